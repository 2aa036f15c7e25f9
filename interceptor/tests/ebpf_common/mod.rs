//! Shared fixtures of the eBPF tests: a private network namespace, a child cgroup v2, a private
//! pin directory, client processes under chosen uids, and an accept loop that asks
//! `Steering::identity_for` about every connection.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use interceptor::ebpf::{self, Steering, SteeringConfig};
use interceptor::identity::ProcessIdentity;

pub(crate) const PROTECTED: u16 = 5432;

/// Whether the eBPF tests can run here. Without root or without the eBPF object they are skipped
/// loudly, unless INTERCEPTOR_REQUIRE_BPF=1 makes that a failure.
pub(crate) fn bpf_available(test: &str) -> bool {
    let required = std::env::var("INTERCEPTOR_REQUIRE_BPF").is_ok_and(|v| v == "1");
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root")
    } else if ebpf::embedded_object().is_none() {
        Some("eBPF support not compiled in (cargo xtask build-ebpf, then rebuild)")
    } else if !Path::new("/usr/bin/python3").exists() {
        Some("/usr/bin/python3 (test client) missing")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if required => panic!("{test}: INTERCEPTOR_REQUIRE_BPF=1 but {p}"),
        Some(p) => {
            // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must show.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPING {test}: {p} (set INTERCEPTOR_REQUIRE_BPF=1 to fail) !!!!!!!!\n"
            );
            false
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace with loopback up, deleted on drop.
pub(crate) struct NetNs {
    pub name: String,
    pub file: File,
}

impl NetNs {
    pub(crate) fn new() -> NetNs {
        let name = unique("icns");
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let file = File::open(format!("/run/netns/{name}")).unwrap();
        NetNs { name, file }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Switches the calling thread into a network namespace until dropped.
pub(crate) struct InNetNs {
    previous: File,
}

impl InNetNs {
    pub(crate) fn enter(ns: &NetNs) -> InNetNs {
        let previous = File::open("/proc/thread-self/ns/net").unwrap();
        assert_eq!(
            unsafe { libc::setns(ns.file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        InNetNs { previous }
    }
}

impl Drop for InNetNs {
    fn drop(&mut self) {
        unsafe { libc::setns(self.previous.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A child cgroup v2, removed on drop (its processes must be gone by then).
pub(crate) struct Cgroup {
    pub path: PathBuf,
    pub procs: File,
}

pub(crate) fn cgroup2_root() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    if let Some(p) = text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
    }) {
        return PathBuf::from(p);
    }
    std::fs::create_dir_all("/sys/fs/cgroup/unified").unwrap();
    run(
        "mount",
        &["-t", "cgroup2", "none", "/sys/fs/cgroup/unified"],
    );
    PathBuf::from("/sys/fs/cgroup/unified")
}

impl Cgroup {
    pub(crate) fn new() -> Cgroup {
        let path = cgroup2_root().join(unique("ic-test-"));
        std::fs::create_dir(&path).unwrap();
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .unwrap();
        Cgroup { path, procs }
    }

    /// A child cgroup `name` of this one (drop it before its parent).
    pub(crate) fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap();
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .unwrap();
        Cgroup { path, procs }
    }

    /// The path as /proc/<pid>/cgroup shows it (relative to the cgroup2 root).
    pub(crate) fn rel_path(&self) -> String {
        let rel = self.path.strip_prefix(cgroup2_root()).unwrap();
        format!("/{}", rel.display())
    }

    pub(crate) fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).unwrap().ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A private pin directory, detached and removed on drop.
pub(crate) struct PinDir(pub PathBuf);

impl PinDir {
    pub(crate) fn new() -> PinDir {
        PinDir(PathBuf::from("/sys/fs/bpf").join(unique("ic-test-")))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = ebpf::detach(&self.0) {
            eprintln!("cleanup: detach {}: {e}", self.0.display());
        }
    }
}

/// A listening socket with TCP Fast Open enabled.
pub(crate) fn listen(addr: &str) -> TcpListener {
    let l = TcpListener::bind(addr).unwrap();
    let qlen: libc::c_int = 16;
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&qlen as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    l.set_nonblocking(true).unwrap();
    l
}

pub(crate) fn config(cgroup: &Cgroup, pin: &PinDir) -> SteeringConfig {
    SteeringConfig {
        enabled: true,
        ports: vec![PROTECTED],
        cgroup: Some(cgroup.path.clone()),
        pin_dir: pin.0.clone(),
        ..SteeringConfig::default()
    }
}

const CLIENT: &str = r#"
import socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
try:
    if mode == 'tfo':
        # Blocking: a non-blocking sendto(MSG_FASTOPEN) without a cookie yet returns EINPROGRESS.
        s.sendto(b'hello\n', socket.MSG_FASTOPEN, (host, port))
        s.settimeout(10)
    else:
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(b'hello\n')
    line = s.makefile().readline().strip()
    print('REPLY ' + line, flush=True)
except ConnectionRefusedError:
    print('REFUSED', flush=True)
except Exception as e:
    print('ERROR %r' % (e,), flush=True)
"#;

/// Where and as whom a client process runs.
pub(crate) struct ClientSpec<'a> {
    pub netns: &'a NetNs,
    pub cgroup: Option<&'a Cgroup>,
    pub uid: u32,
    pub gid: u32,
    pub host: &'a str,
    pub port: u16,
    pub tfo: bool,
}

pub(crate) fn spawn_client(spec: &ClientSpec<'_>) -> Child {
    let ns_fd = spec.netns.file.as_raw_fd();
    let procs_fd = spec.cgroup.map(|c| c.procs.as_raw_fd());
    let (uid, gid) = (spec.uid, spec.gid);
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([
        "-I",
        "-c",
        CLIENT,
        spec.host,
        &spec.port.to_string(),
        if spec.tfo { "tfo" } else { "connect" },
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .current_dir("/");
    // Only raw system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

/// A connection that reached one of the test listeners.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub identity: Option<ProcessIdentity>,
}

#[derive(Debug)]
pub(crate) struct Outcome {
    pub client_pid: u32,
    /// The client's own report: `REPLY ...`, `REFUSED` or `ERROR ...`.
    pub client: String,
    pub accepted: Option<Accepted>,
}

impl Outcome {
    pub(crate) fn refused(&self) -> bool {
        self.client == "REFUSED" && self.accepted.is_none()
    }
}

/// Runs one client while serving `listeners`; looks up each accepted connection's identity.
pub(crate) fn exchange(
    steering: Option<&Steering>,
    listeners: &[&TcpListener],
    spec: &ClientSpec<'_>,
) -> Outcome {
    let mut child = spawn_client(spec);
    let client_pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut accepted = None;
    loop {
        assert!(Instant::now() < deadline, "client {} hangs", spec.host);
        let mut progressed = false;
        for l in listeners {
            match l.accept() {
                Ok((stream, peer)) => {
                    accepted = Some(serve(steering, stream, peer));
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if !progressed {
            if let Some(_status) = child.try_wait().unwrap() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let out = child.wait_with_output().unwrap();
    let client = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().is_empty(), "client stderr: {stderr}");
    Outcome {
        client_pid,
        client,
        accepted,
    }
}

pub(crate) fn serve(steering: Option<&Steering>, stream: TcpStream, peer: SocketAddr) -> Accepted {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let local = stream.local_addr().unwrap();
    // Identity is looked up right after accept(), as interceptor does.
    let identity = steering.and_then(|s| s.identity_for(peer, local));
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n", "from {peer} to {local}");
    let reply = match &identity {
        Some(id) => format!("uid={} pid={} local={local}\n", id.uid, id.pid),
        None => format!("anonymous local={local}\n"),
    };
    (&stream).write_all(reply.as_bytes()).unwrap();
    Accepted {
        peer,
        local,
        identity,
    }
}

pub(crate) fn fds<'a>(ls: &'a [&'a TcpListener]) -> Vec<BorrowedFd<'a>> {
    ls.iter().map(|l| l.as_fd()).collect()
}

pub(crate) fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Runs a client that no test listener serves; returns its report.
pub(crate) fn client_alone(spec: &ClientSpec<'_>) -> String {
    let out = spawn_client(spec).wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub(crate) fn assert_nothing_waiting(l: &TcpListener, what: &str) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{what}: unexpected connection {other:?}"),
    }
}

/// Accepts one connection within a few seconds.
pub(crate) fn accept_within(l: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match l.accept() {
            Ok(c) => return c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "{what}: nothing arrived");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}
