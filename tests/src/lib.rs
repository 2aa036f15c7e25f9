//! End-to-end harness for interceptor: throwaway PostgreSQL clusters, interceptor processes,
//! test certificates and the stock PostgreSQL client programs.
//!
//! Everything here uses real parts: a real `initdb`/`postgres`, the real interceptor binary,
//! real crypto and the real `psql`/`pgbench`. Resources are torn down on `Drop`, also when a
//! test panics.

pub mod certs;
pub mod cli;
pub mod conn;
pub mod corpus;
pub mod fixtures;
pub mod net;
pub mod os;
pub mod pg;
pub mod proxy;
pub mod raw;
pub mod reaper;
pub mod stack;

pub use certs::{TestCa, TestCerts};
pub use cli::{CmdOutput, PgCommand};
pub use conn::{ConnParams, SslMode};
pub use pg::{HbaAuth, PgCluster, PgOptions};
pub use proxy::{IdentitySpec, Interceptor, InterceptorSetup};
pub use stack::{ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, Stack, StackOptions, direct_mode};

/// Root of the cargo workspace (the parent of this crate's directory).
pub fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}
