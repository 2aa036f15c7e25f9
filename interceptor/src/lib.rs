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
pub mod identity;
pub mod mask;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod outbound;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod session;
