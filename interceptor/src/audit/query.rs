//! Queries for auditors: sessions, one session, a replay timeline, export pages, statistics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::AuditError;
use super::export::ExportRecord;
use super::record::{
    AuditEvent, RecordId, ResultRows, SessionEnd, SessionId, SessionStart, StatementOutcome,
    StatementRecord, Timestamp,
};
use super::signing::Mark;
use super::store::{SessionSummary, Space, Store};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionFilter {
    /// Matches the identity subject or display name exactly.
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub database: Option<String>,
    /// Sessions active at or after this time.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Sessions started at or before this time.
    #[serde(default)]
    pub until: Option<Timestamp>,
    #[serde(default)]
    pub limit: Option<usize>,
}

pub(crate) fn list_sessions(
    store: &Store,
    filter: &SessionFilter,
) -> Result<Vec<SessionSummary>, AuditError> {
    let mut out = Vec::new();
    for s in store.all_sessions()? {
        if let Some(id) = &filter.identity
            && s.subject.as_deref() != Some(id)
            && s.display_name.as_deref() != Some(id)
        {
            continue;
        }
        if let Some(db) = &filter.database
            && s.database.as_deref() != Some(db)
        {
            continue;
        }
        let started = s.started_at.or(s.last_at);
        let active_until = s.ended_at.or(s.last_at);
        if let Some(since) = filter.since
            && active_until.is_some_and(|t| t < since)
        {
            continue;
        }
        if let Some(until) = filter.until
            && started.is_some_and(|t| t > until)
        {
            continue;
        }
        out.push(s);
        if filter.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionDetail {
    pub summary: SessionSummary,
    pub start: Option<SessionStart>,
    pub end: Option<SessionEnd>,
}

pub(crate) fn show_session(
    store: &Store,
    id: SessionId,
) -> Result<Option<SessionDetail>, AuditError> {
    let Some(summary) = store.session_summary(id)? else {
        return Ok(None);
    };
    let get = |seq: Option<RecordId>| -> Result<Option<AuditEvent>, AuditError> {
        Ok(match seq {
            Some(s) => store.record(s)?.map(|r| r.event),
            None => None,
        })
    };
    let start = match get(summary.start_seq)? {
        Some(AuditEvent::SessionStart(s)) => Some(s),
        _ => None,
    };
    let end = match get(summary.end_seq)? {
        Some(AuditEvent::SessionEnd(e)) => Some(e),
        _ => None,
    };
    Ok(Some(SessionDetail {
        summary,
        start,
        end,
    }))
}

/// One step of a session's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub(crate) enum ReplayEntry {
    /// A statement with its decision, and (when recorded) its outcome and result rows.
    Statement {
        seq: RecordId,
        at: Timestamp,
        statement: StatementRecord,
        outcome: Option<StatementOutcome>,
        completed_at: Option<Timestamp>,
        rows: Option<ResultRows>,
    },
    /// Any other record of the session (start, approvals, end, ...).
    Event {
        seq: RecordId,
        at: Timestamp,
        event: AuditEvent,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Replay {
    pub session: SessionSummary,
    pub entries: Vec<ReplayEntry>,
}

pub(crate) fn replay(store: &Store, id: SessionId) -> Result<Option<Replay>, AuditError> {
    let Some(summary) = store.session_summary(id)? else {
        return Ok(None);
    };
    let mut entries = Vec::new();
    // Statement record seq -> index in `entries`, to attach outcomes and rows.
    let mut statements: BTreeMap<RecordId, usize> = BTreeMap::new();
    for seq in store.session_seqs(id)? {
        let Some(rec) = store.record(seq)? else {
            continue; // removed by retention
        };
        match rec.event {
            AuditEvent::Statement(st) => {
                statements.insert(rec.seq, entries.len());
                entries.push(ReplayEntry::Statement {
                    seq: rec.seq,
                    at: rec.at,
                    statement: st,
                    outcome: None,
                    completed_at: None,
                    rows: None,
                });
            }
            AuditEvent::Outcome(mut o) => {
                let at = rec.at;
                match statements
                    .get(&o.statement)
                    .and_then(|i| entries.get_mut(*i))
                {
                    Some(ReplayEntry::Statement {
                        outcome,
                        completed_at,
                        rows,
                        ..
                    }) => {
                        // Rows recorded with the outcome show where rows recorded on their own
                        // (older stores) do.
                        if let Some(r) = o.result.take() {
                            *rows = Some(ResultRows {
                                session: o.session,
                                statement: o.statement,
                                columns: r.columns,
                                rows: r.rows,
                                truncated: r.truncated,
                            });
                        }
                        *outcome = Some(o);
                        *completed_at = Some(at);
                    }
                    _ => entries.push(ReplayEntry::Event {
                        seq: rec.seq,
                        at,
                        event: AuditEvent::Outcome(o),
                    }),
                }
            }
            AuditEvent::ResultRows(r) => {
                match statements
                    .get(&r.statement)
                    .and_then(|i| entries.get_mut(*i))
                {
                    Some(ReplayEntry::Statement { rows, .. }) => *rows = Some(r),
                    _ => entries.push(ReplayEntry::Event {
                        seq: rec.seq,
                        at: rec.at,
                        event: AuditEvent::ResultRows(r),
                    }),
                }
            }
            event => entries.push(ReplayEntry::Event {
                seq: rec.seq,
                at: rec.at,
                event,
            }),
        }
    }
    Ok(Some(Replay {
        session: summary,
        entries,
    }))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExportFilter {
    #[serde(default)]
    pub session: Option<SessionId>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub until: Option<Timestamp>,
}

/// Up to `limit` records after `after` that match `filter`, and the last seq examined (pass it
/// back as `after` for the next page; `None` when the log is exhausted).
pub(crate) fn export_page(
    store: &Store,
    after: Option<RecordId>,
    limit: usize,
    filter: &ExportFilter,
) -> Result<(Vec<ExportRecord>, Option<RecordId>), AuditError> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let page = store.records_after(cursor, limit.max(1))?;
        let Some((_, last)) = page.last() else {
            return Ok((out, None));
        };
        cursor = Some(last.seq);
        for (hash, rec) in page {
            if filter.since.is_some_and(|s| rec.at < s) || filter.until.is_some_and(|u| rec.at > u)
            {
                continue;
            }
            if filter.session.is_some() && rec.event.session() != filter.session {
                continue;
            }
            out.push(ExportRecord::new(rec, hash));
        }
        if out.len() >= limit {
            return Ok((out, cursor));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stats {
    pub dir: String,
    pub space: Space,
    pub first: Option<RecordId>,
    pub last: Option<RecordId>,
    pub sessions: u64,
    pub checkpoints: u64,
    pub head: Option<Mark>,
    pub base: Option<Mark>,
    /// Group commits (flush + sync) since the daemon started; absent when read offline.
    pub syncs: Option<u64>,
}

pub(crate) fn stats(store: &Store, syncs: Option<u64>) -> Result<Stats, AuditError> {
    Ok(Stats {
        dir: store.dir().display().to_string(),
        space: store.space()?,
        first: store.records_after(None, 1)?.first().map(|(_, r)| r.seq),
        last: store.last_record()?.map(|(_, r)| r.seq),
        sessions: store.sessions.len() as u64,
        checkpoints: store.checkpoints()?.len() as u64,
        head: store.head()?,
        base: store.base()?,
        syncs,
    })
}
