//! PostgreSQL wire protocol codecs used by interceptor.
//!
//! * [`frame`]: splitting a byte stream into whole messages by their length header.
//! * [`message`]: encoding the backend messages interceptor originates, and typed views over
//!   frontend messages.

pub mod frame;
pub mod message;
