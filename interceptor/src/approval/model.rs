//! The records approvals are made of: requests, votes, resolutions and the events reported to
//! the audit log.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::Identity;
use interceptor_wire::message::{PgError, Severity, sqlstate};

pub(crate) type RequestId = u64;

/// What an approval of a statement covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This one execution.
    #[default]
    Once,
    /// The same statement text (fingerprint) for the rest of the session.
    Session,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    TimedOut,
    /// The client went away (disconnect, cancel, gateway restart) before a decision.
    Aborted,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::TimedOut => "timed out",
            Status::Aborted => "aborted",
        })
    }
}

/// What is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum RequestKind {
    /// A held statement of a live session.
    Statement {
        session_id: u64,
        database: String,
        sql: String,
        /// SHA-256 of the exact SQL text, for session-scoped approvals.
        fingerprint: String,
        risks: Vec<String>,
        policy: Option<String>,
    },
    /// Extra groups (and optionally a named policy) for the requester, for a while.
    Grant {
        groups: Vec<String>,
        policy: Option<String>,
        duration_secs: u64,
    },
}

/// One approver's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Vote {
    pub by: String,
    pub approve: bool,
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// A stored request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Request {
    pub id: RequestId,
    #[serde(flatten)]
    pub kind: RequestKind,
    /// Who asked (for statements: the session's identity, with its kernel identity if any).
    pub identity: Identity,
    /// The policy rule that asked for approval (`grant` for grant requests).
    pub rule: String,
    pub approver_groups: Vec<String>,
    pub approvals_required: u32,
    /// The requester's reason (grants).
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub deadline_ms: u64,
    pub status: Status,
    pub votes: Vec<Vote>,
    pub scope: Scope,
    /// Why it was closed when no vote says so (timeout, abort, reuse of a session approval).
    pub closed_note: Option<String>,
    pub closed_at_ms: Option<u64>,
    /// The grant an approved grant request created.
    pub grant_id: Option<u64>,
}

impl Request {
    pub(crate) fn approvers(&self) -> Vec<String> {
        self.votes
            .iter()
            .filter(|v| v.approve)
            .map(|v| v.by.clone())
            .collect()
    }

    /// The resolution of a closed request (`None` while pending).
    pub(crate) fn resolution(&self) -> Option<Resolution> {
        Some(match self.status {
            Status::Pending => return None,
            Status::Approved => Resolution::Approved {
                by: self.approvers(),
                scope: self.scope,
            },
            Status::Denied => {
                let vote = self.votes.iter().find(|v| !v.approve);
                Resolution::Denied {
                    by: vote.map(|v| v.by.clone()).unwrap_or_default(),
                    reason: vote
                        .and_then(|v| v.reason.clone())
                        .unwrap_or_else(|| "no reason given".into()),
                }
            }
            Status::TimedOut => Resolution::TimedOut,
            Status::Aborted => Resolution::Aborted,
        })
    }

    /// May `who` see this request (its SQL)? Its requester and its possible approvers.
    pub(crate) fn visible_to(&self, who: &Identity) -> bool {
        who.subject == self.identity.subject || self.approver_groups.iter().any(|g| who.in_group(g))
    }
}

/// What the gate gets back from [`super::HeldRequest::wait`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(crate) enum Resolution {
    Approved { by: Vec<String>, scope: Scope },
    Denied { by: String, reason: String },
    TimedOut,
    Aborted,
}

impl Resolution {
    /// The ErrorResponse for a statement that must not run (`None` when approved).
    pub(crate) fn refusal(&self, id: RequestId) -> Option<PgError> {
        let message = match self {
            Resolution::Approved { .. } => return None,
            Resolution::Denied { by, reason } => {
                format!("interceptor: approval request {id} was denied by {by}: {reason}")
            }
            Resolution::TimedOut => format!("interceptor: approval request {id} timed out"),
            Resolution::Aborted => format!("interceptor: approval request {id} was aborted"),
        };
        Some(PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, message))
    }
}

/// A statement the policy wants approved, as the gate describes it to [`super::ApprovalService::hold`].
#[derive(Debug, Clone)]
pub(crate) struct NewRequest {
    pub identity: Identity,
    pub session_id: u64,
    pub database: String,
    pub sql: String,
    pub rule: String,
    pub risks: Vec<String>,
    pub policy: Option<String>,
    pub approver_groups: Vec<String>,
    pub approvals_required: u32,
    /// 0: the configured default.
    pub timeout_secs: u64,
}

impl NewRequest {
    /// Builds the request from a policy decision; `None` unless its verdict is `Approve`.
    pub(crate) fn from_decision(
        identity: &Identity,
        session_id: u64,
        database: &str,
        sql: &str,
        decision: &crate::policy::Decision,
    ) -> Option<NewRequest> {
        let crate::policy::Verdict::Approve {
            rule,
            approver_groups,
            approvals_required,
            timeout_secs,
        } = &decision.verdict
        else {
            return None;
        };
        let mut risks: Vec<String> = decision
            .statements
            .iter()
            .flat_map(|s| s.risks.iter())
            .filter_map(|r| match serde_json::to_value(r) {
                Ok(serde_json::Value::String(name)) => Some(name),
                _ => None,
            })
            .collect();
        risks.sort();
        risks.dedup();
        Some(NewRequest {
            identity: identity.clone(),
            session_id,
            database: database.to_owned(),
            sql: sql.to_owned(),
            rule: rule.clone(),
            risks,
            policy: decision.policy.clone(),
            approver_groups: approver_groups.clone(),
            approvals_required: *approvals_required,
            timeout_secs: *timeout_secs,
        })
    }
}

/// SHA-256 (hex) of the exact statement text: a session approval covers exactly this text.
pub(crate) fn fingerprint(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// The NoticeResponse telling a client its statement is held.
pub(crate) fn pending_notice(
    id: RequestId,
    timeout_secs: u64,
    approver_groups: &[String],
) -> PgError {
    PgError {
        severity: Severity::Notice,
        code: Cow::Borrowed("01000"),
        message: format!(
            "interceptor: statement held for approval, request {id}; waiting up to {timeout_secs} s"
        ),
        detail: Some(format!(
            "approvers: {}; `interceptor approvals show {id}`",
            approver_groups.join(", ")
        )),
        hint: Some("cancel the query to stop waiting".into()),
        position: None,
    }
}

/// Every step, for the audit log (via the sink) and, reduced, for the webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum ApprovalEvent {
    Requested {
        request: Box<Request>,
    },
    /// Approvers were told about request `id` through `channel` (the webhook); `outcome`:
    /// `delivered` or why not (never the URL, which may hold a secret).
    Notified {
        id: RequestId,
        channel: String,
        outcome: String,
    },
    Voted {
        id: RequestId,
        by: String,
        approve: bool,
        reason: Option<String>,
    },
    Approved {
        id: RequestId,
        by: Vec<String>,
        scope: Scope,
        note: Option<String>,
    },
    Denied {
        id: RequestId,
        by: String,
        reason: String,
    },
    TimedOut {
        id: RequestId,
    },
    Aborted {
        id: RequestId,
        reason: String,
    },
    /// The approved statement was forwarded; its outcome is the audit outcome record of
    /// `statement` (the statement record made when it was held).
    Executed {
        id: RequestId,
        session_id: u64,
        statement: Option<u64>,
    },
    GrantActive {
        grant: super::Grant,
    },
    GrantExpired {
        id: u64,
        subject: String,
    },
    GrantRevoked {
        id: u64,
        by: String,
        reason: Option<String>,
    },
}
