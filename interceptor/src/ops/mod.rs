//! Running interceptor on a host: logging, the metrics and health endpoint, service-manager
//! readiness, listing and killing live sessions, install and uninstall.

pub(crate) mod admin;
pub mod cli;
pub mod ebpf;
pub(crate) mod health;
pub(crate) mod http;
pub mod install;
pub mod logging;
pub(crate) mod notify;
pub(crate) mod reload;
