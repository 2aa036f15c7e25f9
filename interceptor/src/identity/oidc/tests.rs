//! OIDC verifier tests with real keys (RSA from the `rsa` crate, P-256 and Ed25519 from ring via
//! rcgen), real signed JWTs, real JWKS files and a real loopback HTTP server for discovery.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header, encode};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const ISSUER: &str = "https://idp.example.com/realms/corp";
const AUDIENCE: &str = "interceptor";

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// RSA key generation takes seconds in debug builds, so the two RSA test keys are shipped
/// (see testdata/README.md); EC and Ed25519 keys are generated per test.
fn rsa_private(slot: usize) -> &'static RsaPrivateKey {
    static KEYS: [OnceLock<RsaPrivateKey>; 2] = [OnceLock::new(), OnceLock::new()];
    const PEMS: [&str; 2] = [
        include_str!("testdata/rsa-test-1.pem"),
        include_str!("testdata/rsa-test-2.pem"),
    ];
    KEYS[slot].get_or_init(|| RsaPrivateKey::from_pkcs8_pem(PEMS[slot]).unwrap())
}

struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn rsa_key(slot: usize, kid: &str, alg: Algorithm, jwk_alg: Option<&str>) -> TestKey {
    let private = rsa_private(slot);
    let der = private.to_pkcs1_der().unwrap();
    let mut jwk = json!({
        "kty": "RSA", "kid": kid, "use": "sig",
        "n": b64(private.n().to_bytes_be()), "e": b64(private.e().to_bytes_be()),
    });
    if let Some(a) = jwk_alg {
        jwk["alg"] = a.into();
    }
    TestKey {
        kid: kid.into(),
        alg,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk,
    }
}

fn ec_key(kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw(); // 0x04 | x | y
    assert_eq!(point.len(), 65);
    TestKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
    }
}

fn ed_key(kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    TestKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(&pair.serialize_der()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key_raw())}),
    }
}

fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn write_jwks(path: &Path, keys: &[&TestKey]) {
    std::fs::write(path, jwks(keys)).unwrap();
}

fn config_text(source: &str, extra: &str) -> OidcConfig {
    toml::from_str(&format!(
        "issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n{source}\n{extra}"
    ))
    .unwrap()
}

fn file_config(jwks: &Path, extra: &str) -> OidcConfig {
    config_text(&format!("jwks_file = \"{}\"", jwks.display()), extra)
}

fn claims() -> Value {
    let t = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": t + 300, "nbf": t - 5,
        "iat": t - 5, "groups": ["dba", "readers"], "name": "Alice Example",
    })
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.encoding).unwrap()
}

/// The error is the expected one and its message carries no part of the token.
fn assert_rejected(result: Result<Identity, IdentityError>, expected: IdentityError, token: &str) {
    let err = result.expect_err("token must be rejected");
    assert_eq!(err, expected);
    let message = err.to_string();
    assert!(!message.contains(token));
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(
            !message.contains(part),
            "message {message:?} leaks the token"
        );
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    rsa: TestKey,
    ec: TestKey,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = rsa_key(0, "rsa-1", Algorithm::RS256, Some("RS256"));
    let ec = ec_key("ec-1");
    write_jwks(&path, &[&rsa, &ec]);
    Fixture {
        _dir: dir,
        path,
        rsa,
        ec,
    }
}

impl Fixture {
    fn verifier(&self, extra: &str) -> OidcVerifier {
        OidcVerifier::new(&file_config(&self.path, extra)).unwrap()
    }
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_map_to_identities() {
    let f = fixture();
    let v = f.verifier("");
    for key in [&f.rsa, &f.ec] {
        let id = v.verify(&sign(key, &claims())).await.unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.display_name, "Alice Example");
        assert_eq!(id.groups, vec!["dba", "readers"]);
        assert_eq!(
            id.proof,
            Proof::Oidc {
                issuer: ISSUER.into()
            }
        );
        assert!(id.process.is_none());
    }
    // A pasted token with a trailing newline is the same token.
    let token = format!("{}\n", sign(&f.rsa, &claims()));
    assert!(v.verify(&token).await.is_ok());
}

#[tokio::test]
async fn eddsa_and_ps256_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let ed = ed_key("ed-1");
    let ps = rsa_key(0, "ps-1", Algorithm::PS256, None);
    write_jwks(&path, &[&ed, &ps]);
    let v = OidcVerifier::new(&file_config(&path, r#"allowed_algs = ["EdDSA", "PS256"]"#)).unwrap();
    assert_eq!(
        v.verify(&sign(&ed, &claims())).await.unwrap().subject,
        "alice"
    );
    assert_eq!(
        v.verify(&sign(&ps, &claims())).await.unwrap().subject,
        "alice"
    );

    // The default pin (RS256, ES256) refuses both.
    let strict = OidcVerifier::new(&file_config(&path, "")).unwrap();
    let t = sign(&ed, &claims());
    assert_rejected(
        strict.verify(&t).await,
        IdentityError::DisallowedAlgorithm("EdDSA".into()),
        &t,
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_with_bounded_leeway() {
    let f = fixture();
    let v = f.verifier("leeway_secs = 60");
    let t = now();

    let mut c = claims();
    c["exp"] = (t - 30).into(); // inside the leeway
    assert!(v.verify(&sign(&f.rsa, &c)).await.is_ok());

    c["exp"] = (t - 120).into();
    let token = sign(&f.rsa, &c);
    assert_rejected(v.verify(&token).await, IdentityError::Expired, &token);

    let mut c = claims();
    c["nbf"] = (t + 600).into();
    let token = sign(&f.ec, &c);
    assert_rejected(v.verify(&token).await, IdentityError::NotYetValid, &token);

    let err = OidcVerifier::new(&file_config(&f.path, "leeway_secs = 301")).unwrap_err();
    assert!(matches!(err, IdentityError::Config(_)), "{err}");
}

#[tokio::test]
async fn issuer_aliases_and_provider_style_jwks_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    // Google / Azure AD publish extra members (x5c, x5t, issuer) next to the key itself, and
    // mix in encryption keys; neither may break loading.
    let mut google = rsa_key(0, "g-1", Algorithm::RS256, Some("RS256"));
    google.jwk["x5t"] = "bm90LWEtcmVhbC10aHVtYnByaW50".into();
    google.jwk["x5c"] = json!(["TUlJQw=="]);
    google.jwk["issuer"] = "https://login.microsoftonline.com/tenant/v2.0".into();
    let mut enc = ec_key("enc-1");
    enc.jwk["use"] = "enc".into();
    write_jwks(&path, &[&enc, &google]);
    let cfg: OidcConfig = toml::from_str(&format!(
        "issuer = \"https://accounts.google.com\"\nissuer_aliases = [\"accounts.google.com\"]\n\
         audience = \"{AUDIENCE}\"\njwks_file = \"{}\"",
        path.display()
    ))
    .unwrap();
    let v = OidcVerifier::new(&cfg).unwrap();
    for iss in ["https://accounts.google.com", "accounts.google.com"] {
        let mut c = claims();
        c["iss"] = iss.into();
        let id = v.verify(&sign(&google, &c)).await.unwrap();
        assert_eq!(
            id.proof,
            Proof::Oidc {
                issuer: "https://accounts.google.com".into()
            }
        );
    }
    let mut c = claims();
    c["iss"] = "https://accounts.google.com.evil".into();
    let token = sign(&google, &c);
    assert_rejected(v.verify(&token).await, IdentityError::WrongIssuer, &token);
    // The encryption key is not a signing key.
    let token = sign(&enc, &claims());
    assert!(matches!(
        v.verify(&token).await,
        Err(IdentityError::UnknownKey { .. })
    ));
}

#[tokio::test]
async fn wrong_audience_and_wrong_issuer() {
    let f = fixture();
    let v = f.verifier("");

    let mut c = claims();
    c["aud"] = "some-other-app".into();
    let token = sign(&f.rsa, &c);
    assert_rejected(v.verify(&token).await, IdentityError::WrongAudience, &token);

    // Azure AD / Okta style list audience that includes us is fine.
    c["aud"] = json!(["api://other", AUDIENCE]);
    assert!(v.verify(&sign(&f.rsa, &c)).await.is_ok());

    let mut c = claims();
    c["iss"] = "https://evil.example.com".into();
    let token = sign(&f.rsa, &c);
    assert_rejected(v.verify(&token).await, IdentityError::WrongIssuer, &token);
}

#[tokio::test]
async fn required_claims() {
    let f = fixture();
    let v = f.verifier("");
    for claim in ["exp", "iss", "aud"] {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        let token = sign(&f.rsa, &c);
        assert_rejected(
            v.verify(&token).await,
            IdentityError::MissingClaim(claim.into()),
            &token,
        );
    }
    let mut c = claims();
    c.as_object_mut().unwrap().remove("sub");
    let token = sign(&f.rsa, &c);
    assert_rejected(
        v.verify(&token).await,
        IdentityError::MissingClaim("sub".into()),
        &token,
    );
}

#[tokio::test]
async fn bad_signatures() {
    let f = fixture();
    let v = f.verifier("");

    // Signed by a different RSA key under the trusted key's kid.
    let impostor = rsa_key(1, "rsa-1", Algorithm::RS256, None);
    let token = sign(&impostor, &claims());
    assert_rejected(v.verify(&token).await, IdentityError::BadSignature, &token);

    // A genuine token whose payload was edited.
    let good = sign(&f.ec, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims();
    c["sub"] = "admin".into();
    let token = format!("{}.{}.{}", parts[0], b64(c.to_string()), parts[2]);
    assert_rejected(v.verify(&token).await, IdentityError::BadSignature, &token);

    // A signature from another token.
    let other = sign(&f.ec, &json!({"iss": ISSUER}));
    let token = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        other.split('.').nth(2).unwrap()
    );
    assert_rejected(v.verify(&token).await, IdentityError::BadSignature, &token);
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let f = fixture();
    let v = f.verifier("");
    let payload = b64(claims().to_string());
    for (header, sig) in [
        (json!({"alg": "none", "typ": "JWT"}), ""),
        (json!({"alg": "none", "kid": "rsa-1"}), "c2lnbmF0dXJl"),
        (json!({"alg": "NONE"}), ""),
    ] {
        let token = format!("{}.{payload}.{sig}", b64(header.to_string()));
        let name = header["alg"].as_str().unwrap().to_owned();
        assert_rejected(
            v.verify(&token).await,
            IdentityError::DisallowedAlgorithm(name),
            &token,
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let f = fixture();
    let v = f.verifier("");
    let public_pem = rsa_private(0)
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    // The classic confusion: the public key (which anyone has) used as the HMAC secret.
    for secret in [
        public_pem.as_bytes(),
        rsa_private(0).n().to_bytes_be().as_slice(),
    ] {
        let token = encode(&header, &claims(), &EncodingKey::from_secret(secret)).unwrap();
        assert_rejected(
            v.verify(&token).await,
            IdentityError::DisallowedAlgorithm("HS256".into()),
            &token,
        );
    }
    // And the pin cannot be configured to allow it.
    let err = OidcVerifier::new(&file_config(
        &f.path,
        r#"allowed_algs = ["RS256", "HS256"]"#,
    ))
    .unwrap_err();
    assert!(matches!(err, IdentityError::Config(_)), "{err}");
}

#[tokio::test]
async fn algorithm_must_fit_the_named_key() {
    let f = fixture();
    let v = f.verifier(r#"allowed_algs = ["RS256", "ES256", "PS256"]"#);

    // ES256 signature presented under the RSA key's kid.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".into());
    let token = encode(&header, &claims(), &f.ec.encoding).unwrap();
    assert_rejected(
        v.verify(&token).await,
        IdentityError::KeyAlgorithmMismatch,
        &token,
    );

    // PS256 with a key whose JWK pins RS256.
    let mut header = Header::new(Algorithm::PS256);
    header.kid = Some("rsa-1".into());
    let token = encode(&header, &claims(), &f.rsa.encoding).unwrap();
    assert_rejected(
        v.verify(&token).await,
        IdentityError::KeyAlgorithmMismatch,
        &token,
    );
}

#[tokio::test]
async fn unknown_kid_and_missing_kid() {
    let f = fixture();
    let v = f.verifier("");
    let mut stranger = ec_key("nope");
    let token = sign(&stranger, &claims());
    assert_rejected(
        v.verify(&token).await,
        IdentityError::UnknownKey {
            kid: "\"nope\"".into(),
        },
        &token,
    );

    // Without a kid every fitting key is tried: the trusted EC key verifies…
    let token = encode(&Header::new(Algorithm::ES256), &claims(), &f.ec.encoding).unwrap();
    assert_eq!(v.verify(&token).await.unwrap().subject, "alice");
    // …and a stranger's signature fails on all of them.
    stranger.kid = String::new();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &stranger.encoding,
    )
    .unwrap();
    assert_rejected(v.verify(&token).await, IdentityError::BadSignature, &token);
}

#[tokio::test]
async fn unknown_kid_refreshes_the_jwks_at_most_once_per_interval() {
    let f = fixture();
    let rotated = rsa_key(1, "rsa-2", Algorithm::RS256, Some("RS256"));
    let token = sign(&rotated, &claims());
    let junk = sign(&ec_key("junk"), &claims());
    let v = f.verifier("jwks_refresh_min_secs = 1");

    // The keys were just loaded: an unknown kid does not trigger a reload yet.
    let err = v.verify(&token).await.unwrap_err();
    assert!(matches!(err, IdentityError::UnknownKey { .. }), "{err}");
    assert_eq!(v.jwks_fetches(), 0);

    // The IdP rotates keys; after the interval, the unknown kid causes one reload.
    write_jwks(&f.path, &[&f.rsa, &rotated]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(v.verify(&token).await.unwrap().subject, "alice");
    assert_eq!(v.jwks_fetches(), 1);

    // A flood of tokens with unknown kids does not turn into a flood of fetches.
    for _ in 0..5 {
        assert!(matches!(
            v.verify(&junk).await,
            Err(IdentityError::UnknownKey { .. })
        ));
    }
    assert_eq!(v.jwks_fetches(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v = Arc::new(v);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let v = Arc::clone(&v);
        let junk = junk.clone();
        tasks.push(tokio::spawn(async move { v.verify(&junk).await }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.unwrap(),
            Err(IdentityError::UnknownKey { .. })
        ));
    }
    assert_eq!(
        v.jwks_fetches(),
        2,
        "concurrent unknown kids share one refresh"
    );
}

#[tokio::test]
async fn old_keys_are_reloaded_and_kept_when_reload_fails() {
    let f = fixture();
    let v = f.verifier("jwks_refresh_min_secs = 1\njwks_max_age_secs = 1\njwks_max_stale_secs = 2");
    let token = sign(&f.rsa, &claims());
    assert!(v.verify(&token).await.is_ok());
    assert_eq!(v.jwks_fetches(), 0);

    std::fs::write(&f.path, "{ broken").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The reload fails; the keys we had stay in use rather than locking everyone out.
    assert!(v.verify(&token).await.is_ok());
    assert_eq!(v.jwks_fetches(), 1);

    // A reload that succeeds replaces the keys: the RSA key is gone now.
    write_jwks(&f.path, &[&f.ec]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(v.verify(&sign(&f.ec, &claims())).await.is_ok());
    assert_eq!(v.jwks_fetches(), 2);
    assert!(matches!(
        v.verify(&token).await,
        Err(IdentityError::UnknownKey { .. })
    ));

    // Keys that cannot be reloaded for longer than `jwks_max_stale_secs` stop being trusted.
    let ec_token = sign(&f.ec, &claims());
    std::fs::write(&f.path, "{ broken").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        v.verify(&ec_token).await.is_ok(),
        "still within the stale bound"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = v.verify(&ec_token).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::ProviderUnavailable(_)),
        "{err}"
    );
}

#[tokio::test]
async fn no_keys_means_no_login() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    assert!(OidcVerifier::new(&file_config(&missing, "")).is_err());

    let cfg = file_config(&missing, "");
    let v = OidcVerifier::with_source(&cfg, Arc::new(FileJwksSource::new(&missing))).unwrap();
    let f = fixture();
    let token = sign(&f.rsa, &claims());
    let err = v.verify(&token).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::ProviderUnavailable(_)),
        "{err}"
    );
    assert_eq!(err.sqlstate(), "28000");
    assert!(!err.to_string().contains(&token));

    // A source that comes good later is used on the next attempt after the interval.
    std::fs::copy(&f.path, &missing).unwrap();
    let cfg = file_config(&missing, "jwks_refresh_min_secs = 1");
    let v = OidcVerifier::with_source(&cfg, Arc::new(FileJwksSource::new(&missing))).unwrap();
    assert!(v.verify(&token).await.is_ok());
    assert_eq!(v.jwks_fetches(), 1);
}

#[tokio::test]
async fn malformed_tokens() {
    let f = fixture();
    let v = f.verifier("");
    let good = sign(&f.rsa, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        "password123".to_owned(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64("not json"), parts[2]),
        "a".repeat(20_000),
    ];
    for token in cases {
        let err = v.verify(&token).await.unwrap_err();
        assert_eq!(err.sqlstate(), "28P01");
        assert!(!err.to_string().contains(&token));
        assert!(
            matches!(
                err,
                IdentityError::MalformedToken(_) | IdentityError::BadSignature
            ),
            "{err}"
        );
    }
}

#[tokio::test]
async fn keycloak_azure_google_okta_claim_shapes() {
    let f = fixture();
    let t = now();

    let keycloak = f.verifier(
        r#"subject_claim = "preferred_username"
           groups_claim = ["realm_access.roles", "resource_access.interceptor.roles"]"#,
    );
    let c = json!({
        "iss": ISSUER, "aud": ["interceptor", "account"], "exp": t + 60, "sub": "f81d4fae-7dec",
        "preferred_username": "alice", "realm_access": {"roles": ["offline_access", "dba"]},
        "resource_access": {"interceptor": {"roles": ["writer"]}},
    });
    let id = keycloak.verify(&sign(&f.rsa, &c)).await.unwrap();
    assert_eq!(id.subject, "alice");
    assert_eq!(id.groups, vec!["offline_access", "dba", "writer"]);

    let azure = f.verifier(
        r#"subject_claim = "preferred_username"
           groups_claim = ["roles", "groups"]"#,
    );
    let c = json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": t + 60, "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "preferred_username": "alice@contoso.com", "roles": ["Db.Read"],
        "groups": ["6c2b5f2e-0000-4000-8000-000000000001"], "name": "Alice",
    });
    let id = azure.verify(&sign(&f.ec, &c)).await.unwrap();
    assert_eq!(id.subject, "alice@contoso.com");
    assert_eq!(
        id.groups,
        vec!["Db.Read", "6c2b5f2e-0000-4000-8000-000000000001"]
    );
    assert_eq!(id.display_name, "Alice");

    let google = f.verifier(r#"subject_claim = "email""#);
    let mut c = json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": t + 60, "sub": "1234567890",
        "email": "alice@example.com", "email_verified": true,
    });
    assert_eq!(
        google.verify(&sign(&f.rsa, &c)).await.unwrap().subject,
        "alice@example.com"
    );
    c["email_verified"] = false.into();
    let token = sign(&f.rsa, &c);
    let err = google.verify(&token).await.unwrap_err();
    assert!(matches!(err, IdentityError::InvalidClaim { .. }), "{err}");

    let okta = f.verifier("");
    let c = json!({
        "iss": ISSUER, "aud": AUDIENCE, "exp": t + 60, "sub": "00u1abcd", "groups": "Everyone",
    });
    let id = okta.verify(&sign(&f.rsa, &c)).await.unwrap();
    assert_eq!(
        (id.subject.as_str(), id.groups),
        ("00u1abcd", vec!["Everyone".to_owned()])
    );
}

#[tokio::test]
async fn user_name_binding() {
    let f = fixture();
    let token = sign(&f.rsa, &claims());

    let v = f.verifier(r#"placeholder_users = ["oidc"]"#);
    assert_eq!(
        v.verify_login("alice", &token).await.unwrap().subject,
        "alice"
    );
    assert_eq!(
        v.verify_login("oidc", &token).await.unwrap().subject,
        "alice"
    );
    let err = v.verify_login("postgres", &token).await.unwrap_err();
    assert_eq!(
        err,
        IdentityError::UserMismatch {
            user: "postgres".into()
        }
    );
    assert_eq!(err.sqlstate(), "28000");

    let loose = f.verifier("bind_user = false");
    assert!(loose.verify_login("postgres", &token).await.is_ok());
}

#[test]
fn config_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_jwks(&path, &[&ec_key("k")]);
    let jwks = format!("jwks_file = \"{}\"", path.display());
    for (source, extra) in [
        (jwks.as_str(), "jwks_url = \"https://idp.example.com/keys\""),
        (jwks.as_str(), "allowed_algs = []"),
        (jwks.as_str(), "allowed_algs = [\"RS257\"]"),
        (jwks.as_str(), "jwks_refresh_min_secs = 0"),
        (jwks.as_str(), "subject_claim = \"\""),
        (
            jwks.as_str(),
            "jwks_max_age_secs = 600\njwks_max_stale_secs = 60",
        ),
        ("jwks_url = \"http://idp.example.com/keys\"", ""),
        (
            "jwks_url = \"https://user:secret@idp.example.com/keys\"",
            "",
        ),
    ] {
        let err = OidcVerifier::new(&config_text(source, extra)).unwrap_err();
        assert!(
            matches!(err, IdentityError::Config(_)),
            "{source} {extra}: {err}"
        );
        assert!(!err.to_string().contains("secret"));
    }
    let no_audience: Result<OidcConfig, _> = toml::from_str("issuer = \"x\"");
    assert!(no_audience.is_err());
    let unknown_field: Result<OidcConfig, _> =
        toml::from_str("issuer = \"x\"\naudience = \"a\"\nleeway = 5");
    assert!(unknown_field.is_err());
    // Discovery over plain http to a remote issuer is refused.
    let remote: OidcConfig =
        toml::from_str("issuer = \"http://idp.example.com\"\naudience = \"a\"").unwrap();
    assert!(matches!(
        OidcVerifier::new(&remote),
        Err(IdentityError::Config(_))
    ));
}

/// A minimal HTTP/1.1 server on loopback serving fixed documents, for a bounded number of
/// requests.
fn serve(
    listener: tokio::net::TcpListener,
    routes: Vec<(String, String)>,
    max_requests: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..max_requests {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                match sock.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            let response = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .into(),
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    })
}

async fn idp(key: &TestKey, claimed_issuer: Option<&str>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let issuer = format!("http://127.0.0.1:{port}/realms/corp");
    let discovery = json!({
        "issuer": claimed_issuer.unwrap_or(&issuer),
        "jwks_uri": format!("http://127.0.0.1:{port}/certs"),
    });
    let routes = vec![
        (
            "/realms/corp/.well-known/openid-configuration".to_owned(),
            discovery.to_string(),
        ),
        ("/certs".to_owned(), jwks(&[key])),
    ];
    (issuer, serve(listener, routes, 8))
}

fn http_config(issuer: &str) -> OidcConfig {
    toml::from_str(&format!(
        "issuer = \"{issuer}\"\naudience = \"{AUDIENCE}\"\nhttp_timeout_secs = 5"
    ))
    .unwrap()
}

#[tokio::test]
async fn discovers_the_jwks_from_the_issuer_over_http() {
    let key = ec_key("ec-http");
    let (issuer, server) = idp(&key, None).await;
    let v = OidcVerifier::new(&http_config(&issuer)).unwrap();
    let mut c = claims();
    c["iss"] = issuer.clone().into();
    let token = sign(&key, &c);
    let id = v.verify(&token).await.unwrap();
    assert_eq!(
        id.proof,
        Proof::Oidc {
            issuer: issuer.clone()
        }
    );
    assert_eq!(v.jwks_fetches(), 1);
    // Cached: a second login does not fetch again.
    assert!(v.verify(&token).await.is_ok());
    assert_eq!(v.jwks_fetches(), 1);
    server.abort();
}

#[tokio::test]
async fn discovery_document_for_another_issuer_is_refused() {
    let key = ec_key("ec-http");
    let (issuer, server) = idp(&key, Some("https://attacker.example.com")).await;
    let v = OidcVerifier::new(&http_config(&issuer)).unwrap();
    let mut c = claims();
    c["iss"] = issuer.clone().into();
    let err = v.verify(&sign(&key, &c)).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::ProviderUnavailable(_)),
        "{err}"
    );
    server.abort();
}

#[tokio::test]
async fn jwks_url_that_fails_fails_closed() {
    let key = ec_key("ec-http");
    let (issuer, server) = idp(&key, None).await;
    let cfg = config_text(&format!("jwks_url = \"{issuer}/no-such-path\""), "");
    let v = OidcVerifier::new(&cfg).unwrap();
    let err = v.verify(&sign(&key, &claims())).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::ProviderUnavailable(_)),
        "{err}"
    );
    server.abort();
}
