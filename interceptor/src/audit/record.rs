//! The audit record types. Their JSON form is the stable export schema documented in
//! `docs/audit-schema.md`: add optional fields only, never rename or remove.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::Identity;

/// Position of a record in the log (its hash-chain sequence number, starting at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct RecordId(pub u64);

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A client session, allocated by [`super::AuditLog::new_session_id`]; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Wall-clock time with microsecond precision, serialized as RFC 3339 UTC
/// (`2026-11-22T01:02:03.456789Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Timestamp {
    micros: u64,
}

impl Timestamp {
    pub(crate) fn now() -> Timestamp {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp { micros }
    }

    pub(crate) fn from_unix_micros(micros: u64) -> Timestamp {
        Timestamp { micros }
    }

    pub(crate) fn unix_micros(self) -> u64 {
        self.micros
    }

    pub(crate) fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.micros)
    }

    pub(crate) fn from_system_time(t: SystemTime) -> Timestamp {
        let micros = t
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp { micros }
    }

    pub(crate) fn saturating_sub(self, d: Duration) -> Timestamp {
        let d = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Timestamp {
            micros: self.micros.saturating_sub(d),
        }
    }

    /// Parses RFC 3339 (`2026-11-22T00:00:00Z`, fractional seconds allowed).
    pub(crate) fn parse_rfc3339(s: &str) -> Result<Timestamp, humantime::TimestampError> {
        humantime::parse_rfc3339_weak(s).map(Timestamp::from_system_time)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_micros(self.to_system_time())
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a client connected from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub(crate) enum Peer {
    Tcp { addr: String },
    Unix { path: Option<String> },
}

/// The TLS parameters a client negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TlsInfo {
    pub version: String,
    pub cipher_suite: String,
    /// SHA-256 (hex) of the client certificate, if one was presented.
    #[serde(default)]
    pub client_cert_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionStart {
    pub session: SessionId,
    /// Who, how it was proven, and the kernel-attested process (inside `identity.process`).
    pub identity: Identity,
    pub peer: Peer,
    #[serde(default)]
    pub tls: Option<TlsInfo>,
    pub database: String,
    /// The PostgreSQL role the gateway logged in as for this session.
    pub upstream_role: String,
    #[serde(default)]
    pub application_name: Option<String>,
}

/// Which protocol path carried a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum QueryProtocol {
    Simple,
    Extended,
    /// The fast path (FunctionCall message); `sql` is the call as SQL, the arguments are the
    /// parameters.
    FunctionCall,
}

/// A statement as the policy saw it, recorded before it is forwarded (write-ahead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatementRecord {
    pub session: SessionId,
    pub protocol: QueryProtocol,
    pub sql: String,
    /// Bind parameters in text form (`None` = SQL NULL, binary values hex-encoded by the caller).
    #[serde(default)]
    pub parameters: Vec<Option<String>>,
    /// Classification from the policy module, e.g. `["select"]`, `["insert", "returning"]`.
    #[serde(default)]
    pub statement_kinds: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    /// `allow`, `deny` or `approval` (as produced by the policy module).
    pub decision: String,
    /// The policy rule that decided, if any (none = default decision).
    #[serde(default)]
    pub rule: Option<String>,
    /// SQLSTATE sent to the client when denied.
    #[serde(default)]
    pub deny_sqlstate: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The approval request or grant this statement ran under.
    #[serde(default)]
    pub approval: Option<String>,
}

/// What masking did to a statement's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MaskingSummary {
    /// Masked columns with the rule applied, e.g. `users.email` → `hash`.
    #[serde(default)]
    pub columns: Vec<MaskedColumn>,
    /// Number of individual values replaced.
    #[serde(default)]
    pub values_masked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MaskedColumn {
    pub column: String,
    pub rule: String,
}

/// How a statement ended, appended once PostgreSQL answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatementOutcome {
    pub session: SessionId,
    /// The [`StatementRecord`] this completes.
    pub statement: RecordId,
    /// Command tags in order (`SELECT 3`); several for a multi-statement simple Query.
    #[serde(default)]
    pub command_tags: Vec<String>,
    /// Rows returned or affected (summed over the tags).
    #[serde(default)]
    pub rows: Option<u64>,
    /// Not executed: PostgreSQL skipped it after an earlier error in the same batch.
    #[serde(default)]
    pub skipped: bool,
    /// Set when the statement failed.
    #[serde(default)]
    pub sqlstate: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub duration_us: u64,
    #[serde(default)]
    pub masking: MaskingSummary,
    /// The result rows the client got (already masked), recorded for replay and capped per
    /// statement; absent when the statement returned no row description or recording is off.
    /// Part of the outcome, so a statement costs one record after it ran, not two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RecordedRows>,
}

/// Result rows (already masked) as recorded with a statement's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordedRows {
    pub columns: Vec<String>,
    /// Text values; `None` = SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
    /// True when rows were dropped because of the per-statement cap.
    #[serde(default)]
    pub truncated: bool,
}

/// Result rows recorded as a record of their own, as stores written before outcomes carried
/// them hold them (still read: replay and export show them as before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ResultRows {
    pub session: SessionId,
    pub statement: RecordId,
    pub columns: Vec<String>,
    /// Text values; `None` = SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
    /// True when rows were dropped because of the per-statement cap.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionEnd {
    pub session: SessionId,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    #[serde(default)]
    pub statements: u64,
    /// Why it ended: `client_terminate`, `client_disconnect`, `server_error`, `shutdown`, ...
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PolicyReload {
    /// Content hash or version of the policy set now in force.
    pub version: String,
    #[serde(default)]
    pub files: Vec<String>,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ApprovalAction {
    Requested,
    Granted,
    Denied,
    Expired,
    Revoked,
    /// One approver's vote (a rule may need several).
    Voted,
    /// The requesting client went away or cancelled before a decision.
    Aborted,
    /// The approved statement was forwarded.
    Executed,
    /// Approvers were notified of a new request (e.g. by the webhook); `reason` says how and
    /// whether it was delivered.
    Notified,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Approval {
    pub approval_id: String,
    pub action: ApprovalAction,
    #[serde(default)]
    pub session: Option<SessionId>,
    #[serde(default)]
    pub statement: Option<RecordId>,
    /// The approver (for granted / denied / revoked).
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// End of a just-in-time grant.
    #[serde(default)]
    pub grant_until: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KernelEvent {
    /// e.g. `connect`, `bypass_attempt`, `program_detached`.
    pub kind: String,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// Anything the gateway records. Serialized as `{"type": "...", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum AuditEvent {
    SessionStart(SessionStart),
    Statement(StatementRecord),
    Outcome(StatementOutcome),
    ResultRows(ResultRows),
    SessionEnd(SessionEnd),
    PolicyReload(PolicyReload),
    Approval(Approval),
    Kernel(KernelEvent),
    /// The operator continued the chain over a detected loss (`--accept-audit-gap`).
    AuditGap(AuditGap),
}

impl AuditEvent {
    /// The session a record belongs to, if any (used for indexing and retention).
    pub(crate) fn session(&self) -> Option<SessionId> {
        match self {
            AuditEvent::SessionStart(s) => Some(s.session),
            AuditEvent::Statement(s) => Some(s.session),
            AuditEvent::Outcome(o) => Some(o.session),
            AuditEvent::ResultRows(r) => Some(r.session),
            AuditEvent::SessionEnd(e) => Some(e.session),
            AuditEvent::Approval(a) => a.session,
            AuditEvent::PolicyReload(_) | AuditEvent::Kernel(_) | AuditEvent::AuditGap(_) => None,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AuditEvent::SessionStart(_) => "session_start",
            AuditEvent::Statement(_) => "statement",
            AuditEvent::Outcome(_) => "outcome",
            AuditEvent::ResultRows(_) => "result_rows",
            AuditEvent::SessionEnd(_) => "session_end",
            AuditEvent::PolicyReload(_) => "policy_reload",
            AuditEvent::Approval(_) => "approval",
            AuditEvent::Kernel(_) => "kernel",
            AuditEvent::AuditGap(_) => "audit_gap",
        }
    }
}

/// One entry of the log: the hashed body. Its exact stored bytes are what the chain covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub seq: RecordId,
    pub at: Timestamp,
    pub event: AuditEvent,
}

/// A recorded decision to continue the chain over a detected loss or alteration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditGap {
    /// What the start-up check found, one line each.
    pub problems: Vec<String>,
    /// The head the head-mark file expected, if it had one.
    #[serde(default)]
    pub expected_head: Option<RecordId>,
    /// The last record the store held when the gap was accepted.
    #[serde(default)]
    pub found_last: Option<RecordId>,
}
