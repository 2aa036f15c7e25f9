//! Policy tests that a team writes next to its policies (`*.tests.toml`), run by
//! `interceptor policy test DIR` and in CI.
//!
//! ```toml
//! [[case]]
//! name = "agents may read orders"
//! identity = "agent-7"
//! groups = ["ai-agents"]
//! database = "app"
//! sql = "SELECT * FROM orders"
//! expect = "allow"            # allow | deny | approve | no_login
//! rule = "read-only"          # optional: the rule that must decide
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use toml::Spanned;

use super::error::PolicyError;
use super::load::TESTS_SUFFIX;
use super::session::SessionStatements;
use super::set::PolicySet;
use crate::identity::{Identity, ProcessIdentity, Proof};
use interceptor_sql::lexer::LexSettings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default, rename = "case")]
    cases: Vec<Spanned<Case>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Expect {
    Allow,
    Deny,
    Approve,
    /// `route` refuses the login.
    NoLogin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    name: Option<String>,
    identity: String,
    #[serde(default)]
    groups: Vec<String>,
    database: String,
    #[serde(default)]
    sql: Option<String>,
    expect: Expect,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default = "yes")]
    standard_conforming_strings: bool,
    /// Kernel-attested process attributes, for policies that match on them.
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    exe: Option<String>,
    #[serde(default)]
    cgroup: Option<String>,
    /// Decide at this Unix time (for rules with windows).
    #[serde(default)]
    at_unix: Option<u64>,
}

fn yes() -> bool {
    true
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaseResult {
    /// `file:line:col` of the case.
    pub location: String,
    pub name: String,
    /// `None` when the case passed.
    pub failure: Option<String>,
}

/// Runs every `*.tests.toml` in `dir` against the policies of `dir`.
pub(crate) fn run_dir(dir: &Path) -> Result<Vec<CaseResult>, PolicyError> {
    let set = PolicySet::load_dir(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PolicyError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(TESTS_SUFFIX))
        .collect();
    files.sort();
    let mut results = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| PolicyError::io(&path, e))?;
        results.extend(run_file(&set, &path, &text)?);
    }
    Ok(results)
}

/// Runs the cases of one test file.
pub(crate) fn run_file(
    set: &PolicySet,
    path: &Path,
    text: &str,
) -> Result<Vec<CaseResult>, PolicyError> {
    let file: TestFile =
        toml::from_str(text).map_err(|e| PolicyError::from_toml(path, text, &e))?;
    let mut out = Vec::new();
    for spanned in file.cases {
        let (line, col) = super::error::line_col(text, spanned.span().start);
        let case = spanned.into_inner();
        let name = case
            .name
            .clone()
            .or_else(|| case.sql.clone())
            .unwrap_or_else(|| format!("login of {}", case.identity));
        out.push(CaseResult {
            location: format!("{}:{line}:{col}", path.display()),
            name,
            failure: run_case(set, &case).err(),
        });
    }
    Ok(out)
}

fn identity_of(case: &Case) -> Identity {
    let process = (case.uid.is_some() || case.exe.is_some() || case.cgroup.is_some()).then(|| {
        ProcessIdentity {
            pid: 0,
            uid: case.uid.unwrap_or(u32::MAX),
            gid: 0,
            comm: String::new(),
            exe: case.exe.clone(),
            cgroup_id: 0,
            cgroup_path: case.cgroup.clone(),
        }
    });
    Identity {
        subject: case.identity.clone(),
        display_name: case.identity.clone(),
        groups: case.groups.clone(),
        proof: if process.is_some() {
            Proof::Kernel
        } else {
            Proof::ScramSha256
        },
        process,
    }
}

fn run_case(set: &PolicySet, case: &Case) -> Result<(), String> {
    let who = identity_of(case);
    let route = set.route(&who, &case.database);
    if case.expect == Expect::NoLogin {
        return match route {
            Err(_) => Ok(()),
            Ok(r) => Err(format!(
                "expected no_login, but policy {:?} routes it",
                r.policy
            )),
        };
    }
    if let Err(refusal) = route {
        return Err(format!("login refused: {}", refusal.message));
    }
    let Some(sql) = &case.sql else {
        return Err("a case that expects a decision needs `sql`".to_owned());
    };
    let lex = LexSettings {
        standard_conforming_strings: case.standard_conforming_strings,
    };
    let now = case
        .at_unix
        .map_or_else(SystemTime::now, |s| UNIX_EPOCH + Duration::from_secs(s));
    let d = set.decide_at(
        &who,
        &case.database,
        sql,
        &lex,
        &SessionStatements::new(),
        now,
    );
    let got = d.verdict.name();
    let want = match case.expect {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
        Expect::Approve => "approve",
        Expect::NoLogin => "no_login",
    };
    if got != want {
        return Err(format!(
            "expected {want}, got {got} (rule {:?}){}",
            d.rule,
            match &d.verdict {
                super::rules::Verdict::Deny { message, .. } => format!(": {message}"),
                _ => String::new(),
            }
        ));
    }
    if let Some(rule) = &case.rule
        && d.rule.as_deref() != Some(rule.as_str())
    {
        return Err(format!("expected rule {rule:?}, decided by {:?}", d.rule));
    }
    Ok(())
}
