//! Liveness and readiness. Live: the process answers. Ready: the listeners accept, the audit
//! trail is writable, PostgreSQL accepts connections, and the kernel programs are attached
//! when `[ebpf] enabled`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::session::shared::ServerState;

/// Set once every listener accepts; cleared when a graceful stop begins.
static LISTENING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_listening(on: bool) {
    LISTENING.store(on, Ordering::SeqCst);
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub name: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

/// Runs every readiness check (opens, and drops, one connection to PostgreSQL).
pub(crate) async fn readiness(state: &ServerState) -> Readiness {
    let mut checks = Vec::new();
    let listening = LISTENING.load(Ordering::SeqCst);
    checks.push(Check {
        name: "listeners",
        ok: listening,
        detail: (!listening).then(|| "not accepting (starting or stopping)".to_owned()),
    });
    let audit = state.audit.health();
    checks.push(Check {
        name: "audit",
        ok: audit.failed.is_none(),
        detail: audit.failed,
    });
    let upstream = tokio::time::timeout(Duration::from_secs(2), state.upstream.connect()).await;
    let upstream_err = match upstream {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "{}: no answer within 2 s",
            state.upstream.describe()
        )),
    };
    checks.push(Check {
        name: "upstream",
        ok: upstream_err.is_none(),
        detail: upstream_err,
    });
    if state.config.ebpf.enabled {
        let detail = match &state.steering {
            None => Some("kernel programs not loaded".to_owned()),
            Some(st) => match crate::ebpf::status(st.pin_dir()) {
                Ok(s) if s.attached() => None,
                Ok(_) => Some("a kernel program is no longer attached".to_owned()),
                Err(e) => Some(e.to_string()),
            },
        };
        checks.push(Check {
            name: "ebpf",
            ok: detail.is_none(),
            detail,
        });
    }
    Readiness {
        ready: checks.iter().all(|c| c.ok),
        checks,
    }
}
