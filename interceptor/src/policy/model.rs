//! The policy file format (`policies/*.toml`), as deserialized. See docs/policy.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::classify::{Risk, StatementKind};
use super::glob::Glob;
use super::window::Window;

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub policy: PolicyMeta,
    pub identities: IdentityMatch,
    pub login: Login,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub unparseable: Option<UnparseableRule>,
    #[serde(default)]
    pub windows: BTreeMap<String, Window>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    /// Masking rules for the masking module; kept raw, not interpreted here.
    #[serde(default)]
    pub mask: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMeta {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    /// Policies are tried from the highest priority down (ties: by name).
    #[serde(default)]
    pub priority: i64,
}

/// Who the policy applies to. `subjects` and `groups`: any one match selects the identity.
/// `process`: every attribute given must match the kernel-attested client process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityMatch {
    #[serde(default)]
    pub subjects: Vec<Glob>,
    #[serde(default)]
    pub groups: Vec<Glob>,
    #[serde(default)]
    pub process: Option<ProcessMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessMatch {
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub exes: Vec<Glob>,
    #[serde(default)]
    pub cgroups: Vec<Glob>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The PostgreSQL role interceptor logs in as for these identities (least privilege).
    pub upstream_role: String,
    /// Databases these identities may connect to (glob patterns).
    pub databases: Vec<Glob>,
}

/// Per-identity limits the proxy enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Rows returned per statement before the proxy cuts the result off.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Sent upstream as `statement_timeout`.
    #[serde(default)]
    pub statement_timeout_ms: Option<u64>,
    /// Concurrent sessions of one identity under this policy.
    #[serde(default)]
    pub max_sessions: Option<u32>,
}

/// What to do with a query that cannot be parsed or classified (default: deny).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnparseableRule {
    pub decision: Spanned<DecisionKind>,
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default = "one")]
    pub approvals: u32,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionKind {
    Allow,
    Deny,
    Approve,
}

/// A kind in a rule: one statement kind, or `copy` for both COPY directions, or `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindSpec {
    Read,
    Transaction,
    Session,
    CopyTo,
    Write,
    CopyFrom,
    Utility,
    Procedural,
    Ddl,
    Dcl,
    Copy,
    Any,
}

impl KindSpec {
    pub fn matches(self, kind: StatementKind) -> bool {
        use StatementKind as K;
        match self {
            KindSpec::Any => true,
            KindSpec::Copy => matches!(kind, K::CopyTo | K::CopyFrom),
            KindSpec::Read => kind == K::Read,
            KindSpec::Transaction => kind == K::Transaction,
            KindSpec::Session => kind == K::Session,
            KindSpec::CopyTo => kind == K::CopyTo,
            KindSpec::Write => kind == K::Write,
            KindSpec::CopyFrom => kind == K::CopyFrom,
            KindSpec::Utility => kind == K::Utility,
            KindSpec::Procedural => kind == K::Procedural,
            KindSpec::Ddl => kind == K::Ddl,
            KindSpec::Dcl => kind == K::Dcl,
        }
    }
}

/// `[[rule]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Spanned<String>,
    pub decision: DecisionKind,
    #[serde(default)]
    pub description: String,
    /// Statement kinds (absent: any kind).
    #[serde(default)]
    pub kinds: Option<Vec<KindSpec>>,
    /// allow: risks the rule accepts (a statement with any other risk does not match).
    /// deny/approve: the rule matches statements carrying any of these.
    #[serde(default)]
    pub risks: Option<Vec<Risk>>,
    /// allow: every table touched must match; deny/approve: any one is enough.
    #[serde(default)]
    pub tables: Option<Vec<Glob>>,
    /// allow: every function called must match; deny/approve: any one is enough.
    #[serde(default)]
    pub functions: Option<Vec<Glob>>,
    /// Name of a `[windows.NAME]`: the rule only applies while the window is open.
    #[serde(default)]
    pub window: Option<Spanned<String>>,
    /// deny: text for the client (the refusal also names the rule).
    #[serde(default)]
    pub message: Option<String>,
    /// deny: SQLSTATE (default 42501).
    #[serde(default)]
    pub sqlstate: Option<Spanned<String>>,
    /// approve: groups whose members may approve.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// approve: number of distinct approvers required.
    #[serde(default)]
    pub approvals: Option<Spanned<u32>>,
    /// approve: how long to wait for approvals.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

fn one() -> u32 {
    1
}

pub(crate) fn default_timeout() -> u64 {
    900
}
