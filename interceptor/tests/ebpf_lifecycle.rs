#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! Crash and restart: the pinned programs keep refusing connections while interceptor is dead
//! (never handing them to PostgreSQL), a new instance re-adopts the pins, and detach uninstalls.

mod ebpf_common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ebpf_common::*;
use interceptor::ebpf::{self, Steering, SteeringConfig};

const HELPER: &str = "helper_interceptor_process";

/// Not a test: the "interceptor" process that the lifecycle test starts and kills.
#[test]
#[ignore = "helper process started by crash_refuses_restart_readopts_detach_uninstalls"]
fn helper_interceptor_process() {
    let (Ok(netns), Ok(cgroup), Ok(pin)) = (
        std::env::var("IC_HELPER_NETNS"),
        std::env::var("IC_HELPER_CGROUP"),
        std::env::var("IC_HELPER_PIN"),
    ) else {
        panic!("helper started without its environment");
    };
    let ns = std::fs::File::open(netns).unwrap();
    assert_eq!(
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
        0
    );
    let v4 = listen("127.0.0.1:6432");
    let v6 = listen("[::1]:6432");
    let cfg = SteeringConfig {
        enabled: true,
        ports: vec![PROTECTED],
        cgroup: Some(PathBuf::from(cgroup)),
        pin_dir: PathBuf::from(pin),
        ..SteeringConfig::default()
    };
    let steering = Steering::attach(&cfg, &fds(&[&v4, &v6])).unwrap();
    println!("READY");
    loop {
        for l in [&v4, &v6] {
            if let Ok((stream, peer)) = l.accept() {
                serve(Some(&steering), stream, peer);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the helper if the test fails half-way.
struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn link_ids(pin: &PinDir) -> BTreeSet<u32> {
    ebpf::status(&pin.0)
        .unwrap()
        .links
        .iter()
        .filter_map(|l| l.link_id)
        .collect()
}

fn live_link_ids() -> BTreeSet<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect()
}

#[test]
fn crash_refuses_restart_readopts_detach_uninstalls() {
    if !bpf_available("crash_refuses_restart_readopts_detach_uninstalls") {
        return;
    }
    let ns = NetNs::new();
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let decoy = {
        let _in = InNetNs::enter(&ns);
        listen(&format!("0.0.0.0:{PROTECTED}"))
    };
    let client = |host| ClientSpec {
        netns: &ns,
        cgroup: Some(&cgroup),
        uid: 65534,
        gid: 65534,
        host,
        port: PROTECTED,
        tfo: false,
    };

    // 1. interceptor runs (a separate process) and serves.
    let mut helper = Helper(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                HELPER,
                "--nocapture",
                "--test-threads=1",
            ])
            .env("IC_HELPER_NETNS", format!("/run/netns/{}", ns.name))
            .env("IC_HELPER_CGROUP", &cgroup.path)
            .env("IC_HELPER_PIN", &pin.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(helper.0.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("helper exited before READY").unwrap();
        if line.trim_end().ends_with("READY") {
            break;
        }
    }
    let reply = client_alone(&client("127.0.0.1"));
    assert!(reply.starts_with("REPLY uid=65534 pid="), "{reply}");
    assert_nothing_waiting(&decoy, "decoy while interceptor runs");
    let first_links = link_ids(&pin);
    assert_eq!(first_links.len(), 4);

    // 2. interceptor crashes: steering stays, connections are refused, PostgreSQL gets nothing.
    helper.0.kill().unwrap();
    helper.0.wait().unwrap();
    let st = ebpf::status(&pin.0).unwrap();
    assert!(st.attached(), "pins must survive the crash: {st:?}");
    for host in ["127.0.0.1", "127.0.0.9", "::1", "::ffff:127.0.0.1"] {
        assert_eq!(client_alone(&client(host)), "REFUSED", "{host}");
    }
    assert_nothing_waiting(&decoy, "decoy while interceptor is down");
    let st = ebpf::status(&pin.0).unwrap();
    assert_eq!(st.counters.dropped, 4, "{st:?}");
    assert_eq!(st.counters.steered, 1, "{st:?}");

    // 3. A new instance re-adopts the pinned maps (counters carry over) and replaces the links.
    let (v4, v6) = {
        let _in = InNetNs::enter(&ns);
        (listen("127.0.0.1:6432"), listen("[::1]:6432"))
    };
    let steering = {
        let _in = InNetNs::enter(&ns);
        let cfg = SteeringConfig {
            enabled: true,
            ports: vec![PROTECTED],
            cgroup: Some(cgroup.path.clone()),
            pin_dir: pin.0.clone(),
            ..SteeringConfig::default()
        };
        Steering::attach(&cfg, &fds(&[&v4, &v6])).unwrap()
    };
    let out = exchange(Some(&steering), &[&v4, &v6], &client("::1"));
    let id = out
        .accepted
        .and_then(|a| a.identity)
        .expect("identity after restart");
    assert_eq!((id.uid, id.pid), (65534, out.client_pid));
    assert_nothing_waiting(&decoy, "decoy after restart");
    let st = ebpf::status(&pin.0).unwrap();
    assert_eq!(st.counters.dropped, 4, "maps must be re-adopted: {st:?}");
    assert_eq!(st.counters.steered, 2, "{st:?}");
    let second_links = link_ids(&pin);
    assert_eq!(second_links.len(), 4);
    assert!(first_links.is_disjoint(&second_links));
    let live = live_link_ids();
    assert!(
        first_links.is_disjoint(&live),
        "the crashed instance's links must be gone: {first_links:?} in {live:?}"
    );

    // 4. Uninstall: nothing pinned, nothing attached, the port reaches its own listener again.
    drop(steering);
    ebpf::detach(&pin.0).unwrap();
    assert!(!pin.0.exists());
    let live = live_link_ids();
    assert!(
        second_links.is_disjoint(&live),
        "detach left links: {live:?}"
    );
    let spec = client("127.0.0.1");
    let mut child = spawn_client(&spec);
    let (stream, _) = accept_within(&decoy, "decoy after detach");
    drop(stream);
    child.wait().unwrap();
}

/// `interceptor ebpf detach` without the privileges (the real binary, as uids nobody and daemon): detach fails with one plain line naming the pin dir and
/// what it needs (exit 1, no panic, no backtrace) and leaves every program attached; as root it
/// uninstalls.
#[test]
fn detach_without_privileges_is_refused_plainly() {
    if !bpf_available("detach_without_privileges_is_refused_plainly") {
        return;
    }
    let ns = NetNs::new();
    let _in = InNetNs::enter(&ns);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let v4 = listen("127.0.0.1:6432");
    let steering = Steering::attach(&config(&cgroup, &pin), &fds(&[&v4])).unwrap();
    let attached = link_ids(&pin);
    assert_eq!(attached.len(), 4, "{attached:?}");

    // A hard link in a directory everyone may enter: the build's target dir may not be.
    let bin_dir = tempfile::Builder::new()
        .prefix("ic-bin-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        bin_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = bin_dir.path().join("interceptor");
    let real = interceptor_tests::proxy::interceptor_bin().unwrap();
    if std::fs::hard_link(&real, &bin).is_err() {
        std::fs::copy(&real, &bin).unwrap();
    }
    let pin_arg = pin.0.display().to_string();
    let bin_arg = bin.display().to_string();
    let detach = ["ebpf", "detach", "--pin-dir", &pin_arg];
    // (Not uid 0 without capabilities: the pins are root's files, and on kernels that let
    // BPF_OBJ_GET and BPF_LINK_DETACH through on file permissions it can detach.)
    let unprivileged: [(&str, Vec<&str>); 2] = [
        ("nobody", vec!["runuser", "-u", "nobody", "--", &bin_arg]),
        ("daemon", vec!["runuser", "-u", "daemon", "--", &bin_arg]),
    ];
    // status neither claims "NOT attached" nor hides why it cannot tell.
    let status = Command::new("runuser")
        .args(["-u", "nobody", "--", &bin_arg])
        .args(["ebpf", "status", "--pin-dir", &pin_arg])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        status.status.code() == Some(1)
            && status.stdout.is_empty()
            && stderr.contains("permission denied")
            && stderr.contains("run it as root"),
        "status as nobody: {status:?}"
    );
    for (who, prefix) in &unprivileged {
        let out = Command::new(prefix[0])
            .args(&prefix[1..])
            .args(detach)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{who}: {out:?}");
        assert!(
            stderr.contains("permission denied")
                && stderr.contains(&pin_arg)
                && stderr.contains("run it as root"),
            "{who}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{who}: {stderr}");
        assert!(
            !stderr.contains("backtrace") && !stderr.contains("panicked"),
            "{who}: {stderr}"
        );
        assert_eq!(link_ids(&pin), attached, "{who} detached something");
    }

    let out = Command::new(&bin).args(detach).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("detached 4 program link(s)"),
        "{out:?}"
    );
    assert!(link_ids(&pin).is_empty());
    drop(steering);
}
