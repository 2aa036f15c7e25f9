//! The audit trail through the real proxy: write-ahead durability under kill -9, refusals
//! recorded, and the auditor's CLI.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use interceptor_tests::pg::{APP_DB, APP_RW};
use interceptor_tests::proxy::interceptor_bin;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand, PgOptions,
};

/// Every audit record, as the auditor's CLI exports it (JSON Lines).
fn export(proxy: &Interceptor) -> Vec<serde_json::Value> {
    proxy.audit_records().unwrap()
}

/// SQL texts of statement records with the given decision, with their counts.
fn statements(records: &[serde_json::Value], decision: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in records {
        let event = r.get("event").unwrap_or(r);
        if event["type"] == "statement" && event["decision"] == decision {
            *out.entry(event["sql"].as_str().unwrap().trim().to_owned())
                .or_default() += 1;
        }
    }
    out
}

/// Statements PostgreSQL itself logged (log_statement = 'all') for `role`.
fn executed_by(pg: &PgCluster, role: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let marker = format!(" {role}@");
    for line in pg.server_log().lines() {
        if let Some(i) = line.find("LOG:  statement: ")
            && line.contains(&marker)
        {
            *out.entry(line[i + "LOG:  statement: ".len()..].trim().to_owned())
                .or_default() += 1;
        }
    }
    out
}

#[test]
fn kill_9_during_pgbench_loses_no_record_of_an_executed_statement() {
    let pg = PgCluster::start_with(PgOptions::default().log_statement_all(true)).unwrap();
    pg.pgbench_init(1).unwrap();
    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .allow_all_policies();
    let mut proxy = Interceptor::start(setup).unwrap();
    let params = proxy.params(ALICE);
    let bench = std::thread::spawn(move || {
        PgCommand::pgbench(&params)
            .args(["-n", "-M", "simple", "-c", "4", "-j", "2", "-T", "20"])
            .timeout(Duration::from_secs(60))
            .run()
    });
    // Kill once PostgreSQL has run a good number of statements: on a loaded machine pgbench's
    // four logins alone can take seconds, and a fixed sleep would kill it before it ran.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while executed_by(&pg, APP_RW).values().sum::<usize>() < 200
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.kill9();
    let _ = bench.join();

    let executed = executed_by(&pg, APP_RW);
    let total: usize = executed.values().sum();
    assert!(
        total > 50,
        "pgbench ran too little to mean anything: {total}"
    );
    let recorded = statements(&export(&proxy), "allow");
    for (sql, n) in &executed {
        let r = recorded.get(sql).copied().unwrap_or(0);
        assert!(
            r >= *n,
            "PostgreSQL executed `{sql}` {n} time(s) but the audit trail has {r} record(s)"
        );
    }
}

#[test]
fn a_refused_statement_is_recorded_and_the_session_goes_on() {
    let pg = PgCluster::start().unwrap();
    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["analyst"], None)
        .policy_file(
            "readonly",
            r#"
[policy]
name = "readonly"
[identities]
groups = ["analyst"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "session", "transaction"]
"#,
        );
    let proxy = Interceptor::start(setup).unwrap();
    let before = pg.psql_db(APP_DB, "SELECT count(*) FROM accounts").unwrap();
    // ON_ERROR_STOP off: psql goes on after the refusal, on the same connection.
    let out = PgCommand::new("psql", &proxy.params(ALICE))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0"])
        .stdin("SELECT 1;\nDELETE FROM accounts;\nSELECT 2;\nSELECT 3;\n")
        .run()
        .unwrap();
    assert_eq!(out.stdout, "1\n2\n3\n", "{out:?}");
    assert!(out.stderr.contains("not allowed by policy"), "{out:?}");
    // One Query message with two statements: one refusal refuses all of it, nothing runs.
    let out = PgCommand::new("psql", &proxy.params(ALICE))
        .args(["-X", "-A", "-t", "-c", "SELECT 1; DROP TABLE accounts"])
        .run()
        .unwrap();
    assert!(!out.success(), "{out:?}");
    assert_eq!(out.stdout, "", "part of a refused query ran: {out:?}");
    assert_eq!(
        pg.psql_db(APP_DB, "SELECT count(*) FROM accounts").unwrap(),
        before,
        "a refused statement changed the database"
    );
    let records = export(&proxy);
    let denied = statements(&records, "deny");
    assert_eq!(denied.get("DELETE FROM accounts;"), Some(&1), "{denied:?}");
    assert_eq!(
        denied.get("SELECT 1; DROP TABLE accounts"),
        Some(&1),
        "{denied:?}"
    );
    let allowed = statements(&records, "allow");
    assert_eq!(allowed.get("SELECT 3;"), Some(&1), "{allowed:?}");
}

#[test]
fn verify_passes_on_a_live_trail_and_names_a_tampered_record() {
    let pg = PgCluster::start().unwrap();
    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .allow_all_policies();
    let mut proxy = Interceptor::start(setup).unwrap();
    let out = PgCommand::psql(&proxy.params(ALICE))
        .args(["-c", "SELECT count(*) FROM accounts"])
        .run()
        .unwrap();
    assert!(out.success(), "{out:?}");
    proxy.terminate();
    let verify = |proxy: &Interceptor| {
        Command::new(interceptor_bin().unwrap())
            .args(["audit", "-c"])
            .arg(proxy.config_path())
            .arg("verify")
            .output()
            .unwrap()
    };
    let ok = verify(&proxy);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("OK"));
}
