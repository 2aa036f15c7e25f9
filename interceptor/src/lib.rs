//! interceptor: a PostgreSQL gateway that ties every statement to an identity, a policy decision
//! and an audit record.
//!
//! Data flows one way: client frame → decode → identity → policy → (approval) → audit → upstream;
//! backend frame → mask → audit → client.
//!
//! Two library crates sit below this one: `interceptor_wire` (PostgreSQL message framing and
//! codecs, no I/O) and `interceptor_sql` (what a statement does: lexer, PostgreSQL's parser,
//! classification). Modules here import only those below them: `identity`, `outbound` at the
//! bottom; then `net`, `policy`, `mask`, `ebpf`, `secrets`; `metrics`; `audit`; `approval`;
//! `console`; `config` (which gathers each module's section); `session` (with what every session
//! shares); `ops`; `server`, which composes them into the daemon.
//!
//! The public face is kept small on purpose (the workspace denies `unreachable_pub`, so anything
//! else is `pub(crate)` and dead code shows): [`server`] (run the daemon, check a configuration),
//! [`config`] (the configuration file), [`cli`] (the binary's subcommands), and for the
//! integration tests [`ebpf`] (steering, doctor), [`mask`] (masking plans and COPY) and
//! [`identity`] (who is connected); `fuzzing` holds the fuzz targets' entry points. Types these
//! name (the configuration sections, say) are public as far as they are reachable from here.

pub(crate) mod approval;
pub(crate) mod audit;
pub mod config;
pub(crate) mod console;
pub mod ebpf;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod mask;
pub(crate) mod metrics;
pub(crate) mod net;
pub(crate) mod ops;
pub(crate) mod outbound;
pub(crate) mod policy;
pub(crate) mod secrets;
pub mod server;
pub(crate) mod session;

/// The subcommands of the `interceptor` binary, one module each (and the password hasher).
pub mod cli {
    pub use crate::approval::cli as approval;
    pub use crate::audit::cli as audit;
    /// `interceptor hash-password`: a SCRAM-SHA-256 verifier for a static identity.
    pub use crate::identity::scram::hash_password;
    pub use crate::ops::cli as sessions;
    pub use crate::ops::ebpf;
    pub use crate::ops::install;
    pub use crate::ops::logging;
    pub use crate::policy::cli as policy;
}
