//! Export formats (schema: `docs/audit-schema.md`, version 1).

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::chain::ChainHash;
use super::record::{AuditEvent, Record, RecordId, SessionId, Timestamp};

pub(crate) const SCHEMA_VERSION: u32 = 1;

/// One exported record: the record plus its chain hash, so an export can be checked against
/// the store's signed checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExportRecord {
    pub v: u32,
    pub seq: RecordId,
    pub at: Timestamp,
    /// Hex SHA-256 chain hash of this record.
    pub hash: String,
    pub event: AuditEvent,
}

impl ExportRecord {
    pub(crate) fn new(rec: Record, hash: ChainHash) -> ExportRecord {
        ExportRecord {
            v: SCHEMA_VERSION,
            seq: rec.seq,
            at: rec.at,
            hash: hash.to_hex(),
            event: rec.event,
        }
    }
}

/// The CSV columns, in order. `event` holds the full event as JSON, so nothing is lost.
pub(crate) const CSV_COLUMNS: [&str; 15] = [
    "v",
    "seq",
    "at",
    "type",
    "session",
    "decision",
    "rule",
    "sql",
    "statement",
    "command_tags",
    "rows",
    "sqlstate",
    "duration_us",
    "hash",
    "event",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

pub(crate) fn write_jsonl<W: Write + ?Sized>(w: &mut W, rec: &ExportRecord) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, rec)?;
    w.write_all(b"\n")
}

pub(crate) fn write_csv_header<W: Write + ?Sized>(w: &mut W) -> std::io::Result<()> {
    writeln!(w, "{}", CSV_COLUMNS.join(","))
}

pub(crate) fn write_csv<W: Write + ?Sized>(w: &mut W, rec: &ExportRecord) -> std::io::Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let session = rec.event.session().map(|s: SessionId| s.to_string());
    let (mut decision, mut rule, mut sql, mut statement) = (None, None, None, None);
    let (mut tag, mut rows, mut sqlstate, mut duration) = (None, None, None, None);
    match &rec.event {
        AuditEvent::Statement(s) => {
            decision = Some(s.decision.clone());
            rule = s.rule.clone();
            sql = Some(s.sql.clone());
            sqlstate = s.deny_sqlstate.clone();
        }
        AuditEvent::Outcome(o) => {
            statement = Some(o.statement.0.to_string());
            tag = (!o.command_tags.is_empty()).then(|| o.command_tags.join("; "));
            rows = o.rows.map(|r| r.to_string());
            sqlstate = o.sqlstate.clone();
            duration = Some(o.duration_us.to_string());
        }
        AuditEvent::ResultRows(r) => statement = Some(r.statement.0.to_string()),
        _ => {}
    }
    let event = serde_json::to_string(&rec.event).map_err(std::io::Error::other)?;
    let fields = [
        rec.v.to_string(),
        rec.seq.0.to_string(),
        rec.at.to_string(),
        kind_of(&rec.event).to_string(),
        opt(session),
        opt(decision),
        opt(rule),
        opt(sql),
        opt(statement),
        opt(tag),
        opt(rows),
        opt(sqlstate),
        opt(duration),
        rec.hash.clone(),
        event,
    ];
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(w, "{}", line.join(","))
}

fn kind_of(e: &AuditEvent) -> &'static str {
    e.kind()
}

/// RFC 4180 quoting; fields starting with a formula character are prefixed with `'` so a
/// spreadsheet never evaluates SQL text recorded from a client (CSV injection).
pub(crate) fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}
