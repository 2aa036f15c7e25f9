//! Cancel keys. Clients get the upstream backend's pid with interceptor's own secret; a
//! CancelRequest carrying them is mapped to the upstream key of that session. Upstream secrets
//! never leave interceptor, so knowing another session's pid is not enough to cancel its query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use rand::Rng;

use crate::identity::scram::constant_time_eq;

#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Entry>>,
}

/// Client-facing secret, the upstream key, and the session's own cancel signal.
type Entry = (i32, UpstreamKey, Arc<CancelSignal>);

/// The client's cancels as seen by the session's own waits (approval holds). Counted, not only
/// notified: a cancel that arrives after the client sent its statement but before interceptor
/// started to wait on it must still end that wait.
#[derive(Default)]
pub(crate) struct CancelSignal {
    count: AtomicU64,
    notify: Notify,
    /// Interceptor alone is answering the client (a held statement, nothing of the session
    /// running upstream): a cancel is the hold's only, see [`CancelSignal::answer_locally`].
    local: AtomicU64,
}

/// What a genuine CancelRequest does besides waking the session's own waits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resolved {
    /// PostgreSQL is (or may be) running something of the session: pass the cancel on.
    Forward(UpstreamKey),
    /// Only interceptor's hold was waiting. Passed on, the cancel could reach PostgreSQL
    /// after the client sent its next statement and cancel that one instead.
    Local,
}

/// While alive, the session's cancels are answered by interceptor alone.
pub(crate) struct LocalAnswer<'a>(&'a CancelSignal);

impl Drop for LocalAnswer<'_> {
    fn drop(&mut self) {
        self.0.local.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CancelSignal {
    pub(crate) fn raise(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// How many cancels were raised so far (a mark for [`CancelSignal::after`]).
    pub(crate) fn seen(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Until the guard drops, cancels are not passed on to PostgreSQL: the caller holds a
    /// statement and nothing of the session runs upstream.
    pub(crate) fn answer_locally(&self) -> LocalAnswer<'_> {
        self.local.fetch_add(1, Ordering::SeqCst);
        LocalAnswer(self)
    }

    /// Completes once a cancel later than `mark` was raised (at once if one already was).
    pub(crate) async fn after(&self, mark: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a raise in between is not missed.
            notified.as_mut().enable();
            if self.seen() > mark {
                return;
            }
            notified.await;
        }
    }
}

/// Removes the session's key when the session ends.
pub(crate) struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
    /// Woken by a genuine CancelRequest: ends a wait that is interceptor's own (approval holds).
    pub cancelled: Arc<CancelSignal>,
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
    pub(crate) fn register(&self, upstream: UpstreamKey) -> CancelKey<'_> {
        let mut rng = rand::thread_rng();
        let secret: i32 = rng.r#gen();
        // A poisoned lock only means another session panicked while holding it; the map is
        // still consistent (single inserts/removes).
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // The client sees the backend's real pid (what notifications and pg_stat_activity
        // show); only the secret is interceptor's. Live backends of one server have distinct
        // pids, so a clash means a stale entry or a second upstream: then a random pid.
        let pid = if upstream.pid > 0 && !m.contains_key(&upstream.pid) {
            upstream.pid
        } else {
            loop {
                let pid = rng.gen_range(1..i32::MAX);
                if !m.contains_key(&pid) {
                    break pid;
                }
            }
        };
        let cancelled = Arc::new(CancelSignal::default());
        m.insert(pid, (secret, upstream, cancelled.clone()));
        CancelKey {
            registry: self,
            pid,
            secret,
            cancelled,
        }
    }

    /// What a client's CancelRequest does, if the key is genuine (`None`: ignore it). Also
    /// wakes the session's own waits (a held statement).
    pub(crate) fn resolve(&self, pid: i32, secret: i32) -> Option<Resolved> {
        let m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (s, up, cancelled) = m.get(&pid)?;
        if !constant_time_eq(&s.to_be_bytes(), &secret.to_be_bytes()) {
            return None;
        }
        cancelled.raise();
        Some(if cancelled.local.load(Ordering::SeqCst) > 0 {
            Resolved::Local
        } else {
            Resolved::Forward(*up)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_resolve_only_with_the_right_secret_and_expire_with_the_session() {
        let reg = CancelRegistry::default();
        let key = reg.register(UpstreamKey { pid: 42, secret: 7 });
        assert_eq!(key.pid, 42, "the client sees the real backend pid");
        assert_ne!(key.secret, 7, "but never the upstream secret");
        assert!(matches!(
            reg.resolve(key.pid, key.secret),
            Some(Resolved::Forward(UpstreamKey { pid: 42, secret: 7 }))
        ));
        assert!(
            reg.resolve(42, 7).is_none(),
            "the upstream secret is no key"
        );
        // A second session that reports the same pid (another upstream) gets a distinct one.
        let other = reg.register(UpstreamKey { pid: 42, secret: 8 });
        assert_ne!(other.pid, 42);
        drop(other);
        assert!(reg.resolve(key.pid, key.secret.wrapping_add(1)).is_none());
        let pid = key.pid;
        let secret = key.secret;
        drop(key);
        assert!(reg.resolve(pid, secret).is_none());
    }

    #[test]
    fn a_cancel_during_a_local_answer_wakes_the_hold_and_stays_with_interceptor() {
        let reg = CancelRegistry::default();
        let key = reg.register(UpstreamKey { pid: 42, secret: 7 });
        let mark = key.cancelled.seen();
        {
            let _local = key.cancelled.answer_locally();
            let nested = key.cancelled.answer_locally();
            drop(nested);
            assert!(matches!(
                reg.resolve(key.pid, key.secret),
                Some(Resolved::Local)
            ));
            assert!(key.cancelled.seen() > mark, "the hold hears of it");
        }
        // Once the hold is over, cancels go to PostgreSQL again.
        assert!(matches!(
            reg.resolve(key.pid, key.secret),
            Some(Resolved::Forward(_))
        ));
    }

    #[tokio::test]
    async fn a_cancel_raised_before_the_wait_still_ends_it() {
        let signal = CancelSignal::default();
        let mark = signal.seen();
        signal.raise();
        tokio::time::timeout(std::time::Duration::from_secs(5), signal.after(mark))
            .await
            .expect("the earlier cancel ends the wait");
        // A wait that starts after the cancel it would answer does not end by itself.
        let later = signal.seen();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), signal.after(later))
                .await
                .is_err()
        );
        let waiter = async { signal.after(later).await };
        let raiser = async {
            tokio::task::yield_now().await;
            signal.raise();
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(waiter, raiser)
        })
        .await
        .expect("a cancel during the wait ends it");
    }
}
