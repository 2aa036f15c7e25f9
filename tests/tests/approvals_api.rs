//! Who may decide, through the daemon's HTTPS admin API and the CLI: unauthenticated and forged
//! callers get 401, callers outside the approver groups 403 (and cannot even see the request),
//! nobody approves their own request, a two-approver rule needs two distinct approvers, and a
//! client certificate (mTLS) is an approver identity too.

mod approval_support;

use std::time::Duration;

use approval_support::{
    ApprovalStack, Auth, Setup, alice_session, forged_token, request_id_in,
    simple_query_in_background, token,
};
use interceptor_tests::{ALICE, PgCommand};
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

fn actions(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn only_distinct_approvers_in_the_group_release_a_two_approver_statement() {
    let s = ApprovalStack::start(Setup {
        write_approval: Some((60, 2)),
        local_subject: "dana",
        local_groups: &["dba"],
    });
    let params = s.proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 9"])
            .run()
    });
    let id = s.wait_pending("statement");
    let approve = format!("/approvals/{id}/approve");
    let reason = Some(json!({"reason": "checked"}));

    // No proof at all, or a token the issuer never signed: 401, and the token is not echoed.
    let (status, _) = s.api("GET", "/approvals", Auth::None, None);
    assert_eq!(status, 401);
    let (status, _) = s.api("POST", &approve, Auth::None, reason.clone());
    assert_eq!(status, 401);
    let forged = forged_token("erin", &["dba"]);
    let (status, body) = s.api("POST", &approve, Auth::Bearer(&forged), reason.clone());
    assert_eq!(status, 401, "{body}");
    assert!(!body.to_string().contains(&forged));

    // Authenticated but not an approver: 403 to decide, and the request (its SQL) stays hidden.
    let mallory = token("mallory", &["agents"]);
    let (status, body) = s.api("POST", &approve, Auth::Bearer(&mallory), reason.clone());
    assert_eq!(status, 403, "{body}");
    let (status, _) = s.api(
        "GET",
        &format!("/approvals/{id}"),
        Auth::Bearer(&mallory),
        None,
    );
    assert_eq!(status, 404);
    let (status, body) = s.api("GET", "/approvals", Auth::Bearer(&mallory), None);
    assert_eq!((status, body), (200, json!([])));
    let (status, body) = s.api(
        "POST",
        &approve,
        Auth::Cert(&s.cert_outsider),
        reason.clone(),
    );
    assert_eq!(status, 403, "{body}");

    // The requester, even in the approver group, cannot approve their own statement.
    let alice = token("alice", &["dba"]);
    let (status, body) = s.api("POST", &approve, Auth::Bearer(&alice), reason.clone());
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("own request"),
        "{body}"
    );

    // First approval (CLI, dana): still pending, still not run.
    let r = s.cli_ok(
        "approvals",
        &["approve", &id.to_string(), "--reason", "looks right"],
    );
    assert_eq!(r["status"], "pending", "{r}");
    assert_eq!(r["votes"].as_array().unwrap().len(), 1);
    assert_eq!(s.count(9), "1");
    assert!(!held.is_finished());
    // The same approver again does not count twice.
    let out = s.cli("approvals", &["approve", &id.to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already decided"),
        "{out:?}"
    );
    assert_eq!(s.request(id)["status"], "pending");

    // A second, different approver (OIDC token over HTTPS) releases it.
    let erin = token("erin", &["dba"]);
    let (status, body) = s.api("POST", &approve, Auth::Bearer(&erin), reason.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved");
    let out = held.join().unwrap().unwrap();
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("DELETE 1"), "{out:?}");
    assert_eq!(s.count(9), "0");

    let records = s.approval_records(id);
    assert_eq!(
        actions(&records),
        ["requested", "voted", "voted", "granted", "executed"],
        "{records:?}"
    );
    assert_eq!(records[1]["by"], "dana");
    assert_eq!(records[1]["reason"], "approve: looks right");
    assert_eq!(records[2]["by"], "erin");
    assert_eq!(records[3]["by"], "dana, erin");
    s.verify_audit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_approver_denies_with_a_reason_the_client_sees() {
    let s = tokio::task::block_in_place(|| ApprovalStack::start(Setup::held_writes(60)));
    let mut c = alice_session(&s).await;
    let client = c.client;
    let held = simple_query_in_background(client, "DELETE FROM accounts WHERE id = 10");
    let id = c.notices.recv().await.map(|n| request_id_in(&n)).unwrap();
    tokio::task::block_in_place(|| {
        // A denial needs a reason.
        let deny = format!("/approvals/{id}/deny");
        let (status, _) = s.api("POST", &deny, Auth::Cert(&s.cert_approver), Some(json!({})));
        assert_eq!(status, 400);
        let (status, body) = s.api(
            "POST",
            &deny,
            Auth::Cert(&s.cert_approver),
            Some(json!({"reason": "not during the freeze"})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "denied");
    });
    let (res, client) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .unwrap()
        .unwrap();
    let err = res.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(db.message().contains("not during the freeze"), "{db:?}");
    assert!(db.message().contains("denied by dana-cert"), "{db:?}");
    // The session stays usable.
    let rows = client
        .simple_query("SELECT count(*) FROM accounts WHERE id = 10")
        .await
        .unwrap();
    let count = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("1"), "a denied statement ran");
    tokio::task::block_in_place(|| {
        let records = s.approval_records(id);
        assert_eq!(
            actions(&records),
            ["requested", "voted", "denied"],
            "{records:?}"
        );
        assert_eq!(records[2]["by"], "dana-cert");
        assert_eq!(records[2]["reason"], "not during the freeze");
    });
}

#[test]
fn the_requester_cannot_approve_their_own_statement_from_the_cli() {
    // The host user running the CLI is mapped to alice, who is also in the dba group.
    let s = ApprovalStack::start(Setup {
        write_approval: Some((60, 1)),
        local_subject: "alice",
        local_groups: &["dba"],
    });
    let params = s.proxy.params(ALICE);
    let held = std::thread::spawn(move || {
        PgCommand::psql(&params)
            .args(["-c", "DELETE FROM accounts WHERE id = 11"])
            .run()
    });
    let id = s.wait_pending("statement");
    let out = s.cli("approvals", &["approve", &id.to_string()]);
    assert!(!out.status.success(), "self-approval was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("own request"),
        "{out:?}"
    );
    assert_eq!(s.request(id)["status"], "pending");
    assert_eq!(s.count(11), "1");
    // Someone else closes it.
    let erin = token("erin", &["dba"]);
    let (status, body) = s.api(
        "POST",
        &format!("/approvals/{id}/deny"),
        Auth::Bearer(&erin),
        Some(json!({"reason": "ask a colleague"})),
    );
    assert_eq!(status, 200, "{body}");
    let out = held.join().unwrap().unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("ask a colleague"), "{out:?}");
    assert_eq!(s.count(11), "1");
}
