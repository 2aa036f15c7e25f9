//! Protocol edges where interceptor must read messages exactly as PostgreSQL does: 16-bit counts
//! are unsigned, negative lengths other than -1 are refused, SASL lengths are checked, a short
//! CancelRequest is named, and connections still authenticating are bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use interceptor_tests::raw::RawClient;
use interceptor_tests::{ALICE, Stack, StackOptions};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn parse(sql: &str) -> Vec<u8> {
    let mut b = b"\0".to_vec();
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind of the unnamed statement: every parameter NULL unless `lens` says otherwise.
fn bind(lens: &[i32]) -> Vec<u8> {
    let mut b = b"\0\0".to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(lens.len() as u16).to_be_bytes());
    for &l in lens {
        b.extend_from_slice(&l.to_be_bytes());
        if l > 0 {
            b.extend(std::iter::repeat_n(b'1', l as usize));
        }
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'B', &b)
}

fn execute_sync() -> Vec<u8> {
    let mut v = msg(b'E', b"\0\0\0\0\0");
    v.extend(msg(b'S', b""));
    v
}

/// PostgreSQL accepts up to 65,535 parameters (the count is read unsigned); so must the proxy.
/// tokio-postgres caps at 32,767 (it encodes the count signed), so the raw client sends it.
#[test]
fn more_than_32767_parameters_reach_postgres() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let mut c = RawClient::login(&s.params(ALICE)).unwrap();
    let n = 40_000;
    let list: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    let sql = format!("SELECT array_length(ARRAY[{}]::text[], 1)", list.join(","));
    let mut out = parse(&sql);
    out.extend(bind(&vec![-1; n]));
    out.extend(execute_sync());
    c.send(&out).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(!closed, "session closed: {msgs:?}");
    assert!(!msgs.iter().any(|m| m.tag == b'E'), "{msgs:?}");
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"40000"), "{row:?}");
}

/// A parameter length of -2 is not NULL: PostgreSQL refuses the Bind, and so does the proxy
/// (before the gate could read it differently from the server).
#[test]
fn bind_length_below_minus_one_is_refused() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let mut c = RawClient::login(&s.params(ALICE)).unwrap();
    let mut out = parse("SELECT $1::text IS NULL");
    out.extend(bind(&[-2]));
    out.extend(execute_sync());
    c.send(&out).unwrap();
    let (msgs, _closed) = c.read_until_ready().unwrap();
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{msgs:?}");
    assert!(!msgs.iter().any(|m| m.tag == b'D'), "{msgs:?}");
    if !s.is_direct() {
        // Refused by the proxy itself, not forwarded for PostgreSQL to refuse.
        let text = err.error_field(b'M').unwrap_or_default();
        assert!(text.contains("malformed Bind"), "{text:?}");
    }
}

fn read_all(mut sock: TcpStream) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = sock.read_to_end(&mut got);
    got
}

#[test]
fn short_cancel_request_is_named() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    if s.is_direct() {
        return; // the wording is interceptor's
    }
    let mut sock = TcpStream::connect(("127.0.0.1", s.params(ALICE).port)).unwrap();
    // Length 12: the code and a pid, no secret.
    let mut p = 12i32.to_be_bytes().to_vec();
    p.extend_from_slice(&80_877_102i32.to_be_bytes());
    p.extend_from_slice(&1i32.to_be_bytes());
    sock.write_all(&p).unwrap();
    let got = String::from_utf8_lossy(&read_all(sock)).into_owned();
    assert!(got.contains("malformed CancelRequest"), "{got:?}");
    assert!(!got.contains("protocol 1234"), "{got:?}");
}

#[test]
fn sasl_initial_response_with_a_lying_length_is_refused() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", s.params(ALICE).port)).unwrap();
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0alice\0database\0app\0\0");
    let mut start = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    start.extend_from_slice(&body);
    sock.write_all(&start).unwrap();
    // Wait for AuthenticationSASL, then claim 100 bytes of client-first and send 22.
    let mut hdr = [0u8; 5];
    sock.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[0], b'R');
    let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize - 4;
    let mut rest = vec![0u8; len];
    sock.read_exact(&mut rest).unwrap();
    let mut sasl = b"SCRAM-SHA-256\0".to_vec();
    sasl.extend_from_slice(&100i32.to_be_bytes());
    sasl.extend_from_slice(b"n,,n=,r=abcdefghijklmn");
    sock.write_all(&msg(b'p', &sasl)).unwrap();
    let got = read_all(sock);
    assert_eq!(got.first(), Some(&b'E'), "{got:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("08P01"), "{text:?}");
}

#[test]
fn connections_awaiting_authentication_are_bounded() {
    let opts = StackOptions {
        customize: Some(|s| s.extra_toml("[limits]\nmax_unauthenticated = 3")),
        ..StackOptions::standard()
    };
    let s = Stack::start(opts).unwrap();
    if s.is_direct() {
        return;
    }
    let port = s.params(ALICE).port;
    // Three connections that never say anything hold every slot.
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let got = read_all(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let text = String::from_utf8_lossy(&got);
    assert_eq!(got.first(), Some(&b'E'), "{text:?}");
    assert!(
        text.contains("53300") && text.contains("awaiting authentication"),
        "{text:?}"
    );
    // Slots come back when those connections go.
    drop(idle);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(mut c) = RawClient::login(&s.params(ALICE)) {
            let (msgs, closed) = c.simple_query("SELECT 1").unwrap();
            ok = !closed && msgs.iter().any(|m| m.tag == b'D');
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "a client could not log in after the idle connections closed"
    );
    // An authenticated session does not hold a slot: three sessions, then one more login.
    let held: Vec<RawClient> = (0..3)
        .map(|_| RawClient::login(&s.params(ALICE)).unwrap())
        .collect();
    assert!(RawClient::login(&s.params(ALICE)).is_ok());
    drop(held);
}

/// FunctionCall ('F') by OID, as libpq's `PQfn` sends it; `args` in binary format.
fn function_call(oid: u32, args: &[&[u8]]) -> Vec<u8> {
    let mut b = oid.to_be_bytes().to_vec();
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(args.len() as u16).to_be_bytes());
    for a in args {
        b.extend_from_slice(&(a.len() as i32).to_be_bytes());
        b.extend_from_slice(a);
    }
    b.extend_from_slice(&1i16.to_be_bytes());
    msg(b'F', &b)
}

/// The OID of a `pg_catalog` function, asked on the session.
fn oid_of(c: &mut RawClient, signature: &str) -> u32 {
    let (msgs, _) = c
        .simple_query(&format!("SELECT '{signature}'::regprocedure::oid"))
        .unwrap();
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    std::str::from_utf8(&row.body[6..])
        .unwrap()
        .parse()
        .unwrap()
}

/// The fast path as PostgreSQL answers it: a call returns its value (FunctionCallResponse), an
/// unknown OID is 42883 and the session goes on, and a malformed message is a protocol error
/// that ends the session.
#[test]
fn function_calls_by_oid_answer_as_postgres_does() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let mut c = RawClient::login(&s.params(ALICE)).unwrap();
    let pid_fn = oid_of(&mut c, "pg_catalog.pg_backend_pid()");
    let abs_fn = oid_of(&mut c, "pg_catalog.int4abs(integer)");
    let (msgs, _) = c.simple_query("SELECT pg_backend_pid()").unwrap();
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    let pid: i32 = std::str::from_utf8(&row.body[6..])
        .unwrap()
        .parse()
        .unwrap();

    c.send(&function_call(pid_fn, &[])).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(!closed, "{msgs:?}");
    let v = msgs
        .iter()
        .find(|m| m.tag == b'V')
        .expect("a FunctionCallResponse");
    assert_eq!(&v.body[..4], &4i32.to_be_bytes(), "{v:?}");
    assert_eq!(&v.body[4..], &pid.to_be_bytes(), "the real backend's pid");

    c.send(&function_call(abs_fn, &[&(-42i32).to_be_bytes()]))
        .unwrap();
    let (msgs, _) = c.read_until_ready().unwrap();
    let v = msgs
        .iter()
        .find(|m| m.tag == b'V')
        .expect("a FunctionCallResponse");
    assert_eq!(&v.body[4..], &42i32.to_be_bytes(), "{v:?}");

    // An OID no function has.
    c.send(&function_call(4_000_000_000, &[])).unwrap();
    let (msgs, closed) = c.read_until_ready().unwrap();
    assert!(!closed, "{msgs:?}");
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("42883"), "{msgs:?}");
    let (msgs, _) = c.simple_query("SELECT 1").unwrap();
    assert!(msgs.iter().any(|m| m.tag == b'D'), "still usable: {msgs:?}");

    // Two format codes for one argument.
    let mut b = pid_fn.to_be_bytes().to_vec();
    b.extend_from_slice(&2u16.to_be_bytes());
    b.extend_from_slice(&[0, 1, 0, 1]);
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    c.send(&msg(b'F', &b)).unwrap();
    let (msgs, _) = c.read_until_ready().unwrap();
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{msgs:?}");
}
