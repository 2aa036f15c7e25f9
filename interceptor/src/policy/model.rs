//! The policy file format (`policies/*.toml`), as deserialized. See docs/policy.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use toml::Spanned;

use super::glob::Glob;
use super::window::Window;
use interceptor_sql::statement::{Risk, StatementKind};

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
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
pub(crate) struct PolicyMeta {
    pub name: Spanned<String>,
    /// A note for readers of the policy file: parsed (so a non-string is refused), never used.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted in policy files as documentation")]
    pub description: String,
    /// Policies are tried from the highest priority down (ties: by name).
    #[serde(default)]
    pub priority: i64,
}

/// Who the policy applies to. `subjects` and `groups`: any one match selects the identity.
/// `process`: every attribute given must match the kernel-attested client process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityMatch {
    #[serde(default)]
    pub subjects: Vec<Glob>,
    #[serde(default)]
    pub groups: Vec<Glob>,
    #[serde(default)]
    pub process: Option<ProcessMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcessMatch {
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub exes: Vec<Glob>,
    #[serde(default)]
    pub cgroups: Vec<Glob>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    /// The PostgreSQL role interceptor logs in as for these identities (least privilege).
    pub upstream_role: String,
    /// Databases these identities may connect to (glob patterns).
    pub databases: Vec<Glob>,
}

/// Per-identity limits the proxy enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limits {
    /// Rows returned per statement before the proxy cuts the result off.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Sent upstream as `statement_timeout`.
    #[serde(default)]
    pub statement_timeout_ms: Option<u64>,
    /// Concurrent sessions of one identity under this policy.
    #[serde(default)]
    pub max_sessions: Option<u32>,
    /// Largest protocol message (one row, one parameter) in either direction for these
    /// identities; absent: the config file's `[limits] max_message_bytes`.
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// What the client may set at startup (startup parameters and `options=-c name=value`).
    #[serde(default)]
    pub startup: StartupSettings,
}

/// `[limits.startup]`: startup settings beyond what the rules decide for the equivalent `SET`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartupSettings {
    /// Settings every session starts with; a client asking for another value is refused.
    #[serde(default)]
    pub pin: BTreeMap<String, String>,
    /// Settings a client may never set at startup.
    #[serde(default)]
    pub forbid: Vec<String>,
    /// Settings refused by default (they change identity or load code) that this policy allows.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// What to do with a query that cannot be parsed or classified (default: deny).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnparseableRule {
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
pub(crate) enum DecisionKind {
    Allow,
    Deny,
    Approve,
}

/// A kind in a rule: one statement kind, or `copy` for both COPY directions, or `any`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum KindSpec {
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
    pub(crate) fn matches(self, kind: StatementKind) -> bool {
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
pub(crate) struct RuleSpec {
    pub name: Spanned<String>,
    pub decision: DecisionKind,
    /// A note for readers of the policy file: parsed (so a non-string is refused), never used.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted in policy files as documentation")]
    pub description: String,
    /// Statement kinds (absent: any kind).
    #[serde(default)]
    pub kinds: Option<Vec<KindSpec>>,
    /// allow: risks the rule accepts (a statement with any other risk does not match).
    /// deny/approve: the rule matches statements carrying any of these.
    /// `["any"]` names every risk (a deliberate allow-all, or deny on any risk).
    #[serde(default, deserialize_with = "risks_or_any")]
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

/// Every risk: what `risks = ["any"]` stands for.
pub(crate) const ALL_RISKS: [Risk; 19] = [
    Risk::DeleteWithoutWhere,
    Risk::UpdateWithoutWhere,
    Risk::Drop,
    Risk::Truncate,
    Risk::AlterRole,
    Risk::AlterSystem,
    Risk::CopyProgram,
    Risk::CopyFile,
    Risk::DynamicSql,
    Risk::AnonymousCode,
    Risk::ServerFile,
    Risk::LargeObject,
    Risk::Dblink,
    Risk::SetRole,
    Risk::SessionAuthorization,
    Risk::SearchPath,
    Risk::SideEffectFunction,
    Risk::AdminFunction,
    Risk::UserFunction,
];

/// Position of a risk in [`ALL_RISKS`]; exhaustive, so a new risk cannot be left out of "any".
#[cfg_attr(not(test), allow(dead_code))]
fn risk_index(r: Risk) -> usize {
    use Risk as R;
    match r {
        R::DeleteWithoutWhere => 0,
        R::UpdateWithoutWhere => 1,
        R::Drop => 2,
        R::Truncate => 3,
        R::AlterRole => 4,
        R::AlterSystem => 5,
        R::CopyProgram => 6,
        R::CopyFile => 7,
        R::DynamicSql => 8,
        R::AnonymousCode => 9,
        R::ServerFile => 10,
        R::LargeObject => 11,
        R::Dblink => 12,
        R::SetRole => 13,
        R::SessionAuthorization => 14,
        R::SearchPath => 15,
        R::SideEffectFunction => 16,
        R::AdminFunction => 17,
        R::UserFunction => 18,
    }
}

fn risks_or_any<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Risk>>, D::Error> {
    use serde::de::{Error, IntoDeserializer};
    let Some(words) = Option::<Vec<String>>::deserialize(d)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for w in words {
        if w == "any" {
            out.extend(ALL_RISKS);
            continue;
        }
        let r = Risk::deserialize(w.as_str().into_deserializer())
            .map_err(|e: serde::de::value::Error| D::Error::custom(format!("{e}, or \"any\"")))?;
        out.push(r);
    }
    out.sort();
    out.dedup();
    Ok(Some(out))
}

#[cfg(test)]
mod any_risk_tests {
    use super::*;

    #[test]
    fn any_lists_every_risk_once() {
        for (i, r) in ALL_RISKS.iter().enumerate() {
            assert_eq!(risk_index(*r), i, "{r:?}");
        }
    }

    #[test]
    fn risks_any_parses_and_unknown_words_are_named() {
        #[derive(Deserialize)]
        struct T {
            #[serde(deserialize_with = "risks_or_any")]
            risks: Option<Vec<Risk>>,
        }
        let t: T = toml::from_str(r#"risks = ["any"]"#).unwrap();
        assert_eq!(t.risks.unwrap().len(), ALL_RISKS.len());
        let t: T = toml::from_str(r#"risks = ["drop", "truncate"]"#).unwrap();
        assert_eq!(t.risks.unwrap(), vec![Risk::Drop, Risk::Truncate]);
        let e = toml::from_str::<T>(r#"risks = ["dorp"]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dorp") && e.contains("any"), "{e}");
    }
}
