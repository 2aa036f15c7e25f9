//! PostgreSQL goes away under the proxy: clients get a prompt, clear error (not a hang or a
//! bare disconnect), and service resumes when PostgreSQL is back.

use std::time::{Duration, Instant};

use interceptor_tests::{ALICE, PgCommand, Stack, StackOptions};

#[tokio::test]
async fn upstream_down_gives_prompt_clear_error_and_recovers() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    if s.is_direct() {
        eprintln!("direct mode: there is no proxy to report an unreachable upstream; skipped");
        return;
    }
    // A session that is open when PostgreSQL dies.
    let open = s.params(ALICE).connect().await.unwrap();
    open.query_one("SELECT 1", &[]).await.unwrap();

    s.pg.stop().unwrap();

    // The open session: the next query fails promptly.
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), open.query_one("SELECT 1", &[]))
        .await
        .expect("a query on a dead upstream must not hang");
    assert!(res.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));

    // A new client: the proxy accepts, then says why it cannot serve.
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(8), s.params(ALICE).connect())
        .await
        .expect("connect must not hang")
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse from the proxy, got {err:?}"));
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    assert!(!db.message().is_empty());
    // Class 08 (connection exception) or 57P03 (cannot connect now) are what clients retry on.
    let code = db.code().code();
    assert!(code.starts_with("08") || code == "57P03", "{db:?}");
    // No secret leaks into the error.
    for pw in s.pg.role_passwords().values() {
        assert!(!db.message().contains(pw.as_str()));
        assert!(!db.detail().unwrap_or("").contains(pw.as_str()));
    }

    // psql shows the error text too.
    let out = PgCommand::psql(&s.params(ALICE))
        .args(["-c", "SELECT 1"])
        .timeout(Duration::from_secs(10))
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("FATAL"), "{out:?}");

    // PostgreSQL comes back: the proxy serves again without a restart.
    s.pg.restart().unwrap();
    let c = s.params(ALICE).connect().await.unwrap();
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    assert!(!s.logs().contains("panicked"));
}
