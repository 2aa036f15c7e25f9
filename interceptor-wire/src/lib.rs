//! PostgreSQL wire protocol codecs used by interceptor. Nothing here touches a socket: the caller
//! reads bytes into a [`frame::FrameBuffer`] and gets whole messages back.
//!
//! * [`frame`]: splitting a byte stream into whole messages by their length header, with the
//!   size limit checked before any memory is reserved.
//! * [`message`]: encoding the backend messages interceptor originates (errors, authentication,
//!   parameter status, ready-for-query), and typed views over frontend messages (Query, Parse,
//!   Bind, Execute, Describe/Close, FunctionCall, SASL, startup parameters).

pub mod frame;
pub mod message;
