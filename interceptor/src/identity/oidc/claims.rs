//! Turns validated JWT claims into subject, groups and display name, following the configured
//! claim paths so one code path serves Okta, Azure AD, Google and Keycloak tokens.

use serde_json::Value;

use crate::identity::error::IdentityError;

/// Longest subject or group name accepted.
const MAX_NAME_LEN: usize = 256;
/// Most groups taken from one token.
const MAX_GROUPS: usize = 256;

/// Finds a claim by path. A claim whose full name is the path wins (namespaced claims such as
/// `https://example.com/roles` contain dots); otherwise the path is walked through nested
/// objects (`realm_access.roles`, `resource_access.my-client.roles`).
pub(super) fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.')
        .try_fold(claims, |node, segment| node.get(segment))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

/// The subject from the configured claim; it must be a usable string.
pub(super) fn subject(claims: &Value, path: &str) -> Result<String, IdentityError> {
    let value = lookup(claims, path).ok_or_else(|| IdentityError::MissingClaim(path.to_owned()))?;
    let invalid = |reason: &str| IdentityError::InvalidClaim {
        claim: path.to_owned(),
        reason: reason.to_owned(),
    };
    let s = value.as_str().ok_or_else(|| invalid("not a string"))?;
    if !valid_name(s) {
        return Err(invalid("empty, too long or contains control characters"));
    }
    // An unverified e-mail address proves nothing about who holds it (Google, Keycloak and Okta
    // send `email_verified`; Azure AD does not, and its `email` is then taken as is).
    if path.rsplit('.').next() == Some("email") {
        let verified = claims.get("email_verified");
        let refused = matches!(verified, Some(Value::Bool(false)))
            || matches!(verified, Some(Value::String(v)) if v.eq_ignore_ascii_case("false"));
        if refused {
            return Err(invalid("e-mail address is not verified"));
        }
    }
    Ok(s.to_owned())
}

/// Groups from every configured path; a path may hold a list of strings or one string.
/// Values that are not usable names are dropped, never turned into groups.
pub(super) fn groups(claims: &Value, paths: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for path in paths {
        let values: Vec<&Value> = match lookup(claims, path) {
            Some(Value::Array(items)) => items.iter().collect(),
            Some(v @ Value::String(_)) => vec![v],
            Some(_) => {
                tracing::warn!(claim = %path, "groups claim is neither a string nor a list; ignored");
                continue;
            }
            None => continue,
        };
        for v in values {
            match v.as_str() {
                Some(g) if valid_name(g) => {
                    if out.len() >= MAX_GROUPS {
                        tracing::warn!(claim = %path, "too many groups in token; rest ignored");
                        return out;
                    }
                    if !out.iter().any(|x| x == g) {
                        out.push(g.to_owned());
                    }
                }
                _ => tracing::debug!(claim = %path, "unusable group value ignored"),
            }
        }
    }
    out
}

/// A human-friendly name: `name`, else `preferred_username`, else the subject.
pub(super) fn display_name(claims: &Value, subject: &str) -> String {
    ["name", "preferred_username"]
        .iter()
        .filter_map(|c| claims.get(*c).and_then(Value::as_str))
        .find(|s| valid_name(s))
        .unwrap_or(subject)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_namespaced_paths() {
        let c = json!({
            "realm_access": {"roles": ["dba", "reader"]},
            "resource_access": {"pg": {"roles": ["writer"]}},
            "https://example.com/roles": ["auditor"],
        });
        assert_eq!(
            groups(
                &c,
                &[
                    "realm_access.roles".into(),
                    "resource_access.pg.roles".into(),
                    "https://example.com/roles".into(),
                    "missing".into()
                ]
            ),
            vec!["dba", "reader", "writer", "auditor"]
        );
    }

    #[test]
    fn groups_accept_a_single_string_and_drop_junk() {
        let c = json!({"groups": "admins", "roles": ["a", 7, "", "a", "b\u{0}"]});
        assert_eq!(
            groups(&c, &["groups".into(), "roles".into()]),
            vec!["admins", "a"]
        );
        assert!(groups(&json!({"groups": {"x": 1}}), &["groups".into()]).is_empty());
    }

    #[test]
    fn subject_rules() {
        let c = json!({"sub": "abc", "email": "a@example.com", "email_verified": false,
                       "n": 5, "preferred_username": "alice"});
        assert_eq!(subject(&c, "sub").unwrap(), "abc");
        assert_eq!(subject(&c, "preferred_username").unwrap(), "alice");
        assert!(matches!(
            subject(&c, "email"),
            Err(IdentityError::InvalidClaim { .. })
        ));
        assert!(matches!(
            subject(&c, "n"),
            Err(IdentityError::InvalidClaim { .. })
        ));
        assert_eq!(
            subject(&c, "upn"),
            Err(IdentityError::MissingClaim("upn".into()))
        );
        let azure = json!({"email": "b@example.com"});
        assert_eq!(subject(&azure, "email").unwrap(), "b@example.com");
    }

    #[test]
    fn display_name_falls_back_to_subject() {
        assert_eq!(display_name(&json!({"name": "Alice A"}), "a"), "Alice A");
        assert_eq!(
            display_name(&json!({"preferred_username": "al"}), "a"),
            "al"
        );
        assert_eq!(display_name(&json!({"name": ""}), "a"), "a");
    }
}
