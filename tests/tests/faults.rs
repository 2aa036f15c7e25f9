//! Faults under live sessions: PostgreSQL restarted mid-result and mid-COPY, an upstream that
//! stalls, clients that vanish mid-result and mid-COPY, two thousand idle connections, messages
//! at and over the size limit, the policy directory removed. Each checks what the client sees
//! (an ErrorResponse with a SQLSTATE, never a bare EOF or a hang), that every statement
//! PostgreSQL ran (its own `log_statement = 'all'` log) has its audit record, and that the
//! daemon still serves new sessions.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use interceptor_tests::pg::APP_RW;
use interceptor_tests::raw::{RawClient, RawMessage};
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand, PgOptions,
};

fn cluster(extra_conf: &str) -> PgCluster {
    PgCluster::start_with(
        PgOptions::default()
            .log_statement_all(true)
            .extra_conf(extra_conf),
    )
    .unwrap()
}

fn proxy(pg: &PgCluster, extra_toml: &str) -> Interceptor {
    let setup = InterceptorSetup::new(pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .allow_all_policies()
        .with_audit()
        .extra_toml(extra_toml);
    Interceptor::start(setup).unwrap()
}

/// A new session through the proxy runs a statement.
fn serves_new_sessions(proxy: &Interceptor) {
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-A", "-t", "-c", "SELECT 'still serving'"])
        .timeout(Duration::from_secs(20))
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "still serving");
    assert!(!proxy.logs().contains("panicked"), "{}", proxy.logs());
}

/// Every statement PostgreSQL logged for the application role has an audit record.
fn every_executed_statement_recorded(pg: &PgCluster, proxy: &Interceptor) {
    let marker = format!(" {APP_RW}@");
    let log = pg.server_log();
    let executed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&marker))
        .filter_map(|l| Some(l[l.find("LOG:  statement: ")? + 17..].trim()))
        .collect();
    assert!(!executed.is_empty(), "PostgreSQL logged no statement");
    let records = proxy.audit_records().unwrap();
    let recorded: Vec<&str> = records
        .iter()
        .map(|r| r.get("event").unwrap_or(r))
        .filter(|e| e["type"] == "statement")
        .filter_map(|e| e["sql"].as_str())
        .collect();
    for stmt in executed {
        let stmt = stmt.trim_end_matches(';');
        assert!(
            recorded.iter().any(|r| r.contains(stmt)),
            "PostgreSQL ran `{stmt:.100}` and the audit trail has no record of it"
        );
    }
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

fn copy_data(data: &[u8]) -> Vec<u8> {
    let mut m = vec![b'd'];
    m.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Reads until the server closes; the ErrorResponses seen on the way.
fn errors_until_closed(c: &mut RawClient) -> Vec<RawMessage> {
    let mut errors = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match c.read_message() {
            Ok(Some(m)) if m.tag == b'E' => errors.push(m),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return errors,
        }
    }
    panic!("the session neither ended nor failed within 30 s");
}

/// Reads `n` messages of the started result (the rest stays in flight).
fn read_some(c: &mut RawClient, n: usize, want: u8) {
    let mut seen = 0;
    while seen < n {
        let m = c.read_message().unwrap().expect("the result ended early");
        assert_ne!(m.tag, b'E', "{:?}", m.error_field(b'M'));
        if m.tag == want {
            seen += 1;
        }
    }
}

/// Backends of the application role PostgreSQL still has, after waiting up to 10 s for them
/// to go.
fn app_backends_left(pg: &PgCluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = pg
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP_RW}'"
            ))
            .unwrap();
        if n.trim() == "0" || Instant::now() > deadline {
            return n.trim().to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const BIG_RESULT: &str = "SELECT g, repeat('r', 200) FROM generate_series(1, 3000000) g";
const BIG_COPY: &str =
    "COPY (SELECT g, repeat('c', 200) FROM generate_series(1, 3000000) g) TO STDOUT";

#[test]
fn postgres_restarted_mid_result_and_mid_copy() {
    let pg = cluster("");
    let proxy = proxy(&pg, "");
    let mut result = RawClient::login(&proxy.params(ALICE)).unwrap();
    result.send(&query_message(BIG_RESULT)).unwrap();
    read_some(&mut result, 100, b'D');
    let mut copy = RawClient::login(&proxy.params(ALICE)).unwrap();
    copy.send(&query_message(BIG_COPY)).unwrap();
    read_some(&mut copy, 100, b'd');

    pg.restart().unwrap();

    for (what, c) in [("result", &mut result), ("copy", &mut copy)] {
        let errors = errors_until_closed(c);
        let fatal = errors
            .iter()
            .find(|e| e.error_field(b'S').as_deref() == Some("FATAL"))
            .unwrap_or_else(|| panic!("mid-{what}: no FATAL before the close: {errors:?}"));
        // PostgreSQL's own 57P01 when it could still say it, else interceptor's 08006.
        let code = fatal.sqlstate().unwrap();
        assert!(
            code == "57P01" || code.starts_with("08"),
            "mid-{what}: {code}"
        );
    }
    serves_new_sessions(&proxy);
    every_executed_statement_recorded(&pg, &proxy);
}

/// Resumes a stopped backend even when the test fails, so the cluster can shut down.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        interceptor_tests::os::signal(self.0, libc::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_holds_only_its_own_session() {
    let pg = cluster("");
    let proxy = proxy(&pg, "");
    let stalled = proxy.params(ALICE).connect().await.unwrap();
    let pid: i32 = stalled
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let cancel = stalled.cancel_token();
    let guard = Stopped(pid as u32);
    interceptor_tests::os::signal(pid as u32, libc::SIGSTOP);
    let query = tokio::spawn(async move {
        let r = stalled.simple_query("SELECT 'stalled'").await;
        (r.map(|_| ()), stalled)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!query.is_finished(), "a stopped backend answered");

    // Other sessions are not held up by it.
    let started = Instant::now();
    let other = proxy.params(ALICE).connect().await.unwrap();
    let v: String = other.query_one("SELECT 'free'", &[]).await.unwrap().get(0);
    assert_eq!(v, "free");
    assert!(started.elapsed() < Duration::from_secs(3));

    // The client cancels; the cancel is delivered once the backend runs again.
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    drop(guard);
    let (r, stalled) = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the stalled statement never finished")
        .unwrap();
    if let Err(e) = r {
        // Cancelled before it ran, or it ran: both leave the session usable.
        assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
    }
    let v: String = stalled
        .query_one("SELECT 'resumed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "resumed");
    drop((other, stalled));
    serves_new_sessions(&proxy);
    every_executed_statement_recorded(&pg, &proxy);
}

#[test]
fn clients_gone_mid_result_and_mid_copy() {
    let pg = cluster("");
    pg.psql(&format!(
        "CREATE TABLE gone_copy (a int, b text); GRANT ALL ON gone_copy TO {APP_RW};"
    ))
    .unwrap();
    let proxy = proxy(&pg, "");

    let mut result = RawClient::login(&proxy.params(ALICE)).unwrap();
    result.send(&query_message(BIG_RESULT)).unwrap();
    read_some(&mut result, 100, b'D');
    drop(result);

    let mut copy_out = RawClient::login(&proxy.params(ALICE)).unwrap();
    copy_out.send(&query_message(BIG_COPY)).unwrap();
    read_some(&mut copy_out, 100, b'd');
    drop(copy_out);

    let mut copy_in = RawClient::login(&proxy.params(ALICE)).unwrap();
    copy_in
        .send(&query_message("COPY gone_copy FROM STDIN"))
        .unwrap();
    let m = copy_in.read_message().unwrap().unwrap();
    assert_eq!(m.tag, b'G', "no CopyInResponse: {:?}", m.error_field(b'M'));
    for i in 0..1000 {
        copy_in
            .send(&copy_data(format!("{i}\tgone\n").as_bytes()))
            .unwrap();
    }
    // Half a row, then the client is gone without CopyDone.
    copy_in.send(&copy_data(b"1000\tha")).unwrap();
    drop(copy_in);

    // PostgreSQL is told: no backend of those sessions is left, the COPY did not commit.
    assert_eq!(
        app_backends_left(&pg),
        "0",
        "backends outlived their clients"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM gone_copy").unwrap().trim(),
        "0"
    );
    serves_new_sessions(&proxy);
    every_executed_statement_recorded(&pg, &proxy);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections() {
    const IDLE_UNAUTHENTICATED: usize = 1960;
    const IDLE_SESSIONS: usize = 40;
    let pg = cluster("max_connections = 100");
    let proxy = proxy(
        &pg,
        "[limits]\nmax_unauthenticated = 4000\nauth_timeout_ms = 60000\n",
    );
    let pid = proxy.pid().unwrap();
    let baseline = open_fds(pid);
    let mut sessions = Vec::new();
    for _ in 0..IDLE_SESSIONS {
        sessions.push(proxy.params(ALICE).connect().await.unwrap());
    }
    let mut idle = Vec::new();
    for _ in 0..IDLE_UNAUTHENTICATED {
        idle.push(TcpStream::connect(("127.0.0.1", proxy.port())).unwrap());
    }
    // The daemon holds them all (accepted, waiting for a startup packet).
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < baseline + IDLE_UNAUTHENTICATED && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(open_fds(pid) >= baseline + IDLE_UNAUTHENTICATED);

    // A new session and every idle one are served promptly.
    let started = Instant::now();
    serves_new_sessions(&proxy);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for s in &sessions {
        let v: i32 = s.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(v, 7);
    }

    // Once they go, so do their file descriptors.
    drop(idle);
    drop(sessions);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > baseline + 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        open_fds(pid) <= baseline + 10,
        "{} fds open, {baseline} at the start",
        open_fds(pid)
    );
    assert_eq!(app_backends_left(&pg), "0");
    every_executed_statement_recorded(&pg, &proxy);
}

#[test]
fn messages_at_and_over_the_size_limit() {
    const LIMIT: usize = 65536;
    let pg = cluster("");
    let proxy = proxy(&pg, &format!("[limits]\nmax_message_bytes = {LIMIT}\n"));
    // A Query whose length field is exactly the limit (4 + SQL + NUL).
    let at = format!("SELECT '{}'", "q".repeat(LIMIT - 5 - 9));
    assert_eq!(query_message(&at).len() - 1, LIMIT);
    let mut c = RawClient::login(&proxy.params(ALICE)).unwrap();
    let (msgs, closed) = c.simple_query(&at).unwrap();
    assert!(!closed && msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    // One byte more: FATAL 54000 naming the setting.
    let over = format!("SELECT '{}'", "q".repeat(LIMIT - 5 - 9 + 1));
    let (msgs, closed) = c.simple_query(&over).unwrap();
    assert!(closed);
    let e = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("no ErrorResponse");
    assert_eq!(e.sqlstate().as_deref(), Some("54000"));
    assert!(
        e.error_field(b'M').unwrap().contains("max_message_bytes"),
        "{:?}",
        e.error_field(b'M')
    );

    // From PostgreSQL: a DataRow (4 + 2 + 4 + value) exactly at the limit passes, one more
    // byte ends the session with 54000 (the statement ran, so it has its record).
    let mut c = RawClient::login(&proxy.params(ALICE)).unwrap();
    let (msgs, closed) = c
        .simple_query(&format!("SELECT repeat('u', {})", LIMIT - 10))
        .unwrap();
    assert!(!closed && msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    let (msgs, closed) = c
        .simple_query(&format!("SELECT repeat('u', {})", LIMIT - 10 + 1))
        .unwrap();
    assert!(closed);
    let e = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("no ErrorResponse");
    assert_eq!(e.sqlstate().as_deref(), Some("54000"));
    serves_new_sessions(&proxy);
    every_executed_statement_recorded(&pg, &proxy);
}

fn wait_for_log(proxy: &Interceptor, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.logs().contains(needle) {
        assert!(Instant::now() < deadline, "no `{needle}` in the log");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_directory_removed_while_running() {
    let pg = cluster("");
    let proxy = proxy(&pg, "");
    let dir = proxy.policy_dir().unwrap();
    let saved = proxy.dir().join("policies-saved");
    copy_dir(&dir, &saved);
    let open = proxy.params(ALICE).connect().await.unwrap();
    open.query_one("SELECT 1", &[]).await.unwrap();

    std::fs::remove_dir_all(&dir).unwrap();
    wait_for_log(&proxy, "policy reload failed; keeping the previous policy");
    // The previous policy stays in force: the open session and a new one still work.
    let v: String = open.query_one("SELECT 'kept'", &[]).await.unwrap().get(0);
    assert_eq!(v, "kept");
    serves_new_sessions(&proxy);

    copy_dir(&saved, &dir);
    wait_for_log(&proxy, "policy reloaded");
    let v: String = open.query_one("SELECT 'back'", &[]).await.unwrap().get(0);
    assert_eq!(v, "back");
    drop(open);
    // The failed reload is in the trail.
    let records = proxy.audit_records().unwrap();
    assert!(
        records
            .iter()
            .map(|r| r.get("event").unwrap_or(r))
            .any(|e| { e["type"] == "policy_reload" && e["ok"] == false }),
        "no policy_reload record with ok = false"
    );
    every_executed_statement_recorded(&pg, &proxy);
}

/// Masked values under a fault: PostgreSQL restarted while a result whose column is masked
/// streams (selected bare, and inside an expression the rewrite masks). Nothing the client
/// reads, before or after the restart, nor anything the audit trail recorded, holds a raw
/// value.
#[test]
fn a_masked_result_cut_by_a_restart_leaks_nothing() {
    const RAW: &str = "SECRETCARD-";
    let pg = cluster("");
    pg.psql(&format!(
        "CREATE TABLE cards AS SELECT g AS id, '{RAW}' || g AS num \
           FROM generate_series(1, 100000) g;\n\
         GRANT SELECT ON cards TO {APP_RW};"
    ))
    .unwrap();
    let alice = interceptor_tests::IdentitySpec::new(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW));
    let policy = format!(
        "{}\n[mask]\n\n[[mask.column]]\nmatch = \"public.cards.num\"\nstrategy = \"redact\"\n",
        interceptor_tests::proxy::allow_all_policy(&alice)
    );
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity_spec(alice)
            .policy_file("alice-masked.toml", &policy)
            .with_audit(),
    )
    .unwrap();
    let mut clients = Vec::new();
    // Results far larger than the socket buffers: still streaming when PostgreSQL restarts.
    for sql in [
        "SELECT c.id, c.num, g FROM cards c, generate_series(1, 50) g",
        "SELECT c.id, upper(c.num) || '!', g FROM cards c, generate_series(1, 50) g",
    ] {
        let mut c = RawClient::login(&proxy.params(ALICE)).unwrap();
        c.send(&query_message(sql)).unwrap();
        clients.push((sql, c));
    }
    let mut rows = 0;
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for (_, c) in clients.iter_mut() {
        while rows < 200 {
            let m = c.read_message().unwrap().expect("the result ended early");
            assert_ne!(m.tag, b'E', "{:?}", m.error_field(b'M'));
            if m.tag == b'D' {
                rows += 1;
                seen.push(m.body);
                if rows % 100 == 0 {
                    break;
                }
            }
        }
    }

    // Rows of both results reached the client before the fault (unmasked, each would hold one).
    assert_eq!(rows, 200);
    pg.restart().unwrap();

    for (sql, c) in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut fatal = false;
        loop {
            assert!(Instant::now() < deadline, "`{sql}`: no end within 30 s");
            match c.read_message() {
                Ok(Some(m)) => {
                    fatal |= m.tag == b'E' && m.error_field(b'S').as_deref() == Some("FATAL");
                    seen.push(m.body);
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert!(fatal, "`{sql}`: no FATAL before the close");
    }
    let leaked = seen
        .iter()
        .filter(|b| {
            String::from_utf8_lossy(b)
                .to_ascii_uppercase()
                .contains(RAW)
        })
        .count();
    assert_eq!(
        leaked, 0,
        "{leaked} messages the client read hold a raw value"
    );
    let audit = serde_json::to_string(&proxy.audit_records().unwrap()).unwrap();
    assert!(
        !audit.to_ascii_uppercase().contains(RAW),
        "the audit trail holds a raw value"
    );
    // Both statements are in the trail (the side connection's catalog look-ups that PostgreSQL
    // also logged are interceptor's own, not the client's).
    for (sql, _) in &clients {
        assert!(audit.contains(sql), "no record of `{sql}`");
    }
    serves_new_sessions(&proxy);
}
