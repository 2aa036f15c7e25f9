//! interceptor: a PostgreSQL gateway that ties every statement to an identity, a policy decision
//! and an audit record.
//!
//! Data flows one way: client frame → decode → identity → policy → (approval) → audit → upstream;
//! backend frame → mask → audit → client.

pub mod approval;
pub mod audit;
pub mod config;
pub mod console;
pub mod ebpf;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod mask;
pub mod net;
pub mod ops;
pub mod outbound;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod session;
