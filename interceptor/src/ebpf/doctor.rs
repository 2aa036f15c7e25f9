//! Health checks: can this host steer and attest, and where could a client get around interceptor?

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::ProgramType;
use serde::Serialize;

use super::{SteeringConfig, embedded_object, status, sys};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub check: &'static str,
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, check: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            severity,
            check,
            message: message.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warn => "WARN",
            Severity::Fail => "FAIL",
        };
        write!(f, "[{tag}] {}: {}", self.check, self.message)
    }
}

/// The OS account interceptor runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

impl Account {
    /// The account this process runs as (effective ids).
    pub fn current() -> Account {
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        unsafe {
            Account {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}

/// `doctor_with` for the default configuration.
pub fn doctor() -> Vec<Finding> {
    doctor_with(&SteeringConfig::default(), None)
}

/// Kernel support, mounts, what is attached, where PostgreSQL listens and the ways around
/// interceptor. `proxy` is interceptor's account, for the unix socket directory check.
pub fn doctor_with(cfg: &SteeringConfig, proxy: Option<Account>) -> Vec<Finding> {
    let mut out = Vec::new();
    kernel_support(&mut out);
    mounts(cfg, &mut out);
    let steered = attachment(cfg, &mut out);
    postgres_listeners(&steered, proxy, &mut out);
    existing_connections(cfg, &mut out);
    out.push(Finding::new(
        Severity::Info,
        "bypass",
        "root and the PostgreSQL server account can always reach PostgreSQL's unix socket; \
         processes in other network namespaces are treated as remote clients (no process identity)",
    ));
    if let Some(cg) = &cfg.cgroup {
        out.push(Finding::new(
            Severity::Warn,
            "identity scope",
            format!(
                "only processes under {} get a kernel-attested identity",
                cg.display()
            ),
        ));
    }
    out
}

fn kernel_support(out: &mut Vec<Finding>) {
    out.push(if embedded_object().is_some() {
        Finding::new(Severity::Ok, "ebpf object", "embedded in this binary")
    } else {
        Finding::new(
            Severity::Fail,
            "ebpf object",
            "eBPF support was not compiled in (cargo xtask build-ebpf before cargo build)",
        )
    });
    out.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Finding::new(Severity::Ok, "btf", "/sys/kernel/btf/vmlinux present")
    } else {
        Finding::new(
            Severity::Warn,
            "btf",
            "kernel BTF missing (/sys/kernel/btf/vmlinux)",
        )
    });
    for (check, ty) in [
        ("sk_lookup", ProgramType::SkLookup),
        ("cgroup sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
    ] {
        out.push(match aya::sys::is_program_supported(ty) {
            Ok(true) => Finding::new(Severity::Ok, check, "supported by the kernel"),
            Ok(false) => Finding::new(Severity::Fail, check, "not supported by the kernel"),
            Err(e) => Finding::new(Severity::Fail, check, format!("cannot probe: {e}")),
        });
    }
    out.push(match std::fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(lsms) if lsms.split(',').any(|l| l.trim() == "bpf") => Finding::new(
            Severity::Info,
            "bpf lsm",
            "active, but not relied on (LSM programs are refused on this kernel family); \
             PostgreSQL's unix socket is guarded by directory permissions",
        ),
        Ok(_) => Finding::new(
            Severity::Info,
            "bpf lsm",
            "not active; PostgreSQL's unix socket is guarded by directory permissions",
        ),
        Err(_) => Finding::new(
            Severity::Info,
            "bpf lsm",
            "unknown (securityfs not mounted); not relied on",
        ),
    });
}

/// Connections to PostgreSQL that do not go through interceptor (they predate steering).
fn existing_connections(cfg: &SteeringConfig, out: &mut Vec<Finding>) {
    let found = super::existing::find(&cfg.ports);
    for c in &found {
        out.push(Finding::new(
            Severity::Warn,
            "existing connection",
            format!("bypasses interceptor until it reconnects: {c}"),
        ));
    }
    if !found.is_empty() {
        out.push(Finding::new(
            Severity::Warn,
            "existing connection",
            format!(
                "to close them: `[ebpf] on_existing = \"terminate\"` at the next start (TCP), \
                 or as a PostgreSQL superuser: {}",
                super::existing::terminate_sql(&found)
            ),
        ));
    }
}

/// The nearest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

fn mounts(cfg: &SteeringConfig, out: &mut Vec<Finding>) {
    let cg = sys::cgroup2_mounts();
    out.push(match cg.first() {
        Some(p) => Finding::new(
            Severity::Ok,
            "cgroup2",
            format!("mounted at {}", p.display()),
        ),
        None => Finding::new(
            Severity::Warn,
            "cgroup2",
            "not mounted; attach will mount it at /sys/fs/cgroup/unified",
        ),
    });
    // The pin dir (or, before the first attach, the directory it will be created in) must be on
    // a bpffs mount, wherever that is mounted.
    let pin = &cfg.pin_dir;
    out.push(match existing_ancestor(pin) {
        Some(at) if sys::is_bpffs(at) => Finding::new(
            Severity::Ok,
            "bpffs",
            format!("pin dir {} is on bpffs", pin.display()),
        ),
        _ if pin.starts_with("/sys/fs/bpf") => Finding::new(
            Severity::Warn,
            "bpffs",
            "not mounted at /sys/fs/bpf; attach will mount it",
        ),
        _ => Finding::new(
            Severity::Fail,
            "bpffs",
            format!(
                "pin dir {} is not on a bpffs mount (mount one there: mount -t bpf bpf <dir>)",
                pin.display()
            ),
        ),
    });
}

/// Reports the pinned state; returns the steered ports.
fn attachment(cfg: &SteeringConfig, out: &mut Vec<Finding>) -> BTreeSet<u16> {
    match status(&cfg.pin_dir) {
        Ok(st) if st.attached() => {
            out.push(Finding::new(
                Severity::Ok,
                "steering",
                format!(
                    "attached (pins in {}), steering ports {:?}; steered {}, dropped {}, \
                     exempted {}, identified {}",
                    cfg.pin_dir.display(),
                    st.steered_ports,
                    st.counters.steered,
                    st.counters.dropped,
                    st.counters.exempted,
                    st.counters.identified
                ),
            ));
            st.steered_ports.into_iter().collect()
        }
        Ok(st) => {
            let missing: Vec<&str> = st
                .links
                .iter()
                .filter(|l| !l.pinned)
                .map(|l| l.program)
                .collect();
            out.push(Finding::new(
                if cfg.enabled {
                    Severity::Fail
                } else {
                    Severity::Warn
                },
                "steering",
                format!(
                    "not attached under {} (missing: {})",
                    cfg.pin_dir.display(),
                    missing.join(", ")
                ),
            ));
            BTreeSet::new()
        }
        Err(e) => {
            out.push(Finding::new(
                Severity::Fail,
                "steering",
                format!("cannot read {}: {e}", cfg.pin_dir.display()),
            ));
            BTreeSet::new()
        }
    }
}

fn postgres_listeners(steered: &BTreeSet<u16>, proxy: Option<Account>, out: &mut Vec<Finding>) {
    let inodes = postgres_socket_inodes();
    if inodes.is_empty() {
        out.push(Finding::new(
            Severity::Info,
            "postgresql",
            "no running PostgreSQL server found on this host",
        ));
        return;
    }
    for (addr, port) in tcp_listeners(&inodes) {
        out.push(if steered.contains(&port) {
            Finding::new(
                Severity::Ok,
                "postgresql tcp",
                format!("listens on {addr}:{port}, which is steered to interceptor"),
            )
        } else {
            Finding::new(
                Severity::Fail,
                "postgresql tcp",
                format!(
                    "bypass: listens on {addr}:{port}, which is not steered (add the port to \
                     [ebpf] ports or stop PostgreSQL listening on TCP)"
                ),
            )
        });
    }
    let dirs: BTreeSet<PathBuf> = unix_listeners(&inodes)
        .into_iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    for dir in dirs {
        out.extend(check_unix_socket_dir(&dir, proxy));
    }
}

/// Whether only the PostgreSQL account, interceptor's account (via the directory's group) and
/// root can reach the unix socket(s) in `dir`. Connecting to a unix socket needs search (x)
/// permission on its directory, so the directory is the gate.
pub fn check_unix_socket_dir(dir: &Path, proxy: Option<Account>) -> Vec<Finding> {
    const CHECK: &str = "postgresql unix socket";
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) => {
            return vec![Finding::new(
                Severity::Fail,
                CHECK,
                format!("cannot inspect {}: {e}", dir.display()),
            )];
        }
    };
    let mode = meta.mode() & 0o7777;
    let (owner, group) = (meta.uid(), meta.gid());
    let d = dir.display();
    let mut out = Vec::new();
    if mode & 0o001 != 0 {
        out.push(Finding::new(
            Severity::Fail,
            CHECK,
            format!(
                "bypass: every local user can enter {d} (mode {mode:o}) and connect to PostgreSQL \
                 directly; make it owned by the PostgreSQL account with interceptor's group, \
                 mode 0750 or 0710"
            ),
        ));
    }
    if mode & 0o010 != 0 {
        if let Some(p) = proxy.filter(|p| p.gid != group) {
            out.push(Finding::new(
                Severity::Fail,
                CHECK,
                format!(
                    "bypass: group {group} of {d} is not interceptor's group {}",
                    p.gid
                ),
            ));
        }
        let others: Vec<String> = group_members(group)
            .into_iter()
            // root passes any permission check anyway; it is reported once, separately.
            .filter(|(_, uid)| *uid != 0 && *uid != owner && proxy.is_none_or(|p| p.uid != *uid))
            .map(|(name, _)| name)
            .collect();
        if !others.is_empty() {
            out.push(Finding::new(
                Severity::Fail,
                CHECK,
                format!(
                    "bypass: members of group {group} can enter {d}: {}",
                    others.join(", ")
                ),
            ));
        }
    } else if let Some(p) = proxy.filter(|p| p.uid != owner && p.uid != 0) {
        // Root passes any permission check, so a 0700 directory stops only non-root accounts.
        out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!(
                "interceptor (uid {}) cannot enter {d}: give the directory interceptor's group \
                 and mode 0750",
                p.uid
            ),
        ));
    }
    if out.is_empty() {
        out.push(Finding::new(
            Severity::Ok,
            CHECK,
            format!(
                "{d} (mode {mode:o}, owner {owner}, group {group}) admits only its owner, \
                 interceptor and root"
            ),
        ));
    }
    out
}

/// Users whose primary group is `gid` or who are listed in it: (name, uid).
fn group_members(gid: u32) -> Vec<(String, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let users: Vec<(String, u32, u32)> = passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((
                f.first()?.to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
            ))
        })
        .collect();
    let mut names: BTreeSet<String> = users
        .iter()
        .filter(|(_, _, g)| *g == gid)
        .map(|(n, _, _)| n.clone())
        .collect();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for l in group.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(gid)
            && let Some(members) = f.get(3)
        {
            names.extend(
                members
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from),
            );
        }
    }
    names
        .into_iter()
        .map(|n| {
            let uid = users
                .iter()
                .find(|(u, _, _)| *u == n)
                .map_or(u32::MAX, |(_, uid, _)| *uid);
            (n, uid)
        })
        .collect()
}

/// Socket inodes held by processes named `postgres`/`postmaster`.
fn postgres_socket_inodes() -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return inodes;
    };
    for entry in procs.flatten() {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !matches!(comm.trim_end(), "postgres" | "postmaster") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    inodes.insert(n);
                }
            }
        }
    }
    inodes
}

/// Listening TCP sockets among `inodes`: (address, port).
fn tcp_listeners(inodes: &BTreeSet<u64>) -> Vec<(std::net::IpAddr, u16)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        out.extend(parse_proc_net_tcp(&text, inodes));
    }
    out
}

fn parse_proc_net_tcp(text: &str, inodes: &BTreeSet<u64>) -> Vec<(std::net::IpAddr, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let inode: u64 = f.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let (addr, port) = f.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // Each 8-digit group is a native-endian u32 holding network-order bytes.
            let words: Vec<u32> = (0..addr.len() / 8)
                .map(|i| u32::from_str_radix(addr.get(8 * i..8 * i + 8)?, 16).ok())
                .collect::<Option<_>>()?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let ip = match bytes.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
                _ => return None,
            };
            Some((ip, port))
        })
        .collect()
}

/// Paths of listening unix sockets among `inodes`.
fn unix_listeners(inodes: &BTreeSet<u64>) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = f.get(7)?;
            (inodes.contains(&inode) && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn proc_net_tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 4242 1 0 100 0 0 10 0\n\
           1: 0100007F:1539 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 4243 1 0 100 0 0 10 0\n\
           2: 0100007F:1538 0100007F:D431 01 00000000:00000000 00:00000000 00000000   105        0 4242 1 0 100 0 0 10 0\n";
        let inodes: BTreeSet<u64> = [4242].into();
        assert_eq!(
            parse_proc_net_tcp(text, &inodes),
            vec![("127.0.0.1".parse().unwrap(), 5432)]
        );
        let v6 = "hdr\n 0: 00000000000000000000000001000000:1538 00000000000000000000000000000000:0000 0A 0:0 0:0 0 105 0 7 1\n";
        assert_eq!(
            parse_proc_net_tcp(v6, &[7].into()),
            vec![("::1".parse().unwrap(), 5432)]
        );
    }

    #[test]
    fn unix_socket_dir_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let me = Account::current();

        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = check_unix_socket_dir(p, Some(me));
        assert!(
            f.iter()
                .any(|f| f.severity == Severity::Fail && f.message.contains("every local user")),
            "{f:?}"
        );

        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let f = check_unix_socket_dir(p, Some(me));
        assert!(f.iter().all(|f| f.severity == Severity::Ok), "{f:?}");

        // Group access for a group that is not interceptor's.
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o750)).unwrap();
        let other = Account {
            uid: me.uid.wrapping_add(1),
            gid: me.gid.wrapping_add(1),
        };
        let f = check_unix_socket_dir(p, Some(other));
        assert!(
            f.iter()
                .any(|f| f.severity == Severity::Fail
                    && f.message.contains("not interceptor's group")),
            "{f:?}"
        );

        let f = check_unix_socket_dir(&p.join("missing"), None);
        assert_eq!(f[0].severity, Severity::Fail);
    }

    #[test]
    fn root_is_not_told_it_cannot_enter_a_0700_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let root = Account { uid: 0, gid: 0 };
        // Owned by another account (the PostgreSQL server's); needs root to hand it over.
        if std::os::unix::fs::chown(p, Some(54_321), Some(54_321)).is_ok() {
            let f = check_unix_socket_dir(p, Some(root));
            assert!(f.iter().all(|f| f.severity == Severity::Ok), "{f:?}");
            assert!(
                !f.iter().any(|f| f.message.contains("cannot enter")),
                "{f:?}"
            );
        }
        // A non-root interceptor account is still told.
        let other = Account {
            uid: 54_322,
            gid: 54_322,
        };
        let f = check_unix_socket_dir(p, Some(other));
        assert!(
            f.iter().any(|f| f.message.contains("cannot enter")),
            "{f:?}"
        );
    }
}
