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

pub fn is_bpffs(path: &Path) -> bool {
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
pub fn ensure_pin_dir(dir: &Path) -> Result<(), EbpfError> {
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
pub fn cgroup2_mounts() -> Vec<PathBuf> {
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
pub fn ensure_cgroup2() -> Result<PathBuf, EbpfError> {
    if let Some(p) = cgroup2_mounts().into_iter().next() {
        return Ok(p);
    }
    mount("cgroup2", Path::new(CGROUP2_FALLBACK))?;
    Ok(PathBuf::from(CGROUP2_FALLBACK))
}

/// The calling thread's cgroup v2 directory under `root` (the cgroup2 mount point).
pub fn current_cgroup(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/thread-self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::canonicalize(root.join(rel.trim_start_matches('/'))).ok()
}

pub fn is_cgroup2(path: &Path) -> bool {
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
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, SO_COOKIE)
}

/// The cookie of the network namespace a socket lives in.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, SO_NETNS_COOKIE)
}

/// `BPF_LINK_DETACH`: detaches a link even while other processes hold it open.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
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
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
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
pub fn listener_info(fd: BorrowedFd<'_>) -> io::Result<(std::net::SocketAddr, bool)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
