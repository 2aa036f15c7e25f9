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

const ATTEMPTS: &[&str] = &[
    "DELETE FROM accounts",
    "SELECT 1; DELETE FROM accounts",
    "/* SELECT */ DELETE FROM accounts",
    "/* nested /* comment */ still a comment */ DELETE FROM accounts",
    "-- SELECT\nDELETE FROM accounts",
    "WITH gone AS (DELETE FROM accounts RETURNING id) SELECT count(*) FROM gone",
    "EXPLAIN ANALYZE DELETE FROM accounts",
    "EXPLAIN (ANALYZE true) UPDATE accounts SET balance = 0",
    "SELECT 'x'; UPDATE accounts SET balance = 0",
    "SELECT E'\\''; DELETE FROM accounts; SELECT '",
    "SELECT $$; DELETE FROM accounts; $$; DELETE FROM accounts",
    "SELECT $tag$ $$ $tag$; DELETE FROM accounts",
    "SELECT U&'\\0041'; DELETE FROM accounts",
    "DELETE FROM U&\"\\0061ccounts\"",
    "DO $$ BEGIN DELETE FROM accounts; END $$",
    "PREPARE p AS DELETE FROM accounts",
    "SELECT set_config('role', 'postgres', false)",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "RESET ROLE",
    "CREATE TABLE evil (id int)",
    "CREATE FUNCTION evil() RETURNS int LANGUAGE sql AS 'DELETE FROM accounts; SELECT 1'",
    "TRUNCATE accounts",
    "DROP TABLE accounts",
    "COPY accounts FROM PROGRAM 'true'",
    "COPY accounts TO '/tmp/interceptor-evasion-leak.csv'",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT nextval('accounts_id_seq')",
    "INSERT INTO accounts (name, email, card_number) VALUES ('x', 'x@example.com', '4111111111111111')",
    "SELECT * FROM accounts FOR UPDATE",
    "GRANT ALL ON accounts TO PUBLIC",
    "VACUUM FULL accounts",
    "SELECT 1 \\; DELETE FROM accounts",
];

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
