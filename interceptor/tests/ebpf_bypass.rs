#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! The bypass battery: a real PostgreSQL (listening on every address, `log_connections = on`), the
//! real interceptor binary with `[ebpf] enabled = true` in front of it, and real clients (psql,
//! tokio-postgres over TCP Fast Open) aimed at PostgreSQL's own port on every address a local or
//! remote client could use, plus the unix socket paths. Each attempt must either land in
//! interceptor (its audit record shows who connected) or be refused; PostgreSQL's own log must show
//! no connection that did not come from interceptor (whose upstream is PostgreSQL's unix socket,
//! logged as `[local]`). Then kill -9 interceptor: every attempt is refused; restart: they land
//! again.
//!
//! Everything runs in a private network namespace (PostgreSQL, interceptor and the clients inherit
//! the test thread's namespace), a second namespace over a veth pair plays the remote host, and the
//! kernel programs are attached to a test cgroup and pinned in a test pin dir.
//!
//! Negative control: `IC_BYPASS_STEERING=off` starts interceptor with `[ebpf] enabled = false`;
//! the battery must then fail (PostgreSQL serves the attempts itself).

mod ebpf_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use ebpf_common::*;
use interceptor_tests::os::{pg_bin_dir, wait_with_deadline};
use interceptor_tests::pg::{APP_DB, APP_RO};
use interceptor_tests::{
    ALICE, ALICE_PASSWORD, Interceptor, InterceptorSetup, PgCluster, PgOptions,
};
use serde_json::Value;

const NOBODY: (u32, u32) = (65534, 65534);
const DAEMON: (u32, u32) = (1, 1);
const HOST_ADDR: &str = "10.78.0.1";
const REMOTE_ADDR: &str = "10.78.0.2";
const HOST_ADDR6: &str = "fd78::1";
const REMOTE_ADDR6: &str = "fd78::2";
/// The host's NIC addresses as the remote host dials them, with the remote host's own address.
const REMOTE_PATHS: [(&str, &str); 2] = [(HOST_ADDR, REMOTE_ADDR), (HOST_ADDR6, REMOTE_ADDR6)];
const HELPER: &str = "helper_tfo_client";

/// The private "host" namespace and a "remote host" namespace joined to it by a veth pair.
struct Net {
    host: NetNs,
    remote: NetNs,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new() -> Net {
        let host = NetNs::new();
        let remote = NetNs::new();
        let (a, b) = (unique("vh"), unique("vr"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &host.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &remote.name,
        ]);
        ip(&[
            "-n",
            &host.name,
            "addr",
            "add",
            &format!("{HOST_ADDR}/24"),
            "dev",
            &a,
        ]);
        ip(&[
            "-n",
            &remote.name,
            "addr",
            "add",
            &format!("{REMOTE_ADDR}/24"),
            "dev",
            &b,
        ]);
        // nodad: the addresses are usable at once, no duplicate address detection to wait for.
        for (ns, addr, dev) in [(&host, HOST_ADDR6, &a), (&remote, REMOTE_ADDR6, &b)] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
        ip(&["-n", &host.name, "link", "set", &a, "up"]);
        ip(&["-n", &remote.name, "link", "set", &b, "up"]);
        // TCP Fast Open for every listener and without cookies, so that the first SYN already
        // carries the startup packet and the server accepts the connection at the SYN.
        let out = Command::new("ip")
            .args(["netns", "exec", &host.name, "sysctl", "-q", "-w"])
            .arg(format!(
                "net.ipv4.tcp_fastopen={}",
                0x1 | 0x2 | 0x4 | 0x200 | 0x400
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Net { host, remote }
    }
}

/// Where and as whom one psql attempt runs.
struct Attempt<'a> {
    label: String,
    netns: &'a NetNs,
    uid: (u32, u32),
    /// An address, or a unix socket directory.
    host: String,
    port: u16,
}

#[derive(Debug)]
struct PsqlRun {
    pid: u32,
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs psql as `attempt` says, inside `cgroup`: a query that reports PostgreSQL's backend pid and
/// the client address PostgreSQL sees.
fn psql(attempt: &Attempt<'_>, cgroup: &Cgroup) -> PsqlRun {
    let ns_fd = attempt.netns.file.as_raw_fd();
    let procs_fd = cgroup.procs.as_raw_fd();
    let (uid, gid) = attempt.uid;
    let mut cmd = Command::new(pg_bin_dir().join("psql"));
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PGHOST", &attempt.host)
        .env("PGPORT", attempt.port.to_string())
        .env("PGUSER", ALICE)
        .env("PGPASSWORD", ALICE_PASSWORD)
        .env("PGDATABASE", APP_DB)
        .env("PGAPPNAME", &attempt.label)
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT pg_backend_pid() || ' ' || coalesce(host(inet_client_addr()), 'local')",
        ])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Only raw system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
                || libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = wait_output(child, &attempt.label);
    PsqlRun {
        pid,
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

fn psql_exe() -> String {
    std::fs::canonicalize(pg_bin_dir().join("psql"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn wait_output(mut child: std::process::Child, what: &str) -> std::process::Output {
    // Pipes are small and the outputs tiny: waiting first cannot deadlock.
    let status = wait_with_deadline(&mut child, Duration::from_secs(30)).unwrap();
    assert!(status.is_some(), "{what}: client hangs");
    child.wait_with_output().unwrap()
}

/// Waits for interceptor's `n`th "ready" log line: the harness only waits for its TCP port, which
/// accepts (into the backlog) before the kernel programs are attached.
fn wait_until_ready(proxy: &Interceptor, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.logs().matches("interceptor ready").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "interceptor not ready:\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `(backend pid, host)` of every connection PostgreSQL received (`log_connections`).
fn pg_connections(pg: &PgCluster) -> Vec<(u32, String)> {
    const MARK: &str = "connection received: host=";
    pg.server_log()
        .lines()
        .filter_map(|line| {
            let host = line[line.find(MARK)? + MARK.len()..]
                .split_whitespace()
                .next()?
                .to_owned();
            let pid = line[line.find('[')? + 1..line.find(']')?].parse().ok()?;
            Some((pid, host))
        })
        .collect()
}

/// Every `session_start` record of the audit trail, by application name.
fn audit_sessions(proxy: &Interceptor) -> BTreeMap<String, Value> {
    proxy
        .audit_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["event"]["type"] == "session_start")
        .filter_map(|r| {
            let app = r["event"]["application_name"].as_str()?.to_owned();
            Some((app, r["event"].clone()))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    Unix,
    LocalTcp,
    /// From the other namespace: `peer.addr` must be the remote host's address.
    Remote(&'static str),
}

/// What an attempt that landed in interceptor must show.
struct Landed {
    label: String,
    /// The client process as the kernel must have attested it; `None` for the remote host.
    process: Option<(u32, u32)>,
    /// The executable interceptor must have read for it (psql clients).
    exe: Option<String>,
    peer: PeerKind,
    backend_pid: u32,
}

/// psql got a session whose backend PostgreSQL reached over its unix socket: interceptor's.
fn assert_served_via_interceptor(run: &PsqlRun, label: &str) -> u32 {
    assert!(run.ok, "{label}: psql failed: {}", run.stderr);
    let (bpid, client) = run
        .stdout
        .split_once(' ')
        .unwrap_or_else(|| panic!("{label}: unexpected output {:?}", run.stdout));
    assert_eq!(
        client, "local",
        "{label}: PostgreSQL saw the client at {client}: it bypassed interceptor"
    );
    bpid.parse().unwrap()
}

fn assert_refused(run: &PsqlRun, label: &str) {
    assert!(
        !run.ok && run.stdout.is_empty(),
        "{label}: must be refused while interceptor is down, got {run:?}"
    );
}

/// Not a test: a tokio-postgres client that opens its TCP connection with TCP Fast Open
/// (`TCP_FASTOPEN_CONNECT`: the startup packet rides on the SYN) and reports
/// `TFO <syn data acked 0|1> <backend pid> <client address PostgreSQL sees>`.
#[test]
#[ignore = "helper process started by bypass_battery"]
fn helper_tfo_client() {
    let (Ok(addr), Ok(app)) = (std::env::var("IC_TFO_ADDR"), std::env::var("IC_TFO_APP")) else {
        panic!("helper started without its environment");
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_FASTOPEN_CONNECT: {}",
        std::io::Error::last_os_error()
    );
    let rc = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe {
                libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe {
                libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        }
    };
    // With TCP_FASTOPEN_CONNECT, connect() returns at once; the SYN leaves with the first write.
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    let stream = std::net::TcpStream::from(sock);
    stream.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bpid, client) = rt.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(ALICE)
            .password(ALICE_PASSWORD)
            .dbname(APP_DB)
            .application_name(&app);
        let (client, conn) = cfg
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = client
            .simple_query(
                "SELECT pg_backend_pid()::text, coalesce(host(inet_client_addr()), 'local')",
            )
            .await
            .unwrap();
        let row = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .unwrap();
        (
            row.get(0).unwrap().to_owned(),
            row.get(1).unwrap().to_owned(),
        )
    });
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // The fd is still open: the runtime (and the connection task in it) is alive until here.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    const TCPI_OPT_SYN_DATA: u8 = 32;
    let syn_data = u8::from(info.tcpi_options & TCPI_OPT_SYN_DATA != 0);
    println!("TFO {syn_data} {bpid} {client}");
    drop(rt);
}

/// Runs [`helper_tfo_client`] as root inside `cgroup`; returns its pid and report.
fn tfo_client(addr: SocketAddr, label: &str, cgroup: &Cgroup) -> (u32, Vec<String>) {
    let procs_fd = cgroup.procs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        HELPER,
        "--nocapture",
        "--test-threads=1",
    ])
    .env("IC_TFO_ADDR", addr.to_string())
    .env("IC_TFO_APP", label)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = wait_output(child, label);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        // libtest prints the test's name on the same line first.
        .find_map(|l| Some(&l[l.find("TFO ")? + 4..]))
        .unwrap_or_else(|| {
            panic!(
                "{label}: no report from the TFO client:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (pid, report.split_whitespace().map(str::to_owned).collect())
}

#[test]
fn bypass_battery() {
    if !bpf_available("bypass_battery") {
        return;
    }
    let steering_on = std::env::var("IC_BYPASS_STEERING").as_deref() != Ok("off");
    let net = Net::new();
    // From here on this thread, and every process it starts (PostgreSQL, interceptor, clients),
    // lives in the private "host" namespace.
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();

    let pg = PgCluster::start_with(
        PgOptions::default()
            .log_connections(true)
            .extra_conf("listen_addresses = '*'"),
    )
    .unwrap();
    let pg_port = pg.port();
    // Everyone may log in over TCP from anywhere, and a role with alice's name and password
    // exists: a connection that slipped past interceptor would be served, not just logged.
    {
        use std::io::Write;
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data_dir().join("pg_hba.conf"))
            .unwrap();
        writeln!(hba, "host all all 0.0.0.0/0 scram-sha-256").unwrap();
        writeln!(hba, "host all all ::/0 scram-sha-256").unwrap();
    }
    pg.psql_db(
        "postgres",
        &format!(
            "CREATE ROLE {ALICE} LOGIN PASSWORD '{ALICE_PASSWORD}' IN ROLE {APP_RO}; \
             SELECT pg_reload_conf();"
        ),
    )
    .unwrap();

    // PostgreSQL's real socket directory (the harness's cluster dir, owned by the postgres
    // account). The harness leaves it open to everyone: doctor must call that a bypass.
    let pg_sock_dir = pg.socket_dir().to_path_buf();
    let socket_dir_fails = || {
        interceptor::ebpf::check_unix_socket_dir(&pg_sock_dir, None)
            .into_iter()
            .filter(|f| f.severity == interceptor::ebpf::Severity::Fail)
            .map(|f| f.message)
            .collect::<Vec<_>>()
    };
    std::fs::set_permissions(&pg_sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fails = socket_dir_fails();
    assert!(
        fails.iter().any(|m| m.contains("every local user")),
        "doctor must flag a world-reachable socket dir: {fails:?}"
    );
    // Guarded: only the postgres account (and root) may enter. interceptor runs as root here and
    // reaches the socket only because root bypasses permission checks; in production it runs as
    // its own account in the directory's group (mode 0750 or 0710).
    std::fs::set_permissions(&pg_sock_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fails = socket_dir_fails();
    assert!(fails.is_empty(), "{fails:?}");

    // The stand-in for /var/run/postgresql: where libpq looks by default, served by interceptor.
    let run_dir = tempfile::Builder::new()
        .prefix("ic-varrun-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(run_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let setup = InterceptorSetup::new(&pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RO))
        .allow_all_policies()
        .listen_v6(true)
        .unix_socket_at(run_dir.path(), pg_port)
        .extra_toml(&format!(
            "[ebpf]\nenabled = {steering_on}\nports = [{pg_port}]\ncgroup = {cg:?}\npin_dir = {pin:?}\n",
            cg = cgroup.path.display().to_string(),
            pin = pin.0.display().to_string(),
        ));
    let mut proxy = Interceptor::start(setup).unwrap();
    wait_until_ready(&proxy, 1);
    let connections_before = pg_connections(&pg);
    assert!(
        connections_before.iter().all(|(_, h)| h == "[local]"),
        "{connections_before:?}"
    );

    let tcp_targets = [
        "127.0.0.1",
        "127.0.0.2",
        "::1",
        "::ffff:127.0.0.1",
        HOST_ADDR,
        HOST_ADDR6,
    ];
    let mut landed: Vec<Landed> = Vec::new();
    let round = |round: &str, landed: &mut Vec<Landed>| {
        // Local clients under two uids on every address of the host.
        for (i, host) in tcp_targets.iter().enumerate() {
            let uid = if i % 2 == 0 { NOBODY } else { DAEMON };
            let attempt = Attempt {
                label: format!("{round}-local-{host}"),
                netns: &net.host,
                uid,
                host: host.to_string(),
                port: pg_port,
            };
            let run = psql(&attempt, &cgroup);
            let backend_pid = assert_served_via_interceptor(&run, &attempt.label);
            landed.push(Landed {
                label: attempt.label,
                process: Some((run.pid, uid.0)),
                exe: Some(psql_exe()),
                peer: PeerKind::LocalTcp,
                backend_pid,
            });
        }
        // A remote host (the other namespace) dialling the host's addresses: steered, no
        // kernel identity (even though the client sits in the identified cgroup).
        for (host_addr, remote_addr) in REMOTE_PATHS {
            let attempt = Attempt {
                label: format!("{round}-remote-{host_addr}"),
                netns: &net.remote,
                uid: NOBODY,
                host: host_addr.into(),
                port: pg_port,
            };
            let run = psql(&attempt, &cgroup);
            let backend_pid = assert_served_via_interceptor(&run, &attempt.label);
            landed.push(Landed {
                label: attempt.label,
                process: None,
                exe: None,
                peer: PeerKind::Remote(remote_addr),
                backend_pid,
            });
        }
        // The default unix socket path: interceptor's socket, the kernel names the peer.
        let attempt = Attempt {
            label: format!("{round}-unix-default"),
            netns: &net.host,
            uid: NOBODY,
            host: run_dir.path().display().to_string(),
            port: pg_port,
        };
        let run = psql(&attempt, &cgroup);
        let backend_pid = assert_served_via_interceptor(&run, &attempt.label);
        landed.push(Landed {
            label: attempt.label,
            process: Some((run.pid, NOBODY.0)),
            // Checked below: never attested over a unix socket.
            exe: None,
            peer: PeerKind::Unix,
            backend_pid,
        });
    };

    round("first", &mut landed);

    // TCP Fast Open: the startup packet rides on the SYN and the server accepts at the SYN.
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], pg_port)),
        SocketAddr::new("::1".parse().unwrap(), pg_port),
    ] {
        let label = format!("tfo-{}", addr.ip());
        let (pid, report) = tfo_client(addr, &label, &cgroup);
        assert_eq!(
            report[0], "1",
            "{label}: the SYN's data was not accepted: {report:?}"
        );
        assert_eq!(
            report[2], "local",
            "{label}: bypassed interceptor: {report:?}"
        );
        landed.push(Landed {
            label,
            process: Some((pid, 0)),
            // Not checked: the client is this test binary re-run as a helper.
            exe: None,
            peer: PeerKind::LocalTcp,
            backend_pid: report[1].parse().unwrap(),
        });
    }

    // PostgreSQL's real socket, straight: the directory's permissions refuse another uid.
    let direct = Attempt {
        label: "direct-unix".into(),
        netns: &net.host,
        uid: NOBODY,
        host: pg_sock_dir.display().to_string(),
        port: pg_port,
    };
    let run = psql(&direct, &cgroup);
    assert!(
        !run.ok && run.stderr.contains("Permission denied"),
        "PostgreSQL's own socket must be out of reach: {run:?}"
    );

    // kill -9: the pinned programs stay and refuse every attempt; PostgreSQL, listening on all
    // these addresses, receives none of them.
    proxy.kill9();
    let dropped_before = interceptor::ebpf::status(&pin.0).unwrap().counters.dropped;
    for host in tcp_targets {
        let run = psql(
            &Attempt {
                label: format!("down-{host}"),
                netns: &net.host,
                uid: NOBODY,
                host: host.into(),
                port: pg_port,
            },
            &cgroup,
        );
        assert_refused(&run, host);
    }
    for (host_addr, _) in REMOTE_PATHS {
        let run = psql(
            &Attempt {
                label: format!("down-remote-{host_addr}"),
                netns: &net.remote,
                uid: NOBODY,
                host: host_addr.into(),
                port: pg_port,
            },
            &cgroup,
        );
        assert_refused(&run, &format!("remote to {host_addr}"));
    }
    let run = psql(
        &Attempt {
            label: "down-unix".into(),
            netns: &net.host,
            uid: NOBODY,
            host: run_dir.path().display().to_string(),
            port: pg_port,
        },
        &cgroup,
    );
    assert_refused(&run, "default unix socket");
    let run = psql(&direct, &cgroup);
    assert!(
        !run.ok && run.stderr.contains("Permission denied"),
        "{run:?}"
    );
    let st = interceptor::ebpf::status(&pin.0).unwrap();
    assert!(st.attached(), "pins must survive kill -9: {st:?}");
    assert_eq!(
        st.counters.dropped - dropped_before,
        (tcp_targets.len() + REMOTE_PATHS.len()) as u64,
        "every TCP attempt must have been dropped by the steering program: {st:?}"
    );

    // Restart with the same pin dir: service is back on every path.
    proxy.restart().unwrap();
    wait_until_ready(&proxy, 2);
    round("restarted", &mut landed);

    // What PostgreSQL saw: only unix-socket connections (interceptor's upstream and the
    // harness's own superuser sessions); every attempt's backend among them.
    let connections = pg_connections(&pg);
    let bypassed: Vec<_> = connections.iter().filter(|(_, h)| h != "[local]").collect();
    assert!(
        bypassed.is_empty(),
        "PostgreSQL received connections that did not come from interceptor: {bypassed:?}"
    );
    let backends: BTreeMap<u32, &str> = connections.iter().map(|(p, h)| (*p, h.as_str())).collect();

    // What interceptor recorded: every attempt, with the kernel's word on who made it.
    let sessions = audit_sessions(&proxy);
    let while_down: Vec<_> = sessions.keys().filter(|k| k.starts_with("down-")).collect();
    assert!(
        while_down.is_empty(),
        "served while interceptor was dead: {while_down:?}"
    );
    let mut identities = BTreeMap::new();
    for l in &landed {
        assert_eq!(
            backends.get(&l.backend_pid).copied(),
            Some("[local]"),
            "{}: backend {} not in PostgreSQL's connection log",
            l.label,
            l.backend_pid
        );
        let s = sessions
            .get(&l.label)
            .unwrap_or_else(|| panic!("{}: no session in the audit trail", l.label));
        assert_eq!(s["identity"]["subject"], ALICE, "{}", l.label);
        let process = &s["identity"]["process"];
        match l.process {
            Some((pid, uid)) => {
                assert_eq!(process["pid"], pid, "{}: {s}", l.label);
                assert_eq!(process["uid"], uid, "{}: {s}", l.label);
                if let Some(exe) = &l.exe {
                    assert_eq!(process["exe"], exe.as_str(), "{}: {s}", l.label);
                }
                identities.insert(uid, l.label.clone());
            }
            None => assert!(process.is_null(), "{}: remote with identity: {s}", l.label),
        }
        let transport = s["peer"]["transport"].as_str();
        match l.peer {
            PeerKind::Unix => {
                assert_eq!(transport, Some("unix"), "{}: {s}", l.label);
                // Nothing records the program that called connect() on a unix socket.
                assert!(process["exe"].is_null(), "{}: exe attested: {s}", l.label);
            }
            PeerKind::LocalTcp => assert_eq!(transport, Some("tcp"), "{}: {s}", l.label),
            PeerKind::Remote(remote_addr) => {
                let addr: SocketAddr = s["peer"]["addr"].as_str().unwrap().parse().unwrap();
                assert_eq!(addr.ip().to_string(), remote_addr, "{}: {s}", l.label);
            }
        }
    }
    // nobody, daemon and root (the TFO client) each came out as themselves.
    let uids: BTreeSet<u32> = identities.keys().copied().collect();
    assert_eq!(
        uids,
        BTreeSet::from([0, DAEMON.0, NOBODY.0]),
        "{identities:?}"
    );
}

/// Runs this test binary's `helper` as root inside `cgroup` with `env`; returns the text after
/// `marker` on the helper's report line.
fn run_helper(helper: &str, env: &[(&str, String)], marker: &str, cgroup: &Cgroup) -> String {
    let procs_fd = cgroup.procs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        helper,
        "--nocapture",
        "--test-threads=1",
    ])
    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = wait_output(cmd.spawn().unwrap(), helper);
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| Some(l[l.find(marker)? + marker.len()..].trim().to_owned()))
        .unwrap_or_else(|| {
            panic!(
                "{helper}: no report:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn interceptor_with(pg: &PgCluster, ebpf: &str, policy: Option<String>) -> Interceptor {
    let mut setup = InterceptorSetup::new(pg)
        .identity(ALICE, ALICE_PASSWORD, &["dev"], Some(APP_RO))
        .listen_v6(true);
    setup = match policy {
        Some(p) => setup.policy_file("process.toml", &p),
        None => setup.allow_all_policies(),
    };
    let proxy = Interceptor::start(setup.extra_toml(ebpf)).unwrap();
    wait_until_ready(&proxy, 1);
    proxy
}

fn ebpf_toml(port: u16, cgroup: &Cgroup, pin: &PinDir, on_existing: &str) -> String {
    format!(
        "[ebpf]\nenabled = true\nports = [{port}]\ncgroup = {cg:?}\npin_dir = {pin:?}\non_existing = \"{on_existing}\"\n",
        cg = cgroup.path.display().to_string(),
        pin = pin.0.display().to_string(),
    )
}

/// A connection opened straight to PostgreSQL before interceptor attached is not steered (it
/// predates the programs): interceptor must name it at start-up, and with
/// `on_existing = "terminate"` close it, so that the client's next connection lands in
/// interceptor. A unix-socket connection cannot be destroyed by the kernel: it is named with its
/// `pg_terminate_backend` call.
#[test]
fn connection_held_open_across_attach() {
    if !bpf_available("connection_held_open_across_attach") {
        return;
    }
    let net = Net::new();
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let pg = PgCluster::start_with(PgOptions::default().log_connections(true)).unwrap();
    let port = pg.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let query = |c: &tokio_postgres::Client, sql: &str| {
        rt.block_on(c.simple_query(sql)).map(|m| {
            m.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default()
        })
    };
    const WHO: &str =
        "SELECT pg_backend_pid() || ' ' || coalesce(host(inet_client_addr()), 'local')";
    let direct = interceptor_tests::ConnParams::new("127.0.0.1", port, APP_RO, pg.password(APP_RO));
    let held_tcp = rt.block_on(direct.connect()).unwrap();
    let held_unix = rt.block_on(pg.superuser_params().connect()).unwrap();
    let tcp_backend = query(&held_tcp, WHO).unwrap();
    assert!(tcp_backend.ends_with(" 127.0.0.1"), "{tcp_backend}");
    let unix_backend = query(&held_unix, WHO).unwrap();
    let unix_backend = unix_backend.split(' ').next().unwrap().to_owned();
    let me = format!("pid {} (", std::process::id());

    // warn: named in the log, and (which is why) still served directly by PostgreSQL.
    let mut proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "warn"), None);
    let logs = proxy.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("predates interceptor"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("-> 127.0.0.1:{port}")) && l.contains(&me)),
        "the held TCP connection must be named with its process:\n{logs}"
    );
    assert!(
        lines.iter().any(|l| l.contains("unix ") && l.contains(&me)),
        "the held unix connection must be named with its process:\n{logs}"
    );
    assert!(
        logs.contains(&format!("pg_terminate_backend({unix_backend})")),
        "{logs}"
    );
    assert_eq!(
        query(&held_tcp, WHO).unwrap(),
        tcp_backend,
        "warn must keep it"
    );

    // doctor, with a session going through the running daemon: the held connections are named,
    // the daemon's own upstream connection is not (it is no bypass).
    let through = rt.block_on(proxy.params(ALICE).connect()).unwrap();
    assert!(query(&through, "SELECT 1").is_ok());
    let daemon = format!("pid {} (", proxy.pid().unwrap());
    let doctor = Command::new(interceptor_tests::proxy::interceptor_bin().unwrap())
        .args(["doctor", "--config"])
        .arg(proxy.config_path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    let existing: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("existing connection"))
        .collect();
    assert!(
        existing
            .iter()
            .any(|l| l.contains(&format!("-> 127.0.0.1:{port}")) && l.contains(&me)),
        "doctor must name the held TCP connection:\n{report}"
    );
    assert!(
        !existing.iter().any(|l| l.contains(&daemon)),
        "doctor named interceptor's own upstream connection as a bypass:\n{report}"
    );
    drop(through);
    proxy.kill9();

    // terminate: the TCP one is closed by the kernel; its next attempt lands in interceptor.
    let proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "terminate"), None);
    let logs = proxy.logs();
    assert!(
        logs.lines().any(
            |l| l.contains("closed a connection to PostgreSQL that predates")
                && l.contains(&me)
                && l.contains(&format!("-> 127.0.0.1:{port}"))
        ),
        "{logs}"
    );
    assert!(
        query(&held_tcp, WHO).is_err(),
        "the held TCP connection must be closed"
    );
    let run = psql(
        &Attempt {
            label: "reconnect-after-terminate".into(),
            netns: &net.host,
            uid: NOBODY,
            host: "127.0.0.1".into(),
            port,
        },
        &cgroup,
    );
    assert_served_via_interceptor(&run, "reconnect after terminate");
    // The unix one is still there, named with the call that ends it.
    assert!(query(&held_unix, "SELECT 1").is_ok());
    assert!(
        logs.contains(&format!("pg_terminate_backend({unix_backend})")),
        "{logs}"
    );
    drop(proxy);
}

/// Not a test: opens a TCP Fast Open socket, forks; the child names itself `sleep`, calls
/// connect() (no SYN leaves yet) and execs /usr/bin/sleep, while this process keeps the socket
/// and logs in over it. Reports `BORROW ok <client addr PostgreSQL sees>` or
/// `BORROW refused <error>`.
#[test]
#[ignore = "helper process started by exec_after_fast_open_connect"]
fn helper_exec_borrow() {
    let Ok(addr) = std::env::var("IC_TFO_ADDR") else {
        panic!("helper started without its environment");
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let path = c"/usr/bin/sleep";
    let arg1 = c"30";
    let argv = [path.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    // Only async-signal-safe calls in the child.
    let child = unsafe { libc::fork() };
    if child == 0 {
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"sleep".as_ptr());
            let rc = libc::connect(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of_val(&sa) as libc::socklen_t,
            );
            if rc != 0 {
                libc::_exit(3);
            }
            libc::execv(path.as_ptr(), argv.as_ptr());
            libc::_exit(4);
        }
    }
    assert!(child > 0);
    // Wait for the exec: from now on /proc says the connecting pid runs /usr/bin/sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{child}/exe"))
        .ok()
        .as_deref()
        != Some(std::path::Path::new("/usr/bin/sleep"))
    {
        assert!(std::time::Instant::now() < deadline, "child did not exec");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stream = std::net::TcpStream::from(sock);
    stream.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(ALICE)
            .password(ALICE_PASSWORD)
            .dbname(APP_DB)
            .application_name("exec-borrow");
        match cfg.connect_raw(stream, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                let rows = client
                    .simple_query("SELECT coalesce(host(inet_client_addr()), 'local')")
                    .await;
                format!("ok {rows:?}")
            }
            Err(e) => format!("refused {e}"),
        }
    });
    unsafe { libc::kill(child, libc::SIGKILL) };
    println!("BORROW {report}");
}

/// The borrowed executable: a process named like the allowed program connects with TCP Fast Open
/// semantics (no SYN yet), execs the allowed program, and its parent speaks the protocol over the
/// socket. Under a policy that admits only `/usr/bin/sleep` and psql by executable, psql is
/// admitted and the borrowed socket is refused: the kernel recorded the executable that called
/// connect(), which is not /usr/bin/sleep.
#[test]
fn exec_after_fast_open_connect() {
    if !bpf_available("exec_after_fast_open_connect") {
        return;
    }
    let net = Net::new();
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let pg = PgCluster::start_with(PgOptions::default().log_connections(true)).unwrap();
    let port = pg.port();
    let policy = format!(
        "[policy]\nname = \"by-exe\"\n\n[identities]\nsubjects = [{ALICE:?}]\n\n\
         [identities.process]\nexes = [\"/usr/bin/sleep\", {psql:?}]\n\n\
         [login]\nupstream_role = {APP_RO:?}\ndatabases = [\"*\"]\n\n\
         [[rule]]\nname = \"reads\"\ndecision = \"allow\"\nkinds = [\"any\"]\n",
        psql = psql_exe(),
    );
    let proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "warn"), Some(policy));

    // Control: the allowed program itself is admitted by its executable.
    let run = psql(
        &Attempt {
            label: "exe-allowed-psql".into(),
            netns: &net.host,
            uid: NOBODY,
            host: "127.0.0.1".into(),
            port,
        },
        &cgroup,
    );
    assert_served_via_interceptor(&run, "psql under an exes policy");

    let report = run_helper(
        "helper_exec_borrow",
        &[("IC_TFO_ADDR", format!("127.0.0.1:{port}"))],
        "BORROW ",
        &cgroup,
    );
    assert!(
        report.starts_with("refused"),
        "a socket connected by another program was admitted as /usr/bin/sleep: {report}\n{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("runs another program than the one that called connect()"),
        "{logs}"
    );
    let bypassed: Vec<_> = pg_connections(&pg)
        .into_iter()
        .filter(|(_, h)| h != "[local]")
        .collect();
    assert!(bypassed.is_empty(), "{bypassed:?}");
}

/// `(storage, length)` of `addr` as a C socket address.
fn c_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Not a test: drops to uid/gid nobody, opens a TCP socket and connects it through io_uring
/// (`IC_URING_MODE`: `inline` = in io_uring_enter() on this thread, `async` = IOSQE_ASYNC, run by
/// an io-wq worker `iou-wrk-*`, `sqpoll` = issued by the ring's SQPOLL thread `iou-sqp-*`,
/// `async-root-ring`, `sqpoll-root-ring` = the same with the ring set up before dropping
/// privileges), logs
/// in over it with tokio-postgres and reports `URING-HELD <local port> <client addr PostgreSQL
/// sees>`; then keeps the connection (and the ring) until its stdin ends.
#[test]
#[ignore = "helper process started by io_uring_connects_are_the_owning_process"]
fn helper_io_uring_client() {
    use io_uring::{IoUring, opcode, squeue, types};
    let (Ok(addr), Ok(app), Ok(mode)) = (
        std::env::var("IC_URING_ADDR"),
        std::env::var("IC_URING_APP"),
        std::env::var("IC_URING_MODE"),
    ) else {
        panic!("helper started without its environment");
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let setup = || -> IoUring {
        match mode.as_str() {
            "sqpoll" | "sqpoll-root-ring" => IoUring::builder().setup_sqpoll(2000).build(8),
            "inline" | "async" | "async-root-ring" => IoUring::new(8),
            other => panic!("unknown mode {other}"),
        }
        .unwrap_or_else(|e| panic!("io_uring setup ({mode}): {e}"))
    };
    // *-root-ring: the ring is set up while still root.
    let early = mode.ends_with("-root-ring").then(setup);
    // The process (and so its ring's worker threads) and the socket belong to nobody (glibc's
    // setuid applies to every thread of the process).
    let rc = unsafe {
        libc::setgroups(0, std::ptr::null()) | libc::setgid(NOBODY.1) | libc::setuid(NOBODY.0)
    };
    assert_eq!(
        rc,
        0,
        "dropping to nobody: {}",
        std::io::Error::last_os_error()
    );
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ring = early.unwrap_or_else(setup);
    let (sa, len) = c_sockaddr(addr);
    let mut entry = opcode::Connect::new(
        types::Fd(fd),
        (&sa as *const libc::sockaddr_storage).cast(),
        len,
    )
    .build()
    .user_data(7);
    if mode.starts_with("async") {
        entry = entry.flags(squeue::Flags::ASYNC);
    }
    unsafe { ring.submission().push(&entry).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert_eq!(
        cqe.result(),
        0,
        "io_uring connect: {}",
        std::io::Error::from_raw_os_error(-cqe.result())
    );
    let stream = std::net::TcpStream::from(sock);
    let sport = stream.local_addr().unwrap().port();
    stream.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, client_addr) = rt.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(ALICE)
            .password(ALICE_PASSWORD)
            .dbname(APP_DB)
            .application_name(&app);
        let (client, conn) = cfg
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = client
            .simple_query("SELECT coalesce(host(inet_client_addr()), 'local')")
            .await
            .unwrap();
        let addr = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        (client, addr)
    });
    println!("URING-HELD {sport} {client_addr}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(client);
    drop(rt);
    drop(ring);
}

/// The thread that called connect() for the connection from `pid`'s local port `sport`, as the
/// kernel recorded it (the pinned flow map; the entry lives as long as the connection).
fn connecting_thread(pin: &PinDir, pid: u32, sport: u16) -> Option<u32> {
    use aya::maps::{HashMap, Map, MapData};
    use interceptor::ebpf::maps::{ConnInfo, FLOWS, FlowKey};
    let data = MapData::from_pin(pin.0.join("maps").join(FLOWS)).unwrap();
    let flows: HashMap<MapData, FlowKey, ConnInfo> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    flows
        .iter()
        .filter_map(Result::ok)
        .find(|(k, v)| v.pid == pid && k.sport == sport)
        .map(|(_, v)| v.tid)
}

/// io_uring connects: issued inline, by an io-wq worker (IOSQE_ASYNC) and by the SQPOLL thread.
/// The kernel must record, and the audit trail show, the process that owns the ring (its pid,
/// uid and executable, its leader's command name), never the worker thread; a policy that admits
/// only that executable (and uids nobody and root) admits them all, and refuses psql as nobody.
/// The uid is the one the connect ran with: for SQPOLL, the ring's setup's.
#[test]
fn io_uring_connects_are_the_owning_process() {
    if !bpf_available("io_uring_connects_are_the_owning_process") {
        return;
    }
    let net = Net::new();
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let pg = PgCluster::start_with(PgOptions::default().log_connections(true)).unwrap();
    let port = pg.port();
    let me = std::fs::canonicalize(std::env::current_exe().unwrap())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let policy = format!(
        "[policy]\nname = \"uring-client\"\n\n[identities]\nsubjects = [{ALICE:?}]\n\n\
         [identities.process]\nuids = [{uid}, 0]\nexes = [{me:?}]\n\n\
         [login]\nupstream_role = {APP_RO:?}\ndatabases = [\"*\"]\n\n\
         [[rule]]\nname = \"all\"\ndecision = \"allow\"\nkinds = [\"any\"]\n",
        uid = NOBODY.0,
    );
    let proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "warn"), Some(policy));

    // Control: another program under the same uid does not match the policy.
    let run = psql(
        &Attempt {
            label: "uring-control-psql".into(),
            netns: &net.host,
            uid: NOBODY,
            host: "127.0.0.1".into(),
            port,
        },
        &cgroup,
    );
    assert!(
        !run.ok && run.stderr.contains("no policy"),
        "psql must be refused by a policy for another executable: {run:?}"
    );

    let procs_fd = cgroup.procs.as_raw_fd();
    let mut seen = Vec::new();
    // (mode, address, the thread that must have called connect(), the uid/gid attested).
    for (mode, target, worker, ids) in [
        ("inline", "127.0.0.1", None, NOBODY),
        ("async", "127.0.0.1", Some("iou-wrk-"), NOBODY),
        ("async", "::1", Some("iou-wrk-"), NOBODY),
        ("sqpoll", "127.0.0.1", Some("iou-sqp-"), NOBODY),
        // io-wq requests run with the submitter's credentials, whoever set the ring up.
        ("async-root-ring", "127.0.0.1", Some("iou-wrk-"), NOBODY),
        // The SQPOLL thread runs with the credentials of the ring's setup (documented): a ring
        // set up as root and used after dropping to nobody connects, and is attested, as root.
        ("sqpoll-root-ring", "127.0.0.1", Some("iou-sqp-"), (0, 0)),
    ] {
        let label = format!("uring-{mode}-{target}");
        let addr = SocketAddr::new(target.parse().unwrap(), port);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "helper_io_uring_client",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IC_URING_ADDR", addr.to_string())
        .env("IC_URING_APP", &label)
        .env("IC_URING_MODE", mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap_or_default();
                if let Some(i) = line.find("URING-HELD ") {
                    let _ = tx.send(line[i + 11..].to_owned());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let Ok(held) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{label}: no report from the io_uring client:\n{}\n{}\n{}",
                reader.join().unwrap(),
                String::from_utf8_lossy(&out.stderr),
                proxy.logs()
            );
        };
        let (sport, client_addr) = held.split_once(' ').unwrap();
        assert_eq!(client_addr, "local", "{label}: bypassed interceptor");
        // While the connection is open: which thread did the kernel see calling connect()?
        let tid = connecting_thread(&pin, pid, sport.parse().unwrap())
            .unwrap_or_else(|| panic!("{label}: no kernel record for pid {pid} port {sport}"));
        let thread_comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_else(|e| panic!("{label}: thread {tid} of {pid} gone: {e}"));
        let thread_comm = thread_comm.trim_end().to_owned();
        match worker {
            Some(prefix) => assert!(
                thread_comm.starts_with(prefix),
                "{label}: connect() ran on thread {tid} {thread_comm:?}, not on an io_uring \
                 thread: the test does not test what it claims"
            ),
            None => assert!(!thread_comm.starts_with("iou-"), "{label}: {thread_comm}"),
        }
        let leader_comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        drop(child.stdin.take());
        let status = wait_with_deadline(&mut child, Duration::from_secs(30)).unwrap();
        assert!(
            status.is_some_and(|s| s.success()),
            "{label}: helper failed: {status:?}\n{}",
            reader.join().unwrap()
        );
        seen.push((
            label,
            pid,
            ids,
            leader_comm.trim_end().to_owned(),
            thread_comm,
        ));
    }

    let sessions = audit_sessions(&proxy);
    for (label, pid, (uid, gid), leader_comm, thread_comm) in &seen {
        let s = sessions
            .get(label)
            .unwrap_or_else(|| panic!("{label}: no session in the audit trail"));
        let p = &s["identity"]["process"];
        assert_eq!(p["pid"], *pid, "{label}: {s}");
        assert_eq!(p["uid"], *uid, "{label}: {s}");
        assert_eq!(p["gid"], *gid, "{label}: {s}");
        assert_eq!(p["exe"], me.as_str(), "{label}: {s}");
        assert_eq!(
            p["comm"],
            leader_comm.as_str(),
            "{label} (connect() on {thread_comm}): {s}"
        );
    }
    let bypassed: Vec<_> = pg_connections(&pg)
        .into_iter()
        .filter(|(_, h)| h != "[local]")
        .collect();
    assert!(bypassed.is_empty(), "{bypassed:?}");
}

/// A policy on the cgroup (a systemd unit's, here a child of the test cgroup named like one)
/// admits psql started inside it, and refuses the same program, as the same uid, started in the
/// parent cgroup: the cgroup the kernel recorded at connect is what matched, not the program or
/// the uid.
#[test]
fn cgroup_policy_admits_only_the_unit() {
    if !bpf_available("cgroup_policy_admits_only_the_unit") {
        return;
    }
    let net = Net::new();
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let unit = cgroup.child("etl.service");
    let pin = PinDir::new();
    let pg = PgCluster::start_with(PgOptions::default().log_connections(true)).unwrap();
    let port = pg.port();
    let policy = format!(
        "[policy]\nname = \"etl-unit\"\n\n[identities]\nsubjects = [{ALICE:?}]\n\n\
         [identities.process]\ncgroups = [{unit:?}]\n\n\
         [login]\nupstream_role = {APP_RO:?}\ndatabases = [\"*\"]\n\n\
         [[rule]]\nname = \"all\"\ndecision = \"allow\"\nkinds = [\"any\"]\n",
        unit = unit.rel_path(),
    );
    let proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "warn"), Some(policy));
    let attempt = |label: &str, host: &str| Attempt {
        label: label.into(),
        netns: &net.host,
        uid: NOBODY,
        host: host.into(),
        port,
    };

    let mut admitted = Vec::new();
    for host in ["127.0.0.1", "::1"] {
        let label = format!("in-unit-{host}");
        let run = psql(&attempt(&label, host), &unit);
        assert_served_via_interceptor(&run, &label);
        admitted.push((label, run.pid));
    }
    // The parent cgroup is attached too: the kernel identifies this client (so the refusal is
    // the cgroup's doing, not a missing identity).
    let identified = || {
        interceptor::ebpf::status(&pin.0)
            .unwrap()
            .counters
            .identified
    };
    let before = identified();
    let outside = psql(&attempt("outside-unit", "127.0.0.1"), &cgroup);
    assert!(
        !outside.ok && outside.stderr.contains("no policy"),
        "psql outside the unit's cgroup must be refused: {outside:?}"
    );
    assert_eq!(
        identified(),
        before + 1,
        "the outside client was not identified"
    );

    let sessions = audit_sessions(&proxy);
    for (label, pid) in &admitted {
        let s = sessions
            .get(label)
            .unwrap_or_else(|| panic!("{label}: no session in the audit trail"));
        let p = &s["identity"]["process"];
        assert_eq!(p["pid"], *pid, "{label}: {s}");
        assert_eq!(p["uid"], NOBODY.0, "{label}: {s}");
        assert_eq!(p["cgroup_path"], unit.rel_path().as_str(), "{label}: {s}");
        assert_eq!(p["cgroup_id"], unit.id(), "{label}: {s}");
        assert_eq!(p["exe"], psql_exe().as_str(), "{label}: {s}");
    }
    assert!(
        !sessions.contains_key("outside-unit"),
        "{:?}",
        sessions.keys()
    );
    let bypassed: Vec<_> = pg_connections(&pg)
        .into_iter()
        .filter(|(_, h)| h != "[local]")
        .collect();
    assert!(bypassed.is_empty(), "{bypassed:?}");
}

const FORWARDER: &str = r#"
import socket, sys, threading
upstream = int(sys.argv[1])
l = socket.socket()
l.bind(('127.0.0.1', 0))
l.listen(8)
print('LISTENING %d' % l.getsockname()[1], flush=True)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
while True:
    c, _ = l.accept()
    u = socket.create_connection(('127.0.0.1', upstream))
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
"#;

/// Kills the process on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A forwarder on the host (a TCP relay running as daemon) is steered like any client, and is
/// what the kernel attests: psql as nobody behind it lands in interceptor as the forwarder's pid,
/// uid and executable (documented in "what it cannot stop").
#[test]
fn a_forwarder_is_attested_as_itself() {
    if !bpf_available("a_forwarder_is_attested_as_itself") {
        return;
    }
    let net = Net::new();
    let _in_host = InNetNs::enter(&net.host);
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let pg = PgCluster::start_with(PgOptions::default().log_connections(true)).unwrap();
    let port = pg.port();
    let proxy = interceptor_with(&pg, &ebpf_toml(port, &cgroup, &pin, "warn"), None);

    let procs_fd = cgroup.procs.as_raw_fd();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-I", "-c", FORWARDER, &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .current_dir("/");
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(DAEMON.1) != 0
                || libc::setuid(DAEMON.0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut forwarder = KillOnDrop(cmd.spawn().unwrap());
    let fwd_pid = forwarder.0.id();
    let mut line = String::new();
    {
        use std::io::BufRead;
        let stdout = forwarder.0.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
    }
    let fwd_port: u16 = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("forwarder: {line:?}"))
        .parse()
        .unwrap();

    let run = psql(
        &Attempt {
            label: "behind-forwarder".into(),
            netns: &net.host,
            uid: NOBODY,
            host: "127.0.0.1".into(),
            port: fwd_port,
        },
        &cgroup,
    );
    assert_served_via_interceptor(&run, "psql behind a forwarder");
    let sessions = audit_sessions(&proxy);
    let s = sessions
        .get("behind-forwarder")
        .unwrap_or_else(|| panic!("no session: {:?}", sessions.keys()));
    let p = &s["identity"]["process"];
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    assert_eq!(p["pid"], fwd_pid, "{s}");
    assert_eq!(p["uid"], DAEMON.0, "{s}");
    assert_eq!(p["exe"], python.to_string_lossy().as_ref(), "{s}");
    assert_ne!(p["pid"], run.pid, "{s}");
    drop(forwarder);
}
