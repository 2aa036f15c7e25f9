//! Listeners, TLS, the streams they hand out and the reader that frames them.

pub(crate) mod admission;
pub(crate) mod reader;
pub(crate) mod stream;
pub(crate) mod tls;
