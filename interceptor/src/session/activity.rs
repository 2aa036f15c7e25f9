//! What a session is doing now, as the gate records it and the live-session listing shows it,
//! and whether it was asked to end.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use interceptor_wire::message::PgError;

/// SQLSTATE admin_shutdown, what PostgreSQL sends for `pg_terminate_backend` and a shutdown.
pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
/// Longest statement text shown in a listing.
const MAX_SHOWN_SQL: usize = 500;

/// What a session is doing, updated by the gate as statements are decided.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    current: Mutex<Option<String>>,
    /// Set when the session is asked to end: statements sent from then on are not run.
    pub(super) stopping: AtomicBool,
}

impl Activity {
    /// The error for a statement that arrives after the session was asked to end.
    pub(crate) fn refuse_if_stopping(&self) -> Option<PgError> {
        self.stopping.load(Ordering::SeqCst).then(|| {
            PgError::error(
                ADMIN_SHUTDOWN,
                "interceptor is ending this session; the statement was not run",
            )
        })
    }

    /// The statement most recently sent upstream (shown while it runs, and after as "last").
    pub(crate) fn statement(&self, sql: &str) {
        let shown = if sql.to_ascii_lowercase().contains("password") {
            // The listing is not the audit trail: never show what may carry a secret.
            "[redacted] (statement mentions a password)".to_owned()
        } else {
            let mut end = sql.len().min(MAX_SHOWN_SQL);
            while !sql.is_char_boundary(end) {
                end -= 1;
            }
            sql[..end].to_owned()
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(shown);
    }

    pub(super) fn current(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
