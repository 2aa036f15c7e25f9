//! The policy's `[limits]` through the real proxy: `max_rows` cuts a result off with 54000 (and
//! stops PostgreSQL producing it), `statement_timeout_ms` is the session's starting timeout,
//! `max_sessions` refuses one session too many with 53300.

use interceptor_tests::{ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster};
use tokio_postgres::SimpleQueryMessage;

fn policy(limits: &str) -> String {
    format!(
        r#"
[policy]
name = "limited"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app_ro"
databases = ["*"]
[limits]
{limits}
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "transaction"]
"#
    )
}

fn start(pg: &PgCluster, limits: &str) -> Interceptor {
    Interceptor::start(
        InterceptorSetup::new(pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("limited", &policy(limits)),
    )
    .unwrap()
}

/// A result PostgreSQL streams for many seconds (5M rows; generate_series materialises them
/// first, then they flow row by row).
const LONG: &str = "SELECT g FROM generate_series(1, 5000000) g";

fn rows(messages: &[SimpleQueryMessage]) -> usize {
    messages
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| panic!("not an ErrorResponse (the session broke?): {e}"))
}

/// Every outcome record, as the auditor's CLI exports it.
fn outcomes(proxy: &Interceptor) -> Vec<serde_json::Value> {
    proxy
        .audit_records()
        .unwrap()
        .into_iter()
        .map(|r| r.get("event").cloned().unwrap_or(r))
        .filter(|e| e["type"] == "outcome")
        .collect()
}

#[test]
fn max_rows_cuts_results_off_with_54000_and_the_session_goes_on() {
    let pg = PgCluster::start().unwrap();
    let proxy = start(&pg, "max_rows = 10");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = proxy.params(ALICE).connect().await.unwrap();
        // At the limit: all rows.
        let ok = client
            .simple_query("SELECT g FROM generate_series(1, 10) g")
            .await
            .unwrap();
        assert_eq!(rows(&ok), 10);

        // Past it (simple protocol), a result PostgreSQL would take long to produce: cut off
        // with interceptor's error, no row past the limit reaches the client.
        let err = client.simple_query(LONG).await.unwrap_err();
        assert_eq!(code(&err), "54000", "{err:?}");
        let db = err.as_db_error().unwrap();
        assert!(db.message().contains("more than 10 rows"), "{db:?}");
        assert!(db.message().contains("limited"), "{db:?}");
        // The session is usable and PostgreSQL is no longer busy with the cut statement.
        let one = client.simple_query("SELECT 1").await.unwrap();
        assert_eq!(rows(&one), 1);

        // Extended protocol (what drivers use), a result that completes quickly: still cut.
        let err = client
            .query("SELECT g FROM generate_series(1, $1::int) g", &[&11i32])
            .await
            .unwrap_err();
        assert_eq!(code(&err), "54000", "{err:?}");
        let fine = client
            .query("SELECT g FROM generate_series(1, $1::int) g", &[&3i32])
            .await
            .unwrap();
        assert_eq!(fine.len(), 3);

        // Inside a transaction the error fails it, as any error would.
        client.simple_query("BEGIN").await.unwrap();
        let err = client.simple_query(LONG).await.unwrap_err();
        assert_eq!(code(&err), "54000");
        let after = client.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(code(&after), "25P02", "{after:?}");
        client.simple_query("ROLLBACK").await.unwrap();
        assert_eq!(rows(&client.simple_query("SELECT 2").await.unwrap()), 1);
    });
    // The trail records the cut statements' error, not a success.
    let cut: Vec<_> = outcomes(&proxy)
        .into_iter()
        .filter(|o| o["sqlstate"] == "54000")
        .collect();
    assert_eq!(cut.len(), 3, "{cut:#?}");
    // PostgreSQL is idle again: nothing of the cut statements still runs.
    let busy = pg
        .psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query LIKE '%generate_series%' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    assert_eq!(busy.trim(), "0", "a cut statement still runs upstream");
}

#[test]
fn statement_timeout_and_max_sessions_come_from_the_policy() {
    let pg = PgCluster::start().unwrap();
    let proxy = start(&pg, "statement_timeout_ms = 1500\nmax_sessions = 2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = proxy.params(ALICE).connect().await.unwrap();
        let err = a.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
        assert_eq!(code(&err), "57014", "{err:?}");
        assert_eq!(rows(&a.simple_query("SELECT 1").await.unwrap()), 1);

        let _b = proxy.params(ALICE).connect().await.unwrap();
        let third = proxy.params(ALICE).connect().await;
        let err = match third {
            Ok(_) => panic!("a third session of alice was let in (max_sessions = 2)"),
            Err(e) => e,
        };
        assert_eq!(code(&err), "53300", "{err:?}");
        // Closing one frees its slot.
        drop(a);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match proxy.params(ALICE).connect().await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(code(&e), "53300", "{e:?}");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the closed session's slot was never freed"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
}
