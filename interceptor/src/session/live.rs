//! Live sessions: who is connected now (for `interceptor sessions` over the admin socket) and
//! how a session is asked to end (an administrator's kill, or the daemon's graceful stop).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::activity::ADMIN_SHUTDOWN;
use super::gate::SessionFacts;
use super::relay;
use interceptor_wire::message::PgError;

/// How long a killed session's running statement may take to end after its cancel.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct Stop {
    message: String,
    /// Running statements may finish until then.
    deadline: Instant,
}

/// One open session.
pub(crate) struct LiveSession {
    pub facts: Arc<SessionFacts>,
    pub peer: String,
    since: SystemTime,
    shared: Arc<relay::Shared>,
    upstream: (i32, i32),
    stop: watch::Sender<Option<Stop>>,
}

impl LiveSession {
    /// Resolves once the session should end, with the FATAL error to send the client: when it
    /// is asked to stop and has no statement running (or the grace period is over).
    pub(crate) async fn stopped(&self) -> PgError {
        let mut rx = self.stop.subscribe();
        let stop = loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                break s;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        // Statements arriving from now on are refused (see `Activity`), so the session goes
        // idle once the running ones finish.
        while self.shared.in_flight() > 0 && Instant::now() < stop.deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        PgError::fatal(ADMIN_SHUTDOWN, stop.message)
    }

    /// Why the session was stopped, if it was.
    pub(crate) fn stop_reason(&self) -> Option<String> {
        self.stop.borrow().as_ref().map(|s| s.message.clone())
    }

    fn request_stop(&self, message: String, grace: Duration) {
        self.facts.activity.stopping.store(true, Ordering::SeqCst);
        self.stop.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(Stop {
                message,
                deadline: Instant::now() + grace,
            });
            true
        });
    }

    fn view(&self) -> SessionView {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters;
        let since_ms = self
            .since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        SessionView {
            id: self.facts.session_id.0,
            identity: self.facts.identity.subject.clone(),
            process: self.facts.identity.process.as_ref().map(|p| {
                format!(
                    "pid={} uid={} {}",
                    p.pid,
                    p.uid,
                    p.exe.as_deref().unwrap_or(&p.comm)
                )
            }),
            peer: self.peer.clone(),
            role: self.facts.upstream_role.clone(),
            database: self.facts.database.clone(),
            policy: self.facts.policy.clone(),
            state: if self.stop.borrow().is_some() {
                "stopping"
            } else if self.shared.in_flight() > 0 {
                "active"
            } else {
                "idle"
            }
            .to_owned(),
            statement: self.facts.activity.current(),
            since: humantime::format_rfc3339_seconds(self.since).to_string(),
            since_ms,
            statements: c.statements.load(Relaxed),
            bytes_from_client: c.bytes_from_client.load(Relaxed),
            bytes_to_client: c.bytes_to_client.load(Relaxed),
            backend_pid: self.upstream.0,
        }
    }
}

/// A session as `interceptor sessions` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionView {
    pub id: u64,
    pub identity: String,
    pub process: Option<String>,
    pub peer: String,
    pub role: String,
    pub database: String,
    pub policy: String,
    /// idle, active (a statement is running) or stopping.
    pub state: String,
    /// The running statement, or the last one.
    pub statement: Option<String>,
    pub since: String,
    pub since_ms: u64,
    pub statements: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// PostgreSQL's backend process serving the session.
    pub backend_pid: i32,
}

/// Every open session.
#[derive(Default)]
pub(crate) struct LiveSessions {
    map: Mutex<HashMap<u64, Arc<LiveSession>>>,
    /// Bytes of sessions that ended (the live ones are read from their counters).
    ended_from_client: AtomicU64,
    ended_to_client: AtomicU64,
}

/// Deregisters the session when it ends.
pub(crate) struct LiveGuard<'a> {
    live: &'a LiveSessions,
    pub session: Arc<LiveSession>,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.live.lock();
        let c = &self.session.shared.counters;
        // Under the map's lock, so a scrape never counts a session twice or not at all.
        self.live.ended_from_client.fetch_add(
            c.bytes_from_client.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.live
            .ended_to_client
            .fetch_add(c.bytes_to_client.load(Ordering::Relaxed), Ordering::Relaxed);
        map.remove(&self.session.facts.session_id.0);
        let f = &self.session.facts;
        crate::metrics::METRICS
            .sessions_open
            .get_or_create(&crate::metrics::SessionLabels {
                identity: f.identity.subject.clone(),
                policy: f.policy.clone(),
            })
            .dec();
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveSession>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn register(
        &self,
        facts: Arc<SessionFacts>,
        peer: String,
        shared: Arc<relay::Shared>,
        upstream: (i32, i32),
    ) -> LiveGuard<'_> {
        let (stop, _) = watch::channel(None);
        let session = Arc::new(LiveSession {
            facts: facts.clone(),
            peer,
            since: SystemTime::now(),
            shared,
            upstream,
            stop,
        });
        let labels = crate::metrics::SessionLabels {
            identity: facts.identity.subject.clone(),
            policy: facts.policy.clone(),
        };
        let m = &crate::metrics::METRICS;
        m.sessions_open.get_or_create(&labels).inc();
        m.sessions.get_or_create(&labels).inc();
        self.lock().insert(facts.session_id.0, session.clone());
        LiveGuard {
            live: self,
            session,
        }
    }

    /// The sessions open now, oldest first.
    pub(crate) fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self.lock().values().map(|s| s.view()).collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Bytes relayed from and to clients, over ended and open sessions.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        let map = self.lock();
        let (mut from, mut to) = (
            self.ended_from_client.load(Ordering::Relaxed),
            self.ended_to_client.load(Ordering::Relaxed),
        );
        for s in map.values() {
            from += s.shared.counters.bytes_from_client.load(Ordering::Relaxed);
            to += s.shared.counters.bytes_to_client.load(Ordering::Relaxed);
        }
        (from, to)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends session `id` (its running statement is cancelled first). Returns the upstream
    /// cancel key when a statement was running, for the caller to send the cancel.
    pub(crate) fn kill(&self, id: u64, by: &str) -> Result<Option<(i32, i32)>, String> {
        let session = self
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("no open session {id}"))?;
        session.request_stop(
            format!("terminating connection due to administrator command ({by})"),
            KILL_GRACE,
        );
        Ok((session.shared.in_flight() > 0).then_some(session.upstream))
    }

    /// Graceful stop: every session ends once its running statement finishes, or at `grace`.
    pub(crate) fn stop_all(&self, grace: Duration) {
        for s in self.lock().values() {
            s.request_stop(
                "terminating connection due to administrator command (interceptor is shutting down)"
                    .to_owned(),
                grace,
            );
        }
    }
}
