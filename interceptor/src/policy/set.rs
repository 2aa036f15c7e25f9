//! A loaded, validated set of policies and the decisions it makes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::classify::{Classified, Unclassifiable, classify};
use super::error::PolicyError;
use super::glob::Glob;
use super::lexer::LexSettings;
use super::model::{
    DecisionKind, IdentityMatch, KindSpec, Limits, PolicyFile, RuleSpec, default_timeout,
};
use super::session::SessionStatements;
use super::window::Window;
use crate::identity::Identity;

/// Policy files end in `.toml`; policy tests in `.tests.toml` are not policies.
pub const TESTS_SUFFIX: &str = ".tests.toml";

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// Classification results kept per policy set (bounded; cleared when full).
const CACHE_ENTRIES: usize = 4096;

type CacheKey = (String, bool);
type Cached = Arc<Result<Vec<Classified>, Unclassifiable>>;

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub decision: DecisionKind,
    pub kinds: Option<Vec<KindSpec>>,
    pub risks: Option<Vec<super::classify::Risk>>,
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
pub struct Policy {
    pub name: String,
    pub description: String,
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

/// All policies of a directory, in evaluation order.
#[derive(Debug)]
pub struct PolicySet {
    policies: Vec<Policy>,
    version: u64,
    dir: PathBuf,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

/// Where a session logs in upstream, and the limits that apply to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub policy: String,
    pub upstream_role: String,
    pub limits: Limits,
    /// The policy's raw `[mask]` rules (for the masking module).
    pub mask: Vec<toml::Value>,
}

/// A login refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
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
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
            Verdict::Approve { .. } => "approve",
        }
    }
}

/// The decision for one query (all its statements).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that made the decision (`None`: default deny, or no policy).
    pub rule: Option<String>,
    /// The policy that was applied.
    pub policy: Option<String>,
    pub statements: Vec<Classified>,
    /// Rule of each statement, in order (`None` where the default deny applied).
    pub statement_rules: Vec<Option<String>>,
}

impl PolicySet {
    /// Loads every `*.toml` (except `*.tests.toml`) in `dir`. Any error fails the whole load.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::new();
        let mut names: HashMap<String, String> = HashMap::new();
        for path in policy_files(dir)? {
            let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
            let policy = parse_policy(&path, &text)?;
            if let Some(other) = names.insert(policy.name.clone(), path.display().to_string()) {
                return Err(PolicyError::Invalid {
                    path: path.clone(),
                    line: 1,
                    column: 1,
                    message: format!("policy name {:?} is also used by {other}", policy.name),
                });
            }
            policies.push(policy);
        }
        policies.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        Ok(PolicySet {
            policies,
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            dir: dir.to_owned(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A set without policies: every login is refused and every statement denied (for a
    /// daemon started without a policy directory: fail closed).
    pub fn empty() -> PolicySet {
        PolicySet {
            policies: Vec::new(),
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            dir: PathBuf::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Changes on each successful load (a cache key for the proxy).
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The policy that applies to `who` on `database`: the first (by priority, then name)
    /// whose identity match and database list both fit.
    pub fn policy_for(&self, who: &Identity, database: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| {
            identity_matches(&p.identities, who) && p.databases.iter().any(|d| d.matches(database))
        })
    }

    /// At login: which upstream role to use, or a refusal.
    pub fn route(&self, who: &Identity, database: &str) -> Result<Route, Refusal> {
        match self.policy_for(who, database) {
            Some(p) => Ok(Route {
                policy: p.name.clone(),
                upstream_role: p.upstream_role.clone(),
                limits: p.limits.clone(),
                mask: mask_values(p.mask.as_ref()),
            }),
            None => Err(Refusal {
                sqlstate: "28000".to_owned(),
                message: format!(
                    "no policy allows identity {:?} to connect to database {database:?}; \
                     ask the security team to add it to a policy in {}",
                    who.subject,
                    self.dir.display()
                ),
            }),
        }
    }

    /// The raw `[mask]` rules of the policy that applies to `who` on `database`.
    pub fn mask_rules_for(&self, who: &Identity, database: &str) -> Vec<toml::Value> {
        self.policy_for(who, database)
            .map(|p| mask_values(p.mask.as_ref()))
            .unwrap_or_default()
    }

    /// Decides every statement of one Query / Parse text (no prepared statements known).
    pub fn decide(&self, who: &Identity, database: &str, sql: &str, lex: &LexSettings) -> Decision {
        self.decide_in_session(who, database, sql, lex, &SessionStatements::new())
    }

    /// As [`PolicySet::decide`], resolving `EXECUTE name` through the session's prepared
    /// statements (feed it with [`SessionStatements::observe`]).
    pub fn decide_in_session(
        &self,
        who: &Identity,
        database: &str,
        sql: &str,
        lex: &LexSettings,
        session: &SessionStatements,
    ) -> Decision {
        self.decide_at(who, database, sql, lex, session, SystemTime::now())
    }

    /// As [`PolicySet::decide_in_session`] at a given time (for rules with windows).
    pub fn decide_at(
        &self,
        who: &Identity,
        database: &str,
        sql: &str,
        lex: &LexSettings,
        session: &SessionStatements,
        now: SystemTime,
    ) -> Decision {
        let classified = self.classify_cached(sql, lex);
        let Some(policy) = self.policy_for(who, database) else {
            return Decision {
                verdict: Verdict::Deny {
                    sqlstate: "42501".to_owned(),
                    message: format!(
                        "interceptor: no policy covers identity {:?} on database {database:?}",
                        who.subject
                    ),
                },
                rule: None,
                policy: None,
                statements: classified.as_ref().clone().unwrap_or_default(),
                statement_rules: Vec::new(),
            };
        };
        let statements = match classified.as_ref() {
            Ok(s) => s,
            Err(e) => return unparseable_decision(policy, e),
        };
        decide_statements(policy, statements, session, now)
    }

    fn classify_cached(&self, sql: &str, lex: &LexSettings) -> Cached {
        let key = (sql.to_owned(), lex.standard_conforming_strings);
        // A poisoned lock only means another thread panicked mid-insert; the map is still sound.
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return hit.clone();
        }
        let result: Cached = Arc::new(classify(sql, *lex));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, result.clone());
        result
    }
}

fn mask_values(mask: Option<&toml::Value>) -> Vec<toml::Value> {
    match mask {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items.clone(),
        Some(v) => vec![v.clone()],
    }
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PolicyError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".toml") && !name.ends_with(TESTS_SUFFIX) && !name.starts_with('.') {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses and validates one policy file.
pub fn parse_policy(path: &Path, text: &str) -> Result<Policy, PolicyError> {
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| PolicyError::from_toml(path, text, &e))?;
    let name_span = file.policy.name.span();
    let name = file.policy.name.into_inner();
    if name.trim().is_empty() {
        return Err(PolicyError::at(
            path,
            text,
            name_span.start,
            "policy name is empty",
        ));
    }
    let ids = &file.identities;
    if ids.subjects.is_empty() && ids.groups.is_empty() && ids.process.is_none() {
        return Err(PolicyError::at(
            path,
            text,
            text.find("[identities]").unwrap_or(0),
            "[identities] must list subjects, groups or process attributes",
        ));
    }
    if file.login.upstream_role.trim().is_empty() || file.login.databases.is_empty() {
        return Err(PolicyError::at(
            path,
            text,
            text.find("[login]").unwrap_or(0),
            "[login] needs a non-empty upstream_role and at least one database",
        ));
    }
    let unparseable = match &file.unparseable {
        None => default_unparseable(),
        Some(u) => match *u.decision.get_ref() {
            DecisionKind::Deny => default_unparseable(),
            DecisionKind::Approve => {
                if u.approvers.is_empty() || u.approvals == 0 {
                    return Err(PolicyError::at(
                        path,
                        text,
                        u.decision.span().start,
                        "approve needs `approvers` and `approvals` >= 1",
                    ));
                }
                Verdict::Approve {
                    rule: "unparseable".to_owned(),
                    approver_groups: u.approvers.clone(),
                    approvals_required: u.approvals,
                    timeout_secs: u.timeout_secs,
                }
            }
            DecisionKind::Allow => {
                return Err(PolicyError::at(
                    path,
                    text,
                    u.decision.span().start,
                    "unparseable queries can only be denied or sent for approval (never allowed)",
                ));
            }
        },
    };
    let mut rules = Vec::new();
    let mut seen = BTreeSet::new();
    for spec in file.rules {
        let span = spec.name.span();
        if !seen.insert(spec.name.get_ref().clone()) {
            return Err(PolicyError::at(
                path,
                text,
                span.start,
                format!("duplicate rule name {:?}", spec.name.get_ref()),
            ));
        }
        rules.push(validate_rule(path, text, spec, &file.windows)?);
    }
    Ok(Policy {
        name,
        description: file.policy.description,
        priority: file.policy.priority,
        path: path.to_owned(),
        identities: file.identities,
        upstream_role: file.login.upstream_role,
        databases: file.login.databases,
        limits: file.limits,
        unparseable,
        rules,
        mask: file.mask,
    })
}

fn default_unparseable() -> Verdict {
    Verdict::Deny {
        sqlstate: "42601".to_owned(),
        message: String::new(),
    }
}

fn validate_rule(
    path: &Path,
    text: &str,
    spec: RuleSpec,
    windows: &std::collections::BTreeMap<String, Window>,
) -> Result<Rule, PolicyError> {
    let name_span = spec.name.span();
    let (line, col) = super::error::line_col(text, name_span.start);
    let location = format!("{}:{line}:{col}", path.display());
    let name = spec.name.into_inner();
    if name.trim().is_empty() {
        return Err(PolicyError::at(
            path,
            text,
            name_span.start,
            "rule name is empty",
        ));
    }
    let window = match spec.window {
        None => None,
        Some(w) => {
            let span = w.span();
            let wname = w.into_inner();
            match windows.get(&wname) {
                Some(def) => Some((wname, def.clone())),
                None => {
                    return Err(PolicyError::at(
                        path,
                        text,
                        span.start,
                        format!(
                            "rule {name:?} names window {wname:?}, which is not defined under [windows]"
                        ),
                    ));
                }
            }
        }
    };
    let sqlstate = match spec.sqlstate {
        None => "42501".to_owned(),
        Some(s) => {
            let span = s.span();
            let code = s.into_inner();
            if code.len() != 5
                || !code
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            {
                return Err(PolicyError::at(
                    path,
                    text,
                    span.start,
                    "sqlstate must be 5 characters [0-9A-Z]",
                ));
            }
            code
        }
    };
    let approvals = match &spec.approvals {
        None => 1,
        Some(a) => *a.get_ref(),
    };
    if spec.decision == DecisionKind::Approve {
        if spec.approvers.is_empty() {
            return Err(PolicyError::at(
                path,
                text,
                name_span.start,
                format!("approve rule {name:?} needs `approvers` (groups allowed to approve)"),
            ));
        }
        if approvals == 0 {
            let at = spec
                .approvals
                .as_ref()
                .map_or(name_span.start, |a| a.span().start);
            return Err(PolicyError::at(
                path,
                text,
                at,
                "approvals must be at least 1",
            ));
        }
    }
    Ok(Rule {
        name,
        decision: spec.decision,
        kinds: spec.kinds,
        risks: spec.risks,
        tables: spec.tables,
        functions: spec.functions,
        window,
        message: spec.message,
        sqlstate,
        approvers: spec.approvers,
        approvals,
        timeout_secs: spec.timeout_secs.unwrap_or_else(default_timeout),
        location,
    })
}

/// Does the identity section select `who`?
pub fn identity_matches(m: &IdentityMatch, who: &Identity) -> bool {
    let named = m.subjects.is_empty() && m.groups.is_empty()
        || m.subjects.iter().any(|g| g.matches(&who.subject))
        || m.groups
            .iter()
            .any(|g| who.groups.iter().any(|wg| g.matches(wg)));
    if !named {
        return false;
    }
    let Some(pm) = &m.process else {
        return true;
    };
    // Kernel attributes are required when named: no attested process, no match.
    let Some(p) = &who.process else {
        return false;
    };
    (pm.uids.is_empty() || pm.uids.contains(&p.uid))
        && (pm.exes.is_empty()
            || p.exe
                .as_deref()
                .is_some_and(|e| pm.exes.iter().any(|g| g.matches(e))))
        && (pm.cgroups.is_empty()
            || p.cgroup_path
                .as_deref()
                .is_some_and(|c| pm.cgroups.iter().any(|g| g.matches(c))))
}

impl Rule {
    /// Does this rule apply to the statement? `allow` rules are narrow (everything the
    /// statement touches must be covered), `deny`/`approve` rules broad (one hit is enough).
    pub fn matches(&self, s: &Classified, now: SystemTime) -> bool {
        if let Some((_, w)) = &self.window
            && !w.contains(now)
        {
            return false;
        }
        if let Some(kinds) = &self.kinds
            && !kinds.iter().any(|k| k.matches(s.kind))
        {
            return false;
        }
        let table_hit = |t: &String, pats: &Vec<Glob>| pats.iter().any(|p| p.matches(t));
        match self.decision {
            DecisionKind::Allow => {
                let accepted = self.risks.as_deref().unwrap_or(&[]);
                if !s.risks.iter().all(|r| accepted.contains(r)) {
                    return false;
                }
                if let Some(pats) = &self.tables
                    && (!s.names_known || !s.tables.iter().all(|t| table_hit(t, pats)))
                {
                    return false;
                }
                if let Some(pats) = &self.functions
                    && (!s.names_known || !s.functions.iter().all(|f| table_hit(f, pats)))
                {
                    return false;
                }
                true
            }
            DecisionKind::Deny | DecisionKind::Approve => {
                if let Some(risks) = &self.risks
                    && !s.risks.iter().any(|r| risks.contains(r))
                {
                    return false;
                }
                // Unknown tables/functions (`names_known` false) count as a hit: fail closed.
                if let Some(pats) = &self.tables
                    && s.names_known
                    && !s.tables.iter().any(|t| table_hit(t, pats))
                {
                    return false;
                }
                if let Some(pats) = &self.functions
                    && s.names_known
                    && !s.functions.iter().any(|f| table_hit(f, pats))
                {
                    return false;
                }
                true
            }
        }
    }

    fn verdict(&self, policy: &Policy, s: &Classified) -> Verdict {
        match self.decision {
            DecisionKind::Allow => Verdict::Allow,
            DecisionKind::Deny => Verdict::Deny {
                sqlstate: self.sqlstate.clone(),
                message: format!(
                    "interceptor: {} refused by rule {:?} of policy {:?}{}{}",
                    s.command,
                    self.name,
                    policy.name,
                    self.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default(),
                    if self.message.is_none() {
                        "; ask the security team if you need this"
                    } else {
                        ""
                    }
                ),
            },
            DecisionKind::Approve => Verdict::Approve {
                rule: self.name.clone(),
                approver_groups: self.approvers.clone(),
                approvals_required: self.approvals,
                timeout_secs: self.timeout_secs,
            },
        }
    }
}

fn unparseable_decision(policy: &Policy, e: &Unclassifiable) -> Decision {
    let verdict = match &policy.unparseable {
        Verdict::Approve { .. } => policy.unparseable.clone(),
        _ => Verdict::Deny {
            sqlstate: e.sqlstate().to_owned(),
            message: format!(
                "interceptor: query refused: {e}. Statements the policy engine cannot \
                 classify are never run; rewrite the query or ask for approval"
            ),
        },
    };
    let rule = match &verdict {
        Verdict::Approve { .. } => Some("unparseable".to_owned()),
        _ => None,
    };
    Decision {
        verdict,
        rule,
        policy: Some(policy.name.clone()),
        statements: Vec::new(),
        statement_rules: Vec::new(),
    }
}

fn decide_statements(
    policy: &Policy,
    classified: &[Classified],
    session: &SessionStatements,
    now: SystemTime,
) -> Decision {
    // PREPAREs earlier in the same query are visible to its later EXECUTEs.
    let mut local = SessionStatements::new();
    let mut statements = Vec::with_capacity(classified.len());
    let mut rules = Vec::with_capacity(classified.len());
    let mut deny: Option<(Verdict, Option<String>)> = None;
    let mut approve: Option<Verdict> = None;
    let mut allow_rules: Vec<String> = Vec::new();
    for s in classified {
        let resolved = match &s.executes {
            Some(name) => match local.get(name).or_else(|| session.get(name)) {
                Some(p) => {
                    let mut r = p.clone();
                    r.command = "EXECUTE".to_owned();
                    r.executes = Some(name.clone());
                    r.span = s.span;
                    r
                }
                None => {
                    deny.get_or_insert((
                        Verdict::Deny {
                            sqlstate: "26000".to_owned(),
                            message: format!(
                                "interceptor: EXECUTE {name}: prepared statement is unknown to the \
                                 policy engine; PREPARE it in this session first"
                            ),
                        },
                        None,
                    ));
                    statements.push(s.clone());
                    rules.push(None);
                    continue;
                }
            },
            None => s.clone(),
        };
        local.apply(&resolved);
        match policy.rules.iter().find(|r| r.matches(&resolved, now)) {
            Some(rule) => {
                let v = rule.verdict(policy, &resolved);
                match &v {
                    Verdict::Allow => {
                        if !allow_rules.contains(&rule.name) {
                            allow_rules.push(rule.name.clone());
                        }
                    }
                    Verdict::Deny { .. } => {
                        deny.get_or_insert((v, Some(rule.name.clone())));
                    }
                    Verdict::Approve { .. } => merge_approval(&mut approve, v),
                }
                rules.push(Some(rule.name.clone()));
            }
            None => {
                deny.get_or_insert((
                    Verdict::Deny {
                        sqlstate: "42501".to_owned(),
                        message: format!(
                            "interceptor: {} ({}) is not allowed by policy {:?} (no rule matched; \
                             the default is deny); ask the security team for a rule",
                            resolved.command,
                            resolved.kind.as_str(),
                            policy.name
                        ),
                    },
                    None,
                ));
                rules.push(None);
            }
        }
        statements.push(resolved);
    }
    let (verdict, rule) = if let Some((v, r)) = deny {
        (v, r)
    } else if let Some(v) = approve {
        let r = match &v {
            Verdict::Approve { rule, .. } => Some(rule.clone()),
            _ => None,
        };
        (v, r)
    } else {
        (
            Verdict::Allow,
            Some(allow_rules.join(",")).filter(|s| !s.is_empty()),
        )
    };
    Decision {
        verdict,
        rule,
        policy: Some(policy.name.clone()),
        statements,
        statement_rules: rules,
    }
}

/// Several statements needing approval: the first rule names the request, the strictest
/// settings of all apply (most approvals, shortest timeout, approver groups of the first).
fn merge_approval(acc: &mut Option<Verdict>, next: Verdict) {
    match (acc.as_mut(), next) {
        (None, v) => *acc = Some(v),
        (
            Some(Verdict::Approve {
                approvals_required,
                timeout_secs,
                ..
            }),
            Verdict::Approve {
                approvals_required: n,
                timeout_secs: t,
                ..
            },
        ) => {
            *approvals_required = (*approvals_required).max(n);
            *timeout_secs = (*timeout_secs).min(t);
        }
        _ => {}
    }
}
