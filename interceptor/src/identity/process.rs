//! Describing a local client process from what the kernel attests (SO_PEERCRED on the unix
//! socket; the eBPF programs for TCP) plus /proc at accept time.
//!
//! /proc is read right after accept; the pid could in principle have exited and been reused by
//! then. We read the process start time before and after the other fields and discard what we read
//! if it changed, and we never accept an identity whose uid differs from the kernel-attested one.
//!
//! No executable is attested for a unix-socket client: SO_PEERCRED names the process that called
//! connect(), but nothing records which program it ran then, and `/proc/<pid>/exe` at accept
//! shows whatever it exec'd since (connect, exec the allowed program, let the parent speak on
//! the socket). An `exes` policy therefore never matches a unix-socket client; the uid (kept by
//! the kernel from connect) and the cgroup (which a process cannot leave or enter on its own)
//! can.

use std::path::Path;

use super::ProcessIdentity;

/// Builds a [`ProcessIdentity`] for `pid`, whose uid/gid the kernel attested.
pub(crate) fn describe(pid: u32, uid: u32, gid: u32) -> ProcessIdentity {
    describe_in(Path::new("/proc"), pid, uid, gid)
}

fn describe_in(proc_root: &Path, pid: u32, uid: u32, gid: u32) -> ProcessIdentity {
    let dir = proc_root.join(pid.to_string());
    let start_before = start_time(&dir);
    let comm = std::fs::read_to_string(dir.join("comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let cgroup_path = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|s| cgroup_v2_path(&s));
    let owner_ok = owner_uid(&dir) == Some(uid);
    let stable = start_before.is_some() && start_before == start_time(&dir);
    if !(stable && owner_ok) {
        // The process is gone or is not the one the kernel saw: keep only attested facts.
        return ProcessIdentity {
            pid,
            uid,
            gid,
            comm: String::new(),
            exe: None,
            cgroup_id: 0,
            cgroup_path: None,
        };
    }
    ProcessIdentity {
        pid,
        uid,
        gid,
        comm,
        exe: None,
        cgroup_id: 0,
        cgroup_path,
    }
}

/// Field 22 of /proc/PID/stat (after the parenthesised comm, which may contain spaces).
fn start_time(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn owner_uid(dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// The unified (v2) hierarchy's path, or the first v1 path when there is no v2 entry.
fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().next().and_then(|l| l.splitn(3, ':').nth(2)))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_this_process() {
        let me = std::process::id();
        let uid = unsafe_free_uid();
        let id = describe(me, uid, 0);
        assert_eq!(id.pid, me);
        assert!(!id.comm.is_empty());
        assert!(id.cgroup_path.is_some());
        // What runs now is not what connected: never attested over a unix socket.
        assert_eq!(id.exe, None);
    }

    #[test]
    fn a_wrong_uid_keeps_only_attested_facts() {
        let me = std::process::id();
        let id = describe(me, unsafe_free_uid().wrapping_add(1), 0);
        assert!(id.exe.is_none() && id.comm.is_empty());
    }

    fn unsafe_free_uid() -> u32 {
        owner_uid(&Path::new("/proc").join(std::process::id().to_string())).unwrap()
    }

    #[test]
    fn cgroup_paths() {
        assert_eq!(
            cgroup_v2_path("12:cpu:/a\n0::/user.slice/x\n").as_deref(),
            Some("/user.slice/x")
        );
        assert_eq!(cgroup_v2_path("12:cpu:/a\n").as_deref(), Some("/a"));
    }
}
