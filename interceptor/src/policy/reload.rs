//! Hot reload: [`PolicyHandle`] holds the current [`PolicySet`] and a watcher task polls the
//! directory once a second. A broken file keeps the old policy; every reload and every failure
//! is sent as a [`PolicyEvent`] so the proxy can audit it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;

use super::error::PolicyError;
use super::set::PolicySet;

/// How often the watcher looks at the directory.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum PolicyEvent {
    /// A new policy set is in force.
    Reloaded { version: u64, policies: Vec<String> },
    /// The directory changed but did not load; `version` (the old set) stays in force.
    ReloadFailed { version: u64, error: String },
}

/// Shared, cheaply cloned access to the current policy set.
#[derive(Debug, Clone)]
pub(crate) struct PolicyHandle {
    current: Arc<RwLock<Arc<PolicySet>>>,
    events: broadcast::Sender<PolicyEvent>,
}

impl PolicyHandle {
    pub(crate) fn new(set: PolicySet) -> PolicyHandle {
        let (events, _) = broadcast::channel(64);
        PolicyHandle {
            current: Arc::new(RwLock::new(Arc::new(set))),
            events,
        }
    }

    /// Loads `dir` once (startup: a broken directory is an error, there is nothing to keep).
    pub(crate) fn load(dir: &Path) -> Result<PolicyHandle, PolicyError> {
        Ok(PolicyHandle::new(PolicySet::load_dir(dir)?))
    }

    /// The policy set in force now. Hold the `Arc` for the whole decision.
    pub(crate) fn current(&self) -> Arc<PolicySet> {
        // A poisoned lock still holds a complete Arc (swaps are a single assignment).
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reload and audit events.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PolicyEvent> {
        self.events.subscribe()
    }

    /// Loads `dir` now; on success swaps it in, on failure keeps the old set. Either way an
    /// event is sent and returned.
    pub(crate) fn reload(&self, dir: &Path) -> PolicyEvent {
        let event = match PolicySet::load_dir(dir) {
            Ok(set) => {
                let event = PolicyEvent::Reloaded {
                    version: set.version(),
                    policies: set.policies().iter().map(|p| p.name.clone()).collect(),
                };
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                tracing::info!(dir = %dir.display(), ?event, "policy reloaded");
                event
            }
            Err(e) => {
                let version = self.current().version();
                tracing::error!(error = %e, kept_version = version, "policy reload failed; keeping the previous policy");
                PolicyEvent::ReloadFailed {
                    version,
                    error: e.to_string(),
                }
            }
        };
        // No receivers is fine: nobody is auditing yet.
        let _ = self.events.send(event.clone());
        event
    }

    /// Starts a task that reloads `dir` whenever a policy file's name, size or mtime changes.
    /// Returns the event receiver (subscribed before the task starts, so no event is missed).
    pub(crate) fn spawn_watcher(&self, dir: PathBuf) -> broadcast::Receiver<PolicyEvent> {
        let rx = self.subscribe();
        let handle = self.clone();
        // Taken now, not in the task: a change made before the task first runs is still seen.
        let mut seen = fingerprint(&dir);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = fingerprint(&dir);
                if now != seen {
                    seen = now;
                    let d = dir.clone();
                    let h = handle.clone();
                    // Parsing files is blocking work.
                    if tokio::task::spawn_blocking(move || h.reload(&d))
                        .await
                        .is_err()
                    {
                        tracing::error!("policy reload task panicked");
                    }
                }
                if Arc::strong_count(&handle.current) == 1 {
                    // Every other handle is gone: nobody can use a new policy any more.
                    break;
                }
            }
        });
        rx
    }
}

/// Names, sizes and modification times of the `.toml` files in `dir` (errors are part of the
/// fingerprint, so a directory that becomes unreadable triggers a reload attempt too).
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".toml") {
                    continue;
                }
                let meta = entry.metadata().ok();
                out.push((
                    name,
                    meta.as_ref().map_or(0, |m| m.len()),
                    meta.and_then(|m| m.modified().ok()),
                ));
            }
        }
        Err(e) => out.push((format!("<error: {e}>"), 0, None)),
    }
    out.sort();
    out
}
