//! The per-statement hook point: every Query, Parse, Execute and FunctionCall passes through here
//! before anything is forwarded. Policy decides here, approvals will hold here, and the audit
//! record is made durable here; the relay only carries out what the gate says.

use std::sync::Arc;

use super::protocol::{Outcome, Statements};
use crate::audit::{
    AuditError, AuditEvent, AuditLog, QueryProtocol, RecordId, RecordedRows, SessionId,
    StatementOutcome, StatementRecord,
};
use crate::identity::Identity;
use crate::policy::{Decision, PolicyHandle, PolicySet, SessionStatements};
use interceptor_sql::lexer::LexSettings;
use interceptor_sql::pgparse::Tree;
use interceptor_wire::message::{PgError, sqlstate};

/// What the relay does with a statement.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Forward it; `record` is the audit record its outcome will be attached to, `tree` the
    /// parse the decision was made on, when it was parsed for it (the masking rewrite reuses it).
    Forward {
        record: Option<RecordId>,
        tree: Option<Arc<Tree>>,
    },
    /// Do not forward it; the client gets this error and the session stays usable.
    Refuse(PgError),
    /// Policy wants a human decision: the request is recorded and pending. The relay tells the
    /// client, waits, and hands the resolution to [`Gate::after_hold`].
    Hold(Held),
}

/// A statement waiting for approval.
pub(crate) struct Held {
    pub request: crate::approval::HeldRequest,
    meta: HeldStatement,
}

/// What is needed to run a held statement once approved.
pub(crate) struct HeldStatement {
    id: crate::approval::RequestId,
    decision: Arc<Decision>,
    /// The statement's audit record, made when it was held; its outcome attaches to it.
    record: RecordId,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({})", self.meta.id)
    }
}

impl Held {
    /// Splits the waitable request from what the gate needs afterwards.
    pub(crate) fn take_request(self) -> (crate::approval::HeldRequest, HeldStatement) {
        (self.request, self.meta)
    }
}

/// Facts about the session the gate decides with.
#[derive(Debug, Clone)]
pub(crate) struct SessionFacts {
    pub session_id: SessionId,
    pub identity: Identity,
    pub database: String,
    pub upstream_role: String,
    pub policy: String,
    /// What the session is doing now, for `interceptor sessions`.
    pub activity: Arc<super::activity::Activity>,
}

/// Lexer-relevant server settings, as last reported by ParameterStatus.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LexState {
    pub standard_conforming_strings: bool,
    pub client_encoding_utf8: bool,
}

pub(crate) struct Gate {
    facts: Arc<SessionFacts>,
    policy: PolicyHandle,
    /// SQL-level PREPARE names, for EXECUTE.
    sql_prepared: SessionStatements,
    /// Protocol-level prepared statements and portals: the session's one copy. Only the
    /// statements the gate let through at Parse are kept; every Execute is decided anew,
    /// because what allowed it can end between the two (a policy reload, a rule's time window,
    /// a grant's expiry). The policy set caches each statement shape's parse, so deciding
    /// again costs rule matching only.
    statements: Statements,
    audit: AuditLog,
    /// Records appended since the last [`Gate::flush`].
    unsynced: bool,
    approvals: Option<crate::approval::ApprovalService>,
    /// The identity with its active time-bound grants; recomputed when a grant changes or one
    /// of its grants reaches its expiry, so grants start and end exactly.
    elevated: Option<crate::approval::Elevation>,
    /// The session's masking rules: bound parameters are recorded with detected values masked.
    param_mask: Option<crate::mask::MaskRules>,
    /// Names the functions of fast-path calls; without it they are refused.
    functions: Option<super::fastpath::FunctionCatalog>,
}

impl Gate {
    pub(crate) fn new(
        facts: Arc<SessionFacts>,
        policy: PolicyHandle,
        audit: AuditLog,
        approvals: Option<crate::approval::ApprovalService>,
    ) -> Self {
        Gate {
            approvals,
            elevated: None,
            facts,
            policy,
            sql_prepared: SessionStatements::new(),
            statements: Statements::new(false),
            audit,
            unsynced: false,
            param_mask: None,
            functions: None,
        }
    }

    /// Decides fast-path calls (FunctionCall) by the function `functions` names for their OID.
    pub(crate) fn resolve_functions_with(&mut self, functions: super::fastpath::FunctionCatalog) {
        self.functions = Some(functions);
    }

    /// Records bound parameters through the session's content detectors (a parameter cannot
    /// be tied to a column, so column rules do not apply to it), and keeps each portal's
    /// result formats, which masking reads.
    pub(crate) fn mask_parameters(&mut self, rules: crate::mask::MaskRules) {
        self.param_mask = (!rules.is_empty()).then_some(rules);
        self.statements = Statements::new(true);
    }

    /// The session's prepared statements and portals, as the gate let them through.
    pub(crate) fn statements(&self) -> &Statements {
        &self.statements
    }

    /// Waits until every record appended so far is durable. The relay calls this before it
    /// forwards anything, so no statement reaches PostgreSQL ahead of its record.
    pub(crate) async fn flush(&mut self) -> Result<(), AuditError> {
        if std::mem::take(&mut self.unsynced) {
            self.audit.sync().await?;
        }
        Ok(())
    }

    /// Appends the statement's record (durable at the next [`Gate::flush`]).
    fn record(
        &mut self,
        protocol: QueryProtocol,
        sql: &str,
        parameters: Vec<Option<String>>,
        decision: &Decision,
    ) -> Result<RecordId, AuditError> {
        self.record_as(protocol, sql, parameters, decision, None)
    }

    /// Appends the record of a statement held as approval request `held` (or, with `None`,
    /// of a statement decided right away).
    fn record_as(
        &mut self,
        protocol: QueryProtocol,
        sql: &str,
        parameters: Vec<Option<String>>,
        decision: &Decision,
        held: Option<crate::approval::RequestId>,
    ) -> Result<RecordId, AuditError> {
        use crate::policy::Verdict as P;
        let (verdict, deny_sqlstate, reason, approval) = match (&decision.verdict, held) {
            (P::Approve { .. }, Some(id)) => (
                "approve",
                None,
                Some(format!(
                    "held for approval request {id}; it runs only once approved"
                )),
                Some(id.to_string()),
            ),
            (verdict, _) => Self::plain_verdict(verdict),
        };

        let mut tables: Vec<String> = Vec::new();
        for st in &decision.statements {
            for t in &st.tables {
                if !tables.contains(t) {
                    tables.push(t.clone());
                }
            }
        }
        crate::metrics::statement(
            verdict,
            decision.statements.iter().map(|c| c.kind.as_str()),
            deny_sqlstate.as_deref(),
        );
        let mut record = StatementRecord {
            session: self.facts.session_id,
            protocol,
            sql: sql.to_owned(),
            parameters,
            statement_kinds: decision
                .statements
                .iter()
                .map(|c| c.kind.as_str().to_owned())
                .collect(),
            tables,
            decision: verdict.to_owned(),
            rule: decision.rule.clone(),
            deny_sqlstate,
            reason,
            approval,
        };
        crate::audit::redact::redact_record(&mut record, &decision.statements);
        // The listing shows the text as recorded (secrets taken out). Before the append, which
        // takes the record; an append that fails ends the session anyway.
        if verdict == "allow" {
            self.facts.activity.statement(&record.sql);
        }
        let id = self.audit.append(AuditEvent::Statement(record))?;
        self.unsynced = true;
        Ok(id)
    }

    /// The record fields of a decision taken without a hold: decision, SQLSTATE, reason and
    /// the approval rule that was not followed.
    fn plain_verdict(
        verdict: &crate::policy::Verdict,
    ) -> (&'static str, Option<String>, Option<String>, Option<String>) {
        use crate::policy::Verdict as P;
        match verdict {
            P::Allow => ("allow", None, None, None),
            P::Deny { sqlstate, message } => {
                ("deny", Some(sqlstate.clone()), Some(message.clone()), None)
            }
            P::Approve { rule, .. } => (
                "approve",
                Some(sqlstate::INSUFFICIENT_PRIVILEGE.to_owned()),
                Some("approval required; refused (no approval workflow in this session)".into()),
                Some(rule.clone()),
            ),
        }
    }

    /// Puts a statement that needs approval on hold, when approvals are configured.
    async fn hold(
        &mut self,
        protocol: QueryProtocol,
        sql: &str,
        parameters: Vec<Option<String>>,
        decision: &Arc<Decision>,
    ) -> Option<Verdict> {
        let svc = self.approvals.clone()?;
        let f = &self.facts;
        let request = crate::approval::NewRequest::from_decision(
            &f.identity,
            f.session_id.0,
            &f.database,
            sql,
            decision,
        )?;
        Some(match svc.hold(request).await {
            Ok(request) => {
                // The attempt is evidence whatever the approvers decide: its record (SQL,
                // parameters, the request id) is durable before the client is told it waits.
                // On failure the request is dropped, which closes it as aborted.
                let id = request.id();
                match self.record_as(protocol, sql, parameters, decision, Some(id)) {
                    Ok(record) => Verdict::Hold(Held {
                        meta: HeldStatement {
                            id,
                            decision: decision.clone(),
                            record,
                        },
                        request,
                    }),
                    Err(e) => audit_unavailable(e),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record an approval request");
                Verdict::Refuse(PgError::error(
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "interceptor: this statement needs approval, and the request could not be recorded: {e}"
                    ),
                ))
            }
        })
    }

    /// Applies a held statement's resolution: approved statements are recorded (with their
    /// approval) and forwarded exactly as submitted; anything else is refused.
    pub(crate) fn after_hold(
        &mut self,
        held: HeldStatement,
        resolution: crate::approval::Resolution,
    ) -> Verdict {
        let id = held.id;
        if let Some(err) = resolution.refusal(id) {
            return Verdict::Refuse(err);
        }
        if let Some(svc) = &self.approvals {
            svc.executed(id, self.facts.session_id.0, Some(held.record.0));
        }
        // The approval's audit records (vote, granted, executed) are appended by the approvals
        // service; the relay's flush before forwarding must make them durable too.
        self.unsynced = true;
        self.observe(&held.decision.statements);
        Verdict::Forward {
            record: Some(held.record),
            tree: held.decision.tree.clone(),
        }
    }

    /// Records the decision and turns it into what the relay does. Fails closed when the
    /// record cannot be written.
    fn recorded_verdict(
        &mut self,
        protocol: QueryProtocol,
        sql: &str,
        parameters: Vec<Option<String>>,
        decision: &Decision,
    ) -> Verdict {
        match self.record(protocol, sql, parameters, decision) {
            Ok(id) => match self.verdict(decision) {
                Verdict::Forward { tree, .. } => Verdict::Forward {
                    record: Some(id),
                    tree,
                },
                refuse => refuse,
            },
            Err(e) => audit_unavailable(e),
        }
    }

    /// Statements that went upstream: SQL-level PREPARE names for `EXECUTE`, and DEALLOCATE /
    /// DISCARD ALL, which drop protocol-level statements too (one namespace in PostgreSQL).
    /// A name dropped here and bound later is one the session does not know: its Execute is
    /// refused, never decided on a text PostgreSQL no longer has.
    fn observe(&mut self, statements: &[interceptor_sql::classify::Classified]) {
        self.sql_prepared.observe(statements);
        for s in statements {
            match s.deallocates.as_deref() {
                Some("") => self.statements.deallocate_all(),
                Some(name) => self.statements.close(b'S', name),
                None => {}
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn facts(&self) -> &SessionFacts {
        &self.facts
    }

    /// Brings the session's identity as policy sees it up to date with the active grants
    /// (see [`Gate::identity`]); checks a generation number unless grants changed.
    fn refresh_elevation(&mut self) {
        let Some(svc) = &self.approvals else {
            return;
        };
        let generation = svc.grants_generation();
        if let Some(e) = &self.elevated
            && e.is_current(generation, crate::approval::now_ms())
        {
            return;
        }
        let fresh = svc.elevation(&self.facts.identity);
        let changed = self
            .elevated
            .as_ref()
            .is_none_or(|old| old.identity.groups != fresh.identity.groups);
        if changed && fresh.identity.groups != self.facts.identity.groups {
            tracing::info!(groups = ?fresh.identity.groups, "time-bound grant in effect");
        }
        self.elevated = Some(fresh);
    }

    /// The session's identity with the groups of its grants, as of the last
    /// [`Gate::refresh_elevation`].
    fn identity(&self) -> &Identity {
        self.elevated
            .as_ref()
            .map_or(&self.facts.identity, |e| &e.identity)
    }

    /// Decides `sql` now, for the identity as it is now (with its grants). Nothing is cached
    /// per session: a decision can depend on the time (rule windows, grant expiry).
    fn decide(&mut self, policy: &PolicySet, sql: &str, lex: LexState) -> Arc<Decision> {
        self.refresh_elevation();
        let lex = LexSettings {
            standard_conforming_strings: lex.standard_conforming_strings,
        };
        let f = &self.facts;
        Arc::new(policy.decide_in_session(
            self.identity(),
            &f.database,
            sql,
            &lex,
            &self.sql_prepared,
        ))
    }

    /// Turns a decision into what the relay does.
    fn verdict(&mut self, decision: &Decision) -> Verdict {
        use crate::policy::Verdict as P;
        match &decision.verdict {
            P::Allow => {
                self.observe(&decision.statements);
                Verdict::Forward {
                    record: None,
                    tree: decision.tree.clone(),
                }
            }
            P::Deny { sqlstate, message } => {
                let rule = decision.rule.as_deref().unwrap_or("default deny");
                tracing::info!(rule, "statement refused by policy");
                let mut error = PgError::error(sqlstate.clone(), message.clone());
                if let Some(position) = decision.syntax_position {
                    error = error.with_position(position);
                }
                Verdict::Refuse(
                    error
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
        if let Some(e) = self.facts.activity.refuse_if_stopping() {
            return Some(e);
        }
        (!lex.client_encoding_utf8).then(|| {
            PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "interceptor only inspects SQL sent in UTF8",
            )
            .with_hint("SET client_encoding = 'UTF8' and retry")
        })
    }

    /// A simple-protocol Query (possibly several statements).
    pub(crate) async fn query(&mut self, sql: &str, lex: LexState) -> Verdict {
        if let Some(e) = self.lex_check(lex) {
            return Verdict::Refuse(e);
        }
        let policy = self.policy.current();
        let decision = self.decide(&policy, sql, lex);
        if let Some(v) = self
            .hold(QueryProtocol::Simple, sql, Vec::new(), &decision)
            .await
        {
            return v;
        }
        self.recorded_verdict(QueryProtocol::Simple, sql, Vec::new(), &decision)
    }

    /// Parse: decided here, enforced (re-decided if the policy changed) and audited at Execute.
    /// The relay reports what it sent upstream ([`Gate::parsed`], [`Gate::parse_refused`]).
    pub(crate) async fn parse(&mut self, sql: &str, lex: LexState) -> Verdict {
        if let Some(e) = self.lex_check(lex) {
            return Verdict::Refuse(e);
        }
        let policy = self.policy.current();
        let decision = self.decide(&policy, sql, lex);
        let needs_approval = matches!(decision.verdict, crate::policy::Verdict::Approve { .. });
        let verdict = if needs_approval && self.approvals.is_some() {
            // Parsing runs nothing: the statement is held at Execute, where it would run.
            Verdict::Forward {
                record: None,
                tree: decision.tree.clone(),
            }
        } else {
            self.verdict(&decision)
        };
        if let Verdict::Refuse(_) = &verdict {
            // Nothing runs at Parse, but an attempt that was refused is evidence: record it.
            if let Err(e) = self.record(QueryProtocol::Extended, sql, Vec::new(), &decision) {
                return audit_unavailable(e);
            }
        }
        verdict
    }

    /// The Parse of `statement` went upstream as the client sent it (or rewritten for
    /// masking); `copies` are its COPY TO STDOUT statements (masking sessions only).
    /// Returns the statement, for PostgreSQL's answer to settle.
    pub(crate) fn parsed(
        &mut self,
        statement: &str,
        sql: &str,
        copies: Vec<crate::mask::CopyTarget>,
        batch: u64,
    ) -> Arc<super::protocol::Prepared> {
        self.statements.parsed(statement, sql, copies, batch)
    }

    /// The Parse of `statement` was refused (by policy or by the masking rewrite): its
    /// stand-in went upstream instead.
    pub(crate) fn parse_refused(&mut self, statement: &str) {
        self.statements.refused(statement);
    }

    /// A Bind in batch `batch`: the portal keeps its statement and its parameters as recorded
    /// (`body` is the whole message, for the result formats masking reads).
    pub(crate) fn bind(
        &mut self,
        bind: &interceptor_wire::message::BindView<'_>,
        body: &[u8],
        batch: u64,
    ) {
        let param_mask = self.param_mask.as_ref();
        let record = || {
            let formats = &bind.param_formats;
            bind.params
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.map(|v| {
                        // Format codes: none = all text, one = for all, else one each.
                        let binary = match formats.len() {
                            0 => false,
                            1 => formats[0] == 1,
                            _ => formats.get(i) == Some(&1),
                        };
                        recorded_parameter(param_mask, v, binary)
                    })
                })
                .collect()
        };
        self.statements
            .bound(bind.portal, bind.statement, body, batch, record);
    }

    pub(crate) fn close(&mut self, kind: u8, name: &str) {
        self.statements.close(kind, name);
    }

    /// PostgreSQL was idle after batch `before - 1`: the portals bound up to then are gone.
    pub(crate) fn transactions_ended_before(&mut self, before: u64) {
        self.statements.transactions_ended_before(before);
    }

    pub(crate) async fn execute(&mut self, portal: &str, lex: LexState) -> Verdict {
        if self.statements.unattributed(portal) {
            // Bound to a statement the session did not see prepared (a name PREPAREd in SQL,
            // or one whose Parse or Close interceptor could not follow): what it would run
            // cannot be decided.
            return Verdict::Refuse(
                PgError::error(
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "interceptor: portal \"{portal}\" is bound to a prepared statement that \
                         interceptor did not see prepared, so it cannot be decided"
                    ),
                )
                .with_hint("prepare the statement (Parse) in this session and bind it again"),
            );
        }
        let Some(p) = self.statements.portal(portal) else {
            // Not a portal we allowed: PostgreSQL does not know it either (its Parse was refused
            // or never sent), so it will answer with its own error.
            return Verdict::Forward {
                record: None,
                tree: None,
            };
        };
        let prepared = p.statement.clone();
        let parameters = p.parameters.clone();
        let policy = self.policy.current();
        // Decided again: a reload, a rule's window or a grant may have ended since Parse.
        let decision = self.decide(&policy, &prepared.sql, lex);
        // Parse let a statement that needs approval through: it is held here, where it runs.
        if let Some(v) = self
            .hold(
                QueryProtocol::Extended,
                &prepared.sql,
                parameters.clone(),
                &decision,
            )
            .await
        {
            return v;
        }
        self.recorded_verdict(
            QueryProtocol::Extended,
            &prepared.sql,
            parameters,
            &decision,
        )
    }

    /// FunctionCall calls a function by OID, outside SQL. It is decided, held, audited and
    /// refused exactly as the SQL it stands for (`SELECT "schema"."function"($1, ...)`, see
    /// [`super::fastpath`]), which is returned with the verdict for the masking check.
    pub(crate) async fn function_call(
        &mut self,
        call: &interceptor_wire::message::FunctionCallView<'_>,
        lex: LexState,
    ) -> (Verdict, Option<String>) {
        if let Some(e) = self.lex_check(lex) {
            return (Verdict::Refuse(e), None);
        }
        let Some(functions) = self.functions.as_mut() else {
            return (
                Verdict::Refuse(
                    PgError::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the FunctionCall protocol message is not available in this session",
                    )
                    .with_hint("call the function with SELECT instead"),
                ),
                None,
            );
        };
        let resolved = functions.resolve(call.function).await;
        let function = match super::fastpath::unresolved(call.function, resolved) {
            Ok(f) => f,
            Err(e) => return (Verdict::Refuse(e), None),
        };
        let sql = function.call_sql(call.args.len());
        let param_mask = self.param_mask.as_ref();
        let parameters = super::fastpath::recorded_arguments(call, |v, binary| {
            recorded_parameter(param_mask, v, binary)
        });
        let policy = self.policy.current();
        let decision = self.decide(&policy, &sql, lex);
        let protocol = QueryProtocol::FunctionCall;
        if let Some(v) = self
            .hold(protocol, &sql, parameters.clone(), &decision)
            .await
        {
            return (v, Some(sql));
        }
        let verdict = self.recorded_verdict(protocol, &sql, parameters, &decision);
        (verdict, Some(sql))
    }
}

/// A parameter as the audit trail records it: text as sent, binary as hex; a value a content
/// detector of the session's masking rules finds is recorded masked.
fn recorded_parameter(mask: Option<&crate::mask::MaskRules>, v: &[u8], binary: bool) -> String {
    let text = String::from_utf8_lossy(v);
    let masked = mask.and_then(|r| r.mask_notification(&text));
    match (masked, binary) {
        (Some(_), true) => "[MASKED]".to_owned(),
        (Some(m), false) => m,
        (None, true) => format!("\\x{}", hex::encode(v)),
        (None, false) => text.into_owned(),
    }
}

fn audit_unavailable(e: AuditError) -> Verdict {
    tracing::error!(error = %e, "AUDIT TRAIL UNAVAILABLE: refusing statements (fail closed)");
    Verdict::Refuse(
        PgError::error(
            sqlstate::IO_ERROR,
            "interceptor: the audit trail cannot be written, so no statement can run",
        )
        .with_hint("this is an operator problem; contact the interceptor administrator"),
    )
}

/// The audit record's view of a statement's masking summary.
fn masking_summary(s: &crate::mask::MaskSummary) -> crate::audit::MaskingSummary {
    crate::audit::MaskingSummary {
        columns: s
            .entries()
            .map(|c| crate::audit::MaskedColumn {
                column: c.target.label(),
                rule: c.strategy.as_str().to_owned(),
            })
            .collect(),
        values_masked: s.total(),
    }
}

/// Records what forwarded statements did; used by the upstream → client direction.
pub(crate) struct Recorder {
    facts: Arc<SessionFacts>,
    audit: AuditLog,
    /// Result rows recorded per statement for replay.
    pub rows_cap: usize,
}

impl Recorder {
    pub(crate) fn new(facts: Arc<SessionFacts>, audit: AuditLog) -> Self {
        let rows_cap = audit.record_rows_cap();
        Recorder {
            facts,
            audit,
            rows_cap,
        }
    }

    /// A forwarded statement finished.
    pub(crate) fn outcome(&self, record: Option<RecordId>, outcome: Outcome) {
        let Some(statement) = record else { return };
        let session = self.facts.session_id;
        let rows = (outcome.rows > 0 || !outcome.command_tags.is_empty()).then(|| {
            let affected: u64 = outcome
                .command_tags
                .iter()
                .filter_map(|t| t.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            affected.max(outcome.rows)
        });
        let result = (!outcome.columns.is_empty()).then_some(RecordedRows {
            columns: outcome.columns,
            rows: outcome.recorded,
            truncated: outcome.truncated,
        });
        crate::metrics::masked(&outcome.masked);
        let result = self.audit.append(AuditEvent::Outcome(StatementOutcome {
            session,
            statement,
            command_tags: outcome.command_tags,
            rows,
            skipped: outcome.skipped,
            sqlstate: outcome.sqlstate,
            error_message: outcome.error,
            duration_us: outcome.duration_us,
            masking: masking_summary(&outcome.masked),
            result,
        }));
        if let Err(e) = result {
            tracing::error!(error = %e, "AUDIT TRAIL UNAVAILABLE: cannot record a statement outcome");
        }
    }
}
