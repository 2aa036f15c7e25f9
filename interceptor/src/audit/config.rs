//! `[audit]` in the gateway config: where the trail lives and what "durable" means.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the sled store.
    pub dir: PathBuf,
    /// Ed25519 signing key (PKCS#8 PEM or 32 raw bytes hex) for checkpoints.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Result rows recorded per statement for replay.
    #[serde(default = "default_recorded_rows")]
    pub record_rows: usize,
    /// Sessions older than this many days are removed (0 = keep forever).
    #[serde(default)]
    pub retention_days: u64,
    /// Size bound of the store in MiB (0 = unbounded).
    #[serde(default)]
    pub max_size_mib: u64,
    /// What "durable" means before a statement is forwarded (see [`Durability`]).
    #[serde(default)]
    pub durability: Durability,
    /// With `durability = "write"`: the longest a written record waits for its `fdatasync`.
    #[serde(default = "default_sync_interval")]
    pub sync_interval_ms: u64,
    /// The head-mark file (expected chain head, rewritten at every commit); default
    /// `<dir>.head`, beside the directory so that losing the directory does not lose it.
    #[serde(default)]
    pub head_mark: Option<PathBuf>,
    /// Start even if the store does not match the head-mark file or fails verification,
    /// recording an `audit_gap` record (`interceptor run --accept-audit-gap`).
    #[serde(skip)]
    pub accept_gap: bool,
}

/// When a statement's audit record counts as written, i.e. may the statement go upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// On disk (`fdatasync`ed): survives a crash of interceptor, of the kernel and a power loss.
    #[default]
    Fsync,
    /// Handed to the kernel (`write`) and synced within `sync_interval_ms`: survives a crash or
    /// kill of interceptor, but a kernel crash or power loss can lose the records of the last
    /// interval. Like PostgreSQL's `synchronous_commit = off`, for hosts that accept that.
    Write,
}

fn default_sync_interval() -> u64 {
    200
}

fn default_recorded_rows() -> usize {
    100
}
