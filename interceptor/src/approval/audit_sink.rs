//! Every approval step becomes an audit record.

use std::sync::Arc;

use super::{ApprovalEvent, EventSink};
use crate::audit::{
    Approval, ApprovalAction, AuditEvent, AuditLog, RecordId, SessionId, Timestamp,
};

/// An [`EventSink`] that appends each approval event to the audit trail.
pub(crate) fn to_audit(log: AuditLog) -> EventSink {
    Arc::new(move |event: ApprovalEvent| {
        let record = approval_record(event);
        if let Err(e) = log.append(AuditEvent::Approval(record)) {
            tracing::error!(error = %e, "cannot record an approval event in the audit trail");
        }
    })
}

fn approval_record(event: ApprovalEvent) -> Approval {
    let base = |id: u64, action| Approval {
        approval_id: id.to_string(),
        action,
        session: None,
        statement: None,
        by: None,
        reason: None,
        grant_until: None,
    };
    match event {
        ApprovalEvent::Requested { request } => {
            let mut a = base(request.id, ApprovalAction::Requested);
            if let super::RequestKind::Statement { session_id, .. } = &request.kind {
                a.session = Some(SessionId(*session_id));
            }
            a.by = Some(request.identity.subject.clone());
            a.reason = Some(format!(
                "rule {}; approvers {}; {} approval(s) needed",
                request.rule,
                request.approver_groups.join(", "),
                request.approvals_required
            ));
            a
        }
        ApprovalEvent::Notified {
            id,
            channel,
            outcome,
        } => Approval {
            reason: Some(format!("{channel}: {outcome}")),
            ..base(id, ApprovalAction::Notified)
        },
        ApprovalEvent::Voted {
            id,
            by,
            approve,
            reason,
        } => Approval {
            by: Some(by),
            reason: Some(format!(
                "{}{}",
                if approve { "approve" } else { "deny" },
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            )),
            ..base(id, ApprovalAction::Voted)
        },
        ApprovalEvent::Approved { id, by, note, .. } => Approval {
            by: Some(by.join(", ")),
            reason: note,
            ..base(id, ApprovalAction::Granted)
        },
        ApprovalEvent::Denied { id, by, reason } => Approval {
            by: Some(by),
            reason: Some(reason),
            ..base(id, ApprovalAction::Denied)
        },
        ApprovalEvent::TimedOut { id } => Approval {
            reason: Some("timed out".into()),
            ..base(id, ApprovalAction::Expired)
        },
        ApprovalEvent::Aborted { id, reason } => Approval {
            reason: Some(reason),
            ..base(id, ApprovalAction::Aborted)
        },
        ApprovalEvent::Executed {
            id,
            session_id,
            statement,
        } => Approval {
            session: Some(SessionId(session_id)),
            statement: statement.map(RecordId),
            ..base(id, ApprovalAction::Executed)
        },
        ApprovalEvent::GrantActive { grant } => Approval {
            by: Some(grant.approved_by.join(", ")),
            reason: Some(format!(
                "grant #{} for {}: groups {}; {}",
                grant.id,
                grant.subject,
                grant.groups.join(", "),
                grant.reason
            )),
            grant_until: Some(Timestamp::from_unix_micros(
                grant.expires_at_ms.saturating_mul(1000),
            )),
            ..base(grant.request_id, ApprovalAction::Granted)
        },
        ApprovalEvent::GrantExpired { id, subject } => Approval {
            reason: Some(format!("grant #{id} for {subject} expired")),
            ..base(id, ApprovalAction::Expired)
        },
        ApprovalEvent::GrantRevoked { id, by, reason } => Approval {
            by: Some(by),
            reason,
            ..base(id, ApprovalAction::Revoked)
        },
    }
}
