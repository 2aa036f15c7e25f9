//! A validated policy and its rules, and what deciding a query produces (verdict, decision).
//! Loading builds these, deciding reads them, the policy set holds them.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::glob::Glob;
use super::model::{DecisionKind, IdentityMatch, KindSpec, Limits};
use super::window::Window;
use interceptor_sql::classify::{Classified, Unclassifiable};
use interceptor_sql::pgparse::Tree;
use interceptor_sql::statement::Risk;

/// A validated rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: String,
    pub decision: DecisionKind,
    pub kinds: Option<Vec<KindSpec>>,
    pub risks: Option<Vec<Risk>>,
    pub tables: Option<Vec<Glob>>,
    pub functions: Option<Vec<Glob>>,
    pub window: Option<(String, Window)>,
    pub message: Option<String>,
    pub sqlstate: String,
    pub approvers: Vec<String>,
    pub approvals: u32,
    pub timeout_secs: u64,
    /// Where it was written: `file:line:col`.
    pub location: String,
}

/// One policy (one file).
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub name: String,
    pub priority: i64,
    pub path: PathBuf,
    pub identities: IdentityMatch,
    pub upstream_role: String,
    pub databases: Vec<Glob>,
    pub limits: Limits,
    pub unparseable: Verdict,
    pub rules: Vec<Rule>,
    pub mask: Option<toml::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub(crate) enum Verdict {
    Allow,
    Deny {
        sqlstate: String,
        message: String,
    },
    Approve {
        rule: String,
        approver_groups: Vec<String>,
        approvals_required: u32,
        timeout_secs: u64,
    },
}

impl Verdict {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
            Verdict::Approve { .. } => "approve",
        }
    }
}

/// The statements a decision covers, as a slice: the classification cache's own list, shared
/// (no copy per decision), or a list of their own where `EXECUTE name` was resolved to what
/// `name` was prepared as.
#[derive(Debug, Clone, Default)]
pub(crate) struct DecidedStatements(Listed);

#[derive(Debug, Clone, Default)]
enum Listed {
    #[default]
    None,
    Shared(Arc<Result<Vec<Classified>, Unclassifiable>>),
    Own(Vec<Classified>),
}

impl DecidedStatements {
    /// The cache's classification (none when it is an error).
    pub(crate) fn shared(classified: Arc<Result<Vec<Classified>, Unclassifiable>>) -> Self {
        DecidedStatements(Listed::Shared(classified))
    }
}

impl From<Vec<Classified>> for DecidedStatements {
    fn from(v: Vec<Classified>) -> Self {
        DecidedStatements(Listed::Own(v))
    }
}

impl std::ops::Deref for DecidedStatements {
    type Target = [Classified];

    fn deref(&self) -> &[Classified] {
        match &self.0 {
            Listed::None => &[],
            Listed::Shared(c) => c.as_ref().as_ref().map_or(&[], Vec::as_slice),
            Listed::Own(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a DecidedStatements {
    type Item = &'a Classified;
    type IntoIter = std::slice::Iter<'a, Classified>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for DecidedStatements {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Serialize for DecidedStatements {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

/// The decision for one query (all its statements).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Decision {
    pub verdict: Verdict,
    /// The rule that made the decision (`None`: default deny, or no policy).
    pub rule: Option<String>,
    /// The policy that was applied.
    pub policy: Option<String>,
    pub statements: DecidedStatements,
    /// Rule of each statement, in order (`None` where the default deny applied).
    pub statement_rules: Vec<Option<String>>,
    /// A syntax error's 1-based character position in the query (PostgreSQL's cursor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syntax_position: Option<u32>,
    /// PostgreSQL's parse of the query when it was parsed for this decision (not when its
    /// classification came from the cache): the masking rewrite reads it instead of parsing
    /// the text again. Never recorded.
    #[serde(skip)]
    pub tree: Option<Arc<Tree>>,
}
