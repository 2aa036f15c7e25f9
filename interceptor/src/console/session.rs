//! Console sessions and sign-ins in progress, in memory (a restart signs everybody out).
//! The browser holds only random ids, in `__Host-` cookies (HttpOnly, Secure, Path=/).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

use crate::identity::Identity;

/// The session cookie: SameSite=Strict, so no other site can make the browser send it.
pub(super) const SESSION_COOKIE: &str = "__Host-interceptor-console";
/// The sign-in cookie lives only between "sign in" and the IdP's redirect back, which is a
/// cross-site navigation: SameSite=Lax, or the browser would not send it on that redirect.
pub(super) const LOGIN_COOKIE: &str = "__Host-interceptor-login";

/// How long a sign-in may take at the IdP.
pub(super) const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Bounds on what unauthenticated callers can make us store.
const MAX_LOGINS: usize = 1000;
const MAX_SESSIONS: usize = 10_000;

/// 32 random bytes, base64url.
pub(super) fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

#[derive(Clone)]
pub(super) struct Session {
    pub identity: Identity,
    /// Sent with every form; compared on every POST.
    pub csrf: String,
    /// Set for a session opened by a client certificate: its SHA-256, so the session never
    /// outlives a change of certificate.
    pub cert_sha256: Option<String>,
    expires: Instant,
}

/// A sign-in waiting for the IdP's redirect.
pub(super) struct PendingLogin {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    started: Instant,
}

pub(super) struct Sessions {
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    logins: Mutex<HashMap<String, PendingLogin>>,
}

impl Sessions {
    pub(super) fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            sessions: Mutex::new(HashMap::new()),
            logins: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // A panic while holding the lock leaves plain data behind: keep serving.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session; returns its cookie value.
    pub(super) fn open(
        &self,
        identity: Identity,
        cert_sha256: Option<String>,
    ) -> (String, Session) {
        let now = Instant::now();
        let mut all = Self::lock(&self.sessions);
        all.retain(|_, s| s.expires > now);
        if all.len() >= MAX_SESSIONS {
            // Oldest first out: a flood of sign-ins cannot exhaust memory.
            if let Some(k) = all
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                all.remove(&k);
            }
        }
        let id = random_token();
        let s = Session {
            identity,
            csrf: random_token(),
            cert_sha256,
            expires: now + self.ttl,
        };
        all.insert(id.clone(), s.clone());
        (id, s)
    }

    pub(super) fn get(&self, id: &str) -> Option<Session> {
        let mut all = Self::lock(&self.sessions);
        match all.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                all.remove(id);
                None
            }
            None => None,
        }
    }

    pub(super) fn close(&self, id: &str) {
        Self::lock(&self.sessions).remove(id);
    }

    /// Starts a sign-in; returns the login cookie value and its state.
    pub(super) fn start_login(&self) -> (String, PendingLogin) {
        let now = Instant::now();
        let mut all = Self::lock(&self.logins);
        all.retain(|_, l| now.duration_since(l.started) < LOGIN_TTL);
        if all.len() >= MAX_LOGINS
            && let Some(k) = all
                .iter()
                .min_by_key(|(_, l)| l.started)
                .map(|(k, _)| k.clone())
        {
            all.remove(&k);
        }
        let id = random_token();
        let make = || PendingLogin {
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
            started: now,
        };
        let login = make();
        let copy = PendingLogin {
            state: login.state.clone(),
            nonce: login.nonce.clone(),
            verifier: login.verifier.clone(),
            started: now,
        };
        all.insert(id.clone(), login);
        (id, copy)
    }

    /// Takes (once) the sign-in the login cookie names.
    pub(super) fn finish_login(&self, id: &str) -> Option<PendingLogin> {
        let l = Self::lock(&self.logins).remove(id)?;
        (l.started.elapsed() < LOGIN_TTL).then_some(l)
    }
}

/// `Set-Cookie` for the session.
pub(super) fn session_cookie(id: &str, ttl: Duration) -> String {
    format!(
        "{SESSION_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        ttl.as_secs()
    )
}

pub(super) fn login_cookie(id: &str) -> String {
    format!(
        "{LOGIN_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        LOGIN_TTL.as_secs()
    )
}

pub(super) fn expired_cookie(name: &str, same_site: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite={same_site}; Max-Age=0")
}

/// The value of cookie `name` in a `Cookie` header.
pub(super) fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Equal without an early exit, so response times do not reveal how much of a token matched.
pub(super) fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
