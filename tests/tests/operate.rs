//! Operating the daemon: readiness through a systemd notify socket, JSON logs carrying the
//! session, the Prometheus scrape after a known workload, /healthz and /readyz, SIGHUP reload,
//! `interceptor sessions` / `sessions kill` against a real psql session, and the graceful stop.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interceptor_tests::{ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster};

fn policy(read_decision: &str) -> String {
    format!(
        r#"
[policy]
name = "ops"
[identities]
subjects = ["alice"]
[login]
upstream_role = "app_rw"
databases = ["*"]
[[rule]]
name = "reads"
decision = "{read_decision}"
kinds = ["read"]
"#
    )
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of the sample named exactly `series` (name and labels) in a scrape, 0 if absent.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn sum_of(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn interceptor(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(interceptor_tests::proxy::interceptor_bin().unwrap())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readiness_metrics_reload_kill_and_graceful_stop() {
    let pg = PgCluster::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let metrics_port = interceptor_tests::net::free_port().unwrap();
    let mut proxy = Interceptor::start(
        InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &[], None)
            .with_audit()
            .policy_file("ops", &policy("allow"))
            .env("NOTIFY_SOCKET", notify_path.to_str().unwrap())
            .env("INTERCEPTOR_LOG_FORMAT", "json")
            .extra_toml(&format!(
                "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
            )),
    )
    .unwrap();

    // Readiness: READY=1 on the notify socket once the daemon accepts.
    let mut buf = [0u8; 4096];
    let n = notify
        .recv(&mut buf)
        .expect("no READY=1 on the notify socket");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(
        msg.contains(&format!("MAINPID={}", proxy.pid().unwrap())),
        "{msg}"
    );
    assert_eq!(http_get(metrics_port, "/healthz").0, 200);
    let (code, body) = http_get(metrics_port, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"upstream\""), "{body}");

    // A known workload: 3 allowed reads, 2 statements no rule allows (denied, 42501).
    let before = http_get(metrics_port, "/metrics").1;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = proxy.params(ALICE).connect().await.unwrap();
        for _ in 0..3 {
            c.simple_query("SELECT 1").await.unwrap();
        }
        for _ in 0..2 {
            let e = c
                .simple_query("CREATE TABLE nope (a int)")
                .await
                .unwrap_err();
            assert_eq!(e.code().unwrap().code(), "42501");
        }
    });
    let after = http_get(metrics_port, "/metrics").1;
    let allow_read = "interceptor_statements_total{decision=\"allow\",kind=\"read\"}";
    assert_eq!(
        sample(&after, allow_read) - sample(&before, allow_read),
        3.0,
        "{after}"
    );
    let denied = "interceptor_statements_total{decision=\"deny\"";
    assert_eq!(
        sum_of(&after, denied) - sum_of(&before, denied),
        2.0,
        "{after}"
    );
    let refused = "interceptor_refusals_total{sqlstate=\"42501\"}";
    assert_eq!(
        sample(&after, refused) - sample(&before, refused),
        2.0,
        "{after}"
    );
    let sessions = "interceptor_sessions_total{identity=\"alice\",policy=\"ops\"}";
    assert_eq!(
        sample(&after, sessions) - sample(&before, sessions),
        1.0,
        "{after}"
    );
    assert!(
        sample(&after, "interceptor_audit_commit_seconds_count") > 0.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "interceptor_relay_bytes_total{direction=\"to_client\"}"
        ) > 0.0
    );
    assert_eq!(sample(&after, "interceptor_audit_unwritable"), 0.0);
    // Every line of a session names it: JSON lines with the session span (id, identity).
    let logs = proxy.logs();
    let started = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "session started")
        .unwrap_or_else(|| panic!("no JSON 'session started' line:\n{logs}"));
    let span = &started["spans"][0];
    assert_eq!(span["identity"], "alice", "{started}");
    assert!(span["id"].as_u64().is_some(), "{started}");
    assert!(!logs.contains("\u{1b}["), "colour codes in a log file");

    // SIGHUP with an unchanged policy directory: a policy reload is audited (the file watcher
    // alone would record none), and a changed config section is named as needing a restart.
    let reloads = |p: &Interceptor| {
        p.audit_records()
            .unwrap()
            .iter()
            .filter(|r| r.to_string().contains("policy_reload"))
            .count()
    };
    let reloads_before = reloads(&proxy);
    // A new identity applies on SIGHUP (no policy admits it: refused after authenticating,
    // 28000, instead of unknown, 28P01); a changed [limits] needs a restart.
    let carol = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut p = proxy.params(ALICE);
            p.user = "carol".into();
            p.password = Some("carol-Pass-1".into());
            p.connect()
                .await
                .map(|_| ())
                .map_err(|e| e.code().map(|c| c.code().to_owned()))
        })
    };
    assert_eq!(carol(&rt), Err(Some("28P01".to_owned())));
    let config = std::fs::read_to_string(proxy.config_path()).unwrap();
    let carol_secret = postgres_protocol::password::scram_sha_256(b"carol-Pass-1");
    std::fs::write(
        proxy.config_path(),
        format!(
            "{config}\n[limits]\nauth_timeout_ms = 12345\n\n\
             [identity.carol]\nsecret = {carol_secret:?}\n"
        ),
    )
    .unwrap();
    let pid = proxy.pid().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("RELOADING=1"));
    wait_until("the reload", || {
        sample(
            &http_get(metrics_port, "/metrics").1,
            "interceptor_reloads_total{event=\"ok\"}",
        ) == 1.0
    });
    let scrape = http_get(metrics_port, "/metrics").1;
    // The sample dashboard only queries metrics the daemon exposes.
    let dashboard = std::fs::read_to_string(
        interceptor_tests::workspace_root().join("deploy/grafana-dashboard.json"),
    )
    .unwrap();
    for name in dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("interceptor_"))
    {
        let family = ["_bucket", "_total"]
            .iter()
            .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
        // Families with no sample yet are not exposed: this workload masks nothing and runs
        // without eBPF.
        if ["interceptor_masked_values", "interceptor_kernel"].contains(&family) {
            continue;
        }
        assert!(
            scrape.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which the scrape lacks"
        );
    }

    let logs = proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("take effect only after a restart"))
        .unwrap_or_else(|| panic!("no restart notice:\n{logs}"));
    assert!(
        line.contains("limits") && !line.contains("listen") && !line.contains("identity"),
        "{line}"
    );
    assert_eq!(
        carol(&rt),
        Err(Some("28000".to_owned())),
        "the identity added to the config did not apply on SIGHUP"
    );
    wait_until("the reload's audit record", || {
        reloads(&proxy) > reloads_before
    });

    // A changed policy applies on SIGHUP.
    std::fs::write(proxy.policy_dir().unwrap().join("ops.toml"), policy("deny")).unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    rt.block_on(async {
        let c = proxy.params(ALICE).connect().await.unwrap();
        let e = c.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(e.code().unwrap().code(), "42501");
    });
    std::fs::write(
        proxy.policy_dir().unwrap().join("ops.toml"),
        policy("allow"),
    )
    .unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));

    // A real psql session, listed and killed.
    let params = proxy.params(ALICE);
    let mut psql = Command::new("psql")
        .args(["-X", "-f", "-"])
        .envs(params.libpq_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    writeln!(stdin, "SELECT 'first';").unwrap();
    let mut listed = serde_json::Value::Null;
    wait_until("psql's session in the listing", || {
        let out = interceptor(proxy.config_path(), &["sessions", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        listed = serde_json::from_slice(&out.stdout).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["statement"].as_str().is_some_and(|q| q.contains("first")))
    });
    let session = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["statement"].as_str().is_some_and(|q| q.contains("first")))
        .unwrap()
        .clone();
    assert_eq!(session["identity"], "alice");
    assert_eq!(session["role"], "app_rw");
    assert_eq!(session["state"], "idle");
    let id = session["id"].as_u64().unwrap().to_string();
    let table = interceptor(proxy.config_path(), &["sessions"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("alice"));
    let out = interceptor(proxy.config_path(), &["sessions", "kill", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    writeln!(stdin, "SELECT 'second';").unwrap();
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("terminating connection due to administrator command"),
        "psql did not read the FATAL: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("second"));
    wait_until("the kill's audit record", || {
        proxy.audit_records().unwrap().iter().any(|r| {
            r.to_string().contains("session_end")
                && r.to_string()
                    .contains("administrator command (admin socket)")
        })
    });

    // Graceful stop: a running statement finishes, then the session gets FATAL 57P01.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let params = proxy.params(ALICE);
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = params.connect().await.unwrap();
            done_tx.send(()).unwrap();
            let slow = c.simple_query("SELECT pg_sleep(1)").await;
            let after = c.simple_query("SELECT 1").await;
            (slow.is_ok(), after.err().map(|e| e.to_string()))
        })
    });
    done_rx.recv().unwrap();
    pg.wait_for_active_query("pg_sleep", Duration::from_secs(10))
        .unwrap();
    let started = Instant::now();
    let status = proxy
        .terminate()
        .expect("interceptor did not stop within 5 s");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the statement was cut short"
    );
    let (slow_ok, after) = waiter.join().unwrap();
    assert!(slow_ok, "the running statement did not finish");
    assert!(after.is_some(), "the session outlived the stop");
    // The notify socket also holds each reload's RELOADING=1 / READY=1.
    notify
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut stopping = false;
    while let Ok(n) = notify.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 on the notify socket");
}
