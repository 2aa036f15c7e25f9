//! Turning a kernel connect record into a [`ProcessIdentity`].
//!
//! pid, uid, gid, comm and cgroup id come from the kernel at connect() time and are trusted as
//! they are. So are the device and inode of the executable that called connect() (the connect
//! programs read `current->mm->exe_file`). The executable's path and the cgroup path are read from
//! /proc at accept time, and only reported when /proc still describes the same process running the
//! same program:
//!
//! * pid reuse: the process start time in `/proc/<pid>/stat` (CLOCK_BOOTTIME, clock ticks) must not
//!   be later than the connect time the kernel recorded (also CLOCK_BOOTTIME). A process that took
//!   the pid over after the connect started later. The stat is read before and after `exe` and the
//!   two start times must agree, so the exe belongs to the process that was checked. The check has
//!   clock-tick resolution (10 ms): fooling it needs the pid space to wrap within one tick.
//! * exec after connect, or the socket handed to another program: `/proc/<pid>/exe` must be the
//!   file (device and inode) the kernel recorded at connect. If not, no executable is reported
//!   (an `exes` policy then refuses) and the comm stays the connecting program's. Kernels whose
//!   BTF lacked the needed members leave the inode unrecorded; then no executable is reported
//!   either: /proc alone cannot tell an exec after connect() (a process can name itself like the
//!   allowed program before it execs it), so an `exes` policy refuses rather than trust it.
//! * io_uring workers (`iou-wrk-*`, `iou-sqp-*`) are threads of the process that owns the ring:
//!   the kernel records that process's pid, its executable and its leader's comm, and the
//!   credentials the request ran with (the submitter's; for SQPOLL, the ring's setup's).
//! * cgroup path: the path from `/proc/<pid>/cgroup` is kept only if that directory's inode is the
//!   cgroup id the kernel recorded.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::maps::ConnInfo;
use crate::identity::ProcessIdentity;

pub(super) fn process_identity(info: &ConnInfo, cgroup_root: Option<&Path>) -> ProcessIdentity {
    let comm = info.comm();
    let proc_dir = Path::new("/proc").join(info.pid.to_string());
    let exe = if info.flags & interceptor_common::CONN_EXE != 0 {
        same_process(info, &proc_dir, || exe_if_recorded(info, &proc_dir)).flatten()
    } else {
        // Logged once at attach ("cannot record executables at connect").
        None
    };
    let cgroup_path = cgroup_root.and_then(|root| cgroup_path(&proc_dir, root, info.cgroup_id));
    ProcessIdentity {
        pid: info.pid,
        uid: info.uid,
        gid: info.gid,
        comm,
        exe,
        cgroup_id: info.cgroup_id,
        cgroup_path,
    }
}

/// The kernel's `s_dev` encoding (major << 20 | minor) as user space's `st_dev`.
fn user_dev(kernel_dev: u32) -> u64 {
    libc::makedev(kernel_dev >> 20, kernel_dev & 0xf_ffff)
}

/// `/proc/<pid>/exe` if it is the file the kernel recorded at connect.
fn exe_if_recorded(info: &ConnInfo, proc_dir: &Path) -> Option<String> {
    let link = proc_dir.join("exe");
    // The path is read around the stat: a process exec'ing in between shows two paths.
    let path = std::fs::read_link(&link).ok()?;
    let meta = std::fs::metadata(&link).ok()?;
    let again = std::fs::read_link(&link).ok()?;
    if meta.ino() != info.exe_ino || meta.dev() != user_dev(info.exe_dev) || again != path {
        tracing::warn!(
            pid = info.pid,
            comm = %info.comm(),
            now = %path.display(),
            "the process runs another program than the one that called connect() (exec after \
             connect, or the socket was handed over): no executable attested"
        );
        return None;
    }
    Some(path.to_string_lossy().into_owned())
}

/// Runs `read` if `/proc/<pid>` is (before and after) the process that connected.
fn same_process<T>(info: &ConnInfo, proc_dir: &Path, read: impl FnOnce() -> T) -> Option<T> {
    let before = start_time_ns(proc_dir)?;
    if before > info.boot_ns {
        tracing::warn!(
            pid = info.pid,
            "pid was reused after connect: not reporting its executable"
        );
        return None;
    }
    let value = read();
    (start_time_ns(proc_dir)? == before).then_some(value)
}

/// Field 22 of `/proc/<pid>/stat`, in nanoseconds since boot.
fn start_time_ns(proc_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    parse_start_ticks(&stat).and_then(|ticks| ticks.checked_mul(ns_per_tick()))
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // comm (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn ns_per_tick() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        1_000_000_000 / hz as u64
    } else {
        10_000_000
    }
}

fn cgroup_path(proc_dir: &Path, root: &Path, cgroup_id: u64) -> Option<String> {
    let text = std::fs::read_to_string(proc_dir.join("cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(rel.trim_start_matches('/'));
    let ino = std::fs::metadata(&dir).ok()?.ino();
    (ino == cgroup_id).then(|| rel.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_odd_comm() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 \
                    1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        assert_eq!(parse_start_ticks("garbage"), None);
        assert_eq!(parse_start_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_is_recognised_and_reuse_is_not() {
        let pid = std::process::id();
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap();
        let comm = comm.trim_end_matches('\n');
        let mut info: ConnInfo = unsafe { std::mem::zeroed() };
        info.pid = pid;
        info.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        info.boot_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;

        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let meta = std::fs::metadata("/proc/self/exe").unwrap();
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        info.flags = interceptor_common::CONN_EXE;
        info.exe_dev = (major << 20) | minor;
        info.exe_ino = meta.ino();
        let now = info.boot_ns;
        assert_eq!(
            process_identity(&info, None).exe.as_deref(),
            Some(&*exe.to_string_lossy())
        );

        // A connect that happened before this process started: the pid must have been reused.
        info.boot_ns = 1;
        assert_eq!(process_identity(&info, None).exe, None);
        info.boot_ns = now;

        // The comm does not matter, the file does.
        info.comm = *b"not-this-comm\0\0\0";
        assert!(process_identity(&info, None).exe.is_some());

        // Without a recorded executable nothing is attested, even with the same comm: a
        // process can name itself like the program it execs after connect().
        info.flags = 0;
        info.comm = [0; 16];
        info.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        assert_eq!(process_identity(&info, None).exe, None);

        info.flags = interceptor_common::CONN_EXE;
        info.exe_ino += 1;
        assert_eq!(process_identity(&info, None).exe, None);
    }
}
