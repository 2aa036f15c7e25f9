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

mod approval_support;

use approval_support::{
    ApprovalStack, Setup, WebhookSink, alice_session, request_id_in, simple_query_in_background,
};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, SimpleQueryMessage};

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
        .arg("--json")
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

// The rest runs on the shared approvals stack (tests/tests/approval_support): tokio-postgres
// sessions that see the "held" notice, the CLI as approver `dana` (group dba).

/// The first column of the first row of a simple query, as text.
async fn scalar(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

fn actions(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn start_stack(setup: Setup) -> ApprovalStack {
    tokio::task::block_in_place(|| ApprovalStack::start(setup))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_statement_times_out_with_42501_and_the_session_stays_usable() {
    let s = start_stack(Setup::held_writes(2));
    let mut c = alice_session(&s).await;
    let err = c
        .client
        .simple_query("DELETE FROM accounts WHERE id = 3")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{db:?}");
    assert!(db.message().contains("timed out"), "{db:?}");
    let id = request_id_in(db.message());
    assert_eq!(c.held_notice().await, id, "the client was told it waits");

    // The same session goes on, and the statement never ran.
    assert_eq!(
        scalar(&c.client, "SELECT count(*) FROM accounts WHERE id = 3").await,
        "1"
    );
    tokio::task::block_in_place(|| {
        assert_eq!(s.count(3), "1");
        let r = s.request(id);
        assert_eq!(r["status"], "timed_out", "{r}");
        // Too late to approve.
        let out = s.cli("approvals", &["approve", &id.to_string()]);
        assert!(!out.status.success(), "a timed-out request was approved");
        assert_eq!(s.count(3), "1");
        let records = s.approval_records(id);
        assert_eq!(actions(&records), ["requested", "expired"], "{records:?}");
        assert_eq!(records[1]["reason"], "timed out");
        assert_eq!(records[0]["by"], "alice");
        s.verify_audit();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_held_gives_57014_aborts_the_request_and_nothing_runs() {
    let s = start_stack(Setup::held_writes(60));
    let mut c = alice_session(&s).await;
    let cancel = c.client.cancel_token();
    let client = c.client;
    let held = simple_query_in_background(client, "DELETE FROM accounts WHERE id = 4");
    let id = c.notices.recv().await.map(|n| request_id_in(&n)).unwrap();
    tokio::task::block_in_place(|| assert_eq!(s.request(id)["status"], "pending"));
    cancel.cancel_query(NoTls).await.unwrap();
    let (res, client) = tokio::time::timeout(std::time::Duration::from_secs(10), held)
        .await
        .expect("the cancel must end the wait")
        .unwrap();
    let err = res.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    // What PostgreSQL itself sends for a cancelled statement.
    assert_eq!(db.code(), &SqlState::QUERY_CANCELED, "{db:?}");
    assert!(
        db.message()
            .starts_with("canceling statement due to user request"),
        "{db:?}"
    );
    // The session is usable.
    assert_eq!(scalar(&client, "SELECT 41 + 1").await, "42");
    tokio::task::block_in_place(|| {
        let r = s.wait_status(id, "aborted");
        assert!(
            r["closed_note"]
                .as_str()
                .unwrap_or_default()
                .contains("cancel"),
            "{r}"
        );
        // An approval that comes too late must not run it.
        let out = s.cli("approvals", &["approve", &id.to_string()]);
        assert!(!out.status.success(), "an aborted request was approved");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("aborted"),
            "{out:?}"
        );
        assert_eq!(s.count(4), "1", "a cancelled statement ran");
        let records = s.approval_records(id);
        assert_eq!(actions(&records), ["requested", "aborted"], "{records:?}");
    });
    // Still nothing ran after the late approval attempt, from the session's view too.
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM accounts WHERE id = 4").await,
        "1"
    );
}

/// The cancel of a held statement is interceptor's alone: nothing of the session ran upstream,
/// so passed on to PostgreSQL it could only land on the client's next statement. A slow next
/// statement gives a late cancel every chance to hit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_of_a_held_statement_never_reaches_the_next_one() {
    let s = start_stack(Setup::held_writes(60));
    // PostgreSQL logs each cancel request it acts on at DEBUG2: the oracle for "never passed
    // on", whether or not a late one happened to hit the next statement.
    tokio::task::block_in_place(|| {
        s.pg.psql("ALTER SYSTEM SET log_min_messages = debug2")
            .unwrap();
        s.pg.psql("SELECT pg_reload_conf()").unwrap();
    });
    let mut c = alice_session(&s).await;
    let cancel = c.client.cancel_token();
    for round in 0..3 {
        let client = c.client;
        let held = simple_query_in_background(client, "DELETE FROM accounts WHERE id = 4");
        let id = c.notices.recv().await.map(|n| request_id_in(&n)).unwrap();
        cancel.cancel_query(NoTls).await.unwrap();
        let (res, client) = tokio::time::timeout(std::time::Duration::from_secs(10), held)
            .await
            .expect("the cancel must end the wait")
            .unwrap();
        let err = res.unwrap_err();
        assert_eq!(
            err.as_db_error().map(|d| d.code()),
            Some(&SqlState::QUERY_CANCELED),
            "round {round}: {err:?}"
        );
        let next = client.simple_query("SELECT pg_sleep(0.3), 42").await;
        assert!(
            next.is_ok(),
            "round {round}: the held statement's cancel reached the next statement: {next:?}"
        );
        tokio::task::block_in_place(|| s.wait_status(id, "aborted"));
        c.client = client;
    }
    let log = s.pg.server_log();
    assert!(
        !log.contains("processing cancel request"),
        "a held statement's cancel reached PostgreSQL:\n{}",
        log.lines()
            .filter(|l| l.contains("cancel"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The oracle works: a cancel of a statement that runs in PostgreSQL is passed on.
    let client = c.client;
    let cancel = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(5)").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel.cancel_query(NoTls).await.unwrap();
    let res = running.await.unwrap();
    assert_eq!(
        res.unwrap_err().as_db_error().map(|d| d.code()),
        Some(&SqlState::QUERY_CANCELED)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !s.pg.server_log().contains("processing cancel request") {
        assert!(
            std::time::Instant::now() < deadline,
            "PostgreSQL never logged the forwarded cancel"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A driver that cancels on a timer may send its CancelRequest before interceptor has started
/// to hold the statement (before the client saw the notice): the cancel must still end the
/// hold, not be lost while the statement waits for its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_before_the_hold_notice_still_ends_the_wait() {
    let s = start_stack(Setup::held_writes(120));
    let c = alice_session(&s).await;
    let cancel = c.client.cancel_token();
    let client = c.client;
    let held = simple_query_in_background(client, "DELETE FROM accounts WHERE id = 5");
    // No wait for the notice: the cancel races the hold.
    cancel.cancel_query(NoTls).await.unwrap();
    let (res, client) = tokio::time::timeout(std::time::Duration::from_secs(20), held)
        .await
        .expect("a cancel sent before the hold must end it (not the 120 s timeout)")
        .unwrap();
    let err = res.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::QUERY_CANCELED, "{db:?}");
    assert_eq!(scalar(&client, "SELECT 41 + 1").await, "42");
    tokio::task::block_in_place(|| assert_eq!(s.count(5), "1", "a cancelled statement ran"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_held_leaves_an_aborted_request() {
    let s = start_stack(Setup::held_writes(60));
    let mut c = alice_session(&s).await;
    let client = c.client;
    let held = tokio::spawn(async move {
        let _ = client
            .simple_query("DELETE FROM accounts WHERE id = 5")
            .await;
    });
    let id = c.notices.recv().await.map(|n| request_id_in(&n)).unwrap();
    // The client process dies: its socket closes without a Terminate.
    c.driver.abort();
    held.abort();
    tokio::task::block_in_place(|| {
        let r = s.wait_status(id, "aborted");
        assert!(
            r["closed_note"]
                .as_str()
                .unwrap_or_default()
                .contains("disconnected"),
            "{r}"
        );
        assert!(
            !s.cli("approvals", &["approve", &id.to_string()])
                .status
                .success()
        );
        assert_eq!(s.count(5), "1");
        let records = s.approval_records(id);
        assert_eq!(actions(&records), ["requested", "aborted"], "{records:?}");
        assert!(
            records[1]["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("disconnected"),
            "{records:?}"
        );
    });
}

/// Extended protocol (what drivers use): the statement is held at Execute, runs with its
/// parameters once approved, and the audit trail links requested → approved (by whom, why)
/// → executed → the statement's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_extended_statement_runs_and_its_trail_links_approval_and_outcome() {
    let s = start_stack(Setup::held_writes(60));
    let mut c = alice_session(&s).await;
    let client = c.client;
    let held = tokio::spawn(async move {
        let res = client
            .execute(
                "UPDATE accounts SET name = $1 WHERE id = $2",
                &[&"Renamed", &6i32],
            )
            .await;
        (res, client)
    });
    let id = c.notices.recv().await.map(|n| request_id_in(&n)).unwrap();
    tokio::task::block_in_place(|| {
        let r = s.request(id);
        assert_eq!(r["status"], "pending");
        assert_eq!(r["kind"], "statement");
        assert!(
            r["sql"].as_str().unwrap().starts_with("UPDATE accounts"),
            "{r}"
        );
        s.cli_ok(
            "approvals",
            &["approve", &id.to_string(), "--reason", "INC-7 balance fix"],
        );
    });
    let (res, client) = tokio::time::timeout(std::time::Duration::from_secs(20), held)
        .await
        .unwrap()
        .unwrap();
    let n = res.unwrap_or_else(|e| panic!("{e:?}; log:\n{}", s.proxy.logs()));
    assert_eq!(n, 1, "the approved UPDATE ran once");
    assert_eq!(scalar(&client, "SELECT 1").await, "1");

    tokio::task::block_in_place(|| {
        assert_eq!(
            s.pg.psql_db(APP_DB, "SELECT name FROM accounts WHERE id = 6")
                .unwrap()
                .trim(),
            "Renamed"
        );
        let export = s.audit_export();
        let key = id.to_string();
        let events: Vec<(u64, &Value)> = export
            .iter()
            .map(|r| (r["seq"].as_u64().unwrap(), &r["event"]))
            .collect();
        let mine: Vec<&Value> = events
            .iter()
            .filter(|(_, e)| {
                e["type"] == "approval" && e["approval_id"].as_str() == Some(key.as_str())
            })
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(
            actions(&mine.iter().map(|v| (*v).clone()).collect::<Vec<_>>()),
            ["requested", "voted", "granted", "executed"],
            "{mine:?}"
        );
        assert_eq!(mine[1]["by"], "dana");
        assert_eq!(mine[1]["reason"], "approve: INC-7 balance fix");
        assert_eq!(mine[2]["by"], "dana");
        // The executed step names the statement record; that record is the held statement
        // (its SQL, its parameters, the request) and its outcome says what it did.
        let statement = mine[3]["statement"]
            .as_u64()
            .expect("executed names its statement");
        let record = events
            .iter()
            .find(|(seq, _)| *seq == statement)
            .map(|(_, e)| *e)
            .unwrap();
        assert_eq!(record["type"], "statement");
        assert_eq!(record["approval"], id.to_string());
        assert_eq!(record["decision"], "approve");
        // tokio-postgres binds in binary: recorded as hex ("Renamed", int4 6).
        assert_eq!(
            record["parameters"],
            serde_json::json!(["\\x52656e616d6564", "\\x00000006"])
        );
        let outcome = events
            .iter()
            .map(|(_, e)| *e)
            .find(|e| e["type"] == "outcome" && e["statement"] == statement)
            .expect("an outcome for the approved statement");
        assert_eq!(outcome["command_tags"], serde_json::json!(["UPDATE 1"]));
        assert!(outcome["sqlstate"].is_null(), "{outcome}");
        s.verify_audit();
    });
}

/// Messages a client pipelined ahead of a held statement (one TCP write) are forwarded exactly
/// once: the hold sends them ahead, and the rest of the chunk must not send them again.
#[test]
fn statements_pipelined_before_a_held_one_run_exactly_once() {
    use interceptor_tests::raw::{RawClient, RawMessage};
    let s = ApprovalStack::start(Setup::held_writes(60));
    let params = s.proxy.params(ALICE);
    let client = std::thread::spawn(move || {
        let mut c = RawClient::login(&params).unwrap();
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query("SELECT 'first'", &mut buf).unwrap();
        postgres_protocol::message::frontend::query("DELETE FROM accounts WHERE id = 8", &mut buf)
            .unwrap();
        c.send(&buf).unwrap();
        let first = c.read_until_ready().unwrap().0;
        let second = c.read_until_ready().unwrap().0;
        // Whatever comes next must be the answer to this query, not a repeated one.
        let third = c.simple_query("SELECT 'marker'").unwrap().0;
        (first, second, third)
    });
    let id = s.wait_pending("statement");
    s.cli_ok("approvals", &["approve", &id.to_string()]);
    let (first, second, third) = client.join().unwrap();
    let text = |msgs: &[RawMessage]| -> String {
        msgs.iter()
            .filter(|m| m.tag == b'D' || m.tag == b'C')
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect::<Vec<_>>()
            .join("|")
    };
    assert!(text(&first).contains("first"), "{first:?}");
    assert!(text(&second).contains("DELETE 1"), "{second:?}");
    assert!(
        text(&third).contains("marker") && !text(&third).contains("first"),
        "an earlier statement was answered again: {third:?}"
    );
    assert_eq!(s.count(8), "0");
}

/// Approvers are notified through the webhook (without the SQL, which only the authenticated
/// API shows), and the notification is a step of the request's audit trail.
#[test]
fn approvers_are_notified_by_webhook_and_the_notification_is_audited() {
    let hook = WebhookSink::start();
    let s = ApprovalStack::start_with_webhook(Setup::held_writes(60), &hook.url());
    let params = s.proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 19"])
            .run()
    });
    let id = s.wait_pending("statement");
    let requested = hook.wait_for("requested", |v| v["event"] == "requested" && v["id"] == id);
    assert_eq!(requested["requester"], "alice");
    assert_eq!(requested["approver_groups"], serde_json::json!(["dba"]));
    assert!(
        !requested.to_string().contains("DELETE"),
        "the webhook must not carry SQL: {requested}"
    );
    // The "notified" record follows the request once the delivery is known.
    let notified = s.poll("a notified record", || {
        s.approval_records(id)
            .into_iter()
            .find(|r| r["action"] == "notified")
    });
    assert_eq!(notified["reason"], "webhook: delivered");
    s.cli_ok("approvals", &["approve", &id.to_string(), "--reason", "ok"]);
    hook.wait_for("approved", |v| v["event"] == "approved" && v["id"] == id);
    let out = held.join().unwrap().unwrap();
    assert!(out.success(), "{out:?}");
    let records = s.approval_records(id);
    assert_eq!(
        actions(&records),
        ["requested", "notified", "voted", "granted", "executed"],
        "{records:?}"
    );
}

/// Fast-path calls are held like the SQL they stand for: psql's `\lo_import` (lo_creat,
/// lo_open, lowrite, lo_close, each a FunctionCall by OID, all writes) waits at each call and
/// runs once approved; a session-scoped approval covers the repeated lowrite of the same text.
#[test]
fn fast_path_calls_are_held_and_run_once_approved() {
    let s = ApprovalStack::start(Setup::held_writes(60));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.txt");
    let content = "approved large object ".repeat(2000);
    std::fs::write(&file, &content).unwrap();
    let params = s.proxy.params(ALICE);
    let import = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-A", "-t", "-c"])
            .arg(format!("\\lo_import '{}'", file.display()))
            .timeout(Duration::from_secs(90))
            .run()
            .unwrap()
    });
    let mut approved: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !import.is_finished() {
        assert!(Instant::now() < deadline, "approved so far: {approved:?}");
        let list = s.cli_ok("approvals", &["list"]);
        let pending = list.as_array().and_then(|l| {
            l.iter()
                .find(|r| r["status"] == "pending" && r["kind"] == "statement")
                .cloned()
        });
        if let Some(r) = pending {
            let id = r["id"].as_u64().unwrap();
            approved.push(r["sql"].as_str().unwrap_or_default().to_owned());
            s.cli_ok(
                "approvals",
                &["approve", &id.to_string(), "--scope", "session"],
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = import.join().unwrap();
    assert!(out.success(), "{out:?}\n{}", s.proxy.logs());
    for f in ["lo_creat", "lo_open", "lowrite", "lo_close"] {
        assert!(
            approved
                .iter()
                .any(|sql| sql.starts_with(&format!("SELECT \"pg_catalog\".\"{f}\"("))),
            "{f} was not held: {approved:?}"
        );
    }
    let oid = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("lo_import "))
        .unwrap_or_else(|| panic!("{out:?}"))
        .trim()
        .to_owned();
    let stored =
        s.pg.psql_db(
            APP_DB,
            &format!("SELECT convert_from(lo_get({oid}), 'UTF8')"),
        )
        .unwrap();
    assert_eq!(stored.trim_end_matches('\n'), content);
}

/// A frontend message: tag, length, body.
fn frontend_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn parse_message(name: &str, sql: &str) -> Vec<u8> {
    let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
    frontend_message(b'P', &body)
}

/// Bind of `statement` into `portal`, no parameters, text results.
fn bind_message(portal: &str, statement: &str) -> Vec<u8> {
    let body = [
        portal.as_bytes(),
        b"\0",
        statement.as_bytes(),
        b"\0",
        &[0, 0, 0, 0, 0, 0],
    ]
    .concat();
    frontend_message(b'B', &body)
}

fn execute_message(portal: &str) -> Vec<u8> {
    frontend_message(b'E', &[portal.as_bytes(), b"\0\0\0\0\0"].concat())
}

/// PostgreSQL keeps a prepared statement when a second Parse of its name fails (42P05), and
/// keeps the unnamed statement when an error earlier in the batch skips a Parse of it. An
/// Execute then runs the statement it kept, so that statement is the one decided: the DELETE
/// is held for approval (and runs not at all when denied), whatever the failed Parse said.
#[test]
fn a_statement_postgresql_kept_after_a_failed_parse_is_still_held() {
    use interceptor_tests::raw::RawClient;
    let s = ApprovalStack::start(Setup::held_writes(60));
    for (name, id) in [("s1", 11), ("", 12)] {
        assert_eq!(s.count(id), "1");
        let params = s.proxy.params(ALICE);
        let client = std::thread::spawn(move || {
            let mut c = RawClient::login(&params).unwrap();
            let delete = format!("DELETE FROM accounts WHERE id = {id}");
            c.send(&[parse_message(name, &delete), frontend_message(b'S', b"")].concat())
                .unwrap();
            let prepared = c.read_until_ready().unwrap().0;
            // The named statement exists: its second Parse fails. The unnamed one's second
            // Parse comes after an error in its batch: PostgreSQL skips it.
            let mut again = Vec::new();
            if name.is_empty() {
                again.extend(execute_message("no_such_portal"));
            }
            again.extend(parse_message(name, "SELECT 1"));
            again.extend(frontend_message(b'S', b""));
            c.send(&again).unwrap();
            let failed = c.read_until_ready().unwrap().0;
            c.send(
                &[
                    bind_message("p", name),
                    execute_message("p"),
                    frontend_message(b'S', b""),
                ]
                .concat(),
            )
            .unwrap();
            let run = c.read_until_ready().unwrap().0;
            (prepared, failed, run)
        });
        let request = s.wait_pending("statement");
        assert_eq!(s.count(id), "1", "held: nothing ran yet");
        s.cli_ok(
            "approvals",
            &["deny", &request.to_string(), "--reason", "not this one"],
        );
        let (prepared, failed, run) = client.join().unwrap();
        assert_eq!(prepared.first().map(|m| m.tag), Some(b'1'), "{prepared:?}");
        let code = failed.iter().find_map(|m| m.sqlstate());
        let expected = if name.is_empty() { "34000" } else { "42P05" };
        assert_eq!(code.as_deref(), Some(expected), "{failed:?}");
        let refusal = run.iter().find(|m| m.tag == b'E').expect("refused");
        assert!(
            refusal
                .error_field(b'M')
                .is_some_and(|m| m.contains("not this one")),
            "{run:?}"
        );
        assert_eq!(s.count(id), "1", "the denied DELETE ran");
    }
}
