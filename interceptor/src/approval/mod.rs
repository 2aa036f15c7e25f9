//! Just-in-time approvals of held statements and time-bound grants.
//!
//! When policy says `approve`, the gate calls [`ApprovalService::hold`]: the request is stored
//! durably, approvers decide through the HTTP admin API ([`api`]) or the CLI ([`cli`], over the
//! local unix socket), and [`HeldRequest::wait`] tells the gate what happened. Grants
//! ([`grant`]) give an identity extra groups for a while, approved the same way.
//! Every step is reported as an [`ApprovalEvent`] to the sink the caller connects to the audit
//! log, and optionally to a webhook.

pub(crate) mod api;
pub(crate) mod audit_sink;
pub mod cli;
pub(crate) mod grant;
pub(crate) mod http;
pub(crate) mod model;
pub(crate) mod render;
pub(crate) mod service;
pub(crate) mod store;
mod webhook;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub(crate) use grant::Grant;
pub(crate) use model::{ApprovalEvent, NewRequest, RequestId, RequestKind, Resolution, Status};
pub(crate) use service::{ApprovalService, Elevation, EventSink, HeldRequest};

/// `[approvals]` in the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Directory of the approvals sled database (its own, not the audit store).
    pub dir: PathBuf,
    /// TCP address of the HTTP admin API (callers authenticate with an OIDC bearer token).
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Unix socket of the admin API for the CLI on the DB host (mode 0660; callers are
    /// identified by their uid through `local_approvers`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// POSTed JSON on new, decided and expired requests (https, or http to loopback).
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default = "default_webhook_timeout")]
    pub webhook_timeout_secs: u64,
    /// Wait used when a rule gives no timeout; also how long a grant request stays open.
    #[serde(default = "default_timeout")]
    pub default_timeout_secs: u64,
    /// Groups whose members may approve grant requests.
    #[serde(default)]
    pub grant_approvers: Vec<String>,
    /// Distinct approvals a grant request needs.
    #[serde(default = "default_one")]
    pub grant_approvals: u32,
    /// Longest grant that may be requested.
    #[serde(default = "default_max_grant")]
    pub max_grant_secs: u64,
    /// OS uid (as a string, TOML keys are strings) → who that local user is for the CLI.
    #[serde(default)]
    pub local_approvers: BTreeMap<String, LocalApprover>,
}

/// A local OS user known to the approvals API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalApprover {
    pub subject: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

fn default_timeout() -> u64 {
    900
}
fn default_webhook_timeout() -> u64 {
    5
}
fn default_one() -> u32 {
    1
}
fn default_max_grant() -> u64 {
    8 * 3600
}

impl ApprovalConfig {
    /// A config with defaults for everything but the store directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ApprovalConfig {
            dir: dir.into(),
            http_listen: None,
            socket: None,
            webhook_url: None,
            webhook_timeout_secs: default_webhook_timeout(),
            default_timeout_secs: default_timeout(),
            grant_approvers: Vec::new(),
            grant_approvals: default_one(),
            max_grant_secs: default_max_grant(),
            local_approvers: BTreeMap::new(),
        }
    }

    /// Checks what serde cannot: uids are numbers, the webhook URL is acceptable.
    pub fn validate(&self) -> Result<(), ApprovalError> {
        for uid in self.local_approvers.keys() {
            uid.parse::<u32>().map_err(|_| {
                ApprovalError::Config(format!("local_approvers key {uid:?} is not a uid"))
            })?;
        }
        if let Some(url) = &self.webhook_url {
            webhook::check_url(url)?;
        }
        if self.default_timeout_secs == 0 {
            return Err(ApprovalError::Config(
                "default_timeout_secs must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Why an approvals operation failed. Messages never carry tokens or passwords.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approvals store: {0}")]
    Store(String),
    #[error("invalid approvals config: {0}")]
    Config(String),
    #[error("no request or grant {0}")]
    NotFound(u64),
    #[error("request {id} is already {status}")]
    Closed { id: u64, status: Status },
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("authentication required: {0}")]
    Unauthenticated(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("admin API answered {status}: {message}")]
    Remote { status: u16, message: String },
}

impl From<sled::Error> for ApprovalError {
    fn from(e: sled::Error) -> Self {
        ApprovalError::Store(e.to_string())
    }
}

impl ApprovalError {
    /// HTTP status for the admin API.
    pub fn http_status(&self) -> u16 {
        match self {
            ApprovalError::NotFound(_) => 404,
            ApprovalError::Closed { .. } => 409,
            ApprovalError::Forbidden(_) => 403,
            ApprovalError::Unauthenticated(_) => 401,
            ApprovalError::BadRequest(_) => 400,
            _ => 500,
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
