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

    // The audit trail says which logins were channel bound.
    if let Some(proxy) = &s.proxy {
        let proofs: Vec<String> = proxy
            .audit_records()
            .unwrap()
            .iter()
            .map(|r| r.get("event").unwrap_or(r))
            .filter(|e| e["type"] == "session_start")
            .map(|e| {
                e["identity"]["proof"]["method"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            proofs,
            ["scram_sha256_plus", "scram_sha256_plus", "scram_sha256"],
            "TLS logins bound, the TCP one not"
        );
    }
}

/// A man in the middle: terminates the client's TLS with a certificate of its own (which a
/// client with `sslmode=require` accepts), opens its own TLS session to interceptor and relays
/// the plaintext. Serves one connection; returns its port.
mod mitm {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[derive(Debug)]
    struct AcceptAnything;

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

    pub fn start(target_port: u16) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let _ = relay(client, target_port);
        });
        port
    }

    fn relay(mut client: TcpStream, target_port: u16) -> std::io::Result<()> {
        let mut req = [0u8; 8];
        client.read_exact(&mut req)?;
        assert_eq!(req, SSL_REQUEST, "the client must ask for TLS");
        client.write_all(b"S")?;
        let mut upstream = TcpStream::connect(("127.0.0.1", target_port))?;
        upstream.write_all(&SSL_REQUEST)?;
        let mut answer = [0u8; 1];
        upstream.read_exact(&mut answer)?;
        assert_eq!(&answer, b"S", "interceptor must offer TLS");

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth();
        let mut down = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        let mut up = rustls::ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        client.set_nonblocking(true)?;
        upstream.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 64 * 1024];
        while Instant::now() < deadline {
            let mut progress = false;
            // Ciphertext in, plaintext across, ciphertext out, both ways.
            for (sock, conn) in [
                (&mut client, &mut down as &mut dyn Tls),
                (&mut upstream, &mut up as &mut dyn Tls),
            ] {
                match conn.read_tls_from(sock) {
                    Ok(0) => return Ok(()),
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return Ok(()),
                }
            }
            loop {
                let n = down.read_plain(&mut buf);
                if n == 0 {
                    break;
                }
                up.write_plain(&buf[..n]);
                progress = true;
            }
            loop {
                let n = up.read_plain(&mut buf);
                if n == 0 {
                    break;
                }
                down.write_plain(&buf[..n]);
                progress = true;
            }
            for (sock, conn) in [
                (&mut client, &mut down as &mut dyn Tls),
                (&mut upstream, &mut up as &mut dyn Tls),
            ] {
                if conn.flush_to(sock).is_err() {
                    return Ok(());
                }
            }
            if !progress {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }

    /// The two ends of the relay, server side and client side alike.
    trait Tls {
        fn read_tls_from(&mut self, sock: &mut TcpStream) -> std::io::Result<usize>;
        fn read_plain(&mut self, buf: &mut [u8]) -> usize;
        fn write_plain(&mut self, data: &[u8]);
        fn flush_to(&mut self, sock: &mut TcpStream) -> std::io::Result<()>;
    }

    impl<C, S> Tls for C
    where
        C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
        S: rustls::SideData,
    {
        fn read_tls_from(&mut self, sock: &mut TcpStream) -> std::io::Result<usize> {
            let n = self.read_tls(sock)?;
            self.process_new_packets()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(n)
        }
        fn read_plain(&mut self, buf: &mut [u8]) -> usize {
            self.reader().read(buf).unwrap_or(0)
        }
        fn write_plain(&mut self, data: &[u8]) {
            let _ = self.writer().write_all(data);
        }
        fn flush_to(&mut self, sock: &mut TcpStream) -> std::io::Result<()> {
            while self.wants_write() {
                match self.write_tls(sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// Through a man in the middle that holds another certificate, the client's channel binding
/// names that certificate, not interceptor's: the exchange fails even with the right password,
/// which is what channel binding is for. libpq binds by default when it is offered.
#[test]
fn channel_binding_defeats_a_man_in_the_middle() {
    let s = Stack::start(StackOptions::standard().tls(true)).unwrap();
    let through_mitm = |binding: &str| {
        let mut params = s.params(ALICE).sslmode(SslMode::Require).host("127.0.0.1");
        params.port = mitm::start(params.port);
        PgCommand::psql(&params)
            .env("PGCHANNELBINDING", binding)
            .args(["-A", "-t", "-c", "SELECT 1"])
            .run()
            .unwrap()
    };
    for binding in ["require", "prefer"] {
        let out = through_mitm(binding);
        assert_eq!(out.code(), Some(2), "{binding}: {out:?}\n{}", s.logs());
        assert!(
            out.stderr.contains("SCRAM channel binding check failed"),
            "{binding}: {out:?}"
        );
    }
    // The relay itself works: a client that does not bind is relayed (and so exposed).
    let out = through_mitm("disable");
    assert!(out.success(), "{out:?}\n{}", s.logs());
    assert_eq!(out.stdout, "1\n");
}

/// A certificate file replaced on disk before SIGHUP is not served until a restart (the TLS
/// acceptor is built at start), so channel binding must go on naming the certificate served:
/// SCRAM-SHA-256-PLUS logins keep working across the reload.
#[test]
fn channel_binding_survives_a_certificate_replaced_before_sighup() {
    let s = Stack::start(StackOptions::standard().tls(true)).unwrap();
    let Some(proxy) = &s.proxy else {
        return; // PostgreSQL has no such reload split; nothing to compare.
    };
    let certs = s.certs.as_ref().unwrap();
    let renewed = certs.ca.server_cert("renewed").unwrap();
    std::fs::copy(&renewed.cert, &certs.server.cert).unwrap();
    std::fs::copy(&renewed.key, &certs.server.key).unwrap();
    let pid = proxy.pid().unwrap() as libc::pid_t;
    // SAFETY: kill has no memory preconditions; pid is the proxy this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !s.logs().contains("reload: applied to new sessions") {
        assert!(std::time::Instant::now() < deadline, "{}", s.logs());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = PgCommand::psql(&s.params(ALICE).sslmode(SslMode::Require))
        .env("PGCHANNELBINDING", "require")
        .args(["-A", "-t", "-c", "SELECT 1"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}\n{}", s.logs());
}
