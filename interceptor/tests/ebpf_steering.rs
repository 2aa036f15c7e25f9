#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! Bypass battery: every way to reach the protected port in the test's network namespace ends at
//! interceptor's listener (with the right identity for local clients) or is refused.

mod ebpf_common;

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use ebpf_common::*;
use interceptor::ebpf::{self, Steering};

const NOBODY: (u32, u32) = (65534, 65534);

struct Fixture {
    ns: NetNs,
    peer_ns: NetNs,
    cgroup: Cgroup,
    pin: PinDir,
    v4: TcpListener,
    v6: TcpListener,
    decoy: TcpListener,
    steering: Steering,
    subnet: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixture() -> Fixture {
    let ns = NetNs::new();
    let peer_ns = NetNs::new();
    // A veth pair from a second namespace: a "remote" host.
    // Each test has namespaces of its own, so a fixed subnet cannot collide.
    let subnet = "10.77.0".to_string();
    let (a, b) = (unique("va"), unique("vb"));
    ip(&[
        "link",
        "add",
        &a,
        "netns",
        &ns.name,
        "type",
        "veth",
        "peer",
        "name",
        &b,
        "netns",
        &peer_ns.name,
    ]);
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{subnet}.1/24"),
        "dev",
        &a,
    ]);
    ip(&[
        "-n",
        &peer_ns.name,
        "addr",
        "add",
        &format!("{subnet}.2/24"),
        "dev",
        &b,
    ]);
    ip(&["-n", &ns.name, "link", "set", &a, "up"]);
    ip(&["-n", &peer_ns.name, "link", "set", &b, "up"]);
    ip(&["-n", &peer_ns.name, "link", "set", "lo", "up"]);

    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let guard = InNetNs::enter(&ns);
    let v4 = listen("127.0.0.1:6432");
    let v6 = listen("[::1]:6432");
    // What must never be reached: a "PostgreSQL" on the protected port itself.
    let decoy = listen(&format!("0.0.0.0:{PROTECTED}"));
    let steering = Steering::attach(&config(&cgroup, &pin), &fds(&[&v4, &v6])).unwrap();
    drop(guard);
    Fixture {
        ns,
        peer_ns,
        cgroup,
        pin,
        v4,
        v6,
        decoy,
        steering,
        subnet,
    }
}

impl Fixture {
    fn client(&self, host: &str, uid: (u32, u32)) -> Outcome {
        self.client_with(host, uid, false, &self.ns)
    }

    fn client_with(&self, host: &str, uid: (u32, u32), tfo: bool, ns: &NetNs) -> Outcome {
        let spec = ClientSpec {
            netns: ns,
            cgroup: Some(&self.cgroup),
            uid: uid.0,
            gid: uid.1,
            host,
            port: PROTECTED,
            tfo,
        };
        let out = exchange(Some(&self.steering), &[&self.v4, &self.v6], &spec);
        self.assert_decoy_untouched();
        out
    }

    fn assert_decoy_untouched(&self) {
        match self.decoy.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a connection reached the decoy PostgreSQL: {other:?}"),
        }
    }

    /// The connection reached interceptor's listener on the address the client dialled, and the
    /// kernel attested the client process.
    fn assert_local(&self, out: &Outcome, dialled: &str, uid: u32) {
        let acc = out
            .accepted
            .as_ref()
            .unwrap_or_else(|| panic!("{dialled}: not accepted: {out:?}"));
        assert_eq!(acc.local.port(), PROTECTED, "{dialled}: no NAT expected");
        let id = acc
            .identity
            .as_ref()
            .unwrap_or_else(|| panic!("{dialled}: no identity: {out:?}"));
        assert_eq!(id.pid, out.client_pid, "{dialled}");
        assert_eq!(id.uid, uid, "{dialled}");
        assert_eq!(id.gid, uid, "{dialled}");
        assert!(id.comm.starts_with("python3"), "{dialled}: {id:?}");
        assert_eq!(id.cgroup_id, self.cgroup.id(), "{dialled}");
        let rel = self
            .cgroup
            .path
            .strip_prefix(cgroup2_root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            id.cgroup_path.as_deref(),
            Some(&*format!("/{rel}")),
            "{dialled}"
        );
        assert!(
            out.client
                .starts_with(&format!("REPLY uid={uid} pid={}", out.client_pid)),
            "{dialled}: {out:?}"
        );
    }
}

#[test]
fn every_path_to_the_protected_port_ends_at_interceptor() {
    if !bpf_available("every_path_to_the_protected_port_ends_at_interceptor") {
        return;
    }
    let f = fixture();

    // Loopback in all its spellings, from an unprivileged local process.
    for host in [
        "127.0.0.1",
        "127.0.0.2",
        "127.1.2.3",
        "::1",
        "::ffff:127.0.0.1",
    ] {
        let out = f.client(host, NOBODY);
        f.assert_local(&out, host, NOBODY.0);
        let acc = out.accepted.as_ref().unwrap();
        if host == "::1" {
            assert!(acc.local.is_ipv6(), "::1 must use the IPv6 listener");
        } else {
            // IPv4 and IPv4-mapped IPv6 both arrive as IPv4.
            assert!(acc.local.is_ipv4(), "{host}: {acc:?}");
        }
    }

    // The host's own non-loopback address.
    let nic = format!("{}.1", f.subnet);
    let out = f.client(&nic, NOBODY);
    f.assert_local(&out, &nic, NOBODY.0);

    // TCP Fast Open (data in the SYN via sendto(MSG_FASTOPEN)).
    let out = f.client_with("127.0.0.1", NOBODY, true, &f.ns);
    f.assert_local(&out, "127.0.0.1 (TFO)", NOBODY.0);

    // A remote host over the veth pair: steered, but never given a local identity — even though
    // the client process sits in the attached cgroup.
    let out = f.client_with(&nic, NOBODY, false, &f.peer_ns);
    let acc = out
        .accepted
        .as_ref()
        .expect("remote client must be steered");
    assert_eq!(acc.local.port(), PROTECTED);
    assert!(acc.identity.is_none(), "remote got an identity: {acc:?}");
    assert!(out.client.starts_with("REPLY anonymous"), "{out:?}");

    let st = ebpf::status(&f.pin.0).unwrap();
    assert!(st.attached(), "{st:?}");
    assert_eq!(st.steered_ports, vec![PROTECTED]);
    assert_eq!(st.identified_ports, vec![6432]);
    assert_eq!(st.counters.steered, 8, "{st:?}");
    assert_eq!(st.counters.dropped, 0, "{st:?}");
    assert!(st.counters.identified >= 8, "{st:?}");
}

#[test]
fn different_uids_get_different_identities() {
    if !bpf_available("different_uids_get_different_identities") {
        return;
    }
    let f = fixture();
    let a = f.client("127.0.0.1", NOBODY);
    let b = f.client("127.0.0.1", (4242, 4243));
    f.assert_local(&a, "127.0.0.1", NOBODY.0);
    let idb = b
        .accepted
        .as_ref()
        .and_then(|a| a.identity.clone())
        .unwrap();
    assert_eq!((idb.uid, idb.gid, idb.pid), (4242, 4243, b.client_pid));
    let ida = a
        .accepted
        .as_ref()
        .and_then(|a| a.identity.clone())
        .unwrap();
    assert_ne!(ida.uid, idb.uid);
    assert_ne!(ida.pid, idb.pid);
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    assert_eq!(idb.exe.as_deref(), Some(&*python.to_string_lossy()));
}

#[test]
fn outside_the_cgroup_there_is_no_identity_but_still_steering() {
    if !bpf_available("outside_the_cgroup_there_is_no_identity_but_still_steering") {
        return;
    }
    let f = fixture();
    let spec = ClientSpec {
        netns: &f.ns,
        cgroup: None,
        uid: NOBODY.0,
        gid: NOBODY.1,
        host: "127.0.0.1",
        port: PROTECTED,
        tfo: false,
    };
    let out = exchange(Some(&f.steering), &[&f.v4, &f.v6], &spec);
    f.assert_decoy_untouched();
    let acc = out.accepted.expect("steered");
    assert!(acc.identity.is_none());
}

#[test]
fn listeners_of_another_namespace_are_refused() {
    if !bpf_available("listeners_of_another_namespace_are_refused") {
        return;
    }
    let ns = NetNs::new();
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let v4 = {
        let _in = InNetNs::enter(&ns);
        listen("127.0.0.1:6432")
    };
    // Called from the host namespace: nothing may get attached there.
    let err = Steering::attach(&config(&cgroup, &pin), &fds(&[&v4])).unwrap_err();
    assert!(
        err.to_string().contains("another network namespace"),
        "{err}"
    );
    let st = ebpf::status(&pin.0).unwrap();
    assert!(st.links.iter().all(|l| !l.pinned), "{st:?}");
}

/// With server-side TCP Fast Open the listener may accept a connection as soon as its SYN (with
/// data) arrives, before the client has processed the SYN-ACK. The identity must already be there.
#[test]
fn tfo_accepted_at_the_syn_has_its_identity() {
    if !bpf_available("tfo_accepted_at_the_syn_has_its_identity") {
        return;
    }
    const ROUNDS: usize = 300;
    let f = fixture();
    // Client and server TFO, no cookie needed: every SYN carries data and is accepted at once.
    let out = Command::new("ip")
        .args(["netns", "exec", &f.ns.name, "sysctl", "-q", "-w"])
        .arg(format!(
            "net.ipv4.tcp_fastopen={}",
            0x1 | 0x2 | 0x4 | 0x200 | 0x400
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    const LOOP: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
syn_data = 0
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.sendto(b'hello\n', socket.MSG_FASTOPEN, (host, port))
    s.settimeout(10)
    s.recv(100)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    syn_data += 1 if info[5] & 32 else 0
    s.close()
print('SYN_DATA %d' % syn_data, flush=True)
"#;
    let ns_fd = f.ns.file.as_raw_fd();
    let procs_fd = f.cgroup.procs.as_raw_fd();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-I", "-c", LOOP, "127.0.0.1", &PROTECTED.to_string()])
        .arg(ROUNDS.to_string())
        .stdout(std::process::Stdio::piped())
        .current_dir("/");
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                || libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setuid(NOBODY.0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().unwrap();
    let client_pid = child.id();
    // Accept as fast as possible (spinning) to give the race every chance.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut missing = 0;
    for _ in 0..ROUNDS {
        let (stream, peer) = loop {
            match f.v4.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "client stalled");
                    std::hint::spin_loop();
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let local = stream.local_addr().unwrap();
        match f.steering.identity_for(peer, local) {
            Some(id) => assert_eq!((id.pid, id.uid), (client_pid, NOBODY.0)),
            None => missing += 1,
        }
        stream.set_nonblocking(false).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line).unwrap();
        std::io::Write::write_all(&mut &stream, b"ok\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        report.trim(),
        format!("SYN_DATA {ROUNDS}"),
        "TFO was not used"
    );
    assert_eq!(
        missing, 0,
        "{missing} of {ROUNDS} TFO connections had no identity at accept"
    );
    f.assert_decoy_untouched();
}
