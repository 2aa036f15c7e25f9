//! A throwaway pgbouncer in session mode, the benchmark's reference proxy: generated
//! `pgbouncer.ini` and `userlist.txt` in a temp dir, run as a non-root user, stopped on drop.

use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Debian's pgbouncer binary (`cargo xtask setup` installs it).
pub const PGBOUNCER_BIN: &str = "/usr/sbin/pgbouncer";

/// Where pgbouncer sends its server connections.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// PostgreSQL's unix socket directory.
    pub socket_dir: PathBuf,
    pub port: u16,
    pub user: String,
    pub password: String,
}

pub struct Pgbouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Pgbouncer {
    /// Starts pgbouncer listening on a free 127.0.0.1 port; as `run_as` when we are root.
    pub fn start(upstream: &Upstream, run_as: &str) -> Result<Pgbouncer> {
        let dir = tempfile::Builder::new()
            .prefix("xtask-pgbouncer-")
            .tempdir()
            .context("create pgbouncer temp dir")?;
        let port = free_port()?;
        let ini = dir.path().join("pgbouncer.ini");
        let userlist = dir.path().join("userlist.txt");
        std::fs::write(&ini, ini_text(upstream, port, dir.path(), &userlist))
            .context("write pgbouncer.ini")?;
        write_private(
            &userlist,
            &userlist_line(&upstream.user, &upstream.password),
        )?;

        let mut cmd = Command::new(PGBOUNCER_BIN);
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            // pgbouncer refuses to run as root; hand it the files and drop privileges.
            let (uid, gid) = lookup_user(run_as)?;
            for path in [dir.path(), &ini, &userlist] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .with_context(|| format!("chown {} to {run_as}", path.display()))?;
            }
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {PGBOUNCER_BIN} (run `cargo xtask setup`)"))?;
        let mut bouncer = Pgbouncer { child, port, dir };
        bouncer.wait_ready(Duration::from_secs(10))?;
        Ok(bouncer)
    }

    /// The pgbouncer process (its CPU time is measured).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("wait for pgbouncer")? {
                bail!("pgbouncer exited ({status}); its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "pgbouncer did not listen on {addr} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration: every database goes to the one PostgreSQL, session pooling, TCP only.
fn ini_text(upstream: &Upstream, port: u16, dir: &Path, userlist: &Path) -> String {
    format!(
        "[databases]\n\
         * = host={socket_dir} port={pg_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = scram-sha-256\n\
         auth_file = {userlist}\n\
         pool_mode = session\n\
         max_client_conn = 100\n\
         default_pool_size = 40\n\
         logfile = {log}\n\
         ignore_startup_parameters = extra_float_digits\n",
        socket_dir = upstream.socket_dir.display(),
        pg_port = upstream.port,
        userlist = userlist.display(),
        log = dir.join("pgbouncer.log").display(),
    )
}

/// One `userlist.txt` line; pgbouncer doubles a `"` inside a quoted field.
fn userlist_line(user: &str, password: &str) -> String {
    format!(
        "\"{}\" \"{}\"\n",
        user.replace('"', "\"\""),
        password.replace('"', "\"\"")
    )
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local_addr")?.port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let cname = CString::new(name).context("user name contains NUL")?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once on this thread.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        bail!("OS user {name:?} does not exist");
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userlist_quotes_are_doubled() {
        assert_eq!(userlist_line("bench", "pa\"ss"), "\"bench\" \"pa\"\"ss\"\n");
    }

    #[test]
    fn ini_routes_every_database_to_the_socket_in_session_mode() {
        let up = Upstream {
            socket_dir: "/tmp/pg.sock".into(),
            port: 5999,
            user: "u".into(),
            password: "secret-pw".into(),
        };
        let ini = ini_text(
            &up,
            6001,
            Path::new("/tmp/b"),
            Path::new("/tmp/b/userlist.txt"),
        );
        assert!(ini.contains("* = host=/tmp/pg.sock port=5999\n"));
        assert!(ini.contains("listen_port = 6001\n"));
        assert!(ini.contains("pool_mode = session\n"));
        assert!(
            !ini.contains("secret-pw"),
            "the password belongs in the userlist only"
        );
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;
    use interceptor_tests::pg::{APP_DB, APP_RW, APP_RW_PASSWORD};
    use interceptor_tests::{ConnParams, PgCluster, PgCommand, PgOptions};

    /// A real pgbouncer (installed by `cargo xtask setup`) in front of a real cluster: SCRAM
    /// from the userlist works, a wrong password is refused, and the process goes away on drop.
    #[test]
    fn pgbouncer_relays_to_a_real_cluster_and_stops_on_drop() {
        let pg = PgCluster::start_with(PgOptions::default()).unwrap();
        let bouncer = Pgbouncer::start(
            &Upstream {
                socket_dir: pg.socket_dir().to_path_buf(),
                port: pg.port(),
                user: APP_RW.into(),
                password: APP_RW_PASSWORD.into(),
            },
            interceptor_tests::os::PG_OS_USER,
        )
        .unwrap();
        let params = |pw| ConnParams::new("127.0.0.1", bouncer.port(), APP_RW, Some(pw));
        let out = PgCommand::psql(&params(APP_RW_PASSWORD).dbname(APP_DB))
            .args(["-At", "-c", "SELECT current_user, count(*) FROM accounts"])
            .run()
            .unwrap()
            .ok()
            .unwrap();
        assert!(out.stdout.starts_with("app_rw|"), "{}", out.stdout);
        let wrong = PgCommand::psql(&params("not-the-password").dbname(APP_DB))
            .args(["-c", "SELECT 1"])
            .run()
            .unwrap();
        assert!(
            !wrong.success(),
            "a wrong password got in: {}",
            wrong.stdout
        );

        let pid = bouncer.child.id();
        drop(bouncer);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pgbouncer {pid} still runs after drop"
        );
    }
}
