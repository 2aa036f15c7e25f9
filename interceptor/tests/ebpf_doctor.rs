#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! `doctor` against a real PostgreSQL: it must find where the server listens and call out the
//! ways around interceptor (an unsteered TCP port, a unix socket directory others can enter).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use interceptor::ebpf::{Account, Severity, SteeringConfig, doctor_with};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn available() -> bool {
    let required = std::env::var("INTERCEPTOR_REQUIRE_BPF").is_ok_and(|v| v == "1");
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root")
    } else if !Path::new(PG_BIN).join("initdb").exists() {
        Some("PostgreSQL 15 binaries missing")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if required => panic!("doctor test: INTERCEPTOR_REQUIRE_BPF=1 but {p}"),
        Some(p) => {
            // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must show.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPING doctor test: {p} !!!!!!!!\n"
            );
            false
        }
    }
}

fn as_postgres(args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Cluster {
    data: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.data)
            .output();
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, gid) }, 0);
}

fn postgres_uid() -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| l.strip_prefix("postgres:x:"))
        .and_then(|r| r.split(':').next())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn doctor_finds_postgres_bypass_paths() {
    if !available() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("ic-doctor-")
        .tempdir_in("/tmp")
        .unwrap();
    let pg_uid = postgres_uid();
    // A group nobody belongs to stands for interceptor's dedicated group.
    let proxy = Account {
        uid: 54_321,
        gid: 54_321,
    };
    chown(tmp.path(), pg_uid, 0);
    let data = tmp.path().join("data");
    let sock = tmp.path().join("sock");
    std::fs::create_dir(&sock).unwrap();
    chown(&sock, pg_uid, proxy.gid);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = 20_000 + (std::process::id() % 20_000) as u16;

    as_postgres(&[
        &format!("{PG_BIN}/initdb"),
        "-D",
        data.to_str().unwrap(),
        "-A",
        "trust",
        "-U",
        "postgres",
    ]);
    let cluster = Cluster { data: data.clone() };
    as_postgres(&[
        &format!("{PG_BIN}/pg_ctl"),
        "start",
        "-w",
        "-D",
        data.to_str().unwrap(),
        "-l",
        tmp.path().join("log").to_str().unwrap(),
        "-o",
        &format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            sock.display()
        ),
    ]);
    // The server holds its socket dir at its own mode; re-open it to everyone for the first run.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();

    let cfg = SteeringConfig {
        pin_dir: tmp.path().join("no-pins"),
        ..SteeringConfig::default()
    };
    let findings = doctor_with(&cfg, Some(proxy));
    let text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    eprintln!("{}", text.join("\n"));
    let has = |sev: Severity, needle: &str| {
        findings
            .iter()
            .any(|f| f.severity == sev && f.message.contains(needle))
    };
    assert!(
        has(
            Severity::Fail,
            &format!("listens on 127.0.0.1:{port}, which is not steered")
        ),
        "{text:#?}"
    );
    let dir = sock.display().to_string();
    assert!(
        findings.iter().any(|f| f.severity == Severity::Fail
            && f.message.contains("every local user")
            && f.message.contains(&dir)),
        "{text:#?}"
    );
    assert!(has(Severity::Warn, "not attached"), "{text:#?}");

    // Guarded as documented: owner postgres, interceptor's group, no access for others.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o750)).unwrap();
    let findings = doctor_with(&cfg, Some(proxy));
    let text: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    let about_dir: Vec<_> = findings
        .iter()
        .filter(|f| f.message.contains(&dir))
        .collect();
    assert!(!about_dir.is_empty(), "{text:#?}");
    assert!(
        about_dir.iter().all(|f| f.severity == Severity::Ok),
        "{about_dir:#?}"
    );
    drop(cluster);
}

/// Unmounts (lazily) on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A pin dir on a bpffs mounted somewhere other than /sys/fs/bpf is fine (no warning about
/// /sys/fs/bpf); a pin dir on a plain filesystem fails, naming the dir.
#[test]
fn doctor_accepts_a_pin_dir_on_another_bpffs_mount() {
    if !available() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("ic-doctor-bpffs-")
        .tempdir_in("/tmp")
        .unwrap();
    let mnt = tmp.path().join("bpf");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount -t bpf: {out:?}");
    let _mounted = Mounted(mnt.clone());
    let bpffs = |pin_dir: PathBuf| {
        let cfg = SteeringConfig {
            pin_dir,
            ..SteeringConfig::default()
        };
        let found: Vec<_> = doctor_with(&cfg, None)
            .into_iter()
            .filter(|f| f.check == "bpffs")
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found.into_iter().next().unwrap()
    };
    // Before the first attach the pin dir does not exist yet: its parent is what counts.
    let pin = mnt.join("interceptor");
    let f = bpffs(pin.clone());
    assert_eq!(f.severity, Severity::Ok, "{f}");
    assert!(f.message.contains(&pin.display().to_string()), "{f}");
    std::fs::create_dir(&pin).unwrap();
    assert_eq!(bpffs(pin).severity, Severity::Ok);

    let plain = tmp.path().join("plain");
    let f = bpffs(plain.clone());
    assert_eq!(f.severity, Severity::Fail, "{f}");
    assert!(
        f.message.contains(&plain.display().to_string()) && f.message.contains("not on a bpffs"),
        "{f}"
    );
}
