//! `interceptor policy check|explain|test`: library functions plus the clap subcommand the
//! binary wires in.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::PolicyError;
use super::glob::Glob;
use super::load::TESTS_SUFFIX;
use super::load::{parse_policy, policy_files};
use super::model::{DecisionKind, KindSpec};
use super::rules::{Policy, Rule, Verdict};
use super::set::PolicySet;
use super::testcases;
use crate::identity::{Identity, ProcessIdentity, Proof};
use interceptor_sql::lexer::LexSettings;
use interceptor_sql::statement::{Risk, StatementKind};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Lint a policy directory: errors with file:line:col, warnings for rules that can never
    /// match or are shadowed by earlier ones.
    Check {
        /// The policy directory (`*.toml`).
        dir: PathBuf,
    },
    /// Show the decision for one query, the rule that made it and the classification.
    Explain {
        /// The policy directory (`*.toml`).
        #[arg(long)]
        dir: PathBuf,
        /// The identity's subject, as a login would prove it.
        #[arg(long)]
        identity: String,
        /// A group of the identity (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The database the session is on.
        #[arg(long, default_value = "postgres")]
        database: String,
        /// The statement (or several, separated by `;`) to decide.
        #[arg(long)]
        sql: String,
        /// Decide as if `standard_conforming_strings` were off.
        #[arg(long)]
        no_standard_conforming_strings: bool,
        /// Kernel-attested attributes of the client process.
        #[arg(long)]
        uid: Option<u32>,
        /// Kernel-attested executable path of the client process.
        #[arg(long)]
        exe: Option<String>,
        /// Kernel-attested cgroup path of the client process.
        #[arg(long)]
        cgroup: Option<String>,
    },
    /// Run the policy tests (`*.tests.toml`) of a directory.
    Test {
        /// The policy directory with its `*.tests.toml`.
        dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode output: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs a subcommand, writing a human-readable report to `out`. Returns whether it succeeded
/// (no errors / all tests passed): the binary turns `false` into exit status 1.
pub fn run(cmd: &PolicyCommand, out: &mut dyn Write) -> Result<bool, CliError> {
    match cmd {
        PolicyCommand::Check { dir } => {
            let report = check_dir(dir)?;
            for e in &report.errors {
                writeln!(out, "error: {e}")?;
            }
            for w in &report.warnings {
                writeln!(out, "warning: {}: {}", w.location, w.message)?;
            }
            writeln!(
                out,
                "{} policies, {} errors, {} warnings",
                report.policies,
                report.errors.len(),
                report.warnings.len()
            )?;
            Ok(report.errors.is_empty())
        }
        PolicyCommand::Explain {
            dir,
            identity,
            groups,
            database,
            sql,
            no_standard_conforming_strings,
            uid,
            exe,
            cgroup,
        } => {
            let set = PolicySet::load_dir(dir)?;
            let process =
                (uid.is_some() || exe.is_some() || cgroup.is_some()).then(|| ProcessIdentity {
                    pid: 0,
                    uid: uid.unwrap_or(u32::MAX),
                    gid: 0,
                    comm: String::new(),
                    exe: exe.clone(),
                    cgroup_id: 0,
                    cgroup_path: cgroup.clone(),
                });
            let who = Identity {
                subject: identity.clone(),
                display_name: identity.clone(),
                groups: groups.clone(),
                proof: Proof::ScramSha256,
                process,
            };
            let lex = LexSettings {
                standard_conforming_strings: !no_standard_conforming_strings,
            };
            match set.route(&who, database) {
                Ok(route) => writeln!(
                    out,
                    "login: policy {:?}, upstream role {:?}, limits {}",
                    route.policy,
                    route.upstream_role,
                    serde_json::to_string(&route.limits)?
                )?,
                Err(refusal) => writeln!(out, "login: refused ({})", refusal.message)?,
            }
            let d = set.decide(&who, database, sql, &lex);
            writeln!(out, "decision: {}", d.verdict.name())?;
            writeln!(
                out,
                "rule: {}",
                d.rule.as_deref().unwrap_or("(default deny)")
            )?;
            match &d.verdict {
                Verdict::Deny { sqlstate, message } => {
                    writeln!(out, "refusal: SQLSTATE {sqlstate}: {message}")?
                }
                Verdict::Approve {
                    approver_groups,
                    approvals_required,
                    timeout_secs,
                    ..
                } => writeln!(
                    out,
                    "approval: {approvals_required} of {approver_groups:?} within {timeout_secs}s"
                )?,
                Verdict::Allow => {}
            }
            for (i, s) in d.statements.iter().enumerate() {
                let rule = d.statement_rules.get(i).cloned().flatten();
                writeln!(
                    out,
                    "statement {}: {} rule={}",
                    i + 1,
                    serde_json::to_string(s)?,
                    rule.as_deref().unwrap_or("-")
                )?;
            }
            Ok(true)
        }
        PolicyCommand::Test { dir } => {
            let results = testcases::run_dir(dir)?;
            let failed = results.iter().filter(|r| r.failure.is_some()).count();
            for r in &results {
                match &r.failure {
                    None => writeln!(out, "ok    {}  {}", r.location, r.name)?,
                    Some(f) => writeln!(out, "FAIL  {}  {}: {f}", r.location, r.name)?,
                }
            }
            writeln!(out, "{} cases, {} failed", results.len(), failed)?;
            Ok(failed == 0 && !results.is_empty())
        }
    }
}

/// A lint finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warning {
    pub location: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub(crate) struct CheckReport {
    pub policies: usize,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<Warning>,
}

/// Lints every policy file of `dir` (all errors, not just the first) and the test files'
/// syntax.
pub(crate) fn check_dir(dir: &Path) -> Result<CheckReport, PolicyError> {
    let mut report = CheckReport::default();
    let mut policies = Vec::new();
    for path in policy_files(dir)? {
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_policy(&path, &text) {
                Ok(p) => policies.push(p),
                Err(e) => report.errors.push(e),
            },
            Err(e) => report.errors.push(PolicyError::io(&path, e)),
        }
    }
    report.policies = policies.len();
    for p in &policies {
        report.warnings.extend(lint_policy(p));
    }
    report.warnings.extend(lint_overlaps(&policies));
    if report.errors.is_empty() {
        // Whole-directory checks (duplicate names) and test-file syntax.
        match PolicySet::load_dir(dir) {
            Ok(set) => {
                let tests: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| PolicyError::io(dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_string_lossy().ends_with(TESTS_SUFFIX))
                    .collect();
                for t in tests {
                    let text = std::fs::read_to_string(&t).map_err(|e| PolicyError::io(&t, e))?;
                    if let Err(e) = testcases::run_file(&set, &t, &text) {
                        report.errors.push(e);
                    }
                }
            }
            Err(e) => report.errors.push(e),
        }
    }
    Ok(report)
}

/// Statement kinds a risk can occur with, for risks raised only by statements that contain no
/// expressions (so their kind cannot be raised by a function call).
fn fixed_kinds(risk: Risk) -> Option<&'static [StatementKind]> {
    use StatementKind as K;
    match risk {
        Risk::Drop => Some(&[K::Ddl, K::Dcl]),
        Risk::Truncate => Some(&[K::Ddl]),
        Risk::AlterRole => Some(&[K::Dcl]),
        Risk::AlterSystem => Some(&[K::Utility]),
        Risk::AnonymousCode => Some(&[K::Procedural]),
        _ => None,
    }
}

fn kinds_of(rule: &Rule) -> Vec<StatementKind> {
    StatementKind::ALL
        .into_iter()
        .filter(|k| {
            rule.kinds
                .as_ref()
                .is_none_or(|ks| ks.iter().any(|s| s.matches(*k)))
        })
        .collect()
}

fn is_broad(rule: &Rule) -> bool {
    rule.decision != DecisionKind::Allow
}

/// Rules that can never match, and rules shadowed by an earlier rule.
pub(crate) fn lint_policy(p: &Policy) -> Vec<Warning> {
    let mut out = Vec::new();
    let warn = |rule: &Rule, message: String| Warning {
        location: rule.location.clone(),
        message: format!("rule {:?}: {message}", rule.name),
    };
    if p.rules.is_empty() {
        out.push(Warning {
            location: p.path.display().to_string(),
            message: format!(
                "policy {:?} has no rules: every statement is denied",
                p.name
            ),
        });
    }
    for (i, rule) in p.rules.iter().enumerate() {
        if let Some(reason) = never_matches(rule) {
            out.push(warn(rule, format!("can never match: {reason}")));
            continue;
        }
        if let Some(earlier) = p.rules[..i].iter().find(|a| shadows(a, rule)) {
            out.push(warn(
                rule,
                format!(
                    "is shadowed by rule {:?} ({}), which matches every statement this one does \
                     and comes first",
                    earlier.name, earlier.location
                ),
            ));
        }
    }
    out
}

fn never_matches(rule: &Rule) -> Option<String> {
    if rule.kinds.as_ref().is_some_and(|k| k.is_empty()) {
        return Some("`kinds` is empty".to_owned());
    }
    if let Some((name, w)) = &rule.window
        && w.is_empty()
    {
        return Some(format!("window {name:?} opens and closes at the same time"));
    }
    if is_broad(rule) {
        if rule.risks.as_ref().is_some_and(|r| r.is_empty()) {
            return Some(
                "`risks` is empty (a deny/approve rule needs one risk to match)".to_owned(),
            );
        }
        if let Some(risks) = &rule.risks {
            let kinds = kinds_of(rule);
            let possible = risks.iter().any(|r| match fixed_kinds(*r) {
                None => true,
                Some(ks) => ks.iter().any(|k| kinds.contains(k)),
            });
            if !possible {
                return Some(format!(
                    "none of its risks {risks:?} can occur in a statement of its kinds"
                ));
            }
        }
    }
    None
}

fn kind_spec_covers(a: &[KindSpec], b: &[KindSpec]) -> bool {
    b.iter().all(|kb| {
        StatementKind::ALL
            .into_iter()
            .filter(|k| kb.matches(*k))
            .all(|k| a.iter().any(|ka| ka.matches(k)))
    })
}

fn globs_cover(a: &[Glob], b: &[Glob]) -> bool {
    b.iter().all(|pb| a.iter().any(|pa| pa.covers(pb)))
}

/// Does `a` (earlier) match every statement `b` matches? Conservative: only says yes when sure.
fn shadows(a: &Rule, b: &Rule) -> bool {
    if a.window.is_some() {
        return false;
    }
    let kinds_ok = match (&a.kinds, &b.kinds) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ka), Some(kb)) => kind_spec_covers(ka, kb),
    };
    if !kinds_ok {
        return false;
    }
    if is_broad(a) {
        // a matches when (its risks absent or hit) and (tables absent or hit) …
        let risks_ok = match (&a.risks, &b.risks) {
            (None, _) => true,
            (Some(ra), Some(rb)) if is_broad(b) => rb.iter().all(|r| ra.contains(r)),
            _ => false,
        };
        let list_ok = |la: &Option<Vec<Glob>>, lb: &Option<Vec<Glob>>| match (la, lb) {
            (None, _) => true,
            (Some(pa), Some(pb)) if is_broad(b) => globs_cover(pa, pb),
            _ => false,
        };
        risks_ok && list_ok(&a.tables, &b.tables) && list_ok(&a.functions, &b.functions)
    } else {
        if is_broad(b) {
            return false;
        }
        let ra = a.risks.as_deref().unwrap_or(&[]);
        let rb = b.risks.as_deref().unwrap_or(&[]);
        let list_ok = |la: &Option<Vec<Glob>>, lb: &Option<Vec<Glob>>| match (la, lb) {
            (None, _) => true,
            (Some(pa), Some(pb)) => globs_cover(pa, pb),
            (Some(_), None) => false,
        };
        rb.iter().all(|r| ra.contains(r))
            && list_ok(&a.tables, &b.tables)
            && list_ok(&a.functions, &b.functions)
    }
}

/// Two policies that select the same subject or group on the same database: only the first
/// (by priority, then name) ever applies.
fn lint_overlaps(policies: &[Policy]) -> Vec<Warning> {
    let mut sorted: Vec<&Policy> = policies.iter().collect();
    sorted.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    let mut out = Vec::new();
    for (i, later) in sorted.iter().enumerate() {
        for earlier in &sorted[..i] {
            let same_db = later
                .databases
                .iter()
                .any(|d| earlier.databases.iter().any(|e| e.covers(d)));
            let same_who = earlier.identities.process.is_none()
                && (later
                    .identities
                    .groups
                    .iter()
                    .any(|g| earlier.identities.groups.iter().any(|e| e.covers(g)))
                    || later
                        .identities
                        .subjects
                        .iter()
                        .any(|s| earlier.identities.subjects.iter().any(|e| e.covers(s))));
            if same_db && same_who {
                out.push(Warning {
                    location: later.path.display().to_string(),
                    message: format!(
                        "policy {:?} overlaps policy {:?} (same identities and database), which \
                         is tried first; raise `priority` or narrow [identities]",
                        later.name, earlier.name
                    ),
                });
            }
        }
    }
    out
}
