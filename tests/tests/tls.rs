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
