//! Cancel keys. Clients get interceptor's own BackendKeyData; a CancelRequest carrying it is mapped
//! to the upstream backend that runs the client's query. Upstream keys never leave interceptor.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;

use crate::identity::scram::constant_time_eq;

#[derive(Debug, Clone, Copy)]
pub struct UpstreamKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, UpstreamKey)>>,
}

/// Removes the session's key when the session ends.
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.sessions.lock() {
            m.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    /// Allocates a client-facing key for a session whose upstream key is `upstream`.
    pub fn register(&self, upstream: UpstreamKey) -> CancelKey<'_> {
        let mut rng = rand::thread_rng();
        let secret: i32 = rng.r#gen();
        // A poisoned lock only means another session panicked while holding it; the map is
        // still consistent (single inserts/removes).
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !m.contains_key(&pid) {
                break pid;
            }
        };
        m.insert(pid, (secret, upstream));
        CancelKey {
            registry: self,
            pid,
            secret,
        }
    }

    /// The upstream key for a client's CancelRequest, if the key is genuine.
    pub fn resolve(&self, pid: i32, secret: i32) -> Option<UpstreamKey> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (s, up) = m.get(&pid)?;
        constant_time_eq(&s.to_be_bytes(), &secret.to_be_bytes()).then_some(*up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_resolve_only_with_the_right_secret_and_expire_with_the_session() {
        let reg = CancelRegistry::default();
        let key = reg.register(UpstreamKey { pid: 42, secret: 7 });
        assert_eq!(reg.resolve(key.pid, key.secret).map(|k| k.pid), Some(42));
        assert!(reg.resolve(key.pid, key.secret.wrapping_add(1)).is_none());
        let pid = key.pid;
        let secret = key.secret;
        drop(key);
        assert!(reg.resolve(pid, secret).is_none());
    }
}
