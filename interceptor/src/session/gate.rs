//! The per-statement hook point: every Query, Parse, Execute and FunctionCall passes through here
//! before anything is forwarded. Policy decides here, approvals will hold here, and the audit
//! record is made durable here; the relay only carries out what the gate says.

use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::Identity;
use crate::net::message::{PgError, sqlstate};
use crate::policy::{Decision, LexSettings, PolicyHandle, PolicySet, SessionStatements};

/// What the relay does with a statement.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it; `record` is the audit record its outcome will be attached to.
    Forward { record: Option<u64> },
    /// Do not forward it; the client gets this error and the session stays usable.
    Refuse(PgError),
}

/// Facts about the session the gate decides with.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    pub session_id: u64,
    pub identity: Identity,
    pub database: String,
    pub upstream_role: String,
    pub policy: String,
}

/// Lexer-relevant server settings, as last reported by ParameterStatus.
#[derive(Debug, Clone, Copy)]
pub struct LexState {
    pub standard_conforming_strings: bool,
    pub client_encoding_utf8: bool,
}

/// Outcome of a forwarded statement, for the audit trail.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub command_tags: Vec<String>,
    pub rows: u64,
    pub sqlstate: Option<String>,
    pub error: Option<String>,
    pub duration_us: u64,
    pub skipped: bool,
}

/// Decisions are cached per SQL text for the policy version they were made under; drivers send
/// the same few texts over and over (pgbench `-M extended` parses every statement anew).
const DECISION_CACHE_LIMIT: usize = 1024;

struct Prepared {
    sql: Arc<str>,
    decision: Arc<Decision>,
    version: u64,
}

pub struct Gate {
    facts: Arc<SessionFacts>,
    policy: PolicyHandle,
    cache: HashMap<Arc<str>, (u64, Arc<Decision>)>,
    /// SQL-level PREPARE names, for EXECUTE.
    sql_prepared: SessionStatements,
    /// Protocol-level prepared statements by name.
    statements: HashMap<String, Arc<Prepared>>,
    /// Portals by name → their statement.
    portals: HashMap<String, Arc<Prepared>>,
}

impl Gate {
    pub fn new(facts: Arc<SessionFacts>, policy: PolicyHandle) -> Self {
        Gate {
            facts,
            policy,
            cache: HashMap::new(),
            sql_prepared: SessionStatements::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
        }
    }

    pub fn facts(&self) -> &SessionFacts {
        &self.facts
    }

    fn decide(&mut self, policy: &PolicySet, sql: &str, lex: LexState) -> Arc<Decision> {
        let version = policy.version();
        if let Some((v, d)) = self.cache.get(sql)
            && *v == version
        {
            return d.clone();
        }
        let lex = LexSettings {
            standard_conforming_strings: lex.standard_conforming_strings,
        };
        let f = &self.facts;
        let decision = Arc::new(policy.decide_in_session(
            &f.identity,
            &f.database,
            sql,
            &lex,
            &self.sql_prepared,
        ));
        // EXECUTE depends on session state (what was PREPAREd), so its decision is not cached.
        let stateful = decision
            .statements
            .iter()
            .any(|s| s.executes.is_some() || s.prepares.is_some() || s.deallocates.is_some());
        if !stateful {
            if self.cache.len() >= DECISION_CACHE_LIMIT {
                self.cache.clear();
            }
            self.cache
                .insert(Arc::from(sql), (version, decision.clone()));
        }
        decision
    }

    /// Turns a decision into what the relay does.
    fn verdict(&mut self, decision: &Decision) -> Verdict {
        use crate::policy::Verdict as P;
        match &decision.verdict {
            P::Allow => {
                self.sql_prepared.observe(&decision.statements);
                Verdict::Forward { record: None }
            }
            P::Deny { sqlstate, message } => {
                let rule = decision.rule.as_deref().unwrap_or("default deny");
                tracing::info!(rule, "statement refused by policy");
                Verdict::Refuse(
                    PgError::error(sqlstate.clone(), message.clone())
                        .with_detail(format!(
                            "policy \"{}\", rule \"{rule}\"",
                            decision.policy.as_deref().unwrap_or(&self.facts.policy)
                        ))
                        .with_hint(
                            "run `interceptor policy explain` with this statement to see why, \
                             or ask your security team for access",
                        ),
                )
            }
            P::Approve {
                rule,
                approver_groups,
                ..
            } => {
                tracing::info!(rule, "statement needs approval");
                Verdict::Refuse(
                    PgError::error(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!(
                            "interceptor: this statement needs approval by {} (rule \"{rule}\")",
                            approver_groups.join(" or ")
                        ),
                    )
                    .with_hint("ask an approver to grant time-bound access, then retry"),
                )
            }
        }
    }

    fn lex_check(&self, lex: LexState) -> Option<PgError> {
        (!lex.client_encoding_utf8).then(|| {
            PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "interceptor only inspects SQL sent in UTF8",
            )
            .with_hint("SET client_encoding = 'UTF8' and retry")
        })
    }

    /// A simple-protocol Query (possibly several statements).
    pub async fn query(&mut self, sql: &str, lex: LexState) -> Verdict {
        if let Some(e) = self.lex_check(lex) {
            return Verdict::Refuse(e);
        }
        let policy = self.policy.current();
        let decision = self.decide(&policy, sql, lex);
        self.verdict(&decision)
    }

    /// Parse: decided here, enforced (re-decided if the policy changed) and audited at Execute.
    pub async fn parse(&mut self, statement: &str, sql: &str, lex: LexState) -> Verdict {
        if let Some(e) = self.lex_check(lex) {
            return Verdict::Refuse(e);
        }
        let policy = self.policy.current();
        let decision = self.decide(&policy, sql, lex);
        let verdict = self.verdict(&decision);
        if matches!(verdict, Verdict::Forward { .. }) {
            self.statements.insert(
                statement.to_owned(),
                Arc::new(Prepared {
                    sql: Arc::from(sql),
                    decision,
                    version: policy.version(),
                }),
            );
        } else {
            self.statements.remove(statement);
        }
        verdict
    }

    pub fn bind(&mut self, portal: &str, statement: &str) {
        match self.statements.get(statement) {
            Some(p) => {
                self.portals.insert(portal.to_owned(), p.clone());
            }
            None => {
                self.portals.remove(portal);
            }
        }
    }

    pub fn close(&mut self, kind: u8, name: &str) {
        match kind {
            b'S' => self.statements.remove(name),
            _ => self.portals.remove(name),
        };
    }

    pub async fn execute(&mut self, portal: &str, lex: LexState) -> Verdict {
        let Some(prepared) = self.portals.get(portal).cloned() else {
            // Not a portal we allowed: PostgreSQL does not know it either (its Parse was refused
            // or never sent), so it will answer with its own error.
            return Verdict::Forward { record: None };
        };
        let policy = self.policy.current();
        if prepared.version != policy.version() {
            // The policy changed since Parse: enforce the current one.
            let decision = self.decide(&policy, &prepared.sql, lex);
            return self.verdict(&decision);
        }
        let _ = &prepared.decision;
        Verdict::Forward { record: None }
    }

    /// FunctionCall calls a function by OID, outside SQL. Nothing can be decided about it from
    /// SQL text, so it is refused.
    pub async fn function_call(&mut self) -> Verdict {
        Verdict::Refuse(
            PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "the FunctionCall protocol message is not allowed through interceptor",
            )
            .with_hint("call the function with SELECT instead"),
        )
    }
}

/// Records what forwarded statements did; used by the upstream → client direction.
pub struct Recorder {
    facts: Arc<SessionFacts>,
}

impl Recorder {
    pub fn new(facts: Arc<SessionFacts>) -> Self {
        Recorder { facts }
    }

    /// A forwarded statement finished.
    pub fn outcome(&self, record: Option<u64>, outcome: Outcome) {
        tracing::debug!(
            session = self.facts.session_id,
            ?record,
            ?outcome,
            "outcome"
        );
    }
}
