//! Throwaway PostgreSQL clusters: `initdb` into a temp dir owned by the `postgres` OS user,
//! SCRAM everywhere, least-privilege application roles and fixtures. Stopped and removed on drop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::cli::PgCommand;
use crate::conn::ConnParams;
use crate::os::{give_to_pg_user, pg_server_command, run_checked};

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "sup3r-Secret-for-tests";
/// Database holding the fixtures.
pub const APP_DB: &str = "app";
/// Read-only application role: SELECT on the public schema.
pub const APP_RO: &str = "app_ro";
pub const APP_RO_PASSWORD: &str = "ro-Pass-4c1d";
/// Read-write application role: SELECT/INSERT/UPDATE/DELETE on the public schema.
pub const APP_RW: &str = "app_rw";
pub const APP_RW_PASSWORD: &str = "rw-Pass-9e7f";

/// Authentication method written to `pg_hba.conf` for local and host lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HbaAuth {
    #[default]
    ScramSha256,
    /// `md5` with MD5-hashed role passwords (`password_encryption = md5`).
    Md5,
    Trust,
}

impl HbaAuth {
    fn hba_word(self) -> &'static str {
        match self {
            HbaAuth::ScramSha256 => "scram-sha-256",
            HbaAuth::Md5 => "md5",
            HbaAuth::Trust => "trust",
        }
    }
}

/// Server TLS material for the cluster itself (copied into the data dir, owned by postgres).
#[derive(Debug, Clone)]
pub struct PgSsl {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PgOptions {
    pub auth: HbaAuth,
    /// Listen on a free TCP port of 127.0.0.1 (otherwise only the unix socket).
    pub tcp: bool,
    pub log_statement_all: bool,
    pub log_connections: bool,
    /// Turn on TLS in the server.
    pub ssl: Option<PgSsl>,
    /// Only `hostssl` lines for TCP: plaintext TCP connections get a FATAL.
    pub ssl_only: bool,
    /// Create and fill the `accounts` table.
    pub accounts_fixture: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            auth: HbaAuth::ScramSha256,
            tcp: true,
            log_statement_all: false,
            log_connections: false,
            ssl: None,
            ssl_only: false,
            accounts_fixture: true,
            extra_conf: String::new(),
        }
    }
}

impl PgOptions {
    pub fn auth(mut self, auth: HbaAuth) -> Self {
        self.auth = auth;
        self
    }
    pub fn tcp(mut self, on: bool) -> Self {
        self.tcp = on;
        self
    }
    pub fn log_statement_all(mut self, on: bool) -> Self {
        self.log_statement_all = on;
        self
    }
    pub fn log_connections(mut self, on: bool) -> Self {
        self.log_connections = on;
        self
    }
    pub fn ssl(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.ssl = Some(PgSsl {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }
    pub fn ssl_only(mut self, on: bool) -> Self {
        self.ssl_only = on;
        self
    }
    pub fn accounts_fixture(mut self, on: bool) -> Self {
        self.accounts_fixture = on;
        self
    }
    pub fn extra_conf(mut self, lines: &str) -> Self {
        self.extra_conf.push_str(lines);
        self.extra_conf.push('\n');
        self
    }
}

/// A running throwaway cluster. Dropping it stops the server (`-m immediate`) and removes
/// its directory.
#[derive(Debug)]
pub struct PgCluster {
    dir: TempDir,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    opts: PgOptions,
    running: AtomicBool,
}

impl PgCluster {
    /// A cluster with the default options (SCRAM, TCP on, `accounts` fixture).
    pub fn start() -> Result<PgCluster> {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("pgt")
            .tempdir_in("/tmp")
            .context("create cluster temp dir")?;
        crate::reaper::reap_orphans_once();
        crate::reaper::claim(dir.path()).context("write owner file")?;
        give_to_pg_user(dir.path())?;
        let data_dir = dir.path().join("data");
        let log_file = dir.path().join("postgres.log");

        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).context("write pwfile")?;
        give_to_pg_user(&pwfile)?;
        let auth = opts.auth.hba_word();
        run_checked(
            pg_server_command("initdb")
                .current_dir(dir.path())
                .arg("-D")
                .arg(&data_dir)
                .args(["-U", SUPERUSER, "--no-sync", "-E", "UTF8", "--no-locale"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .arg(format!("--auth-local={auth}"))
                .arg(format!("--auth-host={auth}")),
            "initdb",
        )?;
        std::fs::remove_file(&pwfile).context("remove pwfile")?;

        let mut cluster = PgCluster {
            dir,
            data_dir,
            log_file,
            port: 0,
            opts,
            running: AtomicBool::new(false),
        };
        cluster.write_hba()?;
        cluster.copy_ssl_files()?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(cluster.data_dir.join("postgresql.conf"))
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "include 'harness.conf'")
            })
            .context("append include to postgresql.conf")?;

        // The port was free when chosen but another process may take it first: retry.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = crate::net::free_port()?;
            cluster.write_conf()?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        cluster.bootstrap()?;
        Ok(cluster)
    }

    fn write_conf(&self) -> Result<()> {
        let o = &self.opts;
        let mut conf = String::new();
        let listen = if o.tcp { "127.0.0.1" } else { "" };
        let _ = writeln!(conf, "listen_addresses = '{listen}'");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(
            conf,
            "unix_socket_directories = '{}'",
            self.dir.path().display()
        );
        let enc = match o.auth {
            HbaAuth::Md5 => "md5",
            _ => "scram-sha-256",
        };
        let _ = writeln!(conf, "password_encryption = '{enc}'");
        conf.push_str(
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nmax_connections = 60\nTimeZone = 'UTC'\n\
             log_timezone = 'UTC'\nlog_line_prefix = '%m [%p] %q%u@%d '\n\
             logging_collector = off\nlog_min_messages = info\n",
        );
        if o.log_statement_all {
            conf.push_str("log_statement = 'all'\n");
        }
        if o.log_connections {
            conf.push_str("log_connections = on\nlog_disconnections = on\n");
        }
        if o.ssl.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        conf.push_str(&o.extra_conf);
        let path = self.data_dir.join("harness.conf");
        std::fs::write(&path, conf).context("write harness.conf")?;
        give_to_pg_user(&path)
    }

    fn write_hba(&self) -> Result<()> {
        let auth = self.opts.auth.hba_word();
        let host = if self.opts.ssl_only {
            "hostssl"
        } else {
            "host"
        };
        let hba = format!(
            "# written by interceptor-tests\n\
             local all all {auth}\n\
             {host} all all 127.0.0.1/32 {auth}\n\
             {host} all all ::1/128 {auth}\n"
        );
        let path = self.data_dir.join("pg_hba.conf");
        std::fs::write(&path, hba).context("write pg_hba.conf")?;
        give_to_pg_user(&path)
    }

    fn copy_ssl_files(&self) -> Result<()> {
        let Some(ssl) = &self.opts.ssl else {
            return Ok(());
        };
        use std::os::unix::fs::PermissionsExt;
        for (src, name) in [(&ssl.cert, "server.crt"), (&ssl.key, "server.key")] {
            let dst = self.data_dir.join(name);
            std::fs::copy(src, &dst).with_context(|| format!("copy {}", src.display()))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
            give_to_pg_user(&dst)?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let res = run_checked(
            pg_server_command("pg_ctl")
                .current_dir(self.dir.path())
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
        match res {
            Ok(_) => {
                self.running.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => bail!("{e:#}\nserver log:\n{}", self.server_log()),
        }
    }

    fn bootstrap(&self) -> Result<()> {
        let mut sql = format!(
            "CREATE ROLE {APP_RO} LOGIN PASSWORD '{APP_RO_PASSWORD}';\n\
             CREATE ROLE {APP_RW} LOGIN PASSWORD '{APP_RW_PASSWORD}';\n\
             CREATE DATABASE {APP_DB};\n"
        );
        self.psql_db("postgres", &sql)?;
        sql = format!(
            "GRANT USAGE ON SCHEMA public TO {APP_RO}, {APP_RW};\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {APP_RO};\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public \
               GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_RW};\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public \
               GRANT USAGE, SELECT ON SEQUENCES TO {APP_RW};\n"
        );
        if self.opts.accounts_fixture {
            sql.push_str(&crate::fixtures::accounts_sql());
        }
        self.psql(&sql)?;
        Ok(())
    }

    /// Initializes the pgbench tables (`pgbench -i -s scale`) in the app database; the
    /// application roles get their privileges through the default privileges.
    pub fn pgbench_init(&self, scale: u32) -> Result<()> {
        PgCommand::pgbench(&self.superuser_params())
            .args(["-i", "-q", "-s"])
            .arg(scale.to_string())
            .timeout(Duration::from_secs(300))
            .run()?
            .ok()
            .context("pgbench -i")?;
        Ok(())
    }

    /// Runs SQL as the superuser over the unix socket in the app database; returns psql's
    /// unaligned, tuples-only output. Fails if any statement fails.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_db(APP_DB, sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> Result<String> {
        let out = PgCommand::psql(&self.superuser_params().dbname(db))
            .args(["-q", "-A", "-t", "-f", "-"])
            .stdin(sql)
            .run()?
            .ok()
            .with_context(|| format!("psql as superuser: {sql}"))?;
        Ok(out.stdout)
    }

    /// A tokio-postgres client over the unix socket.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.socket_params(user, Some(password))
            .dbname(db)
            .connect()
            .await
    }

    /// Waits until a backend is running a query containing `needle` (seen in
    /// `pg_stat_activity`), so a test acts on a query the server really has.
    pub fn wait_for_active_query(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND pid <> pg_backend_pid() AND strpos(query, '{}') > 0",
            needle.replace('\'', "''")
        );
        loop {
            if self.psql_db("postgres", &sql)?.trim() != "0" {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!("no active query containing {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Unix-socket parameters for `user` in the app database.
    pub fn socket_params(&self, user: &str, password: Option<&str>) -> ConnParams {
        ConnParams::new(
            self.socket_dir().to_string_lossy(),
            self.port,
            user,
            password,
        )
    }

    /// TCP (127.0.0.1) parameters for `user` in the app database.
    pub fn tcp_params(&self, user: &str, password: Option<&str>) -> ConnParams {
        ConnParams::new("127.0.0.1", self.port, user, password)
    }

    pub fn superuser_params(&self) -> ConnParams {
        self.socket_params(SUPERUSER, Some(SUPERUSER_PASSWORD))
    }

    /// The password of a role the harness created.
    pub fn password(&self, role: &str) -> Option<&'static str> {
        match role {
            SUPERUSER => Some(SUPERUSER_PASSWORD),
            APP_RO => Some(APP_RO_PASSWORD),
            APP_RW => Some(APP_RW_PASSWORD),
            _ => None,
        }
    }

    /// Role → password for every login role the harness created (for a secrets file).
    pub fn role_passwords(&self) -> BTreeMap<String, String> {
        [SUPERUSER, APP_RO, APP_RW]
            .into_iter()
            .filter_map(|r| self.password(r).map(|p| (r.to_owned(), p.to_owned())))
            .collect()
    }

    /// Directory holding the unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tcp_enabled(&self) -> bool {
        self.opts.tcp
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log so far (stderr of the postmaster).
    pub fn server_log(&self) -> String {
        std::fs::read(&self.log_file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Stops the server immediately (like a crash); the directory stays for [`Self::restart`].
    pub fn stop(&self) -> Result<()> {
        run_checked(
            pg_server_command("pg_ctl")
                .current_dir(self.dir.path())
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        )?;
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Starts a stopped server again on the same port and socket.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.pg_ctl_start()
    }

    /// Kills the postmaster directly when pg_ctl could not stop it, so no server outlives us.
    fn kill_postmaster(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if let Ok(text) = std::fs::read_to_string(pid_file)
            && let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        {
            crate::os::signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.is_running() && self.stop().is_err() {
            self.kill_postmaster();
        }
    }
}
