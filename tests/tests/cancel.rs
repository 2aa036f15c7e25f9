//! Query cancellation through the proxy: the CancelRequest reaches the right backend quickly,
//! and a forged one does nothing.

use std::time::{Duration, Instant};

use interceptor_tests::{ALICE, BOB, Stack, StackOptions};
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_pg_sleep_returns_within_two_seconds() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let client = s.params(ALICE).connect().await.unwrap();
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let res = client.query("SELECT pg_sleep(30)", &[]).await;
        (res, client)
    });
    // Cancel only once the server is really running the query.
    let pg = &s.pg;
    tokio::task::block_in_place(|| {
        pg.wait_for_active_query("pg_sleep(30)", Duration::from_secs(10))
    })
    .unwrap();
    let cancelled_at = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let (res, client) = tokio::time::timeout(Duration::from_secs(2), sleeper)
        .await
        .expect("query must end within 2 s of the cancel")
        .unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(2));
    assert!(started.elapsed() < Duration::from_secs(15));
    let err = res.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    // The session survives a cancel.
    let v: i32 = client.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_only_hits_its_own_session() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let victim = s.params(BOB).connect().await.unwrap();
    let canceller = s.params(ALICE).connect().await.unwrap();
    let victim_query = tokio::spawn(async move {
        victim
            .query_one("SELECT 'done'::text FROM pg_sleep(1.5)", &[])
            .await
            .map(|r| r.get::<_, String>(0))
    });
    let pg = &s.pg;
    tokio::task::block_in_place(|| {
        pg.wait_for_active_query("pg_sleep(1.5)", Duration::from_secs(10))
    })
    .unwrap();
    // Cancelling the other session's own (idle) connection must not touch the victim.
    canceller.cancel_token().cancel_query(NoTls).await.unwrap();
    // A forged CancelRequest with made-up process id and key.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", s.params(ALICE).port))
        .await
        .unwrap();
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16i32.to_be_bytes());
    msg.extend_from_slice(&80_877_102i32.to_be_bytes());
    msg.extend_from_slice(&0x1234_5678i32.to_be_bytes());
    msg.extend_from_slice(&0x0bad_cafei32.to_be_bytes());
    raw.write_all(&msg).await.unwrap();
    drop(raw);
    let out = tokio::time::timeout(Duration::from_secs(5), victim_query)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.unwrap(), "done");
}
