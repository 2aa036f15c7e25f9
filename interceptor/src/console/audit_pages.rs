//! The audit pages: session search, a session's replay, the trail's verification and exports.
//! Everything comes from the audit module's own queries (`audit::query`, `audit::verify`,
//! `audit::export`), run off the async threads against the daemon's open store.

use maud::{Markup, html};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::audit::admin::MAX_PAGE;
use crate::audit::export::{write_csv, write_csv_header, write_jsonl};
use crate::audit::query::{self, ExportFilter, ReplayEntry, SessionFilter};
use crate::audit::record::{AuditEvent, SessionId, Timestamp};
use crate::audit::store::SessionSummary;
use crate::audit::verify::{self, VerifyMode};
use crate::audit::{AuditError, AuditLog};

use super::Console;
use super::auth::Caller;
use super::pages::{layout, message};
use super::reply::{Form, Reply, security_headers};

/// Sessions examined at most for one search (decision / SQLSTATE filters read each replay).
const MAX_SESSIONS: usize = 200;

/// `2h` (an age) or an RFC 3339 time, as the CLI takes them.
fn parse_time(s: &str) -> Result<Timestamp, String> {
    let s = s.trim();
    if let Ok(t) = Timestamp::parse_rfc3339(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|age| Timestamp::now().saturating_sub(age))
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor an age like `2h`"))
}

fn field<'a>(q: &'a Form, k: &str) -> Option<&'a str> {
    q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// The search form's fields, parsed.
struct Search {
    filter: SessionFilter,
    decision: Option<String>,
    sqlstate: Option<String>,
}

fn search(q: &Form) -> Result<Search, String> {
    Ok(Search {
        filter: SessionFilter {
            identity: field(q, "identity").map(str::to_owned),
            database: field(q, "database").map(str::to_owned),
            since: field(q, "since").map(parse_time).transpose()?,
            until: field(q, "until").map(parse_time).transpose()?,
            limit: None,
        },
        decision: field(q, "decision").map(str::to_owned),
        sqlstate: field(q, "sqlstate").map(str::to_ascii_uppercase),
    })
}

/// Does one of the session's statements have this decision / SQLSTATE?
fn session_matches(
    log: &AuditLog,
    s: &SessionSummary,
    search: &Search,
) -> Result<bool, AuditError> {
    if search.decision.is_none() && search.sqlstate.is_none() {
        return Ok(true);
    }
    let Some(replay) = query::replay(log.store(), s.session)? else {
        return Ok(false);
    };
    Ok(replay.entries.iter().any(|e| match e {
        ReplayEntry::Statement {
            statement, outcome, ..
        } => {
            let decision_ok = search
                .decision
                .as_ref()
                .is_none_or(|d| statement.decision.eq_ignore_ascii_case(d));
            let state = outcome
                .as_ref()
                .and_then(|o| o.sqlstate.clone())
                .or_else(|| statement.deny_sqlstate.clone());
            let state_ok = search
                .sqlstate
                .as_ref()
                .is_none_or(|want| state.as_deref() == Some(want.as_str()));
            decision_ok && state_ok
        }
        _ => false,
    }))
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

impl Console {
    /// Runs `f` against the store once everything committed is indexed.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AuditLog) -> Result<T, AuditError> + Send + 'static,
    ) -> Result<T, AuditError> {
        self.audit.sync_index().await?;
        let log = self.audit.clone();
        tokio::task::spawn_blocking(move || f(&log))
            .await
            .map_err(|e| AuditError::Request(format!("query task: {e}")))?
    }

    pub(super) async fn sessions_page(&self, c: &Caller, q: &Form) -> Reply {
        let s = match search(q) {
            Ok(s) => s,
            Err(e) => return Reply::html(400, message(Some(&c.session), "Bad search", &e)),
        };
        let filter = s.filter.clone();
        let found = self
            .with_store(move |log| {
                let mut all = query::list_sessions(log.store(), &s.filter)?;
                all.sort_by_key(|s| std::cmp::Reverse(s.session));
                let mut out = Vec::new();
                for summary in all.into_iter().take(MAX_SESSIONS) {
                    if session_matches(log, &summary, &s)? {
                        out.push(summary);
                    }
                }
                Ok(out)
            })
            .await;
        let sessions = match found {
            Ok(v) => v,
            Err(e) => {
                return Reply::html(
                    500,
                    message(Some(&c.session), "Audit unavailable", &e.to_string()),
                );
            }
        };
        let export_query = {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for k in ["since", "until"] {
                if let Some(v) = field(q, k) {
                    ser.append_pair(k, v);
                }
            }
            ser.finish()
        };
        let v = |k: &str| field(q, k).unwrap_or("").to_owned();
        let body = html! {
            form.search method="get" action="/console/audit" {
                label { "Identity " input type="text" name="identity" value=(v("identity")); }
                label { "Since " input type="text" name="since" value=(v("since")) placeholder="2h or RFC 3339"; }
                label { "Until " input type="text" name="until" value=(v("until")); }
                label { "Decision "
                    select name="decision" {
                        @for d in ["", "allow", "deny", "approve"] {
                            option value=(d) selected[v("decision") == d] { (if d.is_empty() { "any" } else { d }) }
                        }
                    }
                }
                label { "SQLSTATE " input type="text" name="sqlstate" value=(v("sqlstate")) size="6"; }
                button type="submit" { "Search" }
            }
            p.exports {
                "Export this range: "
                a #export-jsonl href={ "/console/audit/export?format=jsonl&" (export_query) } { "JSONL" } " · "
                a #export-csv href={ "/console/audit/export?format=csv&" (export_query) } { "CSV" } " · "
                a href="/console/audit/verify" { "Verify the trail" }
            }
            @if filter.identity.is_some() || filter.since.is_some() || filter.until.is_some() {
                p.muted { (sessions.len()) " session(s) found" }
            }
            table #sessions {
                thead { tr { th { "session" } th { "identity" } th { "proof" } th { "database" } th { "process" } th { "started" } th { "ended" } th { "statements" } th { "denied" } } }
                tbody {
                    @for s in &sessions {
                        tr data-session=(s.session) {
                            td { a href={ "/console/audit/sessions/" (s.session) } { (s.session) } }
                            td { (opt(&s.subject)) }
                            td { (opt(&s.proof)) }
                            td { (opt(&s.database)) }
                            td { (opt(&s.process)) }
                            td { (opt(&s.started_at)) }
                            td { (opt(&s.ended_at)) }
                            td { (s.statements) }
                            td { (s.denied) }
                        }
                    }
                }
            }
        };
        Reply::html(200, layout(Some(&c.session), "Sessions", body))
    }

    pub(super) async fn replay_page(&self, c: &Caller, id: &str) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return Reply::html(
                404,
                message(Some(&c.session), "Not found", "no such session"),
            );
        };
        let replay = match self
            .with_store(move |log| {
                let Some(mut r) = query::replay(log.store(), SessionId(id))? else {
                    return Ok(None);
                };
                with_approvers(log, &mut r)?;
                Ok(Some(r))
            })
            .await
        {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Reply::html(
                    404,
                    message(Some(&c.session), "Not found", "no such session"),
                );
            }
            Err(e) => {
                return Reply::html(
                    500,
                    message(Some(&c.session), "Audit unavailable", &e.to_string()),
                );
            }
        };
        let s = &replay.session;
        let body = html! {
            dl.session {
                dt { "identity" } dd { (opt(&s.subject)) }
                dt { "proof" } dd { (opt(&s.proof)) }
                dt { "database" } dd { (opt(&s.database)) " as " (opt(&s.upstream_role)) }
                dt { "process" } dd { (opt(&s.process)) }
                dt { "started" } dd { (opt(&s.started_at)) }
                dt { "ended" } dd { (opt(&s.ended_at)) " " (opt(&s.end_reason)) }
            }
            p.exports {
                a href={ "/console/audit/export?format=jsonl&session=" (id) } { "JSONL" } " · "
                a href={ "/console/audit/export?format=csv&session=" (id) } { "CSV" }
            }
            ol.replay #replay {
                @for e in &replay.entries { (entry(e)) }
            }
        };
        Reply::html(
            200,
            layout(Some(&c.session), &format!("Session {id}"), body),
        )
    }

    pub(super) async fn verify_page(&self, c: &Caller) -> Reply {
        let result = self
            .with_store(|log| {
                let report = verify::verify(
                    log.store(),
                    log.verifying_key(),
                    VerifyMode::Live {
                        head: log.committed_head(),
                    },
                )?;
                let last = log.store().checkpoints()?.pop();
                Ok((report, last))
            })
            .await;
        let (report, last) = match result {
            Ok(v) => v,
            Err(e) => {
                return Reply::html(
                    500,
                    message(Some(&c.session), "Audit unavailable", &e.to_string()),
                );
            }
        };
        let body = html! {
            p #verify-status class=(if report.ok { "ok" } else { "bad" }) {
                (if report.ok { "OK" } else { "FAILED" }) ": " (report.records) " records, "
                (report.checkpoints) " checkpoints"
                @if report.signatures_checked { ", signatures checked" } @else { ", signatures not checked (no key)" }
            }
            dl {
                dt { "first / last record" } dd { (opt(&report.first)) " / " (opt(&report.last)) }
                dt { "key" } dd { (opt(&report.key_id)) }
                @if let Some(m) = &last {
                    dt { "last signed checkpoint" }
                    dd #last-checkpoint { (m.seq) " at " (m.at) ", hash " code { (m.hash) }
                        @if m.signature.is_some() { " (signed)" } @else { " (unsigned)" } }
                }
            }
            @for p in &report.problems { p.bad { (p.key) ": " (p.message) } }
            @for w in &report.warnings { p.muted { (w) } }
        };
        Reply::html(200, layout(Some(&c.session), "Verify", body))
    }

    /// `GET /console/audit/export?format=jsonl|csv&since&until&session`: streamed page by page.
    pub(super) async fn export<S: AsyncWrite + Unpin>(&self, q: &Form, stream: &mut S) {
        let bad = |why: String| Reply::html(400, message(None, "Bad export", &why));
        let filter = (|| -> Result<ExportFilter, String> {
            Ok(ExportFilter {
                session: field(q, "session")
                    .map(|s| {
                        s.parse()
                            .map(SessionId)
                            .map_err(|_| format!("`{s}` is not a session"))
                    })
                    .transpose()?,
                since: field(q, "since").map(parse_time).transpose()?,
                until: field(q, "until").map(parse_time).transpose()?,
            })
        })();
        let csv = match field(q, "format") {
            Some("csv") => true,
            Some("jsonl") | None => false,
            Some(other) => {
                return send_reply(stream, bad(format!("unknown format `{other}`"))).await;
            }
        };
        let filter = match filter {
            Ok(f) => f,
            Err(e) => return send_reply(stream, bad(e)).await,
        };
        if self.audit.sync_index().await.is_err() {
            return send_reply(stream, bad("the audit trail is not available".into())).await;
        }
        let (ctype, name) = if csv {
            ("text/csv; charset=utf-8", "audit.csv")
        } else {
            ("application/x-ndjson", "audit.jsonl")
        };
        let mut headers = security_headers(ctype);
        headers.push(("Cache-Control", "no-store".into()));
        headers.push((
            "Content-Disposition",
            format!("attachment; filename=\"{name}\""),
        ));
        if crate::approval::http::write_head(stream, 200, &headers, None)
            .await
            .is_err()
        {
            return;
        }
        let mut after = None;
        let mut first = true;
        loop {
            let log = self.audit.clone();
            let f = filter.clone();
            let page = tokio::task::spawn_blocking(move || {
                query::export_page(log.store(), after, MAX_PAGE.min(1000), &f)
            })
            .await;
            let Ok(Ok((records, next))) = page else {
                // Headers are gone: the truncated body is all we can signal.
                tracing::warn!("console export stopped: the store could not be read");
                break;
            };
            let mut buf = Vec::new();
            if csv && first {
                let _ = write_csv_header(&mut buf);
            }
            first = false;
            for r in &records {
                let _ = if csv {
                    write_csv(&mut buf, r)
                } else {
                    write_jsonl(&mut buf, r)
                };
            }
            if stream.write_all(&buf).await.is_err() {
                return;
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    }
}

/// Records scanned at most, per approval request, for the steps outside the session.
const MAX_APPROVAL_SCAN: usize = 20_000;

/// Approvers' votes and decisions are recorded outside the requester's session (they happen
/// elsewhere): adds the records of each request this session raised, from its `requested`
/// record up to the session's last record, in trail order.
fn with_approvers(log: &AuditLog, replay: &mut query::Replay) -> Result<(), AuditError> {
    let seq_of = |e: &ReplayEntry| match e {
        ReplayEntry::Statement { seq, .. } | ReplayEntry::Event { seq, .. } => *seq,
    };
    let Some(last) = replay.entries.last().map(seq_of) else {
        return Ok(());
    };
    let requested: Vec<(String, crate::audit::record::RecordId)> = replay
        .entries
        .iter()
        .filter_map(|e| match e {
            ReplayEntry::Event {
                seq,
                event: AuditEvent::Approval(a),
                ..
            } if matches!(a.action, crate::audit::record::ApprovalAction::Requested) => {
                Some((a.approval_id.clone(), *seq))
            }
            _ => None,
        })
        .collect();
    let mut extra = Vec::new();
    for (approval, from) in requested {
        let mut after = Some(from);
        let mut scanned = 0;
        'scan: while scanned < MAX_APPROVAL_SCAN {
            let page = log.store().records_after(after, 1000)?;
            let Some((_, tail)) = page.last() else { break };
            after = Some(tail.seq);
            for (_, rec) in page {
                scanned += 1;
                if rec.seq > last {
                    break 'scan;
                }
                if let AuditEvent::Approval(a) = &rec.event
                    && a.approval_id == approval
                    && a.session != Some(replay.session.session)
                {
                    extra.push(ReplayEntry::Event {
                        seq: rec.seq,
                        at: rec.at,
                        event: rec.event,
                    });
                }
            }
        }
    }
    if !extra.is_empty() {
        replay.entries.extend(extra);
        replay.entries.sort_by_key(seq_of);
    }
    Ok(())
}

async fn send_reply<S: AsyncWrite + Unpin>(stream: &mut S, r: Reply) {
    let mut headers = security_headers(r.content_type);
    headers.extend(r.headers);
    let _ = crate::approval::http::write_raw(stream, r.status, &headers, &r.body).await;
}

fn entry(e: &ReplayEntry) -> Markup {
    match e {
        ReplayEntry::Statement {
            seq,
            at,
            statement,
            outcome,
            completed_at: _,
            rows,
        } => html! {
            li.statement data-seq=(seq.0) data-decision=(statement.decision) {
                span.at { (at) } " "
                span class={ "decision " (statement.decision) } { (statement.decision) }
                @if let Some(a) = &statement.approval { " " span.approval { "approval request " (a) } }
                @if let Some(r) = &statement.rule { " rule " (r) }
                pre.sql { (statement.sql) }
                @if !statement.parameters.is_empty() {
                    p.params { "parameters: "
                        @for (i, p) in statement.parameters.iter().enumerate() {
                            code { "$" (i + 1) " = " (p.as_deref().unwrap_or("NULL")) } " "
                        }
                    }
                }
                @if let Some(reason) = &statement.reason { p.muted { (reason) } }
                @if let Some(o) = outcome {
                    p.outcome {
                        (o.command_tags.join(", "))
                        @if let Some(state) = &o.sqlstate { " SQLSTATE " (state) }
                        @if let Some(m) = &o.error_message { ": " (m) }
                        " in " (o.duration_us) " µs"
                    }
                }
                @if let Some(r) = rows {
                    table.rows {
                        thead { tr { @for c in &r.columns { th { (c) } } } }
                        tbody { @for row in &r.rows { tr { @for v in row { td { (v.as_deref().unwrap_or("NULL")) } } } } }
                    }
                    @if r.truncated { p.muted { "more rows were not recorded" } }
                }
            }
        },
        ReplayEntry::Event { seq, at, event } => html! {
            li class={ "event " (event.kind()) } data-seq=(seq.0) {
                span.at { (at) } " "
                @match event {
                    AuditEvent::Approval(a) => {
                        span.approval-step { "approval " (a.approval_id) ": " (format!("{:?}", a.action).to_lowercase()) }
                        @if let Some(by) = &a.by { " by " strong { (by) } }
                        @if let Some(r) = &a.reason { " — " (r) }
                    }
                    AuditEvent::SessionStart(_) => { "session started" }
                    AuditEvent::SessionEnd(e) => { "session ended: " (e.reason) }
                    other => { (other.kind()) }
                }
            }
        },
    }
}
