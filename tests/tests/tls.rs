//! TLS toward clients with the test CA: verify-full succeeds, a foreign CA fails, and with
//! `require = true` plaintext clients get a FATAL.

use interceptor_tests::{ALICE, PgCommand, SslMode, Stack, StackOptions, TestCerts};

fn verify_full(s: &Stack) -> interceptor_tests::ConnParams {
    s.params(ALICE)
        .host("localhost")
        .sslmode(SslMode::VerifyFull)
        .sslrootcert(s.ca_cert().unwrap())
}

#[test]
fn verify_full_with_test_ca() {
    let s = Stack::start(StackOptions::standard().tls(true)).unwrap();
    let out = PgCommand::psql(&verify_full(&s))
        .args([
            "-A",
            "-t",
            "-c",
            "\\conninfo",
            "-c",
            "SELECT count(*) FROM accounts",
        ])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("SSL connection (protocol: TLSv1."),
        "{out:?}"
    );
    assert!(out.stdout.ends_with("36\n"), "{out:?}");

    // By IP address too (the certificate carries 127.0.0.1).
    let out = PgCommand::psql(&verify_full(&s).host("127.0.0.1"))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");

    // Not required: plaintext is still accepted.
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Disable))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
}

#[test]
fn foreign_ca_is_rejected_by_the_client() {
    let s = Stack::start(StackOptions::standard().tls(true)).unwrap();
    let other = TestCerts::generate().unwrap();
    let out = PgCommand::psql(&verify_full(&s).sslrootcert(&other.ca_cert))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("certificate verify failed"), "{out:?}");
}

#[test]
fn required_tls_refuses_plaintext_with_fatal() {
    let s = Stack::start(StackOptions::standard().tls(true).require_tls(true)).unwrap();
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Disable))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("FATAL"), "{out:?}");
    assert!(!out.stdout.contains('1'), "{out:?}");

    // TLS clients are still served.
    let out = PgCommand::psql(&verify_full(&s))
        .args(["-A", "-t", "-c", "SELECT 'over tls'"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "over tls\n");
}

#[test]
fn client_certificate_from_a_foreign_ca_is_refused() {
    if interceptor_tests::direct_mode() {
        eprintln!("direct mode: client CA not configured in PostgreSQL; skipped");
        return;
    }
    // A proxy that trusts the test CA for client certificates.
    let pg = interceptor_tests::PgCluster::start().unwrap();
    let certs = TestCerts::generate().unwrap();
    let setup = interceptor_tests::InterceptorSetup::new(&pg)
        .allow_all_policies()
        .identity(
            ALICE,
            interceptor_tests::ALICE_PASSWORD,
            &["dev"],
            Some("app_rw"),
        )
        .tls(&certs)
        .client_ca(&certs.ca_cert);
    let proxy = interceptor_tests::Interceptor::start(setup).unwrap();
    let base = proxy
        .params(ALICE)
        .host("localhost")
        .sslmode(SslMode::VerifyFull)
        .sslrootcert(&certs.ca_cert);

    // A certificate from the trusted CA completes the handshake (password still required).
    let good = certs.client(ALICE).unwrap();
    let out = PgCommand::psql(&base.clone().client_cert(&good.cert, &good.key))
        .args(["-A", "-t", "-c", "SELECT 'mtls'"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "mtls\n");

    // One from another CA is refused during the handshake.
    let other = TestCerts::generate().unwrap();
    let bad = other.client(ALICE).unwrap();
    let out = PgCommand::psql(&base.client_cert(&bad.cert, &bad.key))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(!proxy.logs().contains("panicked"));
}
