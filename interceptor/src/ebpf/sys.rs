//! Thin system-call helpers: mounts, socket cookies, forced link detach.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::EbpfError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const CGROUP2_FALLBACK: &str = "/sys/fs/cgroup/unified";
const SO_COOKIE: libc::c_int = 57;
const SO_NETNS_COOKIE: libc::c_int = 71;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_OBJ_GET: libc::c_long = 7;

fn cstring(path: &Path) -> Result<CString, EbpfError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| EbpfError::Config(format!("path {} contains NUL", path.display())))
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

fn mount(fstype: &str, target: &Path) -> Result<(), EbpfError> {
    std::fs::create_dir_all(target)
        .map_err(|e| EbpfError::io(format!("creating {}", target.display()), e))?;
    let t = cstring(target)?;
    let fs = cstring(Path::new(fstype))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data may be NULL.
    let rc = unsafe { libc::mount(fs.as_ptr(), t.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(EbpfError::io(
            format!("mounting {fstype} on {}", target.display()),
            io::Error::last_os_error(),
        ));
    }
    tracing::info!("mounted {fstype} on {}", target.display());
    Ok(())
}

/// Creates `dir` on bpffs, mounting bpffs on /sys/fs/bpf first if nothing is mounted there.
pub(super) fn ensure_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    if dir.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
        mount("bpf", Path::new(BPFFS_MOUNT))?;
    }
    for sub in ["maps", "links"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)
            .map_err(|e| EbpfError::io(format!("creating {}", d.display()), e))?;
    }
    if !is_bpffs(dir) {
        return Err(EbpfError::Config(format!(
            "pin_dir {} is not on a bpf filesystem",
            dir.display()
        )));
    }
    Ok(())
}

/// Mount points of cgroup v2 hierarchies, from /proc/self/mountinfo.
pub(super) fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(unescape_mount))
                .flatten()
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The root of the cgroup v2 hierarchy, mounting one if none is mounted.
pub(super) fn ensure_cgroup2() -> Result<PathBuf, EbpfError> {
    if let Some(p) = cgroup2_mounts().into_iter().next() {
        return Ok(p);
    }
    mount("cgroup2", Path::new(CGROUP2_FALLBACK))?;
    Ok(PathBuf::from(CGROUP2_FALLBACK))
}

/// The calling thread's cgroup v2 directory under `root` (the cgroup2 mount point).
pub(super) fn current_cgroup(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::canonicalize(root.join(rel.trim_start_matches('/'))).ok()
}

pub(super) fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

fn getsockopt_u64(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// The kernel's unique, never reused id of a socket.
pub(super) fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, SO_COOKIE)
}

/// The cookie of the network namespace a socket lives in.
pub(super) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, SO_NETNS_COOKIE)
}

/// `BPF_LINK_DETACH`: detaches a link even while other processes hold it open.
pub(super) fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    // union bpf_attr { struct { __u32 link_fd; } link_detach; ... }; the tail must be zero.
    let mut attr = [0u32; 16];
    attr[0] = fd.as_raw_fd() as u32;
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // union bpf_attr { struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... } }
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr is a valid, zero-padded bpf_attr; the path outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// The local address and IPV6_V6ONLY flag of a listening socket.
pub(super) fn listener_info(fd: BorrowedFd<'_>) -> io::Result<(std::net::SocketAddr, bool)> {
    let owned = fd.try_clone_to_owned()?;
    let listener = std::net::TcpListener::from(owned);
    let addr = listener.local_addr()?;
    let v6only = if addr.is_ipv6() {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        v != 0
    } else {
        false
    };
    Ok((addr, v6only))
}

// ---------------------------------------------------------------------------------------------
// sock_diag (netlink): destroying TCP sockets, unix socket peers
// ---------------------------------------------------------------------------------------------

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_PEER: u16 = 2;

fn netlink_diag() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn nl_request(msg_type: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&msg_type.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(body);
    m
}

fn nl_send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: msg is a valid buffer of the given length.
    let rc = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn nl_recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

fn rd_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Aborts the TCP socket of this network namespace whose local end is `local` and remote end is
/// `remote` (SOCK_DESTROY: the peer gets a reset, the owner ECONNABORTED). Needs CAP_NET_ADMIN
/// and CONFIG_INET_DIAG_DESTROY.
pub(super) fn sock_destroy(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> io::Result<()> {
    let v6 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
        std::net::IpAddr::V6(a) => a,
    };
    // Both ends IPv4: an AF_INET socket, or an AF_INET6 one with mapped addresses (the kernel's
    // IPv6 lookup handles those). Ask as AF_INET first.
    let attempts: Vec<u8> = if local.is_ipv4() && remote.is_ipv4() {
        vec![libc::AF_INET as u8, libc::AF_INET6 as u8]
    } else {
        vec![libc::AF_INET6 as u8]
    };
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for family in attempts {
        // struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
        //   struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2]; } }
        let mut body = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
        body.extend_from_slice(&u32::MAX.to_ne_bytes());
        body.extend_from_slice(&local.port().to_be_bytes());
        body.extend_from_slice(&remote.port().to_be_bytes());
        for ip in [local.ip(), remote.ip()] {
            let mut a = [0u8; 16];
            match (family as i32, ip) {
                (libc::AF_INET, std::net::IpAddr::V4(v4)) => a[..4].copy_from_slice(&v4.octets()),
                (_, ip) => a = v6(ip).octets(),
            }
            body.extend_from_slice(&a);
        }
        body.extend_from_slice(&0u32.to_ne_bytes()); // interface
        body.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
        body.extend_from_slice(&u32::MAX.to_ne_bytes());
        let fd = netlink_diag()?;
        nl_send(
            &fd,
            &nl_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &body),
        )?;
        let mut buf = [0u8; 4096];
        let n = nl_recv(&fd, &mut buf)?;
        let reply = &buf[..n];
        if rd_u16(reply, 4) != Some(NLMSG_ERROR) {
            return Err(io::Error::other("unexpected sock_diag reply"));
        }
        let errno = rd_u32(reply, 16).map(|e| e as i32).unwrap_or(-libc::EIO);
        if errno == 0 {
            return Ok(());
        }
        last = io::Error::from_raw_os_error(-errno);
    }
    Err(last)
}

/// Every unix socket of this network namespace with a connected peer: inode -> peer inode.
pub(super) fn unix_peers() -> io::Result<std::collections::BTreeMap<u64, u64>> {
    // struct unix_diag_req { u8 family, protocol; u16 pad; u32 states, ino, show; u32 cookie[2]; }
    let mut body = vec![libc::AF_UNIX as u8, 0, 0, 0];
    body.extend_from_slice(&u32::MAX.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    body.extend_from_slice(&[0u8; 8]);
    let fd = netlink_diag()?;
    nl_send(
        &fd,
        &nl_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &body),
    )?;
    let mut peers = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nl_recv(&fd, &mut buf)?;
        if n == 0 {
            return Ok(peers);
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = rd_u32(&buf, at).unwrap_or(0) as usize;
            let ty = rd_u16(&buf, at + 4).unwrap_or(0);
            if len < 16 || at + len > n {
                return Err(io::Error::other("malformed sock_diag reply"));
            }
            match ty {
                NLMSG_DONE => return Ok(peers),
                NLMSG_ERROR => {
                    let errno = rd_u32(&buf, at + 16)
                        .map(|e| e as i32)
                        .unwrap_or(-libc::EIO);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => {}
            }
            // struct unix_diag_msg { u8 family, type, state, pad; u32 ino; u32 cookie[2]; }
            let msg = &buf[at + 16..at + len];
            if let Some(ino) = rd_u32(msg, 4) {
                let mut a = 16;
                while a + 4 <= msg.len() {
                    let alen = rd_u16(msg, a).unwrap_or(0) as usize;
                    let aty = rd_u16(msg, a + 2).unwrap_or(0);
                    if alen < 4 {
                        break;
                    }
                    if aty == UNIX_DIAG_PEER
                        && let Some(peer) = rd_u32(msg, a + 4)
                    {
                        peers.insert(u64::from(ino), u64::from(peer));
                    }
                    a += (alen + 3) & !3;
                }
            }
            at += (len + 3) & !3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_destroy_resets_the_peer() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: SOCK_DESTROY skipped");
            return;
        }
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, peer) = l.accept().unwrap();
        sock_destroy(server.local_addr().unwrap(), peer).unwrap();
        let mut buf = [0u8; 1];
        let r = client.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }

    #[test]
    fn unix_peers_pair_up() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino = |s: &std::os::unix::net::UnixStream| {
            let fd = s.as_raw_fd();
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        let peers = unix_peers().unwrap();
        assert_eq!(peers.get(&ino(&a)), Some(&ino(&b)));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount("/end\\04"), PathBuf::from("/end\\04"));
    }

    #[test]
    fn cookies_of_a_socket() {
        use std::os::fd::AsFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = socket_cookie(l.as_fd()).unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_ne!(a, socket_cookie(l2.as_fd()).unwrap());
        assert_eq!(
            netns_cookie(l.as_fd()).unwrap(),
            netns_cookie(l2.as_fd()).unwrap()
        );
        let (addr, v6only) = listener_info(l.as_fd()).unwrap();
        assert_eq!(addr, l.local_addr().unwrap());
        assert!(!v6only);
    }
}
