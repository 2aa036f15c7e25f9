//! tokio-postgres through the proxy: binary parameters and results, large results,
//! pipelining, transactions, LISTEN/NOTIFY and concurrent clients.

use std::time::Duration;

use interceptor_tests::fixtures;
use interceptor_tests::{ALICE, BOB, Stack, StackOptions};
use tokio_postgres::AsyncMessage;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

fn stack() -> Stack {
    Stack::start(StackOptions::standard()).unwrap()
}

#[tokio::test]
async fn binary_parameters_and_results_round_trip() {
    let s = stack();
    let c = s.params(ALICE).connect().await.unwrap();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let text = "naïve café — 日本語 'quoted' \"double\" \\ back";
    let null_i32: Option<i32> = None;
    let stmt = c
        .prepare_typed(
            "SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::text, $6::bytea, $7::bool, \
                    $8::int4, $9::float4",
            &[
                Type::INT2,
                Type::INT4,
                Type::INT8,
                Type::FLOAT8,
                Type::TEXT,
                Type::BYTEA,
                Type::BOOL,
                Type::INT4,
                Type::FLOAT4,
            ],
        )
        .await
        .unwrap();
    let row = c
        .query_one(
            &stmt,
            &[
                &i16::MIN,
                &-7i32,
                &i64::MAX,
                &-1.5e300f64,
                &text,
                &all_bytes,
                &true,
                &null_i32,
                &f32::INFINITY,
            ],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i16>(0), i16::MIN);
    assert_eq!(row.get::<_, i32>(1), -7);
    assert_eq!(row.get::<_, i64>(2), i64::MAX);
    assert_eq!(row.get::<_, f64>(3), -1.5e300);
    assert_eq!(row.get::<_, &str>(4), text);
    assert_eq!(row.get::<_, Vec<u8>>(5), all_bytes);
    assert!(row.get::<_, bool>(6));
    assert_eq!(row.get::<_, Option<i32>>(7), None);
    assert_eq!(row.get::<_, f32>(8), f32::INFINITY);

    // Parameters against the fixture.
    let by_id = c
        .prepare("SELECT name, email, card_number FROM accounts WHERE id = $1")
        .await
        .unwrap();
    for a in fixtures::accounts().iter().step_by(5) {
        let row = c.query_one(&by_id, &[&a.id]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), a.name);
        assert_eq!(row.get::<_, &str>(1), a.email);
        assert_eq!(row.get::<_, &str>(2), a.card_number);
    }
    let none = c.query_opt(&by_id, &[&9999i32]).await.unwrap();
    assert!(none.is_none());
}

#[tokio::test]
async fn large_result_is_relayed_intact() {
    let s = stack();
    let c = s.params(BOB).connect().await.unwrap();
    // ~20 MiB in 20,000 DataRows.
    let rows = c
        .query(
            "SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 20000) AS g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20_000);
    let sum: i64 = rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).sum();
    assert_eq!(sum, 20_000 * 20_001 / 2);
    for r in rows.iter().step_by(997) {
        let s: &str = r.get(1);
        assert_eq!(s.len(), 1024);
    }
    // And a 16 MiB parameter the other way.
    let big = "z".repeat(16 * 1024 * 1024);
    let len: i32 = c
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 16 * 1024 * 1024);
}

#[tokio::test]
async fn pipelined_queries_keep_order_and_isolate_errors() {
    let s = stack();
    let c = s.params(ALICE).connect().await.unwrap();
    let by_id = c
        .prepare("SELECT email FROM accounts WHERE id = $1")
        .await
        .unwrap();
    let expected = fixtures::accounts();
    // All requests are written before any response is read.
    let (a, b, err, d, e) = tokio::join!(
        c.query_one(&by_id, &[&1i32]),
        c.query_one(&by_id, &[&2i32]),
        c.query_one("SELECT 1 / $1::int", &[&0i32]),
        c.query_one(&by_id, &[&3i32]),
        c.query("SELECT g FROM generate_series(1, 500) g", &[]),
    );
    assert_eq!(a.unwrap().get::<_, &str>(0), expected[0].email);
    assert_eq!(b.unwrap().get::<_, &str>(0), expected[1].email);
    assert_eq!(err.unwrap_err().code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(d.unwrap().get::<_, &str>(0), expected[2].email);
    assert_eq!(e.unwrap().len(), 500);

    // Many in flight at once.
    let futs: Vec<_> = (1..=fixtures::ACCOUNT_ROWS)
        .map(|id| {
            let c = &c;
            let by_id = &by_id;
            async move { c.query_one(by_id, &[&id]).await }
        })
        .collect();
    let rows = futures_join_all(futs).await;
    for (row, a) in rows.into_iter().zip(&expected) {
        assert_eq!(row.unwrap().get::<_, &str>(0), a.email);
    }
}

/// Polls all futures concurrently on the current task (no extra dependency needed).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[tokio::test]
async fn transactions_commit_rollback_and_savepoints() {
    let s = stack();
    let mut c = s.params(ALICE).connect().await.unwrap();
    let observer = s.params(BOB).connect().await.unwrap();
    let count = |email: &'static str| {
        let observer = &observer;
        async move {
            observer
                .query_one("SELECT count(*) FROM accounts WHERE email = $1", &[&email])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let insert =
        "INSERT INTO accounts (name, email, card_number) VALUES ($1, $2, '4111111111111111')";

    // Rolled back: never visible.
    let tx = c.transaction().await.unwrap();
    tx.execute(insert, &[&"Rolled Back", &"rb@example.com"])
        .await
        .unwrap();
    assert_eq!(count("rb@example.com").await, 0, "uncommitted row visible");
    tx.rollback().await.unwrap();
    assert_eq!(count("rb@example.com").await, 0);

    // Committed, with a savepoint rolled back inside.
    let mut tx = c.transaction().await.unwrap();
    tx.execute(insert, &[&"Kept", &"kept@example.com"])
        .await
        .unwrap();
    let sp = tx.savepoint("sp1").await.unwrap();
    sp.execute(insert, &[&"Dropped", &"dropped@example.com"])
        .await
        .unwrap();
    sp.rollback().await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count("kept@example.com").await, 1);
    assert_eq!(count("dropped@example.com").await, 0);

    // An error aborts the transaction until rollback (25P02), then the session works again.
    let tx = c.transaction().await.unwrap();
    let err = tx
        .execute(insert, &[&"Dup", &"kept@example.com"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let err = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    tx.rollback().await.unwrap();
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn listen_notify_through_the_proxy() {
    let s = stack();
    let (listener, mut conn) = s.params(ALICE).connect_raw().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    listener.batch_execute("LISTEN events").await.unwrap();

    let notifier = s.params(BOB).connect().await.unwrap();
    notifier
        .execute(
            "SELECT pg_notify('events', 'hello ' || $1::text)",
            &[&"world"],
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s")
        .expect("channel open");
    assert_eq!(got, ("events".to_owned(), "hello world".to_owned()));

    // Inside a transaction: delivered on commit only, and not at all on rollback.
    notifier
        .batch_execute("BEGIN; NOTIFY events, 'rolled back'; ROLLBACK;")
        .await
        .unwrap();
    notifier
        .batch_execute("BEGIN; NOTIFY events, 'committed'; COMMIT;")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5 s")
        .expect("channel open");
    assert_eq!(got.1, "committed");

    // UNLISTEN stops delivery: the listener sees nothing more.
    listener.batch_execute("UNLISTEN events").await.unwrap();
    notifier
        .batch_execute("NOTIFY events, 'after unlisten'")
        .await
        .unwrap();
    // A round trip on the listener makes sure anything pending would have arrived.
    listener.batch_execute("SELECT 1").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn concurrent_clients_get_separate_sessions() {
    let s = stack();
    let mut handles = Vec::new();
    for i in 0..16i32 {
        let params = s.params(if i % 2 == 0 { ALICE } else { BOB });
        handles.push(tokio::spawn(async move {
            let c = params.connect().await.unwrap();
            // Session state must not leak between clients.
            c.batch_execute(&format!("SET application_name = 'client{i}'"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let row = c
                .query_one(
                    "SELECT current_setting('application_name'), pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            (i, row.get::<_, String>(0), row.get::<_, i32>(1))
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for h in handles {
        let (i, app, pid) = h.await.unwrap();
        assert_eq!(app, format!("client{i}"));
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 16, "each client has its own backend");
}

#[tokio::test]
async fn portals_with_row_limits() {
    let s = stack();
    let mut c = s.params(BOB).connect().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT g FROM generate_series(1, 95) g ORDER BY g")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    // Execute with a row limit: PortalSuspended after each batch of 10.
    let mut seen = Vec::new();
    loop {
        let batch = tx.query_portal(&portal, 10).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 10);
        seen.extend(batch.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=95).collect::<Vec<_>>());
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn empty_and_comment_only_queries() {
    let s = stack();
    let c = s.params(BOB).connect().await.unwrap();
    // Simple-protocol corner cases PostgreSQL answers with EmptyQueryResponse; clients and
    // drivers send them (e.g. keepalive pings of some pools).
    // tokio-postgres reports EmptyQueryResponse as a zero-row completion.
    let msgs = c.simple_query("").await.unwrap();
    assert!(
        msgs.iter()
            .all(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(0))),
        "{msgs:?}"
    );
    c.simple_query("-- nothing but a comment").await.unwrap();
    let msgs = c
        .simple_query("SELECT 'a' AS x; SELECT 'b' AS y")
        .await
        .unwrap();
    let rows: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["a", "b"]);
}

#[tokio::test]
async fn closed_clients_leave_no_upstream_sessions() {
    let s = stack();
    // Backends of the application roles (or, in direct mode, of the identities).
    let count_sql = "SELECT count(*) FROM pg_stat_activity \
                     WHERE usename IN ('app_rw', 'app_ro', 'alice', 'bob')";
    let baseline = s.pg.psql(count_sql).unwrap();
    assert_eq!(baseline.trim(), "0");
    let mut clients = Vec::new();
    for i in 0..8 {
        let c = s
            .params(if i % 2 == 0 { ALICE } else { BOB })
            .connect()
            .await
            .unwrap();
        c.query_one("SELECT 1", &[]).await.unwrap();
        clients.push(c);
    }
    assert_eq!(s.pg.psql(count_sql).unwrap().trim(), "8");
    // Half leave politely (Terminate), half vanish (socket dropped mid-transaction).
    for (i, c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(c);
        } else {
            c.batch_execute("BEGIN; SELECT 1").await.unwrap();
            drop(c);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = s.pg.psql(count_sql).unwrap();
        if n.trim() == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} upstream sessions left behind",
            n.trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// DISCARD PLANS drops cached plans, not prepared statements (DISCARD ALL does both): a
/// statement prepared before it still runs, at the SQL level and the protocol level, as it does
/// directly against PostgreSQL.
#[tokio::test]
async fn prepared_statements_outlive_discard_plans() {
    let s = stack();
    let direct =
        s.pg.psql("PREPARE p AS SELECT 41 + 1; DISCARD PLANS; EXECUTE p;")
            .unwrap();
    assert_eq!(direct.trim(), "42", "PostgreSQL itself: {direct:?}");

    let c = s.params(ALICE).connect().await.unwrap();
    let stmt = c.prepare("SELECT 40 + 2").await.unwrap();
    c.batch_execute("PREPARE p AS SELECT 41 + 1").await.unwrap();
    c.batch_execute("DISCARD PLANS").await.unwrap();
    let row = c.query_one(&stmt, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let executed: Vec<String> = c
        .simple_query("EXECUTE p")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(executed, vec!["42".to_string()]);

    // DISCARD ALL drops them, in PostgreSQL and so through the proxy.
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert!(c.simple_query("EXECUTE p").await.is_err());
    assert!(c.query_one(&stmt, &[]).await.is_err());
}
