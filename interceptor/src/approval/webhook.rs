//! Fire-and-forget JSON POSTs on new, decided and expired requests. The payload names the
//! request but carries no SQL: approvers read it through the authenticated API.

use std::time::Duration;

use serde_json::{Value, json};

use super::ApprovalError;
use super::model::{ApprovalEvent, RequestKind};

pub(super) struct Webhook {
    url: String,
    agent: ureq::Agent,
}

/// The shared rule for URLs interceptor dials (see `outbound`): https anywhere, plain http only
/// to loopback, no credentials, a host.
pub(super) fn check_url(url: &str) -> Result<(), ApprovalError> {
    crate::outbound::check(url)
        .map(|_| ())
        .map_err(|e| ApprovalError::Config(format!("webhook_url {e}")))
}

impl Webhook {
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Webhook, ApprovalError> {
        check_url(url)?;
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .build();
        Ok(Webhook {
            url: url.to_owned(),
            agent: config.into(),
        })
    }

    /// Sends the event if it is one the webhook reports, without waiting for the answer;
    /// `done` gets `delivered` or why not, once known (not called for events not reported).
    pub(super) fn send(&self, event: &ApprovalEvent, done: impl FnOnce(String) + Send + 'static) {
        let Some(body) = payload(event) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            done("not sent (no runtime)".into());
            return;
        };
        let agent = self.agent.clone();
        let url = self.url.clone();
        handle.spawn_blocking(move || {
            let result = agent
                .post(&url)
                .header("content-type", "application/json")
                .send(body.to_string());
            done(match result {
                Ok(_) => "delivered".into(),
                Err(e) => {
                    tracing::warn!(error = %e, "approvals webhook failed");
                    failure(&e)
                }
            });
        });
    }
}

/// Why a delivery failed, for the audit trail: coarse on purpose, since ureq's messages may
/// name the URL and a webhook URL often carries a secret.
fn failure(e: &ureq::Error) -> String {
    match e {
        ureq::Error::StatusCode(code) => format!("failed: HTTP {code}"),
        ureq::Error::Timeout(_) => "failed: timed out".into(),
        ureq::Error::Io(io) => format!("failed: {}", io.kind()),
        _ => "failed".into(),
    }
}

/// The webhook's view of an event (`None`: not reported).
pub(super) fn payload(event: &ApprovalEvent) -> Option<Value> {
    Some(match event {
        ApprovalEvent::Requested { request } => {
            let (kind, database, groups) = match &request.kind {
                RequestKind::Statement { database, .. } => ("statement", Some(database), None),
                RequestKind::Grant { groups, .. } => ("grant", None, Some(groups)),
            };
            json!({
                "event": "requested", "id": request.id, "kind": kind,
                "requester": request.identity.subject, "database": database,
                "groups": groups, "rule": request.rule,
                "approver_groups": request.approver_groups,
                "approvals_required": request.approvals_required,
                "deadline_ms": request.deadline_ms,
            })
        }
        ApprovalEvent::Approved { id, by, scope, .. } => {
            json!({"event": "approved", "id": id, "by": by, "scope": scope})
        }
        ApprovalEvent::Denied { id, by, reason } => {
            json!({"event": "denied", "id": id, "by": by, "reason": reason})
        }
        ApprovalEvent::TimedOut { id } => json!({"event": "timed_out", "id": id}),
        ApprovalEvent::Aborted { id, .. } => json!({"event": "aborted", "id": id}),
        ApprovalEvent::GrantExpired { id, subject } => {
            json!({"event": "grant_expired", "grant": id, "subject": subject})
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(check_url("https://hooks.example.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("http://[::1]:80/").is_ok());
        assert!(check_url("http://hooks.example.com/").is_err());
        assert!(check_url("http://127.0.0.1.evil.com/").is_err());
        assert!(check_url("http://user@127.0.0.1/").is_err());
        assert!(check_url("ftp://127.0.0.1/").is_err());
        // Before the shared rule, an https webhook URL could carry credentials or no host.
        assert!(check_url("https://user:pw@hooks.example.com/").is_err());
        assert!(check_url("https:///x").is_err());
    }
}
