//! Hostile or broken bytes before authentication: the proxy closes that connection, keeps
//! serving everyone else and never panics.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use interceptor_tests::raw::RawClient;
use interceptor_tests::{ALICE, Stack, StackOptions};

/// Sends `bytes` (optionally half-closing), then reads until the server closes.
/// Returns what the server sent; fails the test if it keeps the connection open.
fn send_and_expect_close(port: u16, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A server may close before reading everything: a write error is fine.
    let _ = sock.write_all(bytes);
    if half_close {
        let _ = sock.shutdown(Shutdown::Write);
    }
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "connection not closed after {:?} ({e}); got {got:?}",
                started.elapsed()
            ),
        }
    }
    // Anything said before closing must be an ErrorResponse, the 'N' refusing SSL, or (for a
    // valid startup packet) an authentication request.
    if let Some(first) = got.first() {
        assert!(
            matches!(*first, b'E' | b'N' | b'R'),
            "unexpected reply: {got:?}"
        );
    }
    got
}

fn startup_header(len: i32, version: i32) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(&version.to_be_bytes());
    v
}

/// Deterministic pseudo-random bytes (xorshift) so a failure is reproducible.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

async fn still_serves(s: &Stack) {
    let c = s.params(ALICE).connect().await.unwrap();
    let v: i64 = c
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, i64::from(interceptor_tests::fixtures::ACCOUNT_ROWS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_startup_packets() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let port = s.params(ALICE).port;

    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(),
            false,
        ),
        (
            "oversized length",
            startup_header(0x7fff_fff0, 196_608),
            false,
        ),
        ("negative length", startup_header(-8, 196_608), false),
        ("length below minimum", startup_header(4, 196_608), false),
        ("random bytes", noise(2048, 0x9e37_79b9_7f4a_7c15), false),
        (
            "truncated startup then EOF",
            {
                let mut v = startup_header(200, 196_608);
                v.extend_from_slice(b"user\0ali");
                v
            },
            true,
        ),
        (
            "unsupported protocol version",
            {
                let mut v = startup_header(8 + 11, 0x0002_0000);
                v.extend_from_slice(b"user\0alice\0");
                v
            },
            false,
        ),
        (
            "startup params without terminator",
            {
                let body = b"user\0alice\0database\0app";
                let mut v = startup_header(8 + body.len() as i32, 196_608);
                v.extend_from_slice(body);
                v
            },
            false,
        ),
        (
            "SSLRequest then garbage",
            {
                let mut v = startup_header(8, 80_877_103);
                v.extend_from_slice(&noise(64, 42));
                v
            },
            false,
        ),
    ];
    for (name, bytes, half_close) in cases {
        let started = Instant::now();
        let port2 = port;
        tokio::task::spawn_blocking(move || send_and_expect_close(port2, &bytes, half_close))
            .await
            .unwrap_or_else(|e| panic!("case {name}: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "case {name} took {:?}",
            started.elapsed()
        );
        still_serves(&s).await;
    }

    let logs = s.logs();
    assert!(!logs.contains("panicked"), "panic in the log:\n{logs}");
    if let Some(p) = &s.proxy {
        let pid = p.pid().expect("interceptor started");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "interceptor died"
        );
    }
}

#[test]
fn malformed_messages_after_login_end_the_session_only() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let params = s.params(ALICE);

    // Sanity: the raw client works.
    let mut c = RawClient::login(&params).unwrap();
    let (msgs, closed) = c.simple_query("SELECT 'raw ok'").unwrap();
    assert!(!closed);
    assert!(msgs.iter().any(|m| m.tag == b'D'), "{msgs:?}");

    // A Query declaring ~2 GiB: refused (FATAL), connection closed, nothing buffered.
    let mut c = RawClient::login(&params).unwrap();
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
    huge.extend_from_slice(b"SELECT 1");
    c.send(&huge).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(closed, "connection must be closed: {msgs:?}");
    assert!(
        msgs.iter().all(|m| m.tag == b'E' || m.tag == b'N'),
        "{msgs:?}"
    );

    // An unknown message type: protocol violation, connection closed.
    let mut c = RawClient::login(&params).unwrap();
    c.send(&[b'z', 0, 0, 0, 4]).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(closed, "{msgs:?}");
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        assert_eq!(e.sqlstate().as_deref(), Some("08P01"), "{msgs:?}");
    }

    // A length below the 4-byte minimum.
    let mut c = RawClient::login(&params).unwrap();
    c.send(&[b'Q', 0, 0, 0, 2]).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(closed, "{msgs:?}");

    // Everyone else is fine.
    let mut c = RawClient::login(&params).unwrap();
    let (msgs, closed) = c.simple_query("SELECT count(*) FROM accounts").unwrap();
    assert!(!closed);
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"36"), "{row:?}");
    assert!(!s.logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_cut_off_by_the_auth_timeout() {
    let opts = StackOptions {
        pg: interceptor_tests::PgOptions::default().extra_conf("authentication_timeout = '1s'"),
        customize: Some(|s| s.extra_toml("[limits]\nauth_timeout_ms = 1000")),
        ..StackOptions::standard()
    };
    let s = Stack::start(opts).unwrap();
    let port = s.params(ALICE).port;

    let startup = {
        let mut body = Vec::new();
        body.extend_from_slice(&196_608i32.to_be_bytes());
        body.extend_from_slice(b"user\0alice\0database\0app\0\0");
        let mut v = (body.len() as i32 + 4).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("silent after connect", Vec::new()),
        ("half a startup packet", startup[..10].to_vec()),
        // The server asks for SASL and the client never answers.
        ("stalled in authentication", startup.clone()),
    ];
    // All stalled at once, while a normal client is served.
    let mut handles = Vec::new();
    for (name, bytes) in cases {
        handles.push(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let got = send_and_expect_close(port, &bytes, false);
            (name, started.elapsed(), got)
        }));
    }
    still_serves(&s).await;
    for h in handles {
        let (name, elapsed, got) = h.await.unwrap();
        assert!(
            elapsed < Duration::from_secs(5),
            "{name}: closed only after {elapsed:?}"
        );
        if name == "stalled in authentication" {
            // It did get the SASL request first.
            assert_eq!(got.first(), Some(&b'R'), "{name}: {got:?}");
        }
    }
    assert!(!s.logs().contains("panicked"));
}
