//! Shared by the approval e2e tests: PostgreSQL + the real interceptor with `[approvals]`
//! (admin socket for the CLI, HTTPS admin API), an OIDC issuer whose tokens the API accepts,
//! client certificates for mTLS callers, and small helpers that poll the daemon's state.
//!
//! Identities: `alice` (group `agents`, SCRAM) is the requester whose statements are held.
//! Approvers reach the API with OIDC tokens (`token(sub, groups)`) or client certificates
//! (`cert_*`), and the CLI runs as this process's uid, mapped by `local_approvers` to
//! [`Setup::local_subject`].

#![allow(dead_code)] // each test file uses a different part

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use interceptor_tests::certs::CertFiles;
use interceptor_tests::pg::APP_DB;
use interceptor_tests::proxy::interceptor_bin;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, TestCerts,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::Value;

pub const ISSUER: &str = "https://idp.example.test/realms/ops";
const KEY: &str = include_str!("../../../interceptor/src/identity/oidc/testdata/rsa-test-1.pem");
const OTHER_KEY: &str =
    include_str!("../../../interceptor/src/identity/oidc/testdata/rsa-test-2.pem");

/// Common names of the client certificates the stack issues, and their `[mtls.groups]`.
pub const CERT_APPROVER: &str = "dana-cert";
pub const CERT_OUTSIDER: &str = "mallory-cert";

/// What the gateway is configured with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The rule for writes by `alice`: `Some((timeout_secs, approvals))` holds them for the
    /// `dba` group; `None` denies them (default deny), for grant tests.
    pub write_approval: Option<(u64, u32)>,
    /// Who the CLI (this process's uid) is, and its groups.
    pub local_subject: &'static str,
    pub local_groups: &'static [&'static str],
}

impl Setup {
    /// Writes held for one `dba` approval within `timeout_secs`; the CLI is `dana` (dba).
    pub fn held_writes(timeout_secs: u64) -> Self {
        Setup {
            write_approval: Some((timeout_secs, 1)),
            local_subject: "dana",
            local_groups: &["dba"],
        }
    }
}

fn policy(setup: &Setup) -> String {
    let mut p = String::from(
        r#"
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
"#,
    );
    if let Some((timeout, approvals)) = setup.write_approval {
        p.push_str(&format!(
            "[[rule]]\nname = \"writes-need-a-dba\"\ndecision = \"approve\"\nkinds = [\"write\"]\n\
             approvers = [\"dba\"]\napprovals = {approvals}\ntimeout_secs = {timeout}\n"
        ));
    }
    p
}

/// The policy a grant of group `writers` switches `alice` to (higher priority than `agents`).
const WRITERS_POLICY: &str = r#"
[policy]
name = "writers"
priority = 10
[identities]
groups = ["writers"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "writes-under-a-grant"
decision = "allow"
kinds = ["read", "write", "session", "transaction"]
"#;

pub struct ApprovalStack {
    // Drop order: the proxy first, then the cluster, then the files they use.
    pub proxy: Interceptor,
    pub pg: PgCluster,
    pub certs: TestCerts,
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub cert_approver: CertFiles,
    pub cert_outsider: CertFiles,
}

impl ApprovalStack {
    pub fn start(setup: Setup) -> ApprovalStack {
        Self::start_inner(setup, None)
    }

    /// With `webhook_url` set (plain http is accepted to loopback).
    pub fn start_with_webhook(setup: Setup, url: &str) -> ApprovalStack {
        Self::start_inner(setup, Some(url))
    }

    fn start_inner(setup: Setup, webhook: Option<&str>) -> ApprovalStack {
        let pg = PgCluster::start().unwrap();
        let certs = TestCerts::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_approver = certs.client(CERT_APPROVER).unwrap();
        let cert_outsider = certs.client(CERT_OUTSIDER).unwrap();
        let key = RsaPrivateKey::from_pkcs8_pem(KEY).unwrap();
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        }]});
        let jwks_file = dir.path().join("jwks.json");
        std::fs::write(&jwks_file, jwks.to_string()).unwrap();
        let api_port = interceptor_tests::net::free_port().unwrap();
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let groups: Vec<String> = setup
            .local_groups
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect();
        let extra = format!(
            "[oidc]\nissuer = \"{ISSUER}\"\naudience = [\"interceptor-admin\"]\njwks_file = \"{jwks}\"\n\
             [mtls]\nca_file = \"{ca}\"\n\
             [mtls.groups]\n\"{CERT_APPROVER}\" = [\"dba\", \"security\"]\n\"{CERT_OUTSIDER}\" = [\"agents\"]\n\
             [approvals]\ndir = \"{d}/approvals\"\nsocket = \"{d}/approvals.sock\"\n\
             http_listen = \"127.0.0.1:{api_port}\"\ndefault_timeout_secs = 120\n{hook}\
             grant_approvers = [\"security\"]\n\
             [approvals.local_approvers.{uid}]\nsubject = \"{subject}\"\ngroups = [{groups}]\n",
            jwks = jwks_file.display(),
            ca = certs.ca_cert.display(),
            d = dir.path().display(),
            subject = setup.local_subject,
            groups = groups.join(", "),
            hook = webhook
                .map(|u| format!("webhook_url = \"{u}\"\n"))
                .unwrap_or_default(),
        );
        let proxy = Interceptor::start(
            InterceptorSetup::new(&pg)
                .tls(&certs)
                .identity(ALICE, ALICE_PASSWORD, &["agents"], None)
                .policy_file("agents", &policy(&setup))
                .policy_file("writers", WRITERS_POLICY)
                .extra_toml(&extra),
        )
        .unwrap();
        let stack = ApprovalStack {
            proxy,
            pg,
            certs,
            dir,
            api_port,
            cert_approver,
            cert_outsider,
        };
        stack.wait_for_api();
        stack
    }

    /// The admin API listens once the daemon has started it (after the client listener).
    fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.api_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the admin API did not listen; log:\n{}",
                self.proxy.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn config(&self) -> PathBuf {
        self.proxy.config_path().to_owned()
    }

    /// Restarts the daemon (same config, ports and stores) and waits for its admin API.
    pub fn restart(&mut self) {
        self.proxy.restart().unwrap();
        self.wait_for_api();
    }

    /// `interceptor <args…> -c CONFIG <rest…>`: `group` is `approvals`, `access` or `audit`.
    pub fn cli(&self, group: &str, rest: &[&str]) -> std::process::Output {
        Command::new(interceptor_bin().unwrap())
            .arg(group)
            .arg("-c")
            .arg(self.config())
            // `approvals` and `access` print tables for people; the tests read their JSON.
            .args(matches!(group, "approvals" | "access").then_some("--json"))
            .args(rest)
            .output()
            .unwrap()
    }

    /// A CLI call that must succeed; its JSON output.
    pub fn cli_ok(&self, group: &str, rest: &[&str]) -> Value {
        let out = self.cli(group, rest);
        assert!(
            out.status.success(),
            "interceptor {group} {rest:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// One request as the daemon stores it (the CLI user must be allowed to see it).
    pub fn request(&self, id: u64) -> Value {
        self.cli_ok("approvals", &["show", &id.to_string()])
    }

    /// Polls until a pending request matching `kind` (`statement` / `grant`) appears.
    pub fn wait_pending(&self, kind: &str) -> u64 {
        self.poll("a pending request", || {
            let list = self.cli_ok("approvals", &["list"]);
            list.as_array()?
                .iter()
                .find(|r| r["status"] == "pending" && r["kind"] == kind)
                .and_then(|r| r["id"].as_u64())
        })
    }

    /// Polls until request `id` has `status`; returns the request.
    pub fn wait_status(&self, id: u64, status: &str) -> Value {
        self.poll(&format!("request {id} to be {status}"), || {
            let r = self.request(id);
            (r["status"] == status).then_some(r)
        })
    }

    /// Polls `f` every 100 ms for up to 20 s.
    pub fn poll<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.proxy.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `SELECT count(*) FROM accounts WHERE id = <id>` straight on PostgreSQL.
    pub fn count(&self, id: i32) -> String {
        self.pg
            .psql_db(
                APP_DB,
                &format!("SELECT count(*) FROM accounts WHERE id = {id}"),
            )
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Every audit record (`interceptor audit export`, through the running daemon or the store).
    pub fn audit_export(&self) -> Vec<Value> {
        let out = self.cli("audit", &["export", "--format", "jsonl"]);
        assert!(
            out.status.success(),
            "audit export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The approval records of request (or grant) `id`, in trail order.
    pub fn approval_records(&self, id: u64) -> Vec<Value> {
        let key = id.to_string();
        self.audit_export()
            .into_iter()
            .map(|r| r.get("event").cloned().unwrap_or(r))
            .filter(|e| e["type"] == "approval" && e["approval_id"].as_str() == Some(key.as_str()))
            .collect()
    }

    /// `audit verify` must pass.
    pub fn verify_audit(&self) {
        let out = self.cli("audit", &["verify"]);
        assert!(
            out.status.success(),
            "audit verify failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"));
    }

    /// An admin API call over HTTPS; `auth` chooses how the caller proves who it is.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        auth: Auth<'_>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (token, cert) = match auth {
            Auth::None => (None, None),
            Auth::Bearer(t) => (Some(t), None),
            Auth::Cert(c) => (None, Some(c)),
        };
        https(
            self.api_port,
            &self.certs.ca_cert,
            cert,
            method,
            path,
            token,
            body,
        )
    }
}

/// How an admin API caller authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Bearer(&'a str),
    Cert(&'a CertFiles),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An OIDC token for the admin API, signed by the configured issuer's key.
pub fn token(sub: &str, groups: &[&str]) -> String {
    sign(KEY, sub, groups)
}

/// The same claims signed by a key the issuer never published.
pub fn forged_token(sub: &str, groups: &[&str]) -> String {
    sign(OTHER_KEY, sub, groups)
}

fn sign(pem: &str, sub: &str, groups: &[&str]) -> String {
    let key = RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": "interceptor-admin", "sub": sub, "exp": now() + 300,
        "iat": now(), "groups": groups,
    });
    encode(&header, &claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap()
}

/// One HTTP/1.1 request over TLS (server verified against `ca`), optionally with a client
/// certificate; returns the status and the JSON body.
fn https(
    port: u16,
    ca: &Path,
    client_cert: Option<&CertFiles>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        Some(c) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&c.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // The server closes without close_notify after `Connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the admin API answer: {e}"),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed answer: {text}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json)
}

/// The request id in a refusal such as "approval request 7 timed out".
pub fn request_id_in(message: &str) -> u64 {
    let rest = message
        .split("request ")
        .nth(1)
        .unwrap_or_else(|| panic!("no request id in {message:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request id in {message:?}"))
}

/// A tokio-postgres session as `alice` whose NoticeResponses arrive on a channel (the
/// connection is driven by a task; aborting it closes the socket, like a client that dies).
pub struct NoticedClient {
    pub client: tokio_postgres::Client,
    pub notices: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub driver: tokio::task::JoinHandle<()>,
}

pub async fn alice_session(stack: &ApprovalStack) -> NoticedClient {
    let (client, mut conn) = stack.proxy.params(ALICE).connect_raw().await.unwrap();
    let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) => {
                    let _ = tx.send(n.message().to_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    NoticedClient {
        client,
        notices,
        driver,
    }
}

/// Runs `sql` on `client` in a task of its own (it may be held for approval) and gives the
/// client back with the result.
pub fn simple_query_in_background(
    client: tokio_postgres::Client,
    sql: &'static str,
) -> tokio::task::JoinHandle<(
    Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    tokio_postgres::Client,
)> {
    tokio::spawn(async move {
        let res = client.simple_query(sql).await;
        (res, client)
    })
}

impl NoticedClient {
    /// Waits for the "held for approval" notice and returns the request id it names.
    pub async fn held_notice(&mut self) -> u64 {
        let notice = tokio::time::timeout(Duration::from_secs(20), self.notices.recv())
            .await
            .expect("no notice within 20 s")
            .expect("connection closed before the notice");
        assert!(notice.contains("held for approval"), "{notice}");
        request_id_in(&notice)
    }
}

/// A loopback HTTP endpoint that records the JSON bodies POSTed to it (the approvals webhook's
/// receiver, e.g. a chat relay).
pub struct WebhookSink {
    port: u16,
    bodies: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl WebhookSink {
    pub fn start() -> WebhookSink {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = bodies.clone();
        // Ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if let Some(body) = read_post(&mut stream) {
                    sink.lock().unwrap().push(body);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        WebhookSink { port, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/approvals", self.port)
    }

    /// Polls until a received body matches.
    pub fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.bodies.lock().unwrap().iter().find(|v| f(v)) {
                return v.clone();
            }
            assert!(Instant::now() < deadline, "the webhook never got {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One HTTP request's JSON body (by Content-Length).
fn read_post(stream: &mut TcpStream) -> Option<Value> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() >= length {
            return serde_json::from_str(&body[..length]).ok();
        }
    }
}
