//! interceptor: a PostgreSQL gateway that ties every statement to an identity, a policy decision
//! and an audit record.
//!
//! Data flows one way: client frame → decode → identity → policy → (approval) → audit → upstream;
//! backend frame → mask → audit → client.
//!
//! Modules import only those below them: `identity`, `outbound` at the bottom; then `net`,
//! `policy`, `mask`, `ebpf`, `secrets`; `metrics`; `audit`; `approval`; `console`; `config`
//! (which gathers each module's section); `session` (with what every session shares); `ops`;
//! `server`, which composes them into the daemon.

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
pub mod metrics;
pub mod net;
pub mod ops;
pub mod outbound;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod session;
