//! Operating-system helpers: running PostgreSQL programs as the `postgres` user and
//! waiting for child processes with a deadline.

use std::ffi::CString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The OS account PostgreSQL runs as when the tests run as root (the server refuses root).
pub const PG_OS_USER: &str = "postgres";

/// Directory of the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`).
pub fn pg_bin_dir() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return dir.into();
    }
    "/usr/lib/postgresql/15/bin".into()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of an OS account.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let cname = CString::new(name).context("user name contains NUL")?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage that we read immediately;
    // the harness looks users up before spawning threads that could race on it.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        bail!("OS user {name:?} does not exist (PostgreSQL must run as a non-root user)");
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

/// Hands `path` to the PostgreSQL OS user when running as root (no-op otherwise).
pub fn give_to_pg_user(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = lookup_user(PG_OS_USER)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {PG_OS_USER}", path.display()))
}

/// A command for a PostgreSQL server program, run as `postgres` via `runuser` when we are root.
pub fn pg_server_command(program: &str) -> Command {
    let path = pg_bin_dir().join(program);
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", PG_OS_USER, "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

/// Runs a command to completion and fails with its output when it does not succeed.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {what} ({cmd:?})"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(anyhow!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

/// Waits for `child` until `timeout`; kills it when the deadline passes.
/// Returns `None` when the child had to be killed.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal to a process id (ignoring a process that is already gone).
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}
