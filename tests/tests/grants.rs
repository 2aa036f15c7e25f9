//! Time-bound grants through the real daemon: `interceptor access request` by the identity
//! itself, approved by a grant approver over the admin API, lifts a live session to another
//! policy at its next statement; at expiry (or revocation) the same session is back under its
//! normal policy. Every step is in the audit trail.

mod approval_support;

use approval_support::{ApprovalStack, Auth, Setup, alice_session, token};
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

/// The CLI user is alice herself (group `agents`, whose policy refuses writes).
fn alice_cli() -> Setup {
    Setup {
        write_approval: None,
        local_subject: "alice",
        local_groups: &[],
    }
}

async fn update(client: &tokio_postgres::Client, id: i32) -> Result<u64, tokio_postgres::Error> {
    client
        .execute("UPDATE accounts SET name = 'granted' WHERE id = $1", &[&id])
        .await
}

fn assert_refused(res: Result<u64, tokio_postgres::Error>) {
    let err = res.expect_err("the write must be refused without a grant");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{db:?}");
}

/// `access request` as alice, approved over HTTPS by `sam` (group security); the grant's id.
fn grant(s: &ApprovalStack, duration: &str, reason: &str) -> (u64, u64) {
    let req = s.cli_ok(
        "access",
        &[
            "request", "--role", "writers", "--for", duration, "--reason", reason,
        ],
    );
    assert_eq!(req["status"], "pending", "{req}");
    assert_eq!(req["kind"], "grant");
    let id = req["id"].as_u64().unwrap();
    // Nobody approves their own grant (alice is not a grant approver either).
    assert!(
        !s.cli("approvals", &["approve", &id.to_string()])
            .status
            .success()
    );
    let sam = token("sam", &["security"]);
    let (status, body) = s.api(
        "POST",
        &format!("/approvals/{id}/approve"),
        Auth::Bearer(&sam),
        Some(json!({"reason": "on call"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved");
    (
        id,
        body["grant_id"]
            .as_u64()
            .expect("an approved grant request names its grant"),
    )
}

fn grant_in(list: &Value, id: u64) -> Option<&Value> {
    list.as_array()?.iter().find(|g| g["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_lifts_a_live_session_until_it_expires_or_is_revoked() {
    let s = tokio::task::block_in_place(|| ApprovalStack::start(alice_cli()));
    let c = alice_session(&s).await;
    assert_refused(update(&c.client, 12).await);

    // Granted for a few seconds: the same session writes at once.
    let (request, gid) = tokio::task::block_in_place(|| grant(&s, "5s", "INC-9 hotfix"));
    assert_eq!(update(&c.client, 12).await.unwrap(), 1);

    // Wait until the daemon reports the grant expired, then the session is refused again.
    tokio::task::block_in_place(|| {
        s.poll("the grant to expire", || {
            let all = s.cli_ok("access", &["list", "--all"]);
            grant_in(&all, gid)
                .filter(|g| g["expired_reported"] == true)
                .map(|_| ())
        });
        assert!(grant_in(&s.cli_ok("access", &["list"]), gid).is_none());
    });
    assert_refused(update(&c.client, 13).await);
    assert_eq!(
        tokio::task::block_in_place(|| s.pg.psql_db(
            interceptor_tests::pg::APP_DB,
            "SELECT count(*) FROM accounts WHERE name = 'granted'"
        ))
        .unwrap()
        .trim(),
        "1"
    );

    // A long grant, revoked by its holder: the next statement is refused.
    let (_, long) = tokio::task::block_in_place(|| grant(&s, "10m", "INC-10 cleanup"));
    assert_eq!(update(&c.client, 14).await.unwrap(), 1);
    // A statement prepared under the grant (Parse allowed then) ...
    let prepared = c
        .client
        .prepare("UPDATE accounts SET name = 'granted' WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(c.client.execute(&prepared, &[&17i32]).await.unwrap(), 1);
    tokio::task::block_in_place(|| {
        let g = s.cli_ok(
            "access",
            &["revoke", &long.to_string(), "--reason", "done early"],
        );
        assert_eq!(g["revoked_by"], "alice", "{g}");
    });
    assert_refused(update(&c.client, 15).await);
    // ... is decided again at every Execute: the revoked grant no longer lets it run.
    assert_refused(c.client.execute(&prepared, &[&18i32]).await);

    tokio::task::block_in_place(|| {
        // Request, vote, approval and activation (with its end) under the request id …
        let records = s.approval_records(request);
        let actions: Vec<&str> = records
            .iter()
            .map(|r| r["action"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            actions,
            ["requested", "voted", "granted", "granted"],
            "{records:?}"
        );
        assert_eq!(records[0]["by"], "alice");
        assert_eq!(records[1]["by"], "sam");
        assert!(!records[3]["grant_until"].is_null(), "{records:?}");
        // … and the expiry and the revocation under the grant ids.
        let expired = s.approval_records(gid);
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert_eq!(expired[0]["action"], "expired");
        let revoked = s.approval_records(long);
        assert_eq!(revoked.len(), 1, "{revoked:?}");
        assert_eq!(revoked[0]["action"], "revoked");
        assert_eq!(revoked[0]["by"], "alice");
        assert_eq!(revoked[0]["reason"], "done early");
        s.verify_audit();
    });
}
