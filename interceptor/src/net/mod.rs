//! Listeners, TLS, the streams they hand out and the reader that frames them.

pub mod admission;
pub mod reader;
pub mod stream;
pub mod tls;
