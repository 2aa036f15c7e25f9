//! Listeners, TLS and the streams they hand out.

pub mod admission;
pub mod stream;
pub mod tls;
