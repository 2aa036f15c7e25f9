//! Client authentication at the proxy: SCRAM with the right password works, anything else
//! is 28P01 without revealing whether the identity exists, and the identity's upstream role
//! bounds what it may do.

use interceptor_tests::{ALICE, BOB, PgCommand, Stack, StackOptions};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn wrong_password_is_28p01() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let err = s
        .params(ALICE)
        .password(Some("not-alices-password"))
        .connect()
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse from the server");
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    assert!(
        !db.message().contains("not-alices-password"),
        "the password must never be echoed"
    );

    // An unknown identity looks exactly like a wrong password (no user enumeration).
    let err = s
        .params("mallory")
        .password(Some("whatever"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");

    // psql reports it too and exits with 2.
    let out = PgCommand::psql(&s.params(BOB).password(Some("wrong")))
        .args(["-c", "SELECT 1"])
        .run()
        .unwrap();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("FATAL"), "{out:?}");
    assert!(!out.stderr.contains("wrong"), "{out:?}");

    // The right password still works afterwards.
    let c = s.params(ALICE).connect().await.unwrap();
    let ok: bool = c
        .query_one("SELECT pg_has_role(current_user, 'app_rw', 'MEMBER')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(ok);
}

#[tokio::test]
async fn identity_runs_with_its_upstream_role_privileges() {
    let s = Stack::start(StackOptions::standard()).unwrap();
    let bob = s.params(BOB).connect().await.unwrap();
    let n: i64 = bob
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, i64::from(interceptor_tests::fixtures::ACCOUNT_ROWS));
    let err = bob.execute("DELETE FROM accounts", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let superuser: bool = bob
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);

    let alice = s.params(ALICE).connect().await.unwrap();
    let deleted = alice
        .execute("DELETE FROM accounts WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
}
