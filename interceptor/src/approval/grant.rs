//! Time-bound grants: extra groups for one identity until an expiry, approved like a held
//! statement. The gate decides with [`elevate`]d identities, so a grant takes effect on live
//! sessions at their next statement and ends by itself when it expires.

use serde::{Deserialize, Serialize};

use super::ApprovalError;
use crate::identity::Identity;

/// An approved grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Grant {
    pub id: u64,
    /// The identity the grant is for.
    pub subject: String,
    /// Groups added to the identity while the grant is active.
    pub groups: Vec<String>,
    /// A policy the requester asked for by name (see the report: the gate may map it).
    pub policy: Option<String>,
    pub reason: String,
    pub request_id: u64,
    pub approved_by: Vec<String>,
    pub starts_at_ms: u64,
    pub expires_at_ms: u64,
    pub revoked_by: Option<String>,
    pub revoked_at_ms: Option<u64>,
    /// Set once the expiry was reported.
    #[serde(default)]
    pub expired_reported: bool,
}

impl Grant {
    pub(crate) fn is_active(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.starts_at_ms <= now_ms && now_ms < self.expires_at_ms
    }
}

/// What `access request` / `POST /grants` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GrantRequest {
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub policy: Option<String>,
    /// e.g. `30m`, `2h`, `1h30m`, `90s`.
    pub duration: String,
    pub reason: String,
}

/// `identity` with the groups of its active grants added (grants for other subjects ignored).
pub(crate) fn elevate(identity: &Identity, grants: &[Grant], now_ms: u64) -> Identity {
    let mut out = identity.clone();
    for g in grants
        .iter()
        .filter(|g| g.subject == identity.subject && g.is_active(now_ms))
    {
        for group in &g.groups {
            if !out.in_group(group) {
                out.groups.push(group.clone());
            }
        }
    }
    out
}

/// Parses `30m`, `2h`, `1h30m`, `45s`, `1d` into seconds (positive, bounded by `u32` seconds).
pub(crate) fn parse_duration(text: &str) -> Result<u64, ApprovalError> {
    let bad = || ApprovalError::BadRequest(format!("invalid duration {text:?} (e.g. 30m, 2h)"));
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.trim().chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(
                number
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(bad)?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n = number.take().ok_or_else(bad)?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
    }
    if number.is_some() || total == 0 || total > u64::from(u32::MAX) {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Proof;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("45s").unwrap(), 45);
        assert_eq!(parse_duration("1d").unwrap(), 86_400);
        for bad in ["", "30", "m", "0m", "-5m", "5x", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn elevate_adds_groups_of_active_grants_only() {
        let id = Identity {
            subject: "bob".into(),
            display_name: "Bob".into(),
            groups: vec!["readers".into()],
            proof: Proof::ScramSha256,
            process: None,
        };
        let grant = |subject: &str, group: &str, expires: u64, revoked: bool| Grant {
            id: 1,
            subject: subject.into(),
            groups: vec![group.into(), "readers".into()],
            policy: None,
            reason: "incident".into(),
            request_id: 1,
            approved_by: vec!["alice".into()],
            starts_at_ms: 100,
            expires_at_ms: expires,
            revoked_by: revoked.then(|| "alice".into()),
            revoked_at_ms: revoked.then_some(150),
            expired_reported: false,
        };
        let grants = [
            grant("bob", "writers", 1000, false),
            grant("bob", "expired", 200, false),
            grant("bob", "revoked", 1000, true),
            grant("eve", "other", 1000, false),
        ];
        let e = elevate(&id, &grants, 500);
        assert_eq!(e.groups, vec!["readers", "writers"]);
        assert_eq!(elevate(&id, &grants, 1000).groups, vec!["readers"]);
    }
}
