//! Durability across a gateway restart: a held statement whose session died with the process
//! is closed as aborted (with the reason) and can no longer be approved; a pending grant
//! request and an approved grant survive and keep working.

mod approval_support;

use approval_support::{ApprovalStack, Auth, Setup, token};
use interceptor_tests::{ALICE, PgCommand};
use serde_json::json;

#[test]
fn a_statement_held_when_the_gateway_dies_is_aborted_after_restart_and_never_runs() {
    let mut s = ApprovalStack::start(Setup::held_writes(60));
    let params = s.proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 16"])
            .run()
    });
    let id = s.wait_pending("statement");
    s.proxy.kill9();
    let out = held.join().unwrap().unwrap();
    assert!(!out.success(), "{out:?}");
    s.restart();

    let r = s.request(id);
    assert_eq!(r["status"], "aborted", "{r}");
    assert!(
        r["closed_note"]
            .as_str()
            .unwrap_or_default()
            .contains("gateway restarted"),
        "{r}"
    );
    // Neither the CLI nor the API can release it now.
    assert!(
        !s.cli("approvals", &["approve", &id.to_string()])
            .status
            .success()
    );
    let erin = token("erin", &["dba"]);
    let (status, body) = s.api(
        "POST",
        &format!("/approvals/{id}/approve"),
        Auth::Bearer(&erin),
        None,
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(s.count(16), "1", "a statement held by a dead gateway ran");

    let records = s.approval_records(id);
    let actions: Vec<&str> = records
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(actions, ["requested", "aborted"], "{records:?}");
    assert_eq!(records[1]["reason"], "gateway restarted");
    s.verify_audit();
}

#[test]
fn a_pending_grant_request_and_an_approved_grant_survive_restarts() {
    let mut s = ApprovalStack::start(Setup {
        write_approval: None,
        local_subject: "alice",
        local_groups: &[],
    });
    let write = |s: &ApprovalStack, id: i32| {
        PgCommand::psql(&s.proxy.params(ALICE))
            .args([
                "-c",
                &format!("UPDATE accounts SET name = 'after restart' WHERE id = {id}"),
            ])
            .run()
            .unwrap()
    };
    assert!(!write(&s, 17).success(), "writes need a grant");
    let req = s.cli_ok(
        "access",
        &[
            "request", "--role", "writers", "--for", "30m", "--reason", "INC-11",
        ],
    );
    let id = req["id"].as_u64().unwrap();

    s.restart();
    let r = s.request(id);
    assert_eq!(r["status"], "pending", "{r}");
    assert_eq!(r["kind"], "grant");
    assert_eq!(r["reason"], "INC-11");
    let sam = token("sam", &["security"]);
    let (status, body) = s.api(
        "POST",
        &format!("/approvals/{id}/approve"),
        Auth::Bearer(&sam),
        Some(json!({"reason": "approved after the restart"})),
    );
    assert_eq!(status, 200, "{body}");
    let gid = body["grant_id"].as_u64().unwrap();
    let out = write(&s, 17);
    assert!(out.success(), "{out:?}");

    // The approved grant is still in force after another restart.
    s.restart();
    let active = s.cli_ok("access", &["list"]);
    assert!(
        active.as_array().unwrap().iter().any(|g| g["id"] == gid),
        "{active}"
    );
    let out = write(&s, 18);
    assert!(out.success(), "{out:?}");
    assert_eq!(
        s.pg.psql_db(
            interceptor_tests::pg::APP_DB,
            "SELECT count(*) FROM accounts WHERE name = 'after restart'"
        )
        .unwrap()
        .trim(),
        "2"
    );
}
