//! Request routing and the response headers every console answer carries.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::approval::ApprovalError;
use crate::approval::http::{HttpRequest, write_raw};
use crate::approval::model::Scope;

use super::Console;
use super::auth::{Caller, Refusal};
use super::pages;
use super::reply::{Form, Reply, parse_form, security_headers};
use super::session::{
    LOGIN_COOKIE, SESSION_COOKIE, cookie, expired_cookie, login_cookie, session_cookie,
};

/// Paths the console answers (everything else on the listener is the JSON API).
pub(crate) fn is_console_path(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/") || path.starts_with("/console?")
}

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

impl Console {
    /// Answers one console request on `stream`.
    pub(crate) async fn serve<S: AsyncWrite + Unpin>(
        &self,
        req: &HttpRequest,
        cert: Option<&[u8]>,
        stream: &mut S,
    ) {
        let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
        let query = parse_form(query.as_bytes());
        // Exports stream straight to the socket.
        if req.method == "GET" && path == "/console/audit/export" {
            match self.caller(req, cert) {
                Ok(c) if self.is_auditor(&c.session.identity) => {
                    return self.export(&query, stream).await;
                }
                Ok(c) => {
                    let r = self.forbidden(&c, "the audit pages are for the configured auditors");
                    return send(stream, r).await;
                }
                Err(_) => return send(stream, self.signed_out(401)).await,
            }
        }
        let reply = self.route(req, path, &query, cert).await;
        send(stream, reply).await
    }

    async fn route(
        &self,
        req: &HttpRequest,
        path: &str,
        query: &Form,
        cert: Option<&[u8]>,
    ) -> Reply {
        let method = req.method.as_str();
        let segments: Vec<&str> = path.trim_matches('/').split('/').skip(1).collect();
        match (method, segments.as_slice()) {
            ("GET", ["static", "console.css"]) => {
                return Reply::asset("text/css; charset=utf-8", CSS);
            }
            ("GET", ["static", "console.js"]) => {
                return Reply::asset("text/javascript; charset=utf-8", JS);
            }
            ("GET", ["login"]) => return self.start_login().await,
            ("GET", ["auth", "callback"]) => return self.finish_login(req, query).await,
            _ => {}
        }
        let caller = match self.caller(req, cert) {
            Ok(c) => c,
            Err(Refusal::SignIn) => {
                return self.signed_out(if method == "GET" { 200 } else { 401 });
            }
            Err(Refusal::BadCertificate(why)) => {
                return Reply::html(401, pages::message(None, "Certificate refused", &why));
            }
        };
        let set_cookie = caller.set_cookie.clone();
        let form = if method == "POST" {
            let form = parse_form(&req.body);
            if let Err(why) = self.check_action(req, &caller.session, &form) {
                tracing::info!(subject = %caller.session.identity.subject, path, why, "console action refused");
                return Reply::html(
                    403,
                    pages::message(Some(&caller.session), "Action refused", why),
                )
                .with_cookie(set_cookie);
            }
            form
        } else {
            Form::new()
        };
        let reply = match (method, segments.as_slice()) {
            ("GET", [] | [""]) => Reply::redirect("/console/approvals"),
            ("GET", ["approvals"]) => self.approvals_page(&caller, query).await,
            ("GET", ["approvals", "pending"]) => self.pending_fragment(&caller).await,
            ("POST", ["approvals", id, "decide"]) => self.decide(&caller, id, &form).await,
            ("GET", ["grants"]) => self.grants_page(&caller),
            ("POST", ["grants"]) => self.request_grant(&caller, &form).await,
            ("POST", ["grants", id, "revoke"]) => self.revoke(&caller, id, &form).await,
            ("POST", ["logout"]) => {
                if let Some(id) = cookie(req.header("cookie"), SESSION_COOKIE) {
                    self.sessions.close(id);
                }
                return Reply::redirect("/console/approvals")
                    .with_cookie(Some(expired_cookie(SESSION_COOKIE, "Strict")));
            }
            ("GET", ["audit", rest @ ..]) => {
                if !self.is_auditor(&caller.session.identity) {
                    self.forbidden(&caller, "the audit pages are for the configured auditors")
                } else {
                    match rest {
                        [] => self.sessions_page(&caller, query).await,
                        ["sessions", id] => self.replay_page(&caller, id).await,
                        ["verify"] => self.verify_page(&caller).await,
                        _ => self.not_found(&caller),
                    }
                }
            }
            _ => self.not_found(&caller),
        };
        reply.with_cookie(set_cookie)
    }

    fn not_found(&self, c: &Caller) -> Reply {
        Reply::html(
            404,
            pages::message(
                Some(&c.session),
                "Not found",
                "There is no such console page.",
            ),
        )
    }

    fn forbidden(&self, c: &Caller, why: &str) -> Reply {
        Reply::html(403, pages::message(Some(&c.session), "Not allowed", why))
    }

    fn signed_out(&self, status: u16) -> Reply {
        Reply::html(
            status,
            pages::sign_in(self.idp.as_ref().map(|i| i.issuer()), self.mtls.is_some()),
        )
    }

    /// `GET /console/login`: off to the IdP.
    async fn start_login(&self) -> Reply {
        let Some(idp) = &self.idp else {
            return Reply::html(
                404,
                pages::message(
                    None,
                    "No OIDC sign-in",
                    "This console accepts client certificates only.",
                ),
            );
        };
        let (id, login) = self.sessions.start_login();
        match idp.authorize_url(&login).await {
            Ok(url) => Reply::redirect(&url).with_cookie(Some(login_cookie(&id))),
            Err(e) => {
                tracing::warn!(error = %e, "console sign-in: the IdP is not usable");
                Reply::html(
                    502,
                    pages::message(None, "Sign-in unavailable", &e.to_string()),
                )
            }
        }
    }

    /// `GET /console/auth/callback?code&state`: back from the IdP.
    async fn finish_login(&self, req: &HttpRequest, query: &Form) -> Reply {
        let fail = |status: u16, why: &str| {
            Reply::html(status, pages::message(None, "Sign-in failed", why))
                .with_cookie(Some(expired_cookie(LOGIN_COOKIE, "Lax")))
        };
        let Some(idp) = &self.idp else {
            return fail(404, "OIDC sign-in is not configured");
        };
        let Some(login) = cookie(req.header("cookie"), LOGIN_COOKIE)
            .and_then(|id| self.sessions.finish_login(id))
        else {
            return fail(
                400,
                "this sign-in was not started from this browser, or it took too long; sign in again",
            );
        };
        if query.get("state") != Some(&login.state) {
            return fail(
                400,
                "the IdP's answer does not belong to this sign-in (state)",
            );
        }
        if let Some(err) = query.get("error") {
            let detail = query
                .get("error_description")
                .map(String::as_str)
                .unwrap_or("");
            return fail(401, &format!("the IdP refused: {err} {detail}"));
        }
        let Some(code) = query.get("code") else {
            return fail(400, "the IdP sent no code");
        };
        match idp.redeem(code, &login).await {
            Ok(identity) => {
                tracing::info!(subject = %identity.subject, "console sign-in");
                let (id, _) = self.sessions.open(identity, None);
                // The session cookie is SameSite=Strict, so the browser would not send it on a
                // redirect that is still part of the IdP's cross-site navigation: a page that
                // moves on by itself starts a same-site navigation instead.
                let mut r = Reply::html(200, pages::signed_in());
                r.headers
                    .push(("Set-Cookie", session_cookie(&id, self.sessions.ttl())));
                r.headers
                    .push(("Set-Cookie", expired_cookie(LOGIN_COOKIE, "Lax")));
                r
            }
            Err(e) => {
                tracing::info!(error = %e, "console sign-in refused");
                fail(401, &e.to_string())
            }
        }
    }

    /// `POST /console/approvals/{id}/decide`: approve or deny, refused exactly as the API.
    async fn decide(&self, c: &Caller, id: &str, form: &Form) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return self.not_found(c);
        };
        let approve = match form.get("action").map(String::as_str) {
            Some("approve") => true,
            Some("deny") => false,
            _ => {
                return self.refused(
                    c,
                    &ApprovalError::BadRequest("choose approve or deny".into()),
                );
            }
        };
        let reason = form
            .get("reason")
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        let scope = match form.get("scope").map(String::as_str) {
            Some("session") => Scope::Session,
            _ => Scope::Once,
        };
        let who = &c.session.identity;
        match self.service.decide(id, who, approve, reason, scope).await {
            Ok(r) => {
                tracing::info!(subject = %who.subject, id, approve, status = %r.status, "console decision");
                Reply::redirect(&format!("/console/approvals?decided={id}"))
            }
            Err(e) => self.refused(c, &e),
        }
    }

    fn refused(&self, c: &Caller, e: &ApprovalError) -> Reply {
        Reply::html(
            e.http_status(),
            pages::message(Some(&c.session), "Refused", &e.to_string()),
        )
    }

    async fn request_grant(&self, c: &Caller, form: &Form) -> Reply {
        let groups = form
            .get("groups")
            .map(|g| {
                g.split([',', ' '])
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let req = crate::approval::grant::GrantRequest {
            groups,
            policy: form
                .get("policy")
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty()),
            duration: form.get("duration").cloned().unwrap_or_default(),
            reason: form.get("reason").cloned().unwrap_or_default(),
        };
        match self.service.request_grant(&c.session.identity, req).await {
            Ok(r) => Reply::redirect(&format!("/console/grants?requested={}", r.id)),
            Err(e) => self.refused(c, &e),
        }
    }

    async fn revoke(&self, c: &Caller, id: &str, form: &Form) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return self.not_found(c);
        };
        let reason = form
            .get("reason")
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        match self.service.revoke(id, &c.session.identity, reason).await {
            Ok(_) => Reply::redirect("/console/grants"),
            Err(e) => self.refused(c, &e),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, reply: Reply) {
    let mut headers = security_headers(reply.content_type);
    if !reply.headers.iter().any(|(n, _)| *n == "Cache-Control") {
        headers.push(("Cache-Control", "no-store".into()));
    }
    headers.extend(reply.headers);
    if let Err(e) = write_raw(stream, reply.status, &headers, &reply.body).await {
        tracing::debug!(error = %e, "console client went away");
    }
    let _ = stream.shutdown().await;
}
