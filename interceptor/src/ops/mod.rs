//! Running interceptor on a host: logging, the metrics and health endpoint, service-manager
//! readiness, listing and killing live sessions, install and uninstall.

pub mod admin;
pub mod cli;
pub mod ebpf;
pub mod health;
pub mod http;
pub mod install;
pub mod logging;
pub mod notify;
pub mod reload;

// The registry lives below the rooms that count into it (audit, sessions); reachable here too.
pub use crate::metrics;
// Live sessions are the session's own registry; reachable here too.
pub use crate::session::live as sessions;
