//! Just-in-time approval through the real proxy: a psql session's DELETE is held until an approver
//! on the host approves it with the CLI, or refused with the approver's reason.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use interceptor_tests::pg::APP_DB;
use interceptor_tests::proxy::interceptor_bin;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand,
};

const POLICY: &str = r#"
[policy]
name = "agents"
[identities]
groups = ["agents"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "session", "transaction"]
[[rule]]
name = "writes-need-a-dba"
decision = "approve"
kinds = ["write"]
approvers = ["dba"]
timeout_secs = 60
"#;

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(interceptor_bin().unwrap())
        .arg("approvals")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// Waits for the one pending request and returns its id.
fn pending_request(config: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cli(config, &["list"]);
        if out.status.success()
            && let Ok(list) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            && let Some(id) = list
                .iter()
                .find(|r| r["status"] == "pending")
                .and_then(|r| r["id"].as_u64())
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no pending approval request appeared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start(pg: &PgCluster, dir: &Path) -> Interceptor {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let extra = format!(
        "[approvals]\ndir = \"{d}/approvals\"\nsocket = \"{d}/approvals.sock\"\n\
         [approvals.local_approvers.{uid}]\nsubject = \"dana-dba\"\ngroups = [\"dba\"]\n",
        d = dir.display()
    );
    Interceptor::start(
        InterceptorSetup::new(pg)
            .identity(ALICE, ALICE_PASSWORD, &["agents"], None)
            .policy_file("agents", POLICY)
            .extra_toml(&extra),
    )
    .unwrap()
}

fn count(pg: &PgCluster, id: i32) -> String {
    pg.psql_db(
        APP_DB,
        &format!("SELECT count(*) FROM accounts WHERE id = {id}"),
    )
    .unwrap()
    .trim()
    .to_owned()
}

#[test]
fn a_held_delete_runs_once_approved_and_not_when_denied() {
    let pg = PgCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&pg, dir.path());
    let config = proxy.config_path().to_owned();
    assert_eq!(count(&pg, 1), "1");

    let params = proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 1"])
            .run()
    });
    let id = pending_request(&config);
    // Still held: nothing ran yet.
    assert_eq!(count(&pg, 1), "1");
    let out = cli(&config, &["approve", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = held.join().unwrap().unwrap();
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("DELETE 1"), "{out:?}");
    assert!(
        out.stderr.contains("held for approval"),
        "the client was not told: {out:?}"
    );
    assert_eq!(count(&pg, 1), "0");

    let params = proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 2"])
            .run()
    });
    let id = pending_request(&config);
    let out = cli(
        &config,
        &["deny", &id.to_string(), "--reason", "not during the freeze"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = held.join().unwrap().unwrap();
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("not during the freeze"), "{out:?}");
    assert_eq!(count(&pg, 2), "1", "a denied statement ran");
}
