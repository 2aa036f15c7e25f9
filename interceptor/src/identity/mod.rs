//! Who is on the other end of a session. Every provider (static secrets, OIDC, mTLS, kernel
//! attestation) produces the same [`Identity`], so policy and audit never care how it was proven.

pub(crate) mod error;
pub(crate) mod mtls;
pub(crate) mod oidc;
pub(crate) mod process;
pub(crate) mod scram;

use serde::{Deserialize, Serialize};

/// An authenticated actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Stable name used in policy and audit (e.g. `alice`, `svc-etl`, an OIDC `sub` or email).
    pub subject: String,
    /// Human-friendly name for logs and approval prompts.
    pub display_name: String,
    /// Groups used by policy rules.
    pub groups: Vec<String>,
    /// How the identity was proven.
    pub proof: Proof,
    /// Kernel-attested process identity of a local client, when the eBPF programs saw it.
    pub process: Option<ProcessIdentity>,
}

/// The evidence behind an [`Identity`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Proof {
    /// A static identity from the config, proven by SCRAM-SHA-256.
    ScramSha256,
    /// Proven by SCRAM-SHA-256-PLUS: the exchange was also bound to the TLS session's server
    /// certificate (`tls-server-end-point`), so no man in the middle relayed it.
    ScramSha256Plus,
    /// A static identity proven by a cleartext password over TLS.
    PasswordOverTls,
    /// An OIDC JWT presented as the password, validated against the issuer's JWKS.
    Oidc { issuer: String },
    /// A client certificate chained to the configured CA.
    ClientCertificate { subject: String, sha256: String },
    /// A local process whose identity the kernel attested.
    Kernel,
}

/// What the kernel told us about a local client process at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
}

impl Identity {
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}
