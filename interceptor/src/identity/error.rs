//! Why an identity could not be established. Every provider (OIDC, mTLS, …) returns this type so
//! the session layer can turn any failure into one PostgreSQL error response.
//!
//! Messages are written for the client: they say what was wrong, never echo the credential
//! (token, password) and never include key material.

/// SQLSTATE `28000` invalid_authorization_specification.
pub(crate) const SQLSTATE_INVALID_AUTHORIZATION: &str = "28000";
/// SQLSTATE `28P01` invalid_password: the credential itself was rejected.
pub(crate) const SQLSTATE_INVALID_PASSWORD: &str = "28P01";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum IdentityError {
    /// The credential is not a well-formed JWT (wrong shape, bad base64/JSON, too long, JWE, …).
    #[error("invalid token: {0}")]
    MalformedToken(String),
    /// The token's `alg` is not one of the pinned algorithms (includes `none` and HMAC).
    #[error("token algorithm `{0}` is not allowed")]
    DisallowedAlgorithm(String),
    /// The token names a key that does not fit the algorithm it claims (algorithm confusion).
    #[error("token algorithm does not match the signing key type")]
    KeyAlgorithmMismatch,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not trusted")]
    WrongIssuer,
    #[error("token audience does not include this gateway")]
    WrongAudience,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token claim `{claim}` is invalid: {reason}")]
    InvalidClaim { claim: String, reason: String },
    /// No key in the issuer's JWKS matches the token, even after a (rate-limited) refresh.
    #[error("token signing key {kid} is unknown to the identity provider")]
    UnknownKey { kid: String },
    /// The JWKS could not be loaded; verification fails closed.
    #[error("identity provider keys are unavailable: {0}")]
    ProviderUnavailable(String),
    /// The PostgreSQL user name the client sent is not the authenticated subject.
    #[error("user name \"{user}\" does not match the authenticated identity")]
    UserMismatch { user: String },
    /// A client certificate that cannot be mapped to an identity.
    #[error("client certificate rejected: {0}")]
    Certificate(String),
    /// Invalid provider configuration (reported at startup, never to clients).
    #[error("identity configuration: {0}")]
    Config(String),
}

impl IdentityError {
    /// The SQLSTATE the proxy sends when this error ends a login.
    ///
    /// A rejected credential is `28P01` (as PostgreSQL reports a wrong password); a credential
    /// that is fine but does not authorize this login, or no usable credential at all, is `28000`.
    pub(crate) fn sqlstate(&self) -> &'static str {
        match self {
            IdentityError::MalformedToken(_)
            | IdentityError::DisallowedAlgorithm(_)
            | IdentityError::KeyAlgorithmMismatch
            | IdentityError::BadSignature
            | IdentityError::Expired
            | IdentityError::NotYetValid
            | IdentityError::WrongIssuer
            | IdentityError::WrongAudience
            | IdentityError::MissingClaim(_)
            | IdentityError::InvalidClaim { .. }
            | IdentityError::UnknownKey { .. } => SQLSTATE_INVALID_PASSWORD,
            IdentityError::ProviderUnavailable(_)
            | IdentityError::UserMismatch { .. }
            | IdentityError::Certificate(_)
            | IdentityError::Config(_) => SQLSTATE_INVALID_AUTHORIZATION,
        }
    }
}

/// Makes attacker-chosen text (a `kid`, a user name) safe to put in a message or log line:
/// printable ASCII only, bounded length.
pub(crate) fn sanitize(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_failures_are_28p01_and_authorization_failures_28000() {
        assert_eq!(IdentityError::Expired.sqlstate(), "28P01");
        assert_eq!(IdentityError::BadSignature.sqlstate(), "28P01");
        assert_eq!(
            IdentityError::UserMismatch { user: "bob".into() }.sqlstate(),
            "28000"
        );
        assert_eq!(IdentityError::Certificate("x".into()).sqlstate(), "28000");
    }

    #[test]
    fn sanitize_bounds_and_strips_control_characters() {
        assert_eq!(sanitize("ab\ncd", 10), "ab?cd");
        assert_eq!(sanitize("abcdef", 3), "abc…");
        assert_eq!(sanitize("ключ", 10), "????");
    }
}
