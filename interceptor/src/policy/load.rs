//! Loading and validating policy files (errors positioned as `file:line:col`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::error::PolicyError;
use super::model::{DecisionKind, PolicyFile, RuleSpec, default_timeout};
use super::rules::{Policy, Rule, Verdict};
use super::window::Window;

/// Policy files end in `.toml`; policy tests in `.tests.toml` are not policies.
pub(crate) const TESTS_SUFFIX: &str = ".tests.toml";

/// The policy files of `dir`: `*.toml` except `*.tests.toml` and hidden files, sorted.
pub(crate) fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
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
pub(crate) fn parse_policy(path: &Path, text: &str) -> Result<Policy, PolicyError> {
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

pub(crate) fn default_unparseable() -> Verdict {
    Verdict::Deny {
        sqlstate: "42601".to_owned(),
        message: String::new(),
    }
}

pub(crate) fn validate_rule(
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
