//! Matching rules against classified statements and combining per-statement verdicts into
//! one decision for the query. The order is documented in docs/policy.md.

use std::borrow::Cow;
use std::time::SystemTime;

use super::glob::Glob;
use super::model::{DecisionKind, IdentityMatch};
use super::rules::{DecidedStatements, Decision, Policy, Rule, Verdict};
use super::session::SessionStatements;
use crate::identity::Identity;
use interceptor_sql::classify::{Classified, Unclassifiable};

/// Does the identity section select `who`?
pub(crate) fn identity_matches(m: &IdentityMatch, who: &Identity) -> bool {
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
    pub(crate) fn matches(&self, s: &Classified, now: SystemTime) -> bool {
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

    /// For an allow rule that would match if it accepted more risks: the risks it lacks.
    fn missing_risks(
        &self,
        s: &Classified,
        now: SystemTime,
    ) -> Option<Vec<interceptor_sql::statement::Risk>> {
        if self.decision != DecisionKind::Allow {
            return None;
        }
        let accepted = self.risks.as_deref().unwrap_or(&[]);
        let missing: Vec<_> = s
            .risks
            .iter()
            .filter(|r| !accepted.contains(r))
            .copied()
            .collect();
        if missing.is_empty() {
            return None;
        }
        let mut covered = s.clone();
        covered.risks.retain(|r| accepted.contains(r));
        self.matches(&covered, now).then_some(missing)
    }

    fn verdict(&self, policy: &Policy, s: &Classified) -> Verdict {
        match self.decision {
            DecisionKind::Allow => Verdict::Allow,
            DecisionKind::Deny => Verdict::Deny {
                sqlstate: self.sqlstate.clone(),
                message: format!(
                    "interceptor: {} refused by rule {:?} of policy {:?}{}{}{}",
                    s.command,
                    self.name,
                    policy.name,
                    // The risks this rule matched on, when it names some.
                    match &self.risks {
                        Some(rs) => {
                            let hit: Vec<String> = s
                                .risks
                                .iter()
                                .filter(|r| rs.contains(r))
                                .map(|r| risk_name(*r))
                                .collect();
                            if hit.is_empty() {
                                String::new()
                            } else {
                                format!(" (risk: {})", hit.join(", "))
                            }
                        }
                        None => String::new(),
                    },
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

pub(crate) fn unparseable_decision(policy: &Policy, e: &Unclassifiable) -> Decision {
    let verdict = match &policy.unparseable {
        // A syntax error is PostgreSQL's own: the server would refuse it too, so it is
        // reported as the server reports it and never held for approval.
        _ if matches!(e, Unclassifiable::Syntax { .. }) => Verdict::Deny {
            sqlstate: e.sqlstate().to_owned(),
            message: e.to_string(),
        },
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
        statements: DecidedStatements::default(),
        statement_rules: Vec::new(),
        syntax_position: e.position(),
        tree: None,
    }
}

pub(crate) fn decide_statements(
    policy: &Policy,
    classified: DecidedStatements,
    session: &SessionStatements,
    now: SystemTime,
) -> Decision {
    // PREPAREs earlier in the same query are visible to its later EXECUTEs.
    let mut local = SessionStatements::new();
    // The statements as decided: the classification itself unless an EXECUTE stands for what
    // it runs, then a list of their own.
    let mut resolved_list = classified
        .iter()
        .any(|s| s.executes.is_some())
        .then(|| Vec::with_capacity(classified.len()));
    let mut rules = Vec::with_capacity(classified.len());
    let mut deny: Option<(Verdict, Option<String>)> = None;
    let mut approve: Option<Verdict> = None;
    let mut allow_rules: Vec<&str> = Vec::new();
    for s in classified.iter() {
        let resolved: Cow<'_, Classified> = match &s.executes {
            Some(name) => match local.get(name).or_else(|| session.get(name)) {
                Some(p) => {
                    let mut r = p.clone();
                    r.command = "EXECUTE".to_owned();
                    r.executes = Some(name.clone());
                    r.span = s.span;
                    Cow::Owned(r)
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
                    if let Some(list) = resolved_list.as_mut() {
                        list.push(s.clone());
                    }
                    rules.push(None);
                    continue;
                }
            },
            None => Cow::Borrowed(s),
        };
        local.apply(&resolved);
        match policy.rules.iter().find(|r| r.matches(&resolved, now)) {
            Some(rule) => {
                let v = rule.verdict(policy, &resolved);
                match &v {
                    Verdict::Allow => {
                        if !allow_rules.contains(&rule.name.as_str()) {
                            allow_rules.push(&rule.name);
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
                // Name the risk that kept the closest allow rule from matching, if one did.
                let near = policy
                    .rules
                    .iter()
                    .find_map(|r| r.missing_risks(&resolved, now).map(|m| (r, m)));
                let message = match near {
                    Some((rule, missing)) => {
                        let names: Vec<String> = missing.iter().map(|r| risk_name(*r)).collect();
                        format!(
                            "interceptor: {} ({}) is not allowed by policy {:?}: rule {:?} \
                             matches it but does not accept the risk {} (no other rule matched; \
                             the default is deny); add it to the rule's `risks` (or \
                             risks = [\"any\"]) or ask the security team",
                            resolved.command,
                            resolved.kind.as_str(),
                            policy.name,
                            rule.name,
                            names.join(", ")
                        )
                    }
                    None => format!(
                        "interceptor: {} ({}{}) is not allowed by policy {:?} (no rule matched; \
                         the default is deny); ask the security team for a rule",
                        resolved.command,
                        resolved.kind.as_str(),
                        resolved
                            .risks
                            .iter()
                            .map(|r| format!(", risk {}", risk_name(*r)))
                            .collect::<String>(),
                        policy.name
                    ),
                };
                deny.get_or_insert((
                    Verdict::Deny {
                        sqlstate: "42501".to_owned(),
                        message,
                    },
                    None,
                ));
                rules.push(None);
            }
        }
        if let Some(list) = resolved_list.as_mut() {
            list.push(resolved.into_owned());
        }
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
        statements: resolved_list.map_or(classified, DecidedStatements::from),
        statement_rules: rules,
        syntax_position: None,
        tree: None,
    }
}

/// Several statements needing approval: the first rule names the request, the strictest
/// settings of all apply (most approvals, shortest timeout, approver groups of the first).
pub(crate) fn merge_approval(acc: &mut Option<Verdict>, next: Verdict) {
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

/// A risk as spelled in policy files (its serde name).
fn risk_name(r: interceptor_sql::statement::Risk) -> String {
    match serde_json::to_value(r) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{r:?}"),
    }
}
