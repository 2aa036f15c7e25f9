//! The web console in a real browser: Debian's chromium, headless, driven over WebDriver by
//! chromedriver, against the real interceptor (HTTPS admin listener), a real PostgreSQL with
//! psql sessions whose statements are held, and a small OIDC provider in this process (discovery,
//! authorize with a login form, token with PKCE, JWKS) since no external IdP exists here.
//!
//! One browser session walks through: sign-in, a held statement appearing live, a refused
//! action without CSRF token, approve (psql continues), deny (psql gets the reason), a
//! two-approver rule with self-approval refused, grants, and an auditor's search, replay,
//! verify and export. Screenshots land in target/console-screenshots/.
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (`cargo xtask setup` installs them); the
//! test fails, rather than skips, without them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fantoccini::{Client, ClientBuilder, Locator};
use interceptor_tests::certs::CertFiles;
use interceptor_tests::pg::APP_DB;
use interceptor_tests::proxy::interceptor_bin;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, CmdOutput, Interceptor, InterceptorSetup, PgCluster,
    PgCommand, TestCerts,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rsa::RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const KEY: &str = include_str!("../../interceptor/src/identity/oidc/testdata/rsa-test-1.pem");
const CLIENT_ID: &str = "interceptor-console";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The IdP's users and their groups.
fn groups_of(user: &str) -> Vec<&'static str> {
    match user {
        "dana" | "erin" => vec!["dba"],
        // The requester of two-approver statements, also in the approver group.
        "bob" => vec!["dba"],
        "sam" => vec!["security"],
        _ => vec![],
    }
}

// ---------------------------------------------------------------------------------------------
// A small OIDC provider: discovery, a login form at /authorize, /token (code + PKCE), /jwks.

struct Code {
    user: String,
    challenge: String,
    nonce: String,
    redirect_uri: String,
    client_id: String,
}

struct Idp {
    port: u16,
}

impl Idp {
    fn start() -> Idp {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let codes: Arc<Mutex<HashMap<String, Code>>> = Arc::default();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let codes = codes.clone();
                std::thread::spawn(move || idp_serve(stream, port, &codes));
            }
        });
        Idp { port }
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn form(s: &str) -> HashMap<String, String> {
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}

fn idp_serve(mut stream: TcpStream, port: u16, codes: &Mutex<HashMap<String, Code>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body) = loop {
        let Ok(n) = stream.read(&mut chunk) else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                break (head.to_owned(), body[..length].to_owned());
            }
        }
    };
    let first = head.lines().next().unwrap_or_default().to_owned();
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let issuer = format!("http://127.0.0.1:{port}");
    let reply = |stream: &mut TcpStream, status: &str, ctype: &str, extra: &str, body: &str| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match (method, path) {
        ("GET", "/.well-known/openid-configuration") => {
            let doc = json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}/authorize"),
                "token_endpoint": format!("{issuer}/token"),
                "jwks_uri": format!("{issuer}/jwks"),
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
            });
            reply(
                &mut stream,
                "200 OK",
                "application/json",
                "",
                &doc.to_string(),
            );
        }
        ("GET", "/jwks") => {
            let key = RsaPrivateKey::from_pkcs8_pem(KEY).unwrap();
            let jwks = json!({"keys": [{
                "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            }]});
            reply(
                &mut stream,
                "200 OK",
                "application/json",
                "",
                &jwks.to_string(),
            );
        }
        ("GET", "/authorize") => {
            let q = form(query);
            assert_eq!(q.get("response_type").map(String::as_str), Some("code"));
            assert_eq!(
                q.get("code_challenge_method").map(String::as_str),
                Some("S256"),
                "the console must use PKCE"
            );
            let hidden: String = q
                .iter()
                .map(|(k, v)| {
                    format!(
                        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                        html_escape(k),
                        html_escape(v)
                    )
                })
                .collect();
            let page = format!(
                "<!doctype html><title>Test IdP</title><h1>Test IdP</h1>\
                 <form method=\"post\" action=\"/authorize\">{hidden}\
                 <label>User <input id=\"user\" name=\"user\"></label>\
                 <button id=\"login\" type=\"submit\">Sign in</button></form>"
            );
            reply(&mut stream, "200 OK", "text/html", "", &page);
        }
        ("POST", "/authorize") => {
            let f = form(&body);
            let code = URL_SAFE_NO_PAD.encode(rand_bytes());
            let get = |k: &str| f.get(k).cloned().unwrap_or_default();
            codes.lock().unwrap().insert(
                code.clone(),
                Code {
                    user: get("user"),
                    challenge: get("code_challenge"),
                    nonce: get("nonce"),
                    redirect_uri: get("redirect_uri"),
                    client_id: get("client_id"),
                },
            );
            let location = format!(
                "{}?code={}&state={}",
                get("redirect_uri"),
                encode_component(&code),
                encode_component(&get("state"))
            );
            reply(
                &mut stream,
                "302 Found",
                "text/plain",
                &format!("Location: {location}\r\n"),
                "",
            );
        }
        ("POST", "/token") => {
            let f = form(&body);
            let get = |k: &str| f.get(k).cloned().unwrap_or_default();
            let code = codes.lock().unwrap().remove(&get("code"));
            let refuse = |stream: &mut TcpStream, why: &str| {
                reply(
                    stream,
                    "400 Bad Request",
                    "application/json",
                    "",
                    &json!({"error": "invalid_grant", "error_description": why}).to_string(),
                )
            };
            let Some(code) = code else {
                return refuse(&mut stream, "unknown code");
            };
            let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(get("code_verifier").as_bytes()));
            if challenge != code.challenge {
                return refuse(&mut stream, "PKCE verifier does not match");
            }
            if get("redirect_uri") != code.redirect_uri || get("client_id") != code.client_id {
                return refuse(&mut stream, "redirect_uri or client_id differ");
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let claims = json!({
                "iss": issuer, "aud": CLIENT_ID, "sub": code.user, "exp": now + 300,
                "iat": now, "nonce": code.nonce, "groups": groups_of(&code.user),
                "name": code.user,
            });
            let key = RsaPrivateKey::from_pkcs8_pem(KEY).unwrap();
            let der = key.to_pkcs1_der().unwrap();
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some("k1".into());
            let token =
                encode(&header, &claims, &EncodingKey::from_rsa_der(der.as_bytes())).unwrap();
            let answer =
                json!({"access_token": "unused", "token_type": "Bearer", "id_token": token});
            reply(
                &mut stream,
                "200 OK",
                "application/json",
                "",
                &answer.to_string(),
            );
        }
        _ => reply(&mut stream, "404 Not Found", "text/plain", "", "no"),
    }
}

fn rand_bytes() -> [u8; 24] {
    // Unique enough for test codes: time and a counter through SHA-256.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = Sha256::digest(format!("{n}-{t}").as_bytes());
    let mut out = [0u8; 24];
    out.copy_from_slice(&d[..24]);
    out
}

// ---------------------------------------------------------------------------------------------
// The gateway: writes by alice need one dba, writes by bob (group `pairs`) two.

fn policy(name: &str, group: &str, approvals: u32) -> String {
    format!(
        r#"
[policy]
name = "{name}"
[identities]
groups = ["{group}"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "reads"
decision = "allow"
kinds = ["read", "session", "transaction"]
[[rule]]
name = "{name}-writes-need-approval"
decision = "approve"
kinds = ["write"]
approvers = ["dba"]
approvals = {approvals}
timeout_secs = 120
"#
    )
}

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

struct Gateway {
    proxy: Interceptor,
    pg: PgCluster,
    certs: TestCerts,
    _dir: tempfile::TempDir,
    api_port: u16,
}

impl Gateway {
    fn start(idp: &Idp) -> Gateway {
        let pg = PgCluster::start().unwrap();
        let certs = TestCerts::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let api_port = interceptor_tests::net::free_port().unwrap();
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let extra = format!(
            "[oidc]\nissuer = \"{issuer}\"\naudience = [\"{CLIENT_ID}\"]\n\
             [mtls]\nca_file = \"{ca}\"\n[mtls.groups]\n\"dana-cert\" = [\"dba\"]\n\
             [approvals]\ndir = \"{d}/approvals\"\nsocket = \"{d}/approvals.sock\"\n\
             http_listen = \"127.0.0.1:{api_port}\"\ndefault_timeout_secs = 120\n\
             grant_approvers = [\"security\"]\n\
             [approvals.local_approvers.{uid}]\nsubject = \"cli\"\ngroups = [\"dba\", \"security\"]\n\
             [console]\npublic_url = \"https://127.0.0.1:{api_port}\"\nclient_id = \"{CLIENT_ID}\"\n\
             auditors = [\"security\"]\n",
            issuer = idp.issuer(),
            ca = certs.ca_cert.display(),
            d = dir.path().display(),
        );
        let proxy = Interceptor::start(
            InterceptorSetup::new(&pg)
                .tls(&certs)
                .identity(ALICE, ALICE_PASSWORD, &["agents"], None)
                .identity(BOB, BOB_PASSWORD, &["pairs"], None)
                .policy_file("agents", &policy("agents", "agents", 1))
                .policy_file("pairs", &policy("pairs", "pairs", 2))
                .policy_file("writers", WRITERS_POLICY)
                .extra_toml(&extra),
        )
        .unwrap();
        let g = Gateway {
            proxy,
            pg,
            certs,
            _dir: dir,
            api_port,
        };
        wait_until("the admin listener", || {
            TcpStream::connect(("127.0.0.1", g.api_port)).is_ok()
        });
        g
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api_port)
    }

    /// `interceptor approvals show ID` (the CLI, not the console): the daemon's own state.
    fn request(&self, id: u64) -> Value {
        let out = Command::new(interceptor_bin().unwrap())
            .args(["approvals", "--json", "-c"])
            .arg(self.proxy.config_path())
            .args(["show", &id.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn count(&self, id: i32) -> String {
        self.pg
            .psql_db(
                APP_DB,
                &format!("SELECT count(*) FROM accounts WHERE id = {id}"),
            )
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A psql session running one statement, in a thread (it blocks while held).
    fn psql(&self, who: &str, sql: &str) -> std::thread::JoinHandle<CmdOutput> {
        let params = self.proxy.params(who);
        let sql = sql.to_owned();
        std::thread::spawn(move || PgCommand::psql(&params).args(["-c", &sql]).run().unwrap())
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The browser.

struct Browser {
    driver: Child,
    client: Client,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for f in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(f).exists(),
                "{f} is missing: run `cargo xtask setup` (Debian packages chromium, chromium-driver)"
            );
        }
        let port = interceptor_tests::net::free_port().unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("chromedriver", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        // The gateway's certificate is from the test CA, unknown to the browser.
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("chromedriver did not start a chromium session");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            client,
            shots,
            _profile: profile,
        }
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Waits until `css` matches an element whose text contains `needle`; returns the text.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut seen = Vec::new();
            if let Ok(all) = self.client.find_all(Locator::Css(css)).await {
                for e in all {
                    if let Ok(t) = e.text().await {
                        if t.contains(needle) {
                            return t;
                        }
                        seen.push(t);
                    }
                }
            }
            if Instant::now() > deadline {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let src = self.client.source().await.unwrap_or_default();
                panic!("no `{css}` containing {needle:?} at {url:?}; saw {seen:?}\n{src}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn sign_in(&self, g: &Gateway, user: &str) {
        self.client.goto(&g.url("/console/")).await.unwrap();
        self.click("#sign-in").await;
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Id("user"))
            .await
            .unwrap();
        self.fill("#user", user).await;
        self.click("#login").await;
        self.wait_text("header .who", user).await;
    }

    async fn sign_out(&self) {
        self.click("header form.signout button").await;
        self.wait_text("#sign-in", "Sign in").await;
    }

    /// The pending request card for `id`, once the page shows it.
    async fn card(&self, id: u64) -> String {
        self.wait_text(&format!("#pending #request-{id}"), "Request")
            .await
    }

    async fn decide(&self, id: u64, action: &str, reason: &str) {
        let base = format!("#pending #request-{id} form.decide");
        self.fill(&format!("{base} input[name=reason]"), reason)
            .await;
        self.click(&format!("{base} button.{action}")).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The request id in psql's "held for approval, request N" notice, read from the daemon.
fn pending_id(g: &Gateway, subject: &str) -> u64 {
    let mut found = None;
    wait_until("a pending request", || {
        let out = Command::new(interceptor_bin().unwrap())
            .args(["approvals", "--json", "-c"])
            .arg(g.proxy.config_path())
            .arg("list")
            .output()
            .unwrap();
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        found = list.as_array().and_then(|l| {
            l.iter()
                .filter(|r| r["status"] == "pending" && r["identity"]["subject"] == subject)
                .filter_map(|r| r["id"].as_u64())
                .max()
        });
        found.is_some()
    });
    found.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_and_auditors_work_from_a_browser() {
    let idp = Idp::start();
    let g = tokio::task::block_in_place(|| Gateway::start(&idp));
    let b = Browser::start().await;

    // Not signed in: the sign-in page, with the CSP and no way in without the IdP.
    b.client.goto(&g.url("/console/approvals")).await.unwrap();
    b.wait_text("#sign-in", "Sign in with").await;
    b.shot("01-sign-in").await;
    b.sign_in(&g, "dana").await;
    b.wait_text("#no-pending", "Nothing is waiting").await;

    // A statement held for alice's psql session appears without a reload.
    let held = g.psql(ALICE, "DELETE FROM accounts WHERE id = 1");
    let id = tokio::task::block_in_place(|| pending_id(&g, ALICE));
    let card = b.card(id).await;
    for want in [
        "DELETE FROM accounts WHERE id = 1",
        "alice",
        "SCRAM-SHA-256",
        "app",
        "agents-writes-need-approval",
        "1 of 1 approvals",
    ] {
        assert!(card.contains(want), "{want:?} missing from {card}");
    }
    b.shot("02-approvals-pending").await;

    // Without its CSRF token the same form is refused, and nothing is decided.
    b.client
        .execute(
            &format!(
                "document.querySelector('#request-{id} form.decide input[name=csrf]').remove()"
            ),
            vec![],
        )
        .await
        .unwrap();
    b.decide(id, "approve", "no token").await;
    let refused = b.wait_text("#message", "CSRF").await;
    assert!(refused.contains("missing"), "{refused}");
    b.shot("03-csrf-refused").await;
    assert_eq!(
        tokio::task::block_in_place(|| g.request(id))["status"],
        "pending"
    );
    assert!(!held.is_finished());

    // Approve: psql continues.
    b.client.goto(&g.url("/console/approvals")).await.unwrap();
    b.card(id).await;
    b.decide(id, "approve", "INC-42 cleanup").await;
    b.wait_text("#message", &format!("Request {id}: approved"))
        .await;
    b.shot("04-approved").await;
    let out = tokio::task::block_in_place(|| held.join().unwrap());
    assert!(out.success() && out.stdout.contains("DELETE 1"), "{out:?}");
    assert_eq!(tokio::task::block_in_place(|| g.count(1)), "0");

    // Deny with a reason: psql gets it, the row stays.
    let held = g.psql(ALICE, "DELETE FROM accounts WHERE id = 2");
    let denied_id = tokio::task::block_in_place(|| pending_id(&g, ALICE));
    b.card(denied_id).await;
    b.decide(denied_id, "deny", "not during the freeze").await;
    b.wait_text("#message", &format!("Request {denied_id}: denied"))
        .await;
    let out = tokio::task::block_in_place(|| held.join().unwrap());
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("not during the freeze"), "{out:?}");
    assert!(out.stderr.contains("denied by dana"), "{out:?}");
    assert_eq!(tokio::task::block_in_place(|| g.count(2)), "1");
    b.sign_out().await;

    // Two approvers for bob's statement; bob (also a dba) cannot approve his own.
    let held = g.psql(BOB, "DELETE FROM accounts WHERE id = 3");
    let pair_id = tokio::task::block_in_place(|| pending_id(&g, BOB));
    b.sign_in(&g, "bob").await;
    let card = b.card(pair_id).await;
    assert!(card.contains("Your own request"), "{card}");
    // The page offers no form; a hand-made one (with a valid CSRF token) is refused as the API
    // refuses it.
    b.client
        .execute(
            &format!(
                "const f = document.createElement('form'); f.method = 'post'; \
                 f.action = '/console/approvals/{pair_id}/decide'; \
                 for (const [k, v] of [['csrf', document.querySelector('input[name=csrf]').value], \
                 ['action', 'approve'], ['reason', 'mine']]) {{ \
                 const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; \
                 f.appendChild(i); }} document.body.appendChild(f); f.submit();"
            ),
            vec![],
        )
        .await
        .unwrap();
    let refused = b.wait_text("#message", "own request").await;
    assert!(refused.contains("not allowed"), "{refused}");
    b.shot("05-self-approval-refused").await;
    b.client.goto(&g.url("/console/approvals")).await.unwrap();
    b.sign_out().await;

    b.sign_in(&g, "dana").await;
    b.card(pair_id).await;
    b.decide(pair_id, "approve", "first pair of eyes").await;
    b.wait_text("#message", "1 more approval(s) needed").await;
    let card = b.card(pair_id).await;
    assert!(card.contains("approved by dana"), "{card}");
    assert!(card.contains("1 of 2 approvals"), "{card}");
    b.shot("06-first-of-two").await;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !held.is_finished(),
        "one approval released a two-approver statement"
    );
    assert_eq!(tokio::task::block_in_place(|| g.count(3)), "1");
    b.sign_out().await;

    b.sign_in(&g, "erin").await;
    b.card(pair_id).await;
    b.decide(pair_id, "approve", "second pair of eyes").await;
    b.wait_text("#message", &format!("Request {pair_id}: approved"))
        .await;
    let out = tokio::task::block_in_place(|| held.join().unwrap());
    assert!(out.success() && out.stdout.contains("DELETE 1"), "{out:?}");
    b.sign_out().await;

    // Grants: erin asks, sam (security) approves on the approvals page, then revokes.
    b.sign_in(&g, "erin").await;
    b.client.goto(&g.url("/console/grants")).await.unwrap();
    b.fill("form.grant-request input[name=groups]", "writers")
        .await;
    b.fill("form.grant-request input[name=duration]", "30m")
        .await;
    b.fill("form.grant-request input[name=reason]", "INC-43 backfill")
        .await;
    b.click("form.grant-request button").await;
    b.wait_text("#no-grants", "No active grants").await;
    b.sign_out().await;
    b.sign_in(&g, "sam").await;
    let grant_req = tokio::task::block_in_place(|| pending_id(&g, "erin"));
    let card = b.card(grant_req).await;
    assert!(card.contains("writers"), "{card}");
    b.decide(grant_req, "approve", "on call").await;
    b.wait_text("#message", &format!("Request {grant_req}: approved"))
        .await;
    b.client.goto(&g.url("/console/grants")).await.unwrap();
    let row = b.wait_text("#grants tbody tr", "erin").await;
    assert!(row.contains("writers") && row.contains("min"), "{row}");
    b.shot("07-grants").await;
    b.fill("#grants tbody tr input[name=reason]", "done").await;
    b.click("#grants tbody tr button").await;
    b.wait_text("#no-grants", "No active grants").await;

    // The auditor finds alice's session and replays it: the approval is in it.
    b.client
        .goto(&g.url("/console/audit?identity=alice&decision=approve"))
        .await
        .unwrap();
    b.wait_text("#sessions tbody tr", "alice").await;
    b.shot("08-audit-sessions").await;
    let rows = b
        .client
        .find_all(Locator::Css("#sessions tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "alice had two sessions with held statements");
    // The first session (the approved DELETE) is the older one: the last row.
    rows.last()
        .unwrap()
        .find(Locator::Css("a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let replay = b
        .wait_text("#replay", "DELETE FROM accounts WHERE id = 1")
        .await;
    for want in [
        format!("approval request {id}"),
        format!("approval {id}: granted"),
        "by dana".to_owned(),
        "INC-42 cleanup".to_owned(),
        format!("approval {id}: executed"),
        "DELETE 1".to_owned(),
    ] {
        assert!(
            replay.contains(&want),
            "{want:?} missing from replay:\n{replay}"
        );
    }
    b.shot("09-replay").await;

    // Export of the range, fetched by the page itself (same cookies, same origin).
    let jsonl = b
        .client
        .execute(
            "return fetch(document.querySelector('a[href*=\"format=jsonl\"]').href).then(r => r.text())",
            vec![],
        )
        .await
        .unwrap();
    let jsonl = jsonl.as_str().unwrap_or_default();
    assert!(jsonl.lines().count() > 5, "{jsonl}");
    assert!(jsonl.contains("\"approval\""), "{jsonl}");

    b.client
        .goto(&g.url("/console/audit/verify"))
        .await
        .unwrap();
    let status = b.wait_text("#verify-status", "OK").await;
    assert!(status.contains("records"), "{status}");
    b.shot("10-verify").await;

    // A non-auditor does not get the audit pages.
    b.sign_out().await;
    b.sign_in(&g, "dana").await;
    b.client.goto(&g.url("/console/audit")).await.unwrap();
    b.wait_text("#message", "auditors").await;
    b.client.clone().close().await.unwrap();
}

/// One HTTP/1.1 exchange over TLS with a client certificate: status, head, body.
fn https_with_cert(g: &Gateway, cert: &CertFiles, request: &str) -> (u16, String, String) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&g.certs.ca_cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(("127.0.0.1", g.api_port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the console's answer: {e}"),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[test]
fn a_client_certificate_signs_in_and_approves() {
    let idp = Idp::start();
    let g = Gateway::start(&idp);
    let cert = g.certs.client("dana-cert").unwrap();
    let held = g.psql(ALICE, "DELETE FROM accounts WHERE id = 5");
    let id = pending_id(&g, ALICE);
    let origin = g.url("");

    // The certificate is the sign-in: a session cookie comes back with the page.
    let get = "GET /console/approvals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, head, body) = https_with_cert(&g, &cert, get);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(body.contains("dana-cert"), "{body}");
    assert!(body.contains(&format!("id=\"request-{id}\"")), "{body}");
    let csp = header(&head, "content-security-policy");
    assert_eq!(csp.len(), 1, "{head}");
    assert!(
        csp[0].contains("default-src 'none'") && !csp[0].contains("unsafe"),
        "{head}"
    );
    let set_cookie = header(&head, "set-cookie");
    let cookie = set_cookie
        .iter()
        .find(|c| c.starts_with("__Host-interceptor-console="))
        .unwrap_or_else(|| panic!("no session cookie: {head}"));
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let csrf = body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();

    let post = |cookie: Option<&str>, form: &str| {
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        format!(
            "POST /console/approvals/{id}/decide HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\n\
             {cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        )
    };
    let approve = format!("csrf={csrf}&action=approve&reason=cert");
    // The token belongs to that session: without its cookie the same token is refused.
    let (status, _, body) = https_with_cert(&g, &cert, &post(None, &approve));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF token is wrong"), "{body}");
    // A post from another origin is refused even with cookie and token.
    let foreign = post(Some(&cookie), &approve).replace(&origin, "https://evil.example");
    let (status, _, body) = https_with_cert(&g, &cert, &foreign);
    assert_eq!(status, 403, "{body}");
    assert_eq!(g.request(id)["status"], "pending");
    assert!(!held.is_finished());

    let (status, head, body) = https_with_cert(&g, &cert, &post(Some(&cookie), &approve));
    assert_eq!(status, 303, "{head}\n{body}");
    let out = held.join().unwrap();
    assert!(out.success() && out.stdout.contains("DELETE 1"), "{out:?}");
    let r = g.request(id);
    assert_eq!(r["status"], "approved");
    assert_eq!(r["votes"][0]["by"], "dana-cert");
}
