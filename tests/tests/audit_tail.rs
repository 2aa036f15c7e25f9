//! A lost or altered tail of the audit trail is noticed: after a crash, damage to the
//! write-ahead tail or the store makes `audit verify` fail naming what is missing, and the
//! daemon refuses to start until the operator accepts the gap (`--accept-audit-gap`), which
//! becomes an `audit_gap` record.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interceptor_tests::proxy::interceptor_bin;
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgCommand,
};

use interceptor_tests::pg::APP_RW;

/// The write-ahead segments (`wal.<n>`) of an audit directory, oldest first.
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.strip_prefix("wal.")?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// Leaves what a crash at the worst moment leaves: the last commits only in the write-ahead
/// tail, sled's files without them. (sled writes its files when it likes, so a kill -9 alone
/// leaves the tail in both sometimes; its files are put back as of a clean stop, the way a
/// crash before its own write would leave them.)
fn crash_with_a_tail(proxy: &mut Interceptor) {
    let dir = proxy.audit_dir().unwrap();
    let run = |proxy: &Interceptor, sql: &str| {
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", sql])
            .run()
            .unwrap();
        assert!(out.success(), "{out:?}");
    };
    run(proxy, "SELECT 'before the tail'");
    proxy.terminate();
    let saved = proxy.dir().join("sled-saved");
    let _ = std::fs::remove_dir_all(&saved);
    copy_store_files(&dir, &saved);
    proxy.restart().unwrap();
    run(proxy, "SELECT 'in the tail'");
    // The daemon commits the session's end just after psql returns: wait for it.
    std::thread::sleep(Duration::from_millis(300));
    proxy.kill9();
    assert!(
        segments(&dir)
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0)),
        "no write-ahead tail at the crash: {}",
        describe(&dir)
    );
    remove_store_files(&dir);
    copy_store_files(&saved, &dir);
}

/// Everything in the audit directory but the write-ahead segments.
fn store_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("wal."))
        .map(|e| e.path())
        .collect()
}

fn remove_store_files(dir: &Path) {
    for p in store_files(dir) {
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

fn copy_store_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .args(store_files(from))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The audit directory's files and the head-mark file, for failure messages.
fn describe(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.push_str(&format!("{}={len} ", e.file_name().to_string_lossy()));
    }
    let mark = std::fs::read(dir.with_file_name("audit.head")).unwrap_or_default();
    out.push_str(&String::from_utf8_lossy(&mark).replace('\0', ""));
    out
}

fn verify(proxy: &Interceptor) -> (bool, String) {
    let out = Command::new(interceptor_bin().unwrap())
        .args(["audit", "-c"])
        .arg(proxy.config_path())
        .arg("verify")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Starts the daemon by hand; returns (exited, output) after it exits or reports ready.
fn start_by_hand(proxy: &Interceptor, accept: bool) -> (Option<std::process::ExitStatus>, String) {
    let log = proxy.dir().join(format!("manual-{accept}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(interceptor_bin().unwrap());
    cmd.arg("run").arg("--config").arg(proxy.config_path());
    if accept {
        cmd.arg("--accept-audit-gap");
    }
    let mut child = cmd
        .env("INTERCEPTOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            return (
                Some(status),
                std::fs::read_to_string(&log).unwrap_or_default(),
            );
        }
        if text.contains("interceptor ready") {
            let _ = child.kill();
            let _ = child.wait();
            return (None, text);
        }
        assert!(
            Instant::now() < deadline,
            "neither ready nor exited: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gap_records(proxy: &Interceptor) -> usize {
    proxy
        .audit_records()
        .unwrap()
        .iter()
        .filter(|r| r.to_string().contains("\"audit_gap\""))
        .count()
}

/// Each kind of damage: verify names it, start refuses, `--accept-audit-gap` starts and
/// records it, and later starts are not blocked by the accepted gap.
#[test]
fn damage_to_the_tail_or_store_is_detected_by_verify_and_at_start() {
    let pg = PgCluster::start().unwrap();
    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "last segment truncated",
            |d| {
                let p = segments(d).pop().unwrap();
                let len = std::fs::metadata(&p).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(len / 2).unwrap();
            },
            "missing",
        ),
        (
            "frame corrupted",
            |d| {
                let p = segments(d).pop().unwrap();
                let mut data = std::fs::read(&p).unwrap();
                let at = data.len() - 3;
                data[at] ^= 0x5a;
                std::fs::write(&p, data).unwrap();
            },
            "missing",
        ),
        (
            "last segment deleted",
            |d| std::fs::remove_file(segments(d).pop().unwrap()).unwrap(),
            "missing",
        ),
        ("sled files deleted", remove_store_files, "missing"),
        (
            "directory wiped",
            |d| std::fs::remove_dir_all(d).unwrap(),
            "missing",
        ),
    ];
    for (what, damage, expect) in cases {
        let setup = InterceptorSetup::new(&pg)
            .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
            .allow_all_policies();
        let mut proxy = Interceptor::start(setup).unwrap();
        crash_with_a_tail(&mut proxy);
        let dir = proxy.audit_dir().unwrap();

        // Damage before anything opens the store again (opening replays the tail into sled).
        let before = describe(&dir);
        damage(&dir);
        let (ok, text) = verify(&proxy);
        assert!(
            !ok,
            "{what}: verify passed over the damage: {text}\nbefore: {before}"
        );
        assert!(text.contains(expect), "{what}: {text}");

        let (exited, text) = start_by_hand(&proxy, false);
        let status = exited.unwrap_or_else(|| panic!("{what}: started over the damage: {text}"));
        assert!(!status.success(), "{what}: {text}");
        assert!(text.contains("--accept-audit-gap"), "{what}: {text}");

        let (exited, text) = start_by_hand(&proxy, true);
        assert!(
            exited.is_none(),
            "{what}: did not start with --accept-audit-gap: {text}"
        );
        assert_eq!(gap_records(&proxy), 1, "{what}");

        // The accepted gap does not block the next start.
        proxy
            .restart()
            .unwrap_or_else(|e| panic!("{what}: restart after accepting: {e}"));
        let out = PgCommand::psql(&proxy.params(ALICE))
            .args(["-c", "SELECT 1"])
            .run()
            .unwrap();
        assert!(out.success(), "{what}: {out:?}");
    }
}

#[test]
fn a_plain_crash_restarts_without_a_gap() {
    let pg = PgCluster::start().unwrap();
    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RW))
        .allow_all_policies();
    let mut proxy = Interceptor::start(setup).unwrap();
    crash_with_a_tail(&mut proxy);
    // The tail is replayed: verify (which opens the store) and a restart see no gap.
    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
    let records = proxy.audit_records().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.to_string().contains("in the tail")),
        "the tail's statement is missing after replay"
    );
    proxy.restart().unwrap();
    for _ in 0..2 {
        crash_with_a_tail(&mut proxy);
        proxy.restart().unwrap();
    }
    assert_eq!(gap_records(&proxy), 0);
}
