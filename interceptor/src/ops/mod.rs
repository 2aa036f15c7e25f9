//! Running interceptor on a host: logging, metrics, health, service-manager readiness, live
//! sessions, install and uninstall.

pub mod admin;
pub mod cli;
pub mod health;
pub mod http;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod sessions;
