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

/// A client certificate chained to the configured CA is an identity of its own (mTLS): no
/// password, the policy for its subject applies, and the user name must be that subject.
#[test]
fn client_certificate_is_an_identity_without_a_password() {
    if interceptor_tests::direct_mode() {
        eprintln!("direct mode: client CA not configured in PostgreSQL; skipped");
        return;
    }
    let pg = interceptor_tests::PgCluster::start().unwrap();
    let certs = TestCerts::generate().unwrap();
    let setup = interceptor_tests::InterceptorSetup::new(&pg)
        .identity(
            ALICE,
            interceptor_tests::ALICE_PASSWORD,
            &["dev"],
            Some("app_rw"),
        )
        .policy_file(
            "carol",
            "[policy]\nname = \"carol\"\n[identities]\nsubjects = [\"carol\"]\n\
             [login]\nupstream_role = \"app_ro\"\ndatabases = [\"*\"]\n\
             [[rule]]\nname = \"reads\"\ndecision = \"allow\"\nkinds = [\"read\"]\n",
        )
        .tls(&certs)
        .client_ca(&certs.ca_cert);
    let proxy = interceptor_tests::Interceptor::start(setup).unwrap();
    let carol = certs.client("carol").unwrap();
    let base = proxy
        .params(ALICE)
        .user("carol")
        .password(None)
        .host("localhost")
        .sslmode(SslMode::VerifyFull)
        .sslrootcert(&certs.ca_cert)
        .client_cert(&carol.cert, &carol.key);
    let out = PgCommand::psql(&base)
        .args(["-A", "-t", "-c", "SELECT current_user"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.stdout, "app_ro\n",
        "carol's policy chose the upstream role"
    );

    // The certificate proves carol, not alice.
    let out = PgCommand::psql(&base.user(ALICE))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("does not match"), "{out:?}");
}

/// SCRAM-SHA-256-PLUS: libpq with `channel_binding=require` authenticates over TLS (it fails
/// unless the server proved the channel's end point), and refuses over plain TCP, where no
/// binding is possible.
#[test]
fn channel_binding_required_by_libpq() {
    let s = Stack::start(StackOptions::standard().tls(true)).unwrap();
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Require))
        .env("PGCHANNELBINDING", "require")
        .args(["-A", "-t", "-c", "SELECT count(*) FROM accounts"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}\n{}", s.logs());
    assert_eq!(out.stdout, "36\n", "{out:?}");

    // Verified against the CA too.
    let out = PgCommand::psql(&verify_full(&s))
        .env("PGCHANNELBINDING", "require")
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");

    // The binding does not stand in for the password.
    let out = PgCommand::psql(
        &s.params(ALICE)
            .sslmode(SslMode::Require)
            .password(Some("not-alice's")),
    )
    .env("PGCHANNELBINDING", "require")
    .args(["-c", "SELECT 1"])
    .run()
    .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("password authentication failed"),
        "{out:?}"
    );

    // Plain TCP: SCRAM-SHA-256 only, which libpq will not accept under `require`.
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Disable))
        .env("PGCHANNELBINDING", "require")
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("channel binding"), "{out:?}");
    // ...and without the requirement, plain SCRAM over TCP still works.
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Disable))
        .env("PGCHANNELBINDING", "prefer")
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
}
