//! What a session is doing now, as the gate records it and the live-session listing shows it,
//! and whether it was asked to end.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use interceptor_wire::message::PgError;

/// SQLSTATE admin_shutdown, what PostgreSQL sends for `pg_terminate_backend` and a shutdown.
pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
/// Longest statement text shown in a listing.
const MAX_SHOWN_SQL: usize = 500;
/// A statement mentioning this, in any case, is not shown at all.
const PASSWORD: &[u8] = b"password";

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
        let shown = if sql
            .as_bytes()
            .windows(PASSWORD.len())
            .any(|w| w.eq_ignore_ascii_case(PASSWORD))
        {
            // The listing is not the audit trail: never show what may carry a secret.
            "[redacted] (statement mentions a password)"
        } else {
            let mut end = sql.len().min(MAX_SHOWN_SQL);
            while !sql.is_char_boundary(end) {
                end -= 1;
            }
            &sql[..end]
        };
        // Once per statement: the text goes into the buffer of the previous one.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match current.as_mut() {
            Some(s) => {
                s.clear();
                s.push_str(shown);
            }
            None => *current = Some(shown.to_owned()),
        }
    }

    pub(super) fn current(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_hides_password_statements_and_cuts_long_ones() {
        let a = Activity::default();
        a.statement("ALTER ROLE x PaSsWoRd 'hunter2'");
        let shown = a.current().unwrap_or_default();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.starts_with("[redacted]"), "{shown}");
        a.statement("SELECT 1");
        assert_eq!(a.current().as_deref(), Some("SELECT 1"));
        // Cut at a character boundary: 'é' is two bytes and straddles the limit.
        let long = format!("SELECT '{}é'", "x".repeat(MAX_SHOWN_SQL - 9));
        a.statement(&long);
        let shown = a.current().unwrap_or_default();
        assert!(
            shown.len() < MAX_SHOWN_SQL && long.starts_with(&shown),
            "{shown}"
        );
    }
}
