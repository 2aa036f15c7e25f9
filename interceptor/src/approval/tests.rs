//! Approvals with a real sled store in a temp dir, real HTTP over loopback and the unix
//! socket, real signed JWTs (RSA test key of identity/oidc) and a real webhook receiver.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::grant::GrantRequest;
use super::model::Scope;
use super::*;
use crate::identity::oidc::{OidcConfig, OidcVerifier};
use crate::identity::{Identity, Proof};

fn ident(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        subject: subject.into(),
        display_name: subject.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        proof: Proof::ScramSha256,
        process: None,
    }
}

type Events = Arc<Mutex<Vec<ApprovalEvent>>>;

struct Fixture {
    dir: tempfile::TempDir,
    service: ApprovalService,
    events: Events,
}

fn sink(events: &Events) -> EventSink {
    let events = events.clone();
    Arc::new(move |e| events.lock().unwrap().push(e))
}

fn config(dir: &Path) -> ApprovalConfig {
    let mut cfg = ApprovalConfig::new(dir.join("approvals"));
    cfg.grant_approvers = vec!["security".into()];
    cfg
}

fn fixture_with(edit: impl FnOnce(&mut ApprovalConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    edit(&mut cfg);
    let events = Events::default();
    let service = ApprovalService::open(cfg, sink(&events)).unwrap();
    Fixture {
        dir,
        service,
        events,
    }
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

impl Fixture {
    fn names(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

fn statement(requester: &str, session: u64, sql: &str, required: u32, timeout: u64) -> NewRequest {
    NewRequest {
        identity: ident(requester, &["dba", "agents"]),
        session_id: session,
        database: "app".into(),
        sql: sql.into(),
        rule: "writes-need-approval".into(),
        risks: vec!["delete_without_where".into()],
        policy: Some("agents".into()),
        approver_groups: vec!["dba".into()],
        approvals_required: required,
        timeout_secs: timeout,
    }
}

const SQL: &str = "DELETE FROM orders";

#[tokio::test]
async fn approved_statement_runs_and_every_step_is_reported() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let notice = held.notice().unwrap();
    assert!(
        notice.message.contains(&format!("request {id}")),
        "{}",
        notice.message
    );
    assert!(notice.message.contains("60 s"));
    // Durable before hold returned: a second reader of the store sees it pending.
    assert_eq!(f.service.show(id, None).unwrap().status, Status::Pending);

    // The gate runs the statement as soon as wait returns; "executed" must follow "approved".
    let service = f.service.clone();
    let waiter = tokio::spawn(async move {
        let resolution = held.wait().await;
        service.executed(id, 1, None);
        resolution
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    let r = f
        .service
        .decide(
            id,
            &ident("alice", &["dba"]),
            true,
            Some("looks fine".into()),
            Scope::Once,
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::Approved);
    let resolution = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resolution,
        Resolution::Approved {
            by: vec!["alice".into()],
            scope: Scope::Once
        }
    );
    assert!(resolution.refusal(id).is_none());
    assert_eq!(f.names(), ["requested", "voted", "approved", "executed"]);
    // The stored request keeps the full SQL, the requester and the rule.
    let stored = f.service.show(id, None).unwrap();
    assert!(matches!(&stored.kind, RequestKind::Statement { sql, .. } if sql == SQL));
    assert_eq!(stored.identity.subject, "agent-7");
    // Closed requests take no more votes.
    let again = f
        .service
        .decide(
            id,
            &ident("bob", &["dba"]),
            false,
            Some("late".into()),
            Scope::Once,
        )
        .await;
    assert!(matches!(
        again,
        Err(ApprovalError::Closed {
            status: Status::Approved,
            ..
        })
    ));
}

#[tokio::test]
async fn denied_with_reason_refuses_with_42501() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let bob = ident("bob", &["dba"]);
    let no_reason = f
        .service
        .decide(id, &bob, false, Some("  ".into()), Scope::Once)
        .await;
    assert!(matches!(no_reason, Err(ApprovalError::BadRequest(_))));
    f.service
        .decide(
            id,
            &bob,
            false,
            Some("no deletes during business hours".into()),
            Scope::Once,
        )
        .await
        .unwrap();
    let resolution = waiter.await.unwrap();
    let err = resolution.refusal(id).unwrap();
    assert_eq!(err.code, "42501");
    assert!(
        err.message
            .contains("denied by bob: no deletes during business hours")
    );
    assert!(f.names().contains(&"denied".to_owned()));
}

#[tokio::test]
async fn unanswered_request_times_out() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 1))
        .await
        .unwrap();
    let id = held.id();
    let started = std::time::Instant::now();
    let resolution = held.wait().await;
    assert_eq!(resolution, Resolution::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        resolution
            .refusal(id)
            .unwrap()
            .message
            .contains("timed out")
    );
    assert_eq!(f.service.show(id, None).unwrap().status, Status::TimedOut);
    let late = f
        .service
        .decide(id, &ident("alice", &["dba"]), true, None, Scope::Once)
        .await;
    assert!(matches!(
        late,
        Err(ApprovalError::Closed {
            status: Status::TimedOut,
            ..
        })
    ));
}

#[tokio::test]
async fn dropping_the_wait_aborts_the_request() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    // The client cancels: the gate drops the wait future.
    let r = tokio::time::timeout(Duration::from_millis(100), held.wait()).await;
    assert!(r.is_err());
    assert_eq!(f.service.show(id, None).unwrap().status, Status::Aborted);
    assert_eq!(f.names(), ["requested", "aborted"]);
    let late = f
        .service
        .decide(id, &ident("alice", &["dba"]), true, None, Scope::Once)
        .await;
    assert!(matches!(
        late,
        Err(ApprovalError::Closed {
            status: Status::Aborted,
            ..
        })
    ));
}

#[tokio::test]
async fn self_approval_and_non_approvers_are_refused() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("alice", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    // alice is in "dba" herself.
    let own = f
        .service
        .decide(id, &ident("alice", &["dba"]), true, None, Scope::Once)
        .await;
    assert!(matches!(own, Err(ApprovalError::Forbidden(m)) if m.contains("own request")));
    let outsider = f
        .service
        .decide(
            id,
            &ident("mallory", &["developers"]),
            true,
            None,
            Scope::Once,
        )
        .await;
    assert!(matches!(outsider, Err(ApprovalError::Forbidden(m)) if m.contains("approver group")));
    // Non-approvers cannot even see it.
    assert!(
        f.service
            .list(Some(&ident("mallory", &["developers"])), true)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        f.service.show(id, Some(&ident("mallory", &[]))),
        Err(ApprovalError::NotFound(_))
    ));
    assert_eq!(f.service.show(id, None).unwrap().status, Status::Pending);
    assert!(f.service.show(id, None).unwrap().votes.is_empty());
    drop(held);
}

#[tokio::test]
async fn two_distinct_approvers_are_needed() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 2, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let alice = ident("alice", &["dba"]);
    let r = f
        .service
        .decide(id, &alice, true, None, Scope::Once)
        .await
        .unwrap();
    assert_eq!(r.status, Status::Pending);
    let twice = f.service.decide(id, &alice, true, None, Scope::Once).await;
    assert!(matches!(twice, Err(ApprovalError::Forbidden(m)) if m.contains("already")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    f.service
        .decide(id, &ident("bob", &["dba"]), true, None, Scope::Once)
        .await
        .unwrap();
    assert_eq!(
        waiter.await.unwrap(),
        Resolution::Approved {
            by: vec!["alice".into(), "bob".into()],
            scope: Scope::Once
        }
    );
}

#[tokio::test]
async fn session_scope_covers_the_same_text_in_the_same_session_only() {
    let f = fixture();
    let held = f
        .service
        .hold(statement("agent-7", 7, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    f.service
        .decide(id, &ident("alice", &["dba"]), true, None, Scope::Session)
        .await
        .unwrap();
    assert!(matches!(
        waiter.await.unwrap(),
        Resolution::Approved {
            scope: Scope::Session,
            ..
        }
    ));

    let again = f
        .service
        .hold(statement("agent-7", 7, SQL, 1, 60))
        .await
        .unwrap();
    assert!(again.notice().is_none());
    assert_eq!(
        again.wait().await,
        Resolution::Approved {
            by: vec!["alice".into()],
            scope: Scope::Session
        }
    );
    // Another text, another session, or the same session after it ended: held again.
    for (session, sql) in [(7, "DELETE FROM orders "), (8, SQL)] {
        let other = f
            .service
            .hold(statement("agent-7", session, sql, 1, 1))
            .await
            .unwrap();
        assert!(other.notice().is_some());
        assert_eq!(other.wait().await, Resolution::TimedOut);
    }
    f.service.end_session(7);
    let after = f
        .service
        .hold(statement("agent-7", 7, SQL, 1, 1))
        .await
        .unwrap();
    assert_eq!(after.wait().await, Resolution::TimedOut);
}

#[tokio::test]
async fn grants_elevate_until_they_expire_or_are_revoked() {
    let f = fixture();
    let bob = ident("bob", &["developers"]);
    let ask = |duration: &str| GrantRequest {
        groups: vec!["writers".into()],
        policy: None,
        duration: duration.into(),
        reason: "INC-42 data fix".into(),
    };
    assert!(matches!(
        f.service.request_grant(&bob, ask("9h")).await,
        Err(ApprovalError::BadRequest(_))
    ));
    let req = f.service.request_grant(&bob, ask("1s")).await.unwrap();
    assert!(f.service.active_grants_for(&bob).is_empty());
    // Only grant approvers decide, and not on their own grant.
    let dba = ident("alice", &["dba"]);
    assert!(matches!(
        f.service
            .decide(req.id, &dba, true, None, Scope::Once)
            .await,
        Err(ApprovalError::Forbidden(_))
    ));
    let sec = ident("sam", &["security"]);
    let r = f
        .service
        .decide(req.id, &sec, true, None, Scope::Once)
        .await
        .unwrap();
    let grant_id = r.grant_id.unwrap();
    let grants = f.service.active_grants_for(&bob);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].approved_by, vec!["sam"]);
    assert!(f.service.elevated(&bob).in_group("writers"));
    assert!(!f.service.elevated(&ident("eve", &[])).in_group("writers"));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(f.service.active_grants_for(&bob).is_empty());
    assert!(!f.service.elevated(&bob).in_group("writers"));
    f.service.sweep().await.unwrap();
    f.service.sweep().await.unwrap();
    let expired = f.names().iter().filter(|n| *n == "grant_expired").count();
    assert_eq!(expired, 1, "expiry is reported once: {:?}", f.names());
    assert!(
        f.service
            .grants(Some(&bob), true)
            .unwrap()
            .iter()
            .any(|g| g.id == grant_id)
    );

    // Revoke ends a grant before its time.
    let req = f.service.request_grant(&bob, ask("1h")).await.unwrap();
    let r = f
        .service
        .decide(req.id, &sec, true, None, Scope::Once)
        .await
        .unwrap();
    assert!(f.service.elevated(&bob).in_group("writers"));
    let eve = ident("eve", &["developers"]);
    assert!(matches!(
        f.service.revoke(r.grant_id.unwrap(), &eve, None).await,
        Err(ApprovalError::NotFound(_))
    ));
    f.service
        .revoke(r.grant_id.unwrap(), &sec, Some("done".into()))
        .await
        .unwrap();
    assert!(!f.service.elevated(&bob).in_group("writers"));
}

#[tokio::test]
async fn restart_keeps_grant_requests_and_aborts_orphaned_statements() {
    let dir = tempfile::tempdir().unwrap();
    let bob = ident("bob", &["developers"]);
    let (grant_req, statement_id) = {
        let events = Events::default();
        let service = ApprovalService::open(config(dir.path()), sink(&events)).unwrap();
        let grant_req = service
            .request_grant(
                &bob,
                GrantRequest {
                    groups: vec!["writers".into()],
                    policy: None,
                    duration: "30m".into(),
                    reason: "migration".into(),
                },
            )
            .await
            .unwrap();
        // Simulates a crash while a statement waits: its pending record is on disk and no
        // process is left to close it.
        let store = &service.inner_store_for_tests();
        let mut r = service.show(grant_req.id, None).unwrap();
        r.id = 1_000_000;
        r.kind = RequestKind::Statement {
            session_id: 3,
            database: "app".into(),
            sql: SQL.into(),
            fingerprint: model::fingerprint(SQL),
            risks: vec![],
            policy: None,
        };
        store.put_request(&r).unwrap();
        store.flush().await.unwrap();
        (grant_req, r.id)
    };
    let events = Events::default();
    let service = ApprovalService::open(config(dir.path()), sink(&events)).unwrap();
    assert_eq!(
        service.show(statement_id, None).unwrap().status,
        Status::Aborted
    );
    assert!(matches!(
        &events.lock().unwrap()[..],
        [ApprovalEvent::Aborted { id, .. }] if *id == statement_id
    ));
    let pending = service.list(None, false).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, grant_req.id);
    service
        .decide(
            grant_req.id,
            &ident("sam", &["security"]),
            true,
            None,
            Scope::Once,
        )
        .await
        .unwrap();
    assert!(service.elevated(&bob).in_group("writers"));
    // Fresh ids never collide with stored ones.
    let next = service
        .request_grant(
            &bob,
            GrantRequest {
                groups: vec!["x".into()],
                policy: None,
                duration: "1m".into(),
                reason: "r".into(),
            },
        )
        .await
        .unwrap();
    assert!(next.id > grant_req.id);
}

// ---- HTTP admin API over TCP, with real JWTs ----

const ISSUER: &str = "https://idp.example.com/realms/corp";

fn rsa_key() -> RsaPrivateKey {
    RsaPrivateKey::from_pkcs8_pem(include_str!("../identity/oidc/testdata/rsa-test-1.pem")).unwrap()
}

struct Idp {
    key: EncodingKey,
    verifier: Arc<OidcVerifier>,
}

fn idp(dir: &Path) -> Idp {
    let private = rsa_key();
    let jwk = json!({"keys": [{
        "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
    }]});
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwk.to_string()).unwrap();
    let cfg: OidcConfig = toml::from_str(&format!(
        "issuer = \"{ISSUER}\"\naudience = \"interceptor-admin\"\njwks_file = \"{}\"",
        path.display()
    ))
    .unwrap();
    Idp {
        key: EncodingKey::from_rsa_der(private.to_pkcs1_der().unwrap().as_bytes()),
        verifier: Arc::new(OidcVerifier::new(&cfg).unwrap()),
    }
}

impl Idp {
    fn token(&self, sub: &str, groups: &[&str]) -> String {
        let now = now_ms() as i64 / 1000;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        let claims = json!({"iss": ISSUER, "aud": "interceptor-admin", "sub": sub,
            "exp": now + 300, "iat": now, "groups": groups});
        encode(&header, &claims, &self.key).unwrap()
    }
}

async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn http_api_authenticates_and_enforces_groups() {
    let f = fixture();
    let idp = idp(f.dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = Arc::new(api::AdminApi::new(
        f.service.clone(),
        api::AdminAuth {
            oidc: Some(idp.verifier.clone()),
            ..Default::default()
        },
    ));
    let server = tokio::spawn(api.serve_tcp(listener));

    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let path = format!("/approvals/{id}/approve");

    // No token, a forged token, a token signed by another key: 401.
    let (status, _) = http(addr, "GET", "/approvals", None, json!(null)).await;
    assert_eq!(status, 401);
    let (status, body) = http(addr, "POST", &path, Some("not.a.jwt"), json!({})).await;
    assert_eq!(status, 401, "{body}");
    let other =
        RsaPrivateKey::from_pkcs8_pem(include_str!("../identity/oidc/testdata/rsa-test-2.pem"))
            .unwrap();
    let forged = encode(
        &{
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("k1".into());
            h
        },
        &json!({"iss": ISSUER, "aud": "interceptor-admin", "sub": "alice", "exp": now_ms() / 1000 + 300, "groups": ["dba"]}),
        &EncodingKey::from_rsa_der(other.to_pkcs1_der().unwrap().as_bytes()),
    )
    .unwrap();
    let (status, body) = http(addr, "POST", &path, Some(&forged), json!({})).await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains(&forged));

    // Wrong group, and the requester itself: 403.
    let dev = idp.token("mallory", &["developers"]);
    let (status, _) = http(addr, "POST", &path, Some(&dev), json!({})).await;
    assert_eq!(status, 403);
    let (status, body) = http(addr, "GET", "/approvals", Some(&dev), json!(null)).await;
    assert_eq!((status, body), (200, json!([])));
    let own = idp.token("agent-7", &["dba"]);
    let (status, _) = http(addr, "POST", &path, Some(&own), json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(f.service.show(id, None).unwrap().status, Status::Pending);

    // An approver sees it with its SQL and approves it.
    let alice = idp.token("alice", &["dba"]);
    let (status, body) = http(addr, "GET", "/approvals", Some(&alice), json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["id"], id);
    assert_eq!(body[0]["sql"], SQL);
    let (status, body) = http(
        addr,
        "GET",
        &format!("/approvals/{id}"),
        Some(&alice),
        json!(null),
    )
    .await;
    assert_eq!(
        (status, body["rule"].clone()),
        (200, json!("writes-need-approval"))
    );
    let (status, body) = http(
        addr,
        "POST",
        &path,
        Some(&alice),
        json!({"reason": "ok", "scope": "once"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved");
    assert!(matches!(waiter.await.unwrap(), Resolution::Approved { .. }));
    let (status, _) = http(addr, "POST", &path, Some(&alice), json!({})).await;
    assert_eq!(status, 409);
    let (status, _) = http(addr, "GET", "/nothing", Some(&alice), json!(null)).await;
    assert_eq!(status, 404);

    // Grants over HTTP: request, approve, list, revoke.
    let bob = idp.token("bob", &["developers"]);
    let (status, body) = http(
        addr,
        "POST",
        "/grants",
        Some(&bob),
        json!({"groups": ["writers"], "duration": "30m", "reason": "INC-7"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let req_id = body["id"].as_u64().unwrap();
    let sec = idp.token("sam", &["security"]);
    let (status, body) = http(
        addr,
        "POST",
        &format!("/approvals/{req_id}/approve"),
        Some(&sec),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let grant_id = body["grant_id"].as_u64().unwrap();
    let (status, body) = http(addr, "GET", "/grants", Some(&bob), json!(null)).await;
    assert_eq!(
        (status, body[0]["groups"].clone()),
        (200, json!(["writers"]))
    );
    let (status, _) = http(
        addr,
        "DELETE",
        &format!("/grants/{grant_id}"),
        Some(&dev),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(
        addr,
        "DELETE",
        &format!("/grants/{grant_id}"),
        Some(&bob),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!f.service.elevated(&ident("bob", &[])).in_group("writers"));
    server.abort();
}

// ---- unix socket + CLI ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_over_unix_socket_identifies_callers_by_uid() {
    use std::os::unix::fs::PermissionsExt;
    let uid = unsafe { libc::geteuid() };
    let f = fixture_with(|c| {
        c.local_approvers.insert(
            uid.to_string(),
            LocalApprover {
                subject: "ops-oncall".into(),
                display_name: None,
                groups: vec!["dba".into()],
            },
        );
    });
    let socket = f.dir.path().join("approvals.sock");
    let listener = api::bind_unix(&socket).unwrap();
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let server = tokio::spawn(
        Arc::new(api::AdminApi::new(
            f.service.clone(),
            api::AdminAuth::default(),
        ))
        .serve_unix(listener),
    );

    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let s = socket.clone();
    let listed = tokio::task::spawn_blocking(move || cli::call(&s, "GET", "/approvals", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed[0]["id"], id);
    let s = socket.clone();
    tokio::task::spawn_blocking(move || {
        cli::run_approvals(
            cli::ApprovalsCommand::Deny {
                id,
                reason: "not now".into(),
            },
            &s,
            false,
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        waiter.await.unwrap(),
        Resolution::Denied {
            by: "ops-oncall".into(),
            reason: "not now".into()
        }
    );
    let vote = &f.service.show(id, None).unwrap().votes[0];
    assert_eq!(vote.by, "ops-oncall");
    server.abort();

    // A uid that is not mapped is not an approver.
    let g = fixture();
    let socket = g.dir.path().join("approvals.sock");
    let listener = api::bind_unix(&socket).unwrap();
    let server = tokio::spawn(
        Arc::new(api::AdminApi::new(
            g.service.clone(),
            api::AdminAuth::default(),
        ))
        .serve_unix(listener),
    );
    let err = tokio::task::spawn_blocking(move || {
        cli::run_access(cli::AccessCommand::List { all: true }, &socket, false)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, ApprovalError::Remote { status: 401, .. }),
        "{err}"
    );
    server.abort();
}

// ---- webhook ----

#[tokio::test]
async fn webhook_receives_new_and_decided_requests_without_sql() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let receiver = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let req = http::read_request(&mut s).await.unwrap();
            assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/hook"));
            tx.send(String::from_utf8(req.body).unwrap()).unwrap();
            s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        }
    });
    let f = fixture_with(|c| c.webhook_url = Some(format!("http://{addr}/hook")));
    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let new: Value = serde_json::from_str(
        &tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (new["event"].clone(), new["id"].clone()),
        (json!("requested"), json!(id))
    );
    assert_eq!(new["requester"], "agent-7");
    assert!(
        !new.to_string().contains("orders"),
        "no SQL in the webhook: {new}"
    );
    f.service
        .decide(
            id,
            &ident("bob", &["dba"]),
            false,
            Some("no".into()),
            Scope::Once,
        )
        .await
        .unwrap();
    let decided: Value = serde_json::from_str(
        &tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        decided,
        json!({"event": "denied", "id": id, "by": "bob", "reason": "no"})
    );
    waiter.await.unwrap();
    receiver.abort();
}

#[test]
fn config_from_toml() {
    let cfg: ApprovalConfig = toml::from_str(
        r#"
        dir = "/var/lib/interceptor/approvals"
        http_listen = "127.0.0.1:7070"
        socket = "/run/interceptor/approvals.sock"
        default_timeout_secs = 600
        grant_approvers = ["security"]
        [local_approvers.1000]
        subject = "alice"
        groups = ["dba"]
        "#,
    )
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.local_approvers["1000"].groups, vec!["dba"]);
    let bad: ApprovalConfig =
        toml::from_str("dir = \"/x\"\n[local_approvers.alice]\nsubject = \"a\"\n").unwrap();
    assert!(bad.validate().is_err());
    let hook: ApprovalConfig =
        toml::from_str("dir = \"/x\"\nwebhook_url = \"http://hooks.example.com/\"\n").unwrap();
    assert!(hook.validate().is_err());
}

// ---- HTTP admin API over TLS with client certificates ----

struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn test_ca() -> TestCa {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "approvals test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCa { cert, key }
}

fn issue(
    ca: &TestCa,
    cn: Option<&str>,
    server: bool,
) -> (
    rustls_pki_types::CertificateDer<'static>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let names = if server {
        vec!["localhost".to_owned()]
    } else {
        vec![]
    };
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    params.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (
        cert.der().clone(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

async fn https(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    client: Option<&str>,
    method: &str,
    path: &str,
) -> (u16, Value) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(cn) => {
            let (cert, key) = issue(ca, Some(cn), false);
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{{}}");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // The server closes without close_notify on some paths; what was read counts.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (
        text[9..12].parse().unwrap(),
        serde_json::from_str(body).unwrap(),
    )
}

#[tokio::test]
async fn client_certificates_identify_approvers_over_tls() {
    let f = fixture();
    let ca = test_ca();
    let ca_file = f.dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let mtls: crate::identity::mtls::MtlsConfig = toml::from_str(&format!(
        "ca_file = \"{}\"\n[groups]\nalice = [\"dba\"]\n",
        ca_file.display()
    ))
    .unwrap();
    let (cert, key) = issue(&ca, None, true);
    let tls = crate::identity::mtls::server_config(
        vec![cert],
        key,
        Some(crate::identity::mtls::client_cert_verifier(&mtls).unwrap()),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let auth = api::AdminAuth {
        oidc: None,
        tls: Some(tls),
        mtls: Some(mtls),
        pages: None,
    };
    let server =
        tokio::spawn(Arc::new(api::AdminApi::new(f.service.clone(), auth)).serve_tcp(listener));

    let held = f
        .service
        .hold(statement("agent-7", 1, SQL, 1, 60))
        .await
        .unwrap();
    let id = held.id();
    let waiter = tokio::spawn(held.wait());
    let path = format!("/approvals/{id}/approve");
    // No certificate and no token: 401. A certificate without approver groups: 403.
    assert_eq!(https(addr, &ca, None, "POST", &path).await.0, 401);
    assert_eq!(
        https(addr, &ca, Some("mallory"), "POST", &path).await.0,
        403
    );
    let (status, body) = https(addr, &ca, Some("alice"), "POST", &path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        waiter.await.unwrap(),
        Resolution::Approved {
            by: vec!["alice".into()],
            scope: Scope::Once
        }
    );
    server.abort();
}

#[tokio::test]
async fn plaintext_admin_api_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http_listen = Some("0.0.0.0:0".parse().unwrap());
    let service = ApprovalService::open(cfg, Arc::new(|_| {})).unwrap();
    let err = api::spawn(service, api::AdminAuth::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ApprovalError::Config(m) if m.contains("TLS")));
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_400() {
    let f = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        Arc::new(api::AdminApi::new(
            f.service.clone(),
            api::AdminAuth::default(),
        ))
        .serve_tcp(listener),
    );
    let big = format!(
        "POST /grants HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        http::MAX_BODY + 1
    );
    let chunked = "POST /grants HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned();
    let head = format!("GET /{} HTTP/1.1\r\n", "a".repeat(http::MAX_HEAD + 10));
    for raw in ["\x00\x01garbage\r\n\r\n".to_owned(), big, chunked, head] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400 "), "{raw:.40?} -> {text}");
    }
    server.abort();
}

#[tokio::test]
async fn rules_without_approvers_fail_closed_and_sockets_replace_only_sockets() {
    let f = fixture();
    let mut req = statement("agent-7", 1, SQL, 1, 60);
    req.approver_groups.clear();
    assert!(matches!(
        f.service.hold(req).await,
        Err(ApprovalError::Config(_))
    ));
    assert!(f.service.list(None, true).unwrap().is_empty());

    let path = f.dir.path().join("not-a-socket");
    std::fs::write(&path, "data").unwrap();
    assert!(api::bind_unix(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    let sock = f.dir.path().join("s.sock");
    drop(api::bind_unix(&sock).unwrap());
    // A stale socket from an earlier run is replaced.
    drop(api::bind_unix(&sock).unwrap());
}
