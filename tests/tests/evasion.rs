//! The evasion battery: a read-only identity whose upstream role *could* write tries to change
//! the database by every trick that fools a text-matching gateway. Each attempt must be refused,
//! and afterwards PostgreSQL's own state must be exactly what it was.

use interceptor_tests::pg::APP_DB;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand,
};

const READ_ONLY: &str = r#"
[policy]
name = "read-only"
[identities]
subjects = ["alice"]
[login]
# The role can write: only interceptor's policy keeps this identity read-only.
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "session", "transaction"]
tables = ["public.*", "pg_catalog.*", "information_schema.*"]
functions = ["pg_catalog.*"]
[[rule]]
name = "no-identity-change"
decision = "deny"
risks = ["set_role", "session_authorization"]
"#;

use interceptor_tests::corpus::{
    DISGUISED_WRITES as ATTEMPTS, OVER_BLOCKED, READS_BY_NAME_OUTSIDE_PUBLIC,
};

fn fingerprint(pg: &PgCluster) -> String {
    pg.psql_db(
        APP_DB,
        "SELECT (SELECT count(*) FROM accounts), \
                (SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM accounts a), \
                (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace), \
                (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace), \
                (SELECT last_value FROM accounts_id_seq)",
    )
    .unwrap()
}

#[test]
fn nothing_a_read_only_identity_sends_changes_the_database() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("read-only", READ_ONLY),
    )
    .unwrap();
    let before = fingerprint(&pg);
    for sql in ATTEMPTS {
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", sql])
            .run()
            .unwrap();
        assert!(!out.success(), "not refused: {sql:?}: {out:?}");
        assert!(out.stderr.contains("ERROR"), "{sql:?}: {out:?}");
        assert_eq!(
            fingerprint(&pg),
            before,
            "the database changed after {sql:?}"
        );
    }
    assert!(!std::path::Path::new("/tmp/interceptor-evasion-leak.csv").exists());
    assert!(!proxy.logs().contains("panicked"));

    // What a read-only person does still works: reads, psql's catalog commands.
    for (cmd, expect) in [
        ("SELECT count(*) FROM accounts", "36"),
        ("\\dt", "accounts"),
        ("\\d accounts", "card_number"),
        ("\\df", "List of functions"),
    ] {
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", cmd])
            .run()
            .unwrap();
        assert!(out.success(), "{cmd}: {out:?}");
        assert!(out.stdout.contains(expect), "{cmd}: {out:?}");
    }
}

/// The same battery over tokio-postgres, through the simple protocol and, for single
/// statements, the extended protocol (where the binary-format driver's statements go).
#[tokio::test]
async fn nothing_a_read_only_driver_sends_changes_the_database() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("read-only", READ_ONLY),
    )
    .unwrap();
    let before = fingerprint(&pg);
    let client = proxy.params(ALICE).connect().await.unwrap();
    for sql in ATTEMPTS {
        assert!(
            client.simple_query(sql).await.is_err(),
            "not refused (simple): {sql:?}"
        );
        if !sql.contains(';') {
            assert!(
                client.query(*sql, &[]).await.is_err(),
                "not refused (extended): {sql:?}"
            );
        }
        assert_eq!(
            fingerprint(&pg),
            before,
            "the database changed after {sql:?}"
        );
    }
    // The session is still usable, and a syntax error is PostgreSQL's own, with its position.
    let rows = client.simple_query("SELECT 1").await.unwrap();
    assert!(!rows.is_empty());
    let e = client
        .simple_query("SELECT 1;\nSELECT * FROMM accounts")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "42601");
    assert_eq!(db.message(), "syntax error at or near \"FROMM\"");
    assert!(
        matches!(
            db.position(),
            Some(tokio_postgres::error::ErrorPosition::Original(20))
        ),
        "{db:?}"
    );
}

const ALLOW_ALL: &str = r#"
[policy]
name = "allow-all"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "everything"
decision = "allow"
"#;

/// Valid PostgreSQL that drivers, ORMs and pg_dump send runs under a policy that allows it,
/// through psql (one script) and tokio-postgres (statement by statement, one session).
#[tokio::test]
async fn statements_postgresql_accepts_run_under_an_allow_all_policy() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("allow-all", ALLOW_ALL),
    )
    .unwrap();
    let client = proxy.params(ALICE).connect().await.unwrap();
    for sql in OVER_BLOCKED {
        if let Err(e) = client.simple_query(sql).await {
            panic!("{sql:?} refused or failed: {e:?}");
        }
    }
    let script: String = OVER_BLOCKED.iter().map(|s| format!("{s};\n")).collect();
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(script.as_str())
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    // psql shows the server's cursor for a syntax error the proxy reports.
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-c", "SELECT * FROMM accounts"])
        .run()
        .unwrap();
    assert!(
        out.stderr.contains("syntax error at or near \"FROMM\"") && out.stderr.contains("LINE 1:"),
        "{out:?}"
    );
}

const PUBLIC_ONLY: &str = r#"
[policy]
name = "public-only"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "public-reads"
decision = "allow"
kinds = ["read"]
tables = ["public.*"]
functions = ["pg_catalog.*"]
"#;

/// Functions that read the relations their arguments name are held to the policy's tables:
/// the password verifiers in pg_authid and whole-schema dumps stay out of reach.
#[test]
fn relations_named_in_strings_are_held_to_the_policy() {
    let pg = PgCluster::start().unwrap();
    let proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .policy_file("public-only", PUBLIC_ONLY),
    )
    .unwrap();
    for sql in READS_BY_NAME_OUTSIDE_PUBLIC {
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", sql])
            .run()
            .unwrap();
        assert!(!out.success(), "not refused: {sql:?}: {out:?}");
        assert!(!out.stdout.contains("SCRAM-SHA-256"), "{sql:?}: {out:?}");
    }
    // The same functions over a public table the policy allows still work.
    for sql in [
        "SELECT table_to_xml('accounts', true, true, '')",
        "SELECT query_to_xml('SELECT name FROM accounts', true, true, '')",
    ] {
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", sql])
            .run()
            .unwrap();
        if sql.starts_with("SELECT table_to_xml") {
            assert!(out.success(), "{sql:?}: {out:?}");
            assert!(out.stdout.contains("<name>"), "{sql:?}: {out:?}");
        } else {
            // query_to_xml runs arbitrary text: refused as dynamic SQL unless a rule accepts it.
            assert!(!out.success(), "{sql:?}: {out:?}");
        }
    }
}
