//! Connections to the protected PostgreSQL that predate the steering programs.
//!
//! Steering applies to new connections only: a client connected before interceptor attached
//! keeps talking to PostgreSQL directly. At attach time (and in `doctor`) these are listed from
//! `/proc/net/tcp{,6}`, `/proc/net/unix` and the kernel's unix sock_diag (for a unix socket's
//! peer), with the owning processes from `/proc/*/fd`, and logged by name. With
//! `[ebpf] on_existing = "terminate"` the TCP ones are closed with the kernel's SOCK_DESTROY
//! (sock_diag, CONFIG_INET_DIAG_DESTROY): PostgreSQL's end is aborted, the client gets a reset and
//! its next connection is steered. Unix-socket connections cannot be destroyed that way; for
//! those (and wherever SOCK_DESTROY fails) the exact `pg_terminate_backend` calls are printed.
//!
//! interceptor's own upstream connections are not listed: those of this process, and those of
//! any process running this same executable file (the daemon, seen from `doctor` or `install`).
//! Only root can replace that file, and it speaks to PostgreSQL only for the sessions it
//! decides; a socket taken from it by another process of its uid is the uid boundary the README
//! describes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::sys;

/// What to do with connections that predate steering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExisting {
    /// Log each one (by process) and keep it.
    #[default]
    Warn,
    /// Close the TCP ones (SOCK_DESTROY); list the rest for `pg_terminate_backend`.
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({}", self.pid, self.comm)?;
        if let Some(e) = &self.exe {
            write!(f, ", {e}")?;
        }
        write!(f, ")")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transport {
    /// PostgreSQL's end: `local`; the client's: `remote`.
    Tcp {
        local: SocketAddr,
        remote: SocketAddr,
    },
    Unix {
        path: PathBuf,
    },
}

/// One connection to PostgreSQL that does not go through interceptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Existing {
    pub transport: Transport,
    /// The PostgreSQL backend holding the server end.
    pub backend: Owner,
    /// The client process, when it is on this host (and visible).
    pub peer: Option<Owner>,
}

impl fmt::Display for Existing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer = match &self.peer {
            Some(p) => p.to_string(),
            None => "a process not visible here".into(),
        };
        match &self.transport {
            Transport::Tcp { local, remote } => {
                write!(f, "tcp {remote} -> {local} from {peer}")?;
            }
            Transport::Unix { path } => write!(f, "unix {} from {peer}", path.display())?,
        }
        write!(f, ", PostgreSQL backend pid {}", self.backend.pid)
    }
}

/// A parsed line of /proc/net/tcp{,6}.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpLine {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

const TCP_ESTABLISHED: u8 = 1;

fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 8-digit group is a native-endian u32 holding network-order bytes.
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(8 * i..8 * i + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

fn parse_tcp(text: &str) -> Vec<TcpLine> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpLine {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Socket inode -> owning process, from every /proc/<pid>/fd.
fn socket_owners() -> BTreeMap<u64, Owner> {
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut owner = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let owner = owner.get_or_insert_with(|| Owner {
                pid,
                comm: std::fs::read_to_string(dir.join("comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default(),
                exe: std::fs::read_link(dir.join("exe"))
                    .ok()
                    .map(|p| p.display().to_string()),
            });
            out.entry(inode).or_insert_with(|| owner.clone());
        }
    }
    out
}

fn is_postgres(o: &Owner) -> bool {
    matches!(o.comm.as_str(), "postgres" | "postmaster")
}

/// Whose connections are interceptor's own: this process, and processes running the same
/// executable file (device and inode).
struct Own {
    pid: u32,
    exe: Option<(u64, u64)>,
}

impl Own {
    fn this_process() -> Own {
        Own {
            pid: std::process::id(),
            exe: file_id(Path::new("/proc/self/exe")),
        }
    }

    fn is_own(&self, peer: Option<&Owner>) -> bool {
        peer.is_some_and(|p| {
            p.pid == self.pid
                || self.exe.is_some()
                    && file_id(&Path::new("/proc").join(p.pid.to_string()).join("exe")) == self.exe
        })
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Established connections to PostgreSQL on `ports` (TCP) or on its unix sockets that are not
/// interceptor's own upstream sessions.
pub(crate) fn find(ports: &[u16]) -> Vec<Existing> {
    let owners = socket_owners();
    let me = Own::this_process();
    let mut tcp = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            tcp.extend(parse_tcp(&text));
        }
    }
    let by_tuple: BTreeMap<(SocketAddr, SocketAddr), u64> = tcp
        .iter()
        .filter(|l| l.state == TCP_ESTABLISHED)
        .map(|l| ((l.local, l.remote), l.inode))
        .collect();
    let mut out = Vec::new();
    for l in &tcp {
        if l.state != TCP_ESTABLISHED || !ports.contains(&l.local.port()) {
            continue;
        }
        let Some(backend) = owners.get(&l.inode).filter(|o| is_postgres(o)) else {
            continue;
        };
        let peer = by_tuple
            .get(&(l.remote, l.local))
            .and_then(|ino| owners.get(ino))
            .cloned();
        if me.is_own(peer.as_ref()) {
            continue;
        }
        out.push(Existing {
            transport: Transport::Tcp {
                local: l.local,
                remote: l.remote,
            },
            backend: backend.clone(),
            peer,
        });
    }
    out.extend(unix_connections(&owners, &me));
    out
}

/// Connected unix sockets of PostgreSQL processes on a path PostgreSQL listens on.
fn unix_connections(owners: &BTreeMap<u64, Owner>, me: &Own) -> Vec<Existing> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    // Num RefCount Protocol Flags Type St Inode Path
    let lines: Vec<(u64, u32, u8, String)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.get(6)?.parse().ok()?,
                u32::from_str_radix(f.get(3)?, 16).ok()?,
                u8::from_str_radix(f.get(5)?, 16).ok()?,
                f.get(7)?.to_string(),
            ))
        })
        .collect();
    const SO_ACCEPTCON: u32 = 1 << 16;
    const SS_CONNECTED: u8 = 3;
    let pg_paths: BTreeSet<&str> = lines
        .iter()
        .filter(|(ino, flags, _, path)| {
            flags & SO_ACCEPTCON != 0
                && path.starts_with('/')
                && owners.get(ino).is_some_and(is_postgres)
        })
        .map(|(_, _, _, p)| p.as_str())
        .collect();
    if pg_paths.is_empty() {
        return Vec::new();
    }
    let peers = sys::unix_peers().unwrap_or_else(|e| {
        tracing::debug!("unix sock_diag: {e}");
        BTreeMap::new()
    });
    let mut out = Vec::new();
    for (ino, flags, state, path) in &lines {
        if flags & SO_ACCEPTCON != 0 || *state != SS_CONNECTED || !pg_paths.contains(path.as_str())
        {
            continue;
        }
        let Some(backend) = owners.get(ino).filter(|o| is_postgres(o)) else {
            continue;
        };
        let peer = peers.get(ino).and_then(|p| owners.get(p)).cloned();
        if me.is_own(peer.as_ref()) {
            continue;
        }
        out.push(Existing {
            transport: Transport::Unix {
                path: Path::new(path).to_path_buf(),
            },
            backend: backend.clone(),
            peer,
        });
    }
    out
}

/// Logs every connection that predates steering; with `Terminate`, closes the TCP ones. Returns
/// the connections still open (unix ones, and TCP ones the kernel refused to destroy).
pub(crate) fn handle(ports: &[u16], mode: OnExisting) -> Vec<Existing> {
    let found = find(ports);
    let mut left = Vec::new();
    for c in found {
        match (&c.transport, mode) {
            (Transport::Tcp { local, remote }, OnExisting::Terminate) => {
                match sys::sock_destroy(*local, *remote) {
                    Ok(()) => {
                        tracing::warn!(
                            "closed a connection to PostgreSQL that predates interceptor: {c}"
                        );
                        continue;
                    }
                    Err(e) => tracing::warn!(
                        "cannot close a connection that predates interceptor ({e}): {c}"
                    ),
                }
            }
            _ => tracing::warn!(
                "a connection to PostgreSQL predates interceptor and bypasses it until it \
                 reconnects: {c}"
            ),
        }
        left.push(c);
    }
    if !left.is_empty() {
        tracing::warn!(
            "to close the connections that bypass interceptor, run as a PostgreSQL superuser: {}",
            terminate_sql(&left)
        );
    }
    left
}

/// The `pg_terminate_backend` calls that end these connections.
pub(crate) fn terminate_sql(conns: &[Existing]) -> String {
    let pids: BTreeSet<u32> = conns.iter().map(|c| c.backend.pid).collect();
    pids.iter()
        .map(|p| format!("SELECT pg_terminate_backend({p});"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 4242 1 0 100 0 0 10 0\n\
           2: 0100007F:1538 0100007F:D431 01 00000000:00000000 00:00000000 00000000   105        0 4243 1 0 100 0 0 10 0\n\
           bad line\n";
        let l = parse_tcp(text);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].local, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(l[1].remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!((l[1].state, l[1].inode), (TCP_ESTABLISHED, 4243));
        // IPv4-mapped addresses of tcp6 come out as IPv4, so both ends pair up.
        let v6 = "hdr\n 0: 0000000000000000FFFF00000100007F:1538 0000000000000000FFFF00000100007F:D431 01 0:0 0:0 0 105 0 7 1\n";
        assert_eq!(parse_tcp(v6)[0].local, "127.0.0.1:5432".parse().unwrap());
    }

    #[test]
    fn terminate_list() {
        let owner = |pid| Owner {
            pid,
            comm: "postgres".into(),
            exe: None,
        };
        let c = |pid| Existing {
            transport: Transport::Unix {
                path: "/run/postgresql/.s.PGSQL.5432".into(),
            },
            backend: owner(pid),
            peer: None,
        };
        assert_eq!(
            terminate_sql(&[c(12), c(7), c(12)]),
            "SELECT pg_terminate_backend(7); SELECT pg_terminate_backend(12);"
        );
        assert!(c(7).to_string().contains("backend pid 7"));
    }
}
