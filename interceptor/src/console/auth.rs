//! Who is calling: a client certificate (mTLS) or a session cookie from an OIDC sign-in; and
//! the checks every state-changing request passes (same origin, CSRF token).

use sha2::{Digest, Sha256};

use crate::approval::http::HttpRequest;
use crate::identity::mtls::identity_from_cert;

use super::Console;
use super::session::{SESSION_COOKIE, Session, cookie, same_token, session_cookie};

/// A signed-in caller.
pub(super) struct Caller {
    pub session: Session,
    /// `Set-Cookie` to send when the session was opened by this request (client certificate).
    pub set_cookie: Option<String>,
}

/// Why a request is refused before it reaches a page.
pub(super) enum Refusal {
    /// Not signed in (GET: the sign-in page; POST: 401).
    SignIn,
    /// A certificate was presented but does not map to an identity.
    BadCertificate(String),
}

impl Console {
    /// The caller's session. A client certificate wins over a cookie: a session opened by a
    /// certificate is only valid with that same certificate.
    pub(super) fn caller(&self, req: &HttpRequest, cert: Option<&[u8]>) -> Result<Caller, Refusal> {
        let cookie_session =
            cookie(req.header("cookie"), SESSION_COOKIE).and_then(|id| self.sessions.get(id));
        if let (Some(der), Some(mtls)) = (cert, &self.mtls) {
            let sha = hex::encode(Sha256::digest(der));
            if let Some(s) = cookie_session
                && s.cert_sha256.as_deref() == Some(sha.as_str())
            {
                return Ok(Caller {
                    session: s,
                    set_cookie: None,
                });
            }
            let identity = identity_from_cert(der, mtls)
                .map_err(|e| Refusal::BadCertificate(e.to_string()))?;
            let (id, session) = self.sessions.open(identity, Some(sha));
            return Ok(Caller {
                session,
                set_cookie: Some(session_cookie(&id, self.sessions.ttl())),
            });
        }
        match cookie_session {
            // A certificate session without its certificate is not a session.
            Some(s) if s.cert_sha256.is_none() => Ok(Caller {
                session: s,
                set_cookie: None,
            }),
            _ => Err(Refusal::SignIn),
        }
    }

    /// A POST must come from a console page: same origin (when the browser says) and the
    /// session's CSRF token in the form.
    pub(super) fn check_action(
        &self,
        req: &HttpRequest,
        session: &Session,
        form: &super::reply::Form,
    ) -> Result<(), &'static str> {
        if let Some(origin) = req.header("origin")
            && origin.trim_end_matches('/') != self.cfg.origin()
        {
            return Err("the request came from another origin");
        }
        if req
            .header("sec-fetch-site")
            .is_some_and(|s| s == "cross-site")
        {
            return Err("the request came from another site");
        }
        match form.get("csrf") {
            Some(t) if same_token(t, &session.csrf) => Ok(()),
            Some(_) => Err("the CSRF token is wrong (reload the page and try again)"),
            None => Err("the CSRF token is missing (reload the page and try again)"),
        }
    }
}
