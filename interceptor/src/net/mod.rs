//! Listeners, TLS and PostgreSQL wire framing.

pub mod admission;
pub mod frame;
pub mod message;
pub mod stream;
pub mod tls;
