//! The per-statement hook point: every Query, Parse, Execute and FunctionCall passes through here
//! before anything is forwarded. This is where policy decides, approvals hold and the audit record is
//! made durable; the relay only carries out what the gate says.

use std::collections::HashMap;
use std::sync::Arc;

use crate::identity::Identity;
use crate::net::message::{PgError, sqlstate};

/// What the relay does with a statement.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it; `record` is the durable audit record its outcome will be attached to.
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

pub struct Gate {
    facts: Arc<SessionFacts>,
    /// Prepared statements: name → SQL, for Execute's audit record.
    statements: HashMap<String, Arc<str>>,
    /// Portals: name → statement SQL.
    portals: HashMap<String, Arc<str>>,
}

impl Gate {
    pub fn new(facts: Arc<SessionFacts>) -> Self {
        Gate {
            facts,
            statements: HashMap::new(),
            portals: HashMap::new(),
        }
    }

    pub fn facts(&self) -> &SessionFacts {
        &self.facts
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
        tracing::debug!(sql, "query");
        Verdict::Forward { record: None }
    }

    /// Parse: decided here, executed (and audited) at Execute.
    pub async fn parse(&mut self, statement: &str, sql: &str, lex: LexState) -> Verdict {
        if let Some(e) = self.lex_check(lex) {
            return Verdict::Refuse(e);
        }
        self.statements.insert(statement.to_owned(), Arc::from(sql));
        Verdict::Forward { record: None }
    }

    pub fn bind(&mut self, portal: &str, statement: &str) {
        if let Some(sql) = self.statements.get(statement) {
            self.portals.insert(portal.to_owned(), sql.clone());
        }
    }

    pub fn close(&mut self, kind: u8, name: &str) {
        match kind {
            b'S' => self.statements.remove(name),
            _ => self.portals.remove(name),
        };
    }

    pub async fn execute(&mut self, portal: &str) -> Verdict {
        let _sql = self.portals.get(portal);
        Verdict::Forward { record: None }
    }

    /// FunctionCall calls a function by OID, outside SQL. Nothing can be decided about it from
    /// SQL text, so it is refused until policy can name functions by OID.
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
