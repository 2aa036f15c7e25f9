#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code fails loudly
//! interceptor's own TCP upstream connection to a steered port reaches PostgreSQL; every other
//! connection, even from interceptor's own process, is still steered. Its own test binary,
//! because it moves the whole test process into the test cgroup.

mod ebpf_common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};
use ebpf_common::*;
use interceptor::ebpf::{self, Steering};

/// Collects everything logged through `tracing`.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn wait_for(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if String::from_utf8_lossy(&self.0.lock().unwrap()).contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Moves this process into a cgroup and back to the root on drop.
struct Joined;

impl Joined {
    fn join(cg: &Cgroup) -> Joined {
        std::fs::write(cg.path.join("cgroup.procs"), "0").unwrap();
        Joined
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = std::fs::write(cgroup2_root().join("cgroup.procs"), "0");
    }
}

/// A connected TCP socket, exempted (or not) before connect().
fn connect(steering: &Steering, to: SocketAddr, exempt: bool) -> TcpStream {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if exempt {
        steering.exempt_upstream(fd.as_fd()).unwrap();
    }
    let SocketAddr::V4(v4) = to else {
        panic!("v4 only")
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    TcpStream::from(fd)
}

fn pinned_len<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> usize {
    let data = MapData::from_pin(pin.join("maps").join(name)).unwrap();
    let m: HashMap<MapData, K, V> = HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    m.keys().count()
}

fn exempt_flows(pin: &Path) -> usize {
    pinned_len::<[u8; 48], u64>(pin, "IC_EXEMPT_FL")
}

#[test]
fn only_the_registered_upstream_socket_reaches_postgres() {
    if !bpf_available("only_the_registered_upstream_socket_reaches_postgres") {
        return;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let ns = NetNs::new();
    let cgroup = Cgroup::new();
    let pin = PinDir::new();
    let _in = InNetNs::enter(&ns);
    let proxy = listen("127.0.0.1:6432");
    let postgres = listen(&format!("127.0.0.1:{PROTECTED}"));
    let steering = Steering::attach(&config(&cgroup, &pin), &fds(&[&proxy])).unwrap();
    // Outside the attached cgroup the kernel could not honour an exemption: refused up front.
    let probe = listen("127.0.0.1:0");
    assert!(steering.exempt_upstream(probe.as_fd()).is_err());
    let _joined = Joined::join(&cgroup);
    let pg: SocketAddr = format!("127.0.0.1:{PROTECTED}").parse().unwrap();

    // The registered upstream socket goes to PostgreSQL.
    let mut upstream = connect(&steering, pg, true);
    let (mut pg_side, _) = accept_within(&postgres, "postgres");
    assert_nothing_waiting(&proxy, "proxy after exempt connect");
    upstream.write_all(b"x").unwrap();
    assert_eq!(ebpf::status(&pin.0).unwrap().counters.exempted, 1);
    assert_eq!(exempt_flows(&pin.0), 1);

    // Any other socket, even of the same process, is steered to the proxy and identified.
    let other = connect(&steering, pg, false);
    let (accepted, peer) = accept_within(&proxy, "proxy");
    assert_nothing_waiting(&postgres, "postgres after a plain connect");
    let id = steering
        .identity_for(peer, accepted.local_addr().unwrap())
        .expect("identity of our own process");
    assert_eq!(id.pid, std::process::id());
    assert_eq!(id.cgroup_id, cgroup.id());
    drop((other, accepted));

    // Closing the upstream connection removes its exemption: the 4-tuple is not reusable.
    drop(upstream);
    let _ = pg_side.flush();
    drop(pg_side);
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = exempt_flows(&pin.0);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(left, 0, "exemption outlived its socket");
    assert_eq!(pinned_len::<u64, u8>(&pin.0, "IC_EXEMPT_CK"), 0);

    // No IPv6 listener was given: IPv6 connections to the port are refused (fail closed), and
    // the kernel program's log line reaches tracing.
    let err = TcpStream::connect(format!("[::1]:{PROTECTED}")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_nothing_waiting(&postgres, "postgres after a v6 connect");
    assert_eq!(ebpf::status(&pin.0).unwrap().counters.dropped, 1);
    assert!(
        logs.wait_for("no interceptor listener: dropped connection to port 5432"),
        "{}",
        String::from_utf8_lossy(&logs.0.lock().unwrap())
    );
}
