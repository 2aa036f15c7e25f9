//! OIDC through the real proxy: a JWT signed by the identity provider's key is the password
//! (over TLS only); expired, wrongly addressed or forged tokens are refused without echoing them.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use interceptor_tests::{Interceptor, InterceptorSetup, PgCluster, PgCommand, SslMode, TestCerts};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;

const ISSUER: &str = "https://idp.example.test/realms/agents";
const KEY: &str = include_str!("../../interceptor/src/identity/oidc/testdata/rsa-test-1.pem");
const OTHER_KEY: &str = include_str!("../../interceptor/src/identity/oidc/testdata/rsa-test-2.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(pem: &str, aud: &str, exp: u64) -> String {
    let key = RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": aud, "sub": "agent-7", "exp": exp, "iat": now(),
        "groups": ["ai-agents"],
    });
    encode(&header, &claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap()
}

#[test]
fn a_jwt_is_the_password_and_bad_tokens_are_refused() {
    if interceptor_tests::direct_mode() {
        eprintln!("direct mode: PostgreSQL has no OIDC; skipped");
        return;
    }
    let pg = PgCluster::start().unwrap();
    let certs = TestCerts::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = RsaPrivateKey::from_pkcs8_pem(KEY).unwrap();
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    }]});
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .tls(&certs)
            .policy_file(
                "agents",
                "[policy]\nname = \"agents\"\n[identities]\ngroups = [\"ai-agents\"]\n\
                 [login]\nupstream_role = \"app_ro\"\ndatabases = [\"*\"]\n\
                 [[rule]]\nname = \"reads\"\ndecision = \"allow\"\nkinds = [\"read\"]\n",
            )
            .extra_toml(&format!(
                "[oidc]\nissuer = \"{ISSUER}\"\naudience = [\"interceptor\"]\njwks_file = \"{}\"\n",
                jwks_file.display()
            )),
    )
    .unwrap();
    let params = |tok: &str, mode: SslMode| {
        proxy
            .params("agent-7")
            .user("agent-7")
            .password(Some(tok))
            .host("localhost")
            .sslmode(mode)
            .sslrootcert(&certs.ca_cert)
    };
    let good = token(KEY, "interceptor", now() + 300);
    let out = PgCommand::psql(&params(&good, SslMode::VerifyFull))
        .args(["-A", "-t", "-c", "SELECT current_user"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "app_ro\n");

    for (bad, why) in [
        (token(KEY, "interceptor", now() - 3600), "expired"),
        (token(KEY, "someone-else", now() + 300), "audience"),
        (token(OTHER_KEY, "interceptor", now() + 300), "signature"),
    ] {
        let out = PgCommand::psql(&params(&bad, SslMode::VerifyFull))
            .args(["-c", "SELECT 1"])
            .run()
            .unwrap();
        assert!(!out.success(), "{why}: {out:?}");
        assert!(out.stderr.contains("FATAL"), "{why}: {out:?}");
        assert!(!out.stderr.contains(&bad), "{why}: the token was echoed");
        assert!(!proxy.logs().contains(&bad), "{why}: the token was logged");
    }

    // Never over plaintext: the token would be exposed.
    let out = PgCommand::psql(&params(&good, SslMode::Disable))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("only accepted over TLS"), "{out:?}");
}
