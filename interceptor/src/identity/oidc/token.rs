//! A first, strict look at a presented JWT before any key is touched: shape, size, and the
//! header fields that decide which key may verify it. Rejecting `alg: none`, HMAC and anything
//! not pinned here is what keeps algorithm-confusion attacks away from the crypto library.

use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;

use crate::identity::error::{IdentityError, sanitize};

/// Longest token accepted; real IdP tokens (even Azure AD with many groups) stay well below.
pub(super) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The header fields verification depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TokenHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

fn malformed(reason: &str) -> IdentityError {
    IdentityError::MalformedToken(reason.to_owned())
}

fn is_base64url(part: &str) -> bool {
    part.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks the compact serialization and returns the pinned algorithm and key id.
pub(super) fn inspect(token: &str, allowed: &[Algorithm]) -> Result<TokenHeader, IdentityError> {
    if token.is_empty() {
        return Err(malformed("empty token"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("token is too long"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => return Err(malformed("encrypted tokens (JWE) are not supported")),
        _ => return Err(malformed("a JWT has three dot-separated parts")),
    }
    if !parts.iter().all(|p| is_base64url(p)) {
        return Err(malformed("token parts must be unpadded base64url"));
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(parts[0])
        .map_err(|_| malformed("token header is not base64url"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header_bytes).map_err(|_| malformed("token header is not JSON"))?;
    let header = header
        .as_object()
        .ok_or_else(|| malformed("token header is not a JSON object"))?;

    let alg_name = header
        .get("alg")
        .and_then(|v| v.as_str())
        .ok_or_else(|| malformed("token header has no `alg`"))?;
    let alg = Algorithm::from_str(alg_name)
        .ok()
        .filter(|a| allowed.contains(a))
        .ok_or_else(|| IdentityError::DisallowedAlgorithm(sanitize(alg_name, 32)))?;
    if parts[2].is_empty() {
        return Err(malformed("token is not signed"));
    }
    // RFC 7515 §4.1.11: a recipient must reject extensions it does not understand.
    if header.contains_key("crit") {
        return Err(malformed("critical header extensions are not supported"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(malformed("token header `kid` is not a string")),
    };
    Ok(TokenHeader { alg, kid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    const ALLOWED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];

    #[test]
    fn reads_alg_and_kid() {
        let t = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","kid":"k1"}"#),
            b64("{}")
        );
        let h = inspect(&t, ALLOWED).unwrap();
        assert_eq!(h.alg, Algorithm::RS256);
        assert_eq!(h.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn rejects_none_hmac_and_unpinned_algorithms() {
        for alg in ["none", "None", "HS256", "PS256", "RS1"] {
            let t = format!(
                "{}.{}.c2ln",
                b64(&format!(r#"{{"alg":"{alg}"}}"#)),
                b64("{}")
            );
            assert_eq!(
                inspect(&t, ALLOWED),
                Err(IdentityError::DisallowedAlgorithm(alg.into())),
                "{alg}"
            );
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let h = b64(r#"{"alg":"RS256"}"#);
        let cases = [
            String::new(),
            "abc".to_owned(),
            format!("{h}.e30"),
            format!("{h}.e30.c2ln.x.y"),
            format!("{h}.e30="),
            format!("{h}.e30.c2ln="),
            format!("{h}.e30."),
            format!("{}.e30.c2ln", b64("[1]")),
            format!("{}.e30.c2ln", b64(r#"{"alg":"RS256","crit":["b64"]}"#)),
            format!("{}.e30.c2ln", b64(r#"{"alg":"RS256","kid":7}"#)),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for t in cases {
            assert!(
                matches!(inspect(&t, ALLOWED), Err(IdentityError::MalformedToken(_))),
                "{t:.60}"
            );
        }
    }
}
