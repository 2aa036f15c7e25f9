//! mTLS tests: CAs and certificates made with rcgen (ring), real TLS handshakes between a
//! tokio-rustls client and server over an in-memory duplex stream, real PEM files.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};
use rustls::ClientConfig;
use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

struct Leaf {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

#[derive(Default)]
struct LeafSpec<'a> {
    cns: &'a [&'a str],
    ous: &'a [&'a str],
    sans: Vec<SanType>,
    expired: bool,
    serial: u64,
}

fn ia5(s: &str) -> rcgen::Ia5String {
    s.try_into().unwrap()
}

fn leaf(ca: &Ca, spec: LeafSpec<'_>) -> Leaf {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    // rcgen's default DN has a CN of its own; start empty so "no CN" means none.
    params.distinguished_name = rcgen::DistinguishedName::new();
    for cn in spec.cns {
        params.distinguished_name.push(DnType::CommonName, *cn);
    }
    for ou in spec.ous {
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, *ou);
    }
    params.subject_alt_names = spec.sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from(spec.serial.max(1)));
    if spec.expired {
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Leaf {
        der: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn client(ca: &Ca, cn: &str) -> Leaf {
    leaf(
        ca,
        LeafSpec {
            cns: &[cn],
            ..Default::default()
        },
    )
}

fn write_ca(dir: &Path, ca: &Ca) -> PathBuf {
    let path = dir.join("client-ca.pem");
    std::fs::write(&path, ca.cert.pem()).unwrap();
    path
}

fn config(ca_file: &Path, extra: &str) -> MtlsConfig {
    toml::from_str(&format!("ca_file = \"{}\"\n{extra}", ca_file.display())).unwrap()
}

/// The gateway side: a server certificate from `server_ca` for `localhost` (loaded from PEM
/// files, as the daemon does) and our verifier.
fn gateway(server_ca: &Ca, cfg: &MtlsConfig) -> Arc<rustls::ServerConfig> {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &server_ca.cert, &server_ca.key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let (chain, key) = load_server_identity(&cert_file, &key_file).unwrap();
    server_config(chain, key, Some(client_cert_verifier(cfg).unwrap())).unwrap()
}

/// Runs a real TLS handshake plus one round trip; returns what the server saw: the client's
/// certificates, or the server's handshake error.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    server_ca: &Ca,
    client_cert: Option<Leaf>,
) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let client_config = match client_cert {
        Some(c) => builder.with_client_auth_cert(vec![c.der], c.key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let acceptor = tokio_rustls::TlsAcceptor::from(server);

    let server_side = async move {
        let mut tls = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(tls.get_ref().1.peer_certificates().map(|c| c.to_vec()))
    };
    let client_side = async move {
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, client_io).await?;
        tls.write_all(b"ping").await?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await?;
        Ok::<_, std::io::Error>(())
    };
    let (server_result, client_result) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("handshake must not hang");
    // A client only completes its round trip if the server accepted it.
    assert_eq!(server_result.is_ok(), client_result.is_ok());
    server_result
}

#[tokio::test]
async fn certificate_from_the_ca_maps_to_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let server_ca = ca("Corp Server CA");
    let cfg = config(
        &write_ca(dir.path(), &client_ca),
        "ou_as_groups = true\n[groups]\nalice = [\"readers\", \"dba\"]",
    );
    let alice = leaf(
        &client_ca,
        LeafSpec {
            cns: &["alice"],
            ous: &["dba"],
            sans: vec![SanType::Rfc822Name(ia5("alice@example.com"))],
            ..Default::default()
        },
    );
    let expected_der = alice.der.clone();

    let peer = handshake(gateway(&server_ca, &cfg), &server_ca, Some(alice))
        .await
        .unwrap()
        .expect("the server saw the client certificate");
    assert_eq!(peer[0], expected_der);

    let id = identity_from_cert(&peer[0], &cfg).unwrap();
    assert_eq!(id.subject, "alice");
    assert_eq!(id.display_name, "alice");
    assert_eq!(id.groups, vec!["readers", "dba"]);
    let Proof::ClientCertificate { subject, sha256 } = &id.proof else {
        panic!("wrong proof {:?}", id.proof);
    };
    assert!(subject.contains("CN=alice"), "{subject}");
    assert_eq!(sha256, &hex::encode(Sha256::digest(&expected_der)));
    assert_eq!(sha256.len(), 64);

    // The same certificate mapped by its e-mail SAN.
    let by_email = config(&cfg.ca_file, "subject_from = \"email\"");
    assert_eq!(
        identity_from_cert(&peer[0], &by_email).unwrap().subject,
        "alice@example.com"
    );
}

#[tokio::test]
async fn certificate_from_another_ca_is_rejected_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let rogue_ca = ca("Corp Client CA"); // same name, different key
    let server_ca = ca("Corp Server CA");
    let cfg = config(&write_ca(dir.path(), &client_ca), "");
    let err = handshake(
        gateway(&server_ca, &cfg),
        &server_ca,
        Some(client(&rogue_ca, "mallory")),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let server_ca = ca("Corp Server CA");
    let cfg = config(&write_ca(dir.path(), &client_ca), "");
    let old = leaf(
        &client_ca,
        LeafSpec {
            cns: &["bob"],
            expired: true,
            ..Default::default()
        },
    );
    let old_der = old.der.clone();
    let err = handshake(gateway(&server_ca, &cfg), &server_ca, Some(old))
        .await
        .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    // And the mapping refuses it on its own as well.
    assert!(matches!(
        identity_from_cert(&old_der, &cfg),
        Err(IdentityError::Certificate(_))
    ));
}

#[tokio::test]
async fn revoked_certificate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let server_ca = ca("Corp Server CA");
    let crl = CertificateRevocationListParams {
        this_update: date_time_ymd(2020, 1, 1),
        next_update: date_time_ymd(2099, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(666u64),
            revocation_time: date_time_ymd(2020, 1, 1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&client_ca.cert, &client_ca.key)
    .unwrap();
    let crl_path = dir.path().join("client-ca.crl.pem");
    std::fs::write(&crl_path, crl.pem().unwrap()).unwrap();
    let cfg = config(
        &write_ca(dir.path(), &client_ca),
        &format!("crl_files = [\"{}\"]", crl_path.display()),
    );
    let server = gateway(&server_ca, &cfg);

    let revoked = leaf(
        &client_ca,
        LeafSpec {
            cns: &["carol"],
            serial: 666,
            ..Default::default()
        },
    );
    let err = handshake(server.clone(), &server_ca, Some(revoked))
        .await
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");

    let fine = leaf(
        &client_ca,
        LeafSpec {
            cns: &["dave"],
            serial: 667,
            ..Default::default()
        },
    );
    assert!(handshake(server, &server_ca, Some(fine)).await.is_ok());
}

#[tokio::test]
async fn clients_without_a_certificate_pass_unless_required() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let server_ca = ca("Corp Server CA");
    let ca_file = write_ca(dir.path(), &client_ca);

    let optional = MtlsConfig::with_ca_file(&ca_file);
    let seen = handshake(gateway(&server_ca, &optional), &server_ca, None)
        .await
        .unwrap();
    assert!(seen.is_none());

    let required = config(&ca_file, "require_client_cert = true");
    let err = handshake(gateway(&server_ca, &required), &server_ca, None)
        .await
        .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn subject_from_san_fields() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let ca_file = write_ca(dir.path(), &client_ca);
    let workload = leaf(
        &client_ca,
        LeafSpec {
            sans: vec![
                SanType::URI(ia5("https://example.org/not-spiffe")),
                SanType::URI(ia5("spiffe://example.org/ns/etl/sa/loader")),
                SanType::DnsName(ia5("loader.etl.svc")),
            ],
            ..Default::default()
        },
    );

    let uri = config(
        &ca_file,
        "subject_from = \"uri\"\nuri_prefix = \"spiffe://example.org/\"\n\
         [groups]\n\"spiffe://example.org/ns/etl/sa/loader\" = [\"etl\"]",
    );
    let id = identity_from_cert(&workload.der, &uri).unwrap();
    assert_eq!(id.subject, "spiffe://example.org/ns/etl/sa/loader");
    assert_eq!(id.display_name, id.subject);
    assert_eq!(id.groups, vec!["etl"]);

    // Two URIs without a prefix to choose between them: ambiguous, refused.
    let any_uri = config(&ca_file, "subject_from = \"uri\"");
    assert!(matches!(
        identity_from_cert(&workload.der, &any_uri),
        Err(IdentityError::Certificate(_))
    ));
    let other_domain = config(
        &ca_file,
        "subject_from = \"uri\"\nuri_prefix = \"spiffe://other.org/\"",
    );
    assert!(identity_from_cert(&workload.der, &other_domain).is_err());

    let dns = config(&ca_file, "subject_from = \"dns\"");
    assert_eq!(
        identity_from_cert(&workload.der, &dns).unwrap().subject,
        "loader.etl.svc"
    );
    // No CN and no e-mail SAN.
    assert!(identity_from_cert(&workload.der, &config(&ca_file, "")).is_err());
    let email = config(&ca_file, "subject_from = \"email\"");
    assert!(identity_from_cert(&workload.der, &email).is_err());
}

#[test]
fn ambiguous_or_broken_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = ca("Corp Client CA");
    let cfg = config(&write_ca(dir.path(), &client_ca), "");
    let two_emails = leaf(
        &client_ca,
        LeafSpec {
            cns: &["alice"],
            sans: vec![
                SanType::Rfc822Name(ia5("alice@example.com")),
                SanType::Rfc822Name(ia5("root@example.com")),
            ],
            ..Default::default()
        },
    );
    let by_email = config(&cfg.ca_file, "subject_from = \"email\"");
    let err = identity_from_cert(&two_emails.der, &by_email).unwrap_err();
    assert_eq!(err.sqlstate(), "28000");
    assert!(err.to_string().contains("more than one"), "{err}");

    assert!(identity_from_cert(b"not a certificate", &cfg).is_err());
    let mut trailing = client(&client_ca, "alice").der.to_vec();
    trailing.push(0);
    assert!(identity_from_cert(&trailing, &cfg).is_err());

    // Groups are not taken from OUs unless configured.
    let with_ou = leaf(
        &client_ca,
        LeafSpec {
            cns: &["erin"],
            ous: &["admins"],
            ..Default::default()
        },
    );
    assert!(
        identity_from_cert(&with_ou.der, &cfg)
            .unwrap()
            .groups
            .is_empty()
    );
}

#[test]
fn a_field_must_hold_exactly_one_value() {
    assert_eq!(exactly_one(vec!["a"], "subject CN"), Ok("a"));
    let none = exactly_one(vec![], "subject CN").unwrap_err();
    assert!(none.to_string().contains("no subject CN"), "{none}");
    let two = exactly_one(vec!["alice", "root"], "subject CN").unwrap_err();
    assert!(
        two.to_string().contains("more than one subject CN"),
        "{two}"
    );
}

#[test]
fn verifier_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = config(&dir.path().join("missing.pem"), "");
    assert!(matches!(
        client_cert_verifier(&missing),
        Err(IdentityError::Config(_))
    ));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    assert!(matches!(
        client_cert_verifier(&config(&empty, "")),
        Err(IdentityError::Config(_))
    ));
    assert!(matches!(
        load_server_identity(&empty, &empty),
        Err(IdentityError::Config(_))
    ));
    let bad_field: Result<MtlsConfig, _> =
        toml::from_str("ca_file = \"x\"\nsubject_from = \"serial\"");
    assert!(bad_field.is_err());
}
