//! Cleanup after test processes that died without running destructors (SIGKILL, a timeout in
//! CI): every cluster and proxy dir records its owner's pid, and the next harness start stops
//! the servers of owners that no longer exist, so no server outlives its test for long.

use std::path::Path;
use std::sync::Once;

use crate::os::{pg_server_command, signal};

/// File in each harness temp dir naming the owning test process.
pub const OWNER_FILE: &str = "owner.pid";
/// File in an interceptor dir naming the interceptor process.
pub const PROXY_PID_FILE: &str = "interceptor.pid";

/// Records the current process as the owner of `dir`.
pub fn claim(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs once per process: stops orphaned clusters and proxies under /tmp.
pub fn reap_orphans_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(reap_orphans);
}

/// Stops clusters and proxies under /tmp whose owning process is gone.
pub fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let Some(owner) = read_pid(&dir.join(OWNER_FILE)) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        if name.starts_with("pgt") && dir.join("data").is_dir() {
            let _ = pg_server_command("pg_ctl")
                .current_dir(&dir)
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .output();
            let _ = std::fs::remove_dir_all(&dir);
        } else if name.starts_with("icpt") {
            if let Some(pid) = read_pid(&dir.join(PROXY_PID_FILE)) {
                // Only if that pid still runs our binary with this dir's config.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let config = dir.join("interceptor.toml");
                if String::from_utf8_lossy(&cmdline).contains(&*config.to_string_lossy()) {
                    signal(pid, libc::SIGKILL);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
