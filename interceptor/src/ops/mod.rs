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
