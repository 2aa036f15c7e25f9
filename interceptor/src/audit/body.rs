//! How a record's body is encoded in the log.
//!
//! Statements and their outcomes, two records per statement on the hot path, are stored in a
//! compact binary form: the byte [`COMPACT_V1`], then the record in postcard (varint integers,
//! length-prefixed UTF-8 strings, fields in the order of the `*V1` types below). Every other
//! record, and every record of a store written before, is a JSON object, so its first byte is
//! `{`. The chain hashes the body as stored, whichever form it has; exports and the CLI show
//! every record as JSON.
//!
//! The `*V1` types are the layout of version 1 and never change: a field added to a record type
//! needs a new version byte and new layout types, and decoding keeps every older version. The
//! golden-bytes test pins the layout.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::record::{
    AuditEvent, MaskingSummary, QueryProtocol, Record, RecordId, RecordedRows, SessionId,
    StatementOutcome, StatementRecord, Timestamp,
};

/// First byte of a compact (postcard, layout version 1) body. JSON bodies start with `{`.
pub(crate) const COMPACT_V1: u8 = 0x01;

/// Appends `record`'s body to `out`.
pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), String> {
    let event = match &record.event {
        AuditEvent::Statement(s) => EventV1::Statement(StatementV1::borrowed(s)),
        AuditEvent::Outcome(o) => EventV1::Outcome(OutcomeV1::borrowed(o)),
        _ => return serde_json::to_writer(&mut *out, record).map_err(|e| e.to_string()),
    };
    let compact = RecordV1 {
        seq: record.seq.0,
        at: record.at.unix_micros(),
        event,
    };
    out.push(COMPACT_V1);
    let taken = std::mem::take(out);
    *out = postcard::to_extend(&compact, taken).map_err(|e| e.to_string())?;
    Ok(())
}

/// Decodes a body in either form; `None` when it is neither a JSON record nor a whole compact
/// one (a damaged or forged body).
pub(crate) fn decode(body: &[u8]) -> Option<Record> {
    match body.split_first() {
        Some((&COMPACT_V1, rest)) => {
            let (r, tail) = postcard::take_from_bytes::<RecordV1<'_>>(rest).ok()?;
            if !tail.is_empty() {
                return None;
            }
            Some(Record {
                seq: RecordId(r.seq),
                at: Timestamp::from_unix_micros(r.at),
                event: match r.event {
                    EventV1::Statement(s) => AuditEvent::Statement(s.into_record()?),
                    EventV1::Outcome(o) => AuditEvent::Outcome(o.into_outcome()),
                },
            })
        }
        Some((b'{', _)) => serde_json::from_slice(body).ok(),
        _ => None,
    }
}

#[derive(Serialize, Deserialize)]
struct RecordV1<'a> {
    seq: u64,
    /// Microseconds since the Unix epoch.
    at: u64,
    #[serde(borrow)]
    event: EventV1<'a>,
}

/// postcard writes the variant's index: append variants, never reorder.
#[derive(Serialize, Deserialize)]
enum EventV1<'a> {
    #[serde(borrow)]
    Statement(StatementV1<'a>),
    #[serde(borrow)]
    Outcome(OutcomeV1<'a>),
}

#[derive(Serialize, Deserialize)]
struct StatementV1<'a> {
    session: u64,
    /// 0 simple, 1 extended, 2 function call.
    protocol: u8,
    #[serde(borrow)]
    sql: Cow<'a, str>,
    #[serde(borrow)]
    parameters: Cow<'a, [Option<String>]>,
    #[serde(borrow)]
    statement_kinds: Cow<'a, [String]>,
    #[serde(borrow)]
    tables: Cow<'a, [String]>,
    #[serde(borrow)]
    decision: Cow<'a, str>,
    #[serde(borrow)]
    rule: Option<Cow<'a, str>>,
    #[serde(borrow)]
    deny_sqlstate: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    approval: Option<Cow<'a, str>>,
}

impl<'a> StatementV1<'a> {
    fn borrowed(s: &'a StatementRecord) -> StatementV1<'a> {
        // Destructured so that a field added to the record fails to compile here rather than
        // being dropped from the log silently.
        let StatementRecord {
            session,
            protocol,
            sql,
            parameters,
            statement_kinds,
            tables,
            decision,
            rule,
            deny_sqlstate,
            reason,
            approval,
        } = s;
        StatementV1 {
            session: session.0,
            protocol: match protocol {
                QueryProtocol::Simple => 0,
                QueryProtocol::Extended => 1,
                QueryProtocol::FunctionCall => 2,
            },
            sql: Cow::Borrowed(sql),
            parameters: Cow::Borrowed(parameters),
            statement_kinds: Cow::Borrowed(statement_kinds),
            tables: Cow::Borrowed(tables),
            decision: Cow::Borrowed(decision),
            rule: rule.as_deref().map(Cow::Borrowed),
            deny_sqlstate: deny_sqlstate.as_deref().map(Cow::Borrowed),
            reason: reason.as_deref().map(Cow::Borrowed),
            approval: approval.as_deref().map(Cow::Borrowed),
        }
    }

    fn into_record(self) -> Option<StatementRecord> {
        Some(StatementRecord {
            session: SessionId(self.session),
            protocol: match self.protocol {
                0 => QueryProtocol::Simple,
                1 => QueryProtocol::Extended,
                2 => QueryProtocol::FunctionCall,
                _ => return None,
            },
            sql: self.sql.into_owned(),
            parameters: self.parameters.into_owned(),
            statement_kinds: self.statement_kinds.into_owned(),
            tables: self.tables.into_owned(),
            decision: self.decision.into_owned(),
            rule: self.rule.map(Cow::into_owned),
            deny_sqlstate: self.deny_sqlstate.map(Cow::into_owned),
            reason: self.reason.map(Cow::into_owned),
            approval: self.approval.map(Cow::into_owned),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct OutcomeV1<'a> {
    session: u64,
    statement: u64,
    #[serde(borrow)]
    command_tags: Cow<'a, [String]>,
    rows: Option<u64>,
    skipped: bool,
    #[serde(borrow)]
    sqlstate: Option<Cow<'a, str>>,
    #[serde(borrow)]
    error_message: Option<Cow<'a, str>>,
    duration_us: u64,
    #[serde(borrow)]
    masking: Cow<'a, MaskingSummary>,
    #[serde(borrow)]
    result: Option<Cow<'a, RecordedRows>>,
}

impl<'a> OutcomeV1<'a> {
    fn borrowed(o: &'a StatementOutcome) -> OutcomeV1<'a> {
        let StatementOutcome {
            session,
            statement,
            command_tags,
            rows,
            skipped,
            sqlstate,
            error_message,
            duration_us,
            masking,
            result,
        } = o;
        OutcomeV1 {
            session: session.0,
            statement: statement.0,
            command_tags: Cow::Borrowed(command_tags),
            rows: *rows,
            skipped: *skipped,
            sqlstate: sqlstate.as_deref().map(Cow::Borrowed),
            error_message: error_message.as_deref().map(Cow::Borrowed),
            duration_us: *duration_us,
            masking: Cow::Borrowed(masking),
            result: result.as_ref().map(Cow::Borrowed),
        }
    }

    fn into_outcome(self) -> StatementOutcome {
        StatementOutcome {
            session: SessionId(self.session),
            statement: RecordId(self.statement),
            command_tags: self.command_tags.into_owned(),
            rows: self.rows,
            skipped: self.skipped,
            sqlstate: self.sqlstate.map(Cow::into_owned),
            error_message: self.error_message.map(Cow::into_owned),
            duration_us: self.duration_us,
            masking: self.masking.into_owned(),
            result: self.result.map(Cow::into_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{MaskedColumn, SessionEnd};

    fn statement() -> Record {
        Record {
            seq: RecordId(300),
            at: Timestamp::from_unix_micros(1_780_000_000_123_456),
            event: AuditEvent::Statement(StatementRecord {
                session: SessionId(7),
                protocol: QueryProtocol::Extended,
                sql: "SELECT $1::text, 'é'".into(),
                parameters: vec![Some("x".into()), None],
                statement_kinds: vec!["select".into()],
                tables: vec!["users".into()],
                decision: "deny".into(),
                rule: Some("no-users".into()),
                deny_sqlstate: Some("42501".into()),
                reason: None,
                approval: Some("ap-1".into()),
            }),
        }
    }

    fn outcome() -> Record {
        Record {
            seq: RecordId(301),
            at: Timestamp::from_unix_micros(1_780_000_000_223_456),
            event: AuditEvent::Outcome(StatementOutcome {
                session: SessionId(7),
                statement: RecordId(300),
                command_tags: vec!["SELECT 2".into()],
                rows: Some(2),
                skipped: false,
                sqlstate: None,
                error_message: Some("boom".into()),
                duration_us: 1234,
                masking: MaskingSummary {
                    columns: vec![MaskedColumn {
                        column: "users.email".into(),
                        rule: "hash".into(),
                    }],
                    values_masked: 2,
                },
                result: Some(RecordedRows {
                    columns: vec!["email".into()],
                    rows: vec![vec![Some("h1".into())], vec![None]],
                    truncated: true,
                }),
            }),
        }
    }

    fn body(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        encode(r, &mut out).expect("encode");
        out
    }

    #[test]
    fn statements_and_outcomes_round_trip_compact() {
        for r in [statement(), outcome()] {
            let b = body(&r);
            assert_eq!(b[0], COMPACT_V1);
            let json = serde_json::to_vec(&r).expect("json");
            assert!(b.len() * 2 < json.len(), "{} vs {}", b.len(), json.len());
            assert_eq!(decode(&b), Some(r));
        }
        // An outcome without recorded rows, no masking, no tags.
        let mut r = outcome();
        if let AuditEvent::Outcome(o) = &mut r.event {
            o.result = None;
            o.masking = MaskingSummary::default();
            o.command_tags.clear();
        }
        assert_eq!(decode(&body(&r)), Some(r));
    }

    #[test]
    fn other_records_and_old_bodies_are_json() {
        let end = Record {
            seq: RecordId(9),
            at: Timestamp::from_unix_micros(5),
            event: AuditEvent::SessionEnd(SessionEnd {
                session: SessionId(1),
                bytes_from_client: 1,
                bytes_to_client: 2,
                statements: 3,
                reason: "client_terminate".into(),
            }),
        };
        let b = body(&end);
        assert_eq!(b[0], b'{');
        assert_eq!(decode(&b), Some(end));
        // A statement as stores written before hold it.
        let old = serde_json::to_vec(&statement()).expect("json");
        assert_eq!(decode(&old), Some(statement()));
    }

    #[test]
    fn damaged_compact_bodies_are_refused() {
        let b = body(&outcome());
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut]), None, "cut at {cut}");
        }
        let mut trailing = b.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), None);
        let mut bad_version = b.clone();
        bad_version[0] = 0x02;
        assert_eq!(decode(&bad_version), None);
        // An unknown protocol code.
        let mut s = body(&statement());
        let at = 1 + 2 + 8 + 1; // version, seq (2-byte varint), at (8-byte varint), variant
        assert_eq!(s[at], 7, "session");
        assert_eq!(s[at + 1], 1, "protocol");
        s[at + 1] = 9;
        assert_eq!(decode(&s), None);
    }

    /// The layout of version 1, byte for byte: stores hold it for as long as they are kept.
    #[test]
    fn compact_layout_v1_is_fixed() {
        let b = body(&statement());
        // version, seq 300, at, variant Statement, session 7, protocol extended, the SQL, then
        // parameters, kinds, tables, decision, rule, SQLSTATE, reason (none), approval.
        let hex = hex::encode(&b);
        assert_eq!(
            hex,
            "01ac02c0c4d4dde8dc9403\
             00070115\
             53454c4543542024313a3a746578742c2027c3a927\
             0201017800010673656c656374010575736572730464656e79\
             01086e6f2d75736572730105343235303100010461702d31",
            "{hex}"
        );
        assert_eq!(decode(&b), Some(statement()));
    }
}
