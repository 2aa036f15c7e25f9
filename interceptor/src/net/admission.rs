//! A bound on connections that have not authenticated yet.
//!
//! Before authentication a connection costs a task, a socket and buffers, and is anonymous:
//! without a bound, a slow or idle crowd of them (slowloris) holds file descriptors until
//! `auth_timeout_ms` ends each one, starving real clients. Past the bound a new connection is
//! refused at once with PostgreSQL's own "too many connections" SQLSTATE.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use interceptor_wire::message::PgError;

/// SQLSTATE too_many_connections.
pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";

#[derive(Clone)]
pub(crate) struct Admission {
    pending: Arc<Semaphore>,
    max: usize,
}

/// Held while a connection has not authenticated; dropped once it has (or is gone).
pub(crate) struct Pending(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub(crate) fn new(max_unauthenticated: usize) -> Self {
        Admission {
            pending: Arc::new(Semaphore::new(max_unauthenticated)),
            max: max_unauthenticated,
        }
    }

    /// A slot for one more unauthenticated connection, or the error to send when none is free.
    pub(crate) fn admit(&self) -> Result<Pending, PgError> {
        self.pending
            .clone()
            .try_acquire_owned()
            .map(Pending)
            .map_err(|_| {
                PgError::fatal(
                    TOO_MANY_CONNECTIONS,
                    format!(
                        "interceptor: too many connections awaiting authentication (limit {})",
                        self.max
                    ),
                )
                .with_hint("retry shortly; the operator can raise [limits] max_unauthenticated")
            })
    }

    /// Connections currently awaiting authentication.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.max - self.pending.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_released_on_drop() {
        let a = Admission::new(2);
        let one = a.admit().unwrap();
        let _two = a.admit().unwrap();
        let refused = a.admit().err().unwrap();
        assert_eq!(refused.code, TOO_MANY_CONNECTIONS);
        assert_eq!(a.pending(), 2);
        drop(one);
        assert!(a.admit().is_ok());
    }
}
