//! The issuer's public signing keys (a JWKS), reduced to what is safe to verify with: asymmetric
//! signature keys only, each remembering the family, curve and `alg` it may be used for.

use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

/// More keys than any real IdP publishes; bounds the work an oversized JWKS can cause.
const MAX_KEYS: usize = 64;
/// RSA keys below 2048 bits are refused (NIST SP 800-131A).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// One usable verification key.
struct VerificationKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    /// The JWK's own `alg`, which, when present, is the only algorithm the key may serve.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerificationKey {
    fn fits(&self, alg: Algorithm) -> bool {
        if self.family != alg.family() || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match alg {
            Algorithm::ES256 => self.curve == Some(EllipticCurve::P256),
            Algorithm::ES384 => self.curve == Some(EllipticCurve::P384),
            Algorithm::EdDSA => self.curve == Some(EllipticCurve::Ed25519),
            _ => true,
        }
    }
}

/// Why no key was selected for a token.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NoKey {
    /// No key has the token's `kid` (or, without `kid`, none fits the algorithm).
    Unknown,
    /// The `kid` exists but is a different kind of key than `alg` claims: algorithm confusion.
    Mismatch,
}

/// A parsed JWKS.
pub(super) struct KeySet {
    keys: Vec<VerificationKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document. Keys that are unusable for signature verification are skipped
    /// (real JWKS mix in encryption keys and unsupported curves); a set with no usable key is
    /// an error, so a broken JWKS fails closed.
    pub(super) fn parse(json: &str) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let entries = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("JWKS has no `keys` array")?;
        let mut keys = Vec::new();
        for entry in entries.iter().take(MAX_KEYS) {
            match parse_key(entry) {
                Ok(Some(key)) => keys.push(key),
                Ok(None) => {}
                Err(reason) => {
                    let kid = entry.get("kid").and_then(|k| k.as_str()).unwrap_or("?");
                    tracing::warn!(kid, %reason, "skipping JWKS key");
                }
            }
        }
        if keys.is_empty() {
            return Err("JWKS has no usable signing key".into());
        }
        Ok(KeySet { keys })
    }

    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The keys that may verify a token with this `alg` and `kid`.
    pub(super) fn select(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Vec<&DecodingKey>, NoKey> {
        let Some(kid) = kid else {
            // Some IdPs omit `kid` when they have one key: try every key that fits.
            let fitting: Vec<_> = self
                .keys
                .iter()
                .filter(|k| k.fits(alg))
                .map(|k| &k.key)
                .collect();
            return if fitting.is_empty() {
                Err(NoKey::Unknown)
            } else {
                Ok(fitting)
            };
        };
        let named: Vec<_> = self
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect();
        if named.is_empty() {
            return Err(NoKey::Unknown);
        }
        let fitting: Vec<_> = named
            .into_iter()
            .filter(|k| k.fits(alg))
            .map(|k| &k.key)
            .collect();
        if fitting.is_empty() {
            Err(NoKey::Mismatch)
        } else {
            Ok(fitting)
        }
    }
}

/// `Ok(None)`: a key that is fine but not for us (encryption, symmetric); `Err`: a broken or
/// unsupported key worth a warning.
fn parse_key(entry: &serde_json::Value) -> Result<Option<VerificationKey>, String> {
    let jwk: Jwk =
        serde_json::from_value(entry.clone()).map_err(|e| format!("invalid JWK: {e}"))?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    ) {
        return Ok(None);
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Ok(None);
    }
    let alg = match &jwk.common.key_algorithm {
        None => None,
        Some(ka) => {
            // KeyAlgorithm and Algorithm share names for signature algorithms; anything else
            // (RSA-OAEP, unknown) marks a key that must not verify signatures.
            let name = serde_json::to_value(ka)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            match Algorithm::from_str(&name) {
                Ok(a) => Some(a),
                Err(_) => return Ok(None),
            }
        }
    };
    let (family, curve) = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url".to_owned())?;
            let significant = modulus.iter().skip_while(|b| **b == 0).count();
            if significant < MIN_RSA_MODULUS_BYTES {
                return Err(format!("RSA key of {} bits is too short", significant * 8));
            }
            (AlgorithmFamily::Rsa, None)
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 | EllipticCurve::P384 => {
                (AlgorithmFamily::Ec, Some(ec.curve.clone()))
            }
            _ => return Err("unsupported EC curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => (AlgorithmFamily::Ed, Some(EllipticCurve::Ed25519)),
            _ => return Err("unsupported OKP curve".into()),
        },
        // A symmetric key in a public JWKS is never trusted: that is the HS256 confusion attack.
        AlgorithmParameters::OctetKey(_) => return Ok(None),
        _ => return Err("unsupported key type".into()),
    };
    if alg.is_some_and(|a| a.family() != family) {
        return Err("JWK `alg` does not match its key type".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Some(VerificationKey {
        kid: jwk.common.key_id.clone(),
        family,
        curve,
        alg,
        key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_jwk(kid: &str, bytes: usize) -> serde_json::Value {
        let mut n = vec![0xC5u8; bytes];
        n[bytes - 1] |= 1;
        serde_json::json!({"kty":"RSA","kid":kid,"use":"sig","n":URL_SAFE_NO_PAD.encode(n),"e":"AQAB"})
    }

    #[test]
    fn skips_unusable_keys_and_keeps_signature_keys() {
        let doc = serde_json::json!({"keys": [
            rsa_jwk("sig", 256),
            rsa_jwk("short", 128),
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"RSA","kid":"oaep","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"},
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
            {"kty":"EC","kid":"p521","crv":"P-521","x":"AQ","y":"AQ"},
            {"kty":"weird","kid":"w"}
        ]});
        let set = KeySet::parse(&doc.to_string()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.select(Algorithm::RS256, Some("sig")).is_ok());
        assert_eq!(
            set.select(Algorithm::RS256, Some("hmac")).err(),
            Some(NoKey::Unknown)
        );
        assert_eq!(
            set.select(Algorithm::ES256, Some("sig")).err(),
            Some(NoKey::Mismatch)
        );
        assert_eq!(set.select(Algorithm::RS256, None).map(|k| k.len()), Ok(1));
        assert_eq!(
            set.select(Algorithm::ES256, None).err(),
            Some(NoKey::Unknown)
        );
    }

    #[test]
    fn jwk_alg_pins_the_algorithm() {
        let mut k = rsa_jwk("k", 256);
        k["alg"] = "RS256".into();
        let set = KeySet::parse(&serde_json::json!({ "keys": [k] }).to_string()).unwrap();
        assert!(set.select(Algorithm::RS256, Some("k")).is_ok());
        assert_eq!(
            set.select(Algorithm::PS256, Some("k")).err(),
            Some(NoKey::Mismatch)
        );
    }

    #[test]
    fn empty_or_broken_sets_fail_closed() {
        assert!(KeySet::parse("not json").is_err());
        assert!(KeySet::parse("{}").is_err());
        assert!(KeySet::parse(r#"{"keys":[]}"#).is_err());
        assert!(KeySet::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
    }
}
