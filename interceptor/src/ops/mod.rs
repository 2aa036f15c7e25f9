//! Running interceptor on a host: logging, metrics, health, service-manager readiness, live
//! sessions, install and uninstall.

pub mod logging;
