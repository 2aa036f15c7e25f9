//! The interceptor process under test: a generated config and secrets file in a temp dir,
//! the real binary, logs captured to a file, killed on drop.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use toml::{Table, Value};

use crate::certs::TestCerts;
use crate::conn::ConnParams;
use crate::pg::PgCluster;

/// A static identity the proxy authenticates with SCRAM.
#[derive(Debug, Clone)]
pub struct IdentitySpec {
    pub name: String,
    pub password: String,
    pub groups: Vec<String>,
    pub upstream_role: Option<String>,
}

impl IdentitySpec {
    pub fn new(name: &str, password: &str, groups: &[&str], upstream_role: Option<&str>) -> Self {
        IdentitySpec {
            name: name.to_owned(),
            password: password.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            upstream_role: upstream_role.map(str::to_owned),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamVia {
    UnixSocket,
    Tcp,
}

/// What to put into the generated config. Start with [`InterceptorSetup::new`].
#[derive(Debug, Clone)]
pub struct InterceptorSetup {
    upstream_socket_dir: PathBuf,
    upstream_port: u16,
    upstream_via: UpstreamVia,
    /// `[upstream] auth` (`None`: the daemon's default).
    upstream_auth: Option<Vec<String>>,
    role_passwords: Vec<(String, String)>,
    pseudonym_key: Option<String>,
    identities: Vec<IdentitySpec>,
    tls: Option<(PathBuf, PathBuf)>,
    ca_cert: Option<PathBuf>,
    require_tls: bool,
    client_ca: Option<PathBuf>,
    audit_dir: Option<AuditDir>,
    /// `[audit] durability` (`None`: the daemon's default, fsync).
    audit_durability: Option<String>,
    policy_dir: Option<PathBuf>,
    policy_files: Vec<(String, String)>,
    allow_all_policies: bool,
    unix_listener: bool,
    /// `(dir, port)` of the unix socket instead of `<tempdir>/sock` and the proxy's port.
    unix_socket_at: Option<(PathBuf, u16)>,
    /// Also listen on `[::1]` (same port as 127.0.0.1).
    listen_v6: bool,
    extra_toml: String,
    env: Vec<(String, String)>,
    startup_timeout: Duration,
    /// The binary to run instead of [`interceptor_bin`].
    binary: Option<PathBuf>,
}

#[derive(Debug, Clone)]
enum AuditDir {
    InTemp,
    At(PathBuf),
}

impl InterceptorSetup {
    /// Upstream is `pg` over its unix socket; the secrets file holds every role password the
    /// harness created.
    pub fn new(pg: &PgCluster) -> Self {
        InterceptorSetup {
            upstream_socket_dir: pg.socket_dir().to_path_buf(),
            upstream_port: pg.port(),
            upstream_via: UpstreamVia::UnixSocket,
            upstream_auth: None,
            role_passwords: pg.role_passwords().into_iter().collect(),
            identities: Vec::new(),
            tls: None,
            ca_cert: None,
            require_tls: false,
            client_ca: None,
            audit_dir: Some(AuditDir::InTemp),
            audit_durability: None,
            policy_dir: None,
            policy_files: Vec::new(),
            pseudonym_key: None,
            allow_all_policies: false,
            unix_listener: true,
            unix_socket_at: None,
            listen_v6: false,
            extra_toml: String::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(20),
            binary: None,
        }
    }

    /// Adds a static identity (name, password, groups, upstream role).
    pub fn identity(
        mut self,
        name: &str,
        password: &str,
        groups: &[&str],
        upstream_role: Option<&str>,
    ) -> Self {
        self.identities
            .push(IdentitySpec::new(name, password, groups, upstream_role));
        self
    }

    pub fn identity_spec(mut self, spec: IdentitySpec) -> Self {
        self.identities.push(spec);
        self
    }

    /// Serve TLS with the test server certificate.
    pub fn tls(mut self, certs: &TestCerts) -> Self {
        self.tls = Some((certs.server.cert.clone(), certs.server.key.clone()));
        self.ca_cert = Some(certs.ca_cert.clone());
        self
    }

    /// Refuse clients that do not negotiate TLS (`[tls] require = true`).
    pub fn require_tls(mut self, on: bool) -> Self {
        self.require_tls = on;
        self
    }

    /// Accept client certificates signed by this CA (mTLS).
    pub fn client_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(ca.into());
        self
    }

    /// Reach PostgreSQL over TCP 127.0.0.1 instead of its unix socket.
    pub fn upstream_tcp(mut self) -> Self {
        self.upstream_via = UpstreamVia::Tcp;
        self
    }

    /// The password methods PostgreSQL may ask for (`[upstream] auth`).
    pub fn upstream_auth(mut self, methods: &[&str]) -> Self {
        self.upstream_auth = Some(methods.iter().map(|m| (*m).to_owned()).collect());
        self
    }

    /// The masking pseudonym key in the secrets file.
    pub fn pseudonym_key(mut self, key: &str) -> Self {
        self.pseudonym_key = Some(key.to_owned());
        self
    }

    /// Add or replace an upstream role password in the secrets file.
    pub fn role_password(mut self, role: &str, password: &str) -> Self {
        self.role_passwords.retain(|(r, _)| r != role);
        self.role_passwords
            .push((role.to_owned(), password.to_owned()));
        self
    }

    fn admin_socket(&self, dir: &Path) -> PathBuf {
        dir.join("admin.sock")
    }

    /// Keep the audit store in `<tempdir>/audit` (the default: interceptor requires an audit trail).
    pub fn with_audit(mut self) -> Self {
        self.audit_dir = Some(AuditDir::InTemp);
        self
    }

    pub fn audit_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.audit_dir = Some(AuditDir::At(dir.into()));
        self
    }

    /// Runs `bin` (same command line as interceptor's) instead of [`interceptor_bin`]: the
    /// benchmark's allocation-counting build.
    pub fn binary(mut self, bin: impl Into<PathBuf>) -> Self {
        self.binary = Some(bin.into());
        self
    }

    /// `[audit] durability = "fsync" | "write"`.
    pub fn audit_durability(mut self, durability: &str) -> Self {
        self.audit_durability = Some(durability.to_owned());
        self
    }

    pub fn policy_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.policy_dir = Some(dir.into());
        self
    }

    /// A policy file (`<name>.toml`) written into `<tempdir>/policies`, which becomes the
    /// policy dir unless [`Self::policy_dir`] names another one (then the file goes there).
    pub fn policy_file(mut self, name: &str, toml: &str) -> Self {
        self.policy_files.push((name.to_owned(), toml.to_owned()));
        self
    }

    /// One policy per identity that logs it in as its `upstream_role` (default `app_ro`) and
    /// allows every statement kind and risk: for tests of the relay itself, so that what
    /// they observe is PostgreSQL's behaviour and not a policy decision. The proxy denies
    /// everything without a policy.
    pub fn allow_all_policies(mut self) -> Self {
        self.allow_all_policies = true;
        self
    }

    fn all_policy_files(&self) -> Vec<(String, String)> {
        let mut files = self.policy_files.clone();
        if self.allow_all_policies {
            for id in &self.identities {
                files.push((format!("e2e-allow-all-{}", id.name), allow_all_policy(id)));
            }
        }
        files
    }

    fn effective_policy_dir(&self, dir: &Path) -> Option<PathBuf> {
        let has_files = !self.policy_files.is_empty() || self.allow_all_policies;
        match (&self.policy_dir, has_files) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(dir.join("policies")),
            (None, false) => None,
        }
    }

    /// Also listen on a unix socket in the temp dir (default on).
    pub fn unix_listener(mut self, on: bool) -> Self {
        self.unix_listener = on;
        self
    }

    /// Serve the unix socket `<dir>/.s.PGSQL.<port>` (e.g. a stand-in for /var/run/postgresql
    /// and PostgreSQL's port) instead of one in the temp dir.
    pub fn unix_socket_at(mut self, dir: impl Into<PathBuf>, port: u16) -> Self {
        self.unix_listener = true;
        self.unix_socket_at = Some((dir.into(), port));
        self
    }

    /// Also listen on `[::1]`, on the same port as on 127.0.0.1.
    pub fn listen_v6(mut self, on: bool) -> Self {
        self.listen_v6 = on;
        self
    }

    /// TOML appended verbatim to the generated config (e.g. `[limits]` or `[admin]`).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self.extra_toml.push('\n');
        self
    }

    /// An environment variable for the interceptor process (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    pub fn identities(&self) -> &[IdentitySpec] {
        &self.identities
    }

    /// The config TOML for a proxy listening on `port` with its files under `dir`.
    pub fn render_config(&self, dir: &Path, port: u16) -> Result<String> {
        let mut root = Table::new();
        let path = |p: &Path| Value::String(p.to_string_lossy().into_owned());

        let mut listen = Table::new();
        let mut tcp = vec![Value::String(format!("127.0.0.1:{port}"))];
        if self.listen_v6 {
            tcp.push(Value::String(format!("[::1]:{port}")));
        }
        listen.insert("tcp".into(), Value::Array(tcp));
        if self.unix_listener {
            let (sock_dir, unix_port) = match &self.unix_socket_at {
                Some((d, p)) => (d.clone(), *p),
                None => (dir.join("sock"), port),
            };
            listen.insert("unix_socket_dir".into(), path(&sock_dir));
            listen.insert("unix_port".into(), Value::Integer(i64::from(unix_port)));
        }
        root.insert("listen".into(), Value::Table(listen));

        if let Some((cert, key)) = &self.tls {
            let mut tls = Table::new();
            tls.insert("cert".into(), path(cert));
            tls.insert("key".into(), path(key));
            tls.insert("require".into(), Value::Boolean(self.require_tls));
            if let Some(ca) = &self.client_ca {
                tls.insert("client_ca".into(), path(ca));
            }
            root.insert("tls".into(), Value::Table(tls));
        } else if self.require_tls {
            bail!("require_tls needs tls(certs)");
        }

        let mut upstream = Table::new();
        match self.upstream_via {
            UpstreamVia::UnixSocket => {
                upstream.insert("host".into(), path(&self.upstream_socket_dir));
            }
            UpstreamVia::Tcp => {
                upstream.insert("host".into(), Value::String("127.0.0.1".into()));
            }
        }
        upstream.insert("port".into(), Value::Integer(i64::from(self.upstream_port)));
        if let Some(methods) = &self.upstream_auth {
            let list = methods.iter().map(|m| Value::String(m.clone())).collect();
            upstream.insert("auth".into(), Value::Array(list));
        }
        root.insert("upstream".into(), Value::Table(upstream));

        let mut secrets = Table::new();
        secrets.insert("file".into(), path(&dir.join("secrets.toml")));
        root.insert("secrets".into(), Value::Table(secrets));

        let mut identities = Table::new();
        for id in &self.identities {
            let mut t = Table::new();
            let verifier = postgres_protocol::password::scram_sha_256(id.password.as_bytes());
            t.insert("secret".into(), Value::String(verifier));
            t.insert(
                "groups".into(),
                Value::Array(id.groups.iter().cloned().map(Value::String).collect()),
            );
            // The upstream role is chosen by policy ([login] upstream_role), not here.
            identities.insert(id.name.clone(), Value::Table(t));
        }
        if !identities.is_empty() {
            root.insert("identity".into(), Value::Table(identities));
        }

        if let Some(audit) = &self.audit_dir {
            let admin_socket = self.admin_socket(dir);
            let dir = match audit {
                AuditDir::InTemp => dir.join("audit"),
                AuditDir::At(p) => p.clone(),
            };
            let mut t = Table::new();
            t.insert("dir".into(), path(&dir));
            if let Some(d) = &self.audit_durability {
                t.insert("durability".into(), Value::String(d.clone()));
            }
            root.insert("audit".into(), Value::Table(t));
            // The auditor's CLI reaches the running daemon's store through the admin socket.
            let mut admin = Table::new();
            admin.insert("socket".into(), path(&admin_socket));
            root.insert("admin".into(), Value::Table(admin));
        }
        if let Some(p) = self.effective_policy_dir(dir) {
            let mut t = Table::new();
            t.insert("dir".into(), path(&p));
            root.insert("policy".into(), Value::Table(t));
        }

        let mut text = toml::to_string(&root).context("serialize config")?;
        if !self.extra_toml.is_empty() {
            text.push('\n');
            text.push_str(&self.extra_toml);
        }
        Ok(text)
    }

    fn render_secrets(&self) -> Result<String> {
        let mut roles = Table::new();
        for (role, pw) in &self.role_passwords {
            roles.insert(role.clone(), Value::String(pw.clone()));
        }
        let mut root = Table::new();
        root.insert("roles".into(), Value::Table(roles));
        if let Some(k) = &self.pseudonym_key {
            root.insert("pseudonym_key".into(), Value::String(k.clone()));
        }
        toml::to_string(&root).context("serialize secrets")
    }
}

/// The policy [`InterceptorSetup::allow_all_policies`] writes for one identity (tests append
/// sections such as `[mask]` to it).
pub fn allow_all_policy(id: &IdentitySpec) -> String {
    let role = id.upstream_role.as_deref().unwrap_or(crate::pg::APP_RO);
    let quote = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        "[policy]\n\
         name = {name}\n\
         description = \"interceptor-tests: everything allowed (relay tests, not policy tests)\"\n\
         \n\
         [identities]\n\
         subjects = [{subject}]\n\
         \n\
         [login]\n\
         upstream_role = {role}\n\
         databases = [\"*\"]\n\
         \n\
         [[rule]]\n\
         name = \"everything\"\n\
         decision = \"allow\"\n\
         kinds = [\"any\"]\n\
         risks = [\"any\"]\n",
        name = quote(&format!("e2e-allow-all-{}", id.name)),
        subject = quote(&id.name),
        role = quote(role),
    )
}

/// Path of the interceptor binary: `$INTERCEPTOR_BIN`, else `debug/interceptor` in the cargo
/// target dir (`$CARGO_TARGET_DIR`, the dir this test binary runs from, or `<workspace>/target`).
pub fn interceptor_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("INTERCEPTOR_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!("INTERCEPTOR_BIN={} does not exist", bin.display());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join("interceptor"));
    }
    // Test binaries live in <target>/debug/deps/.
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("interceptor"));
    }
    candidates.push(
        crate::workspace_root()
            .join("target")
            .join("debug")
            .join("interceptor"),
    );
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "interceptor binary not found (looked at {candidates:?}); run `cargo build -p interceptor` \
         (or `cargo xtask test`) first, or set INTERCEPTOR_BIN"
    )
}

/// What the daemon logs once it serves (server.rs).
const READY_LINE: &str = "interceptor ready";

/// A running interceptor. Dropping it kills the process and removes its temp dir.
#[derive(Debug)]
pub struct Interceptor {
    dir: TempDir,
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    port: u16,
    unix_listener: bool,
    setup: InterceptorSetup,
    child: Option<Child>,
}

impl Interceptor {
    pub fn start(setup: InterceptorSetup) -> Result<Interceptor> {
        let bin = match &setup.binary {
            Some(b) => b.clone(),
            None => interceptor_bin()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("icpt")
            .tempdir_in("/tmp")
            .context("interceptor temp dir")?;
        crate::reaper::reap_orphans_once();
        crate::reaper::claim(dir.path()).context("write owner file")?;
        if setup.unix_listener && setup.unix_socket_at.is_none() {
            std::fs::create_dir(dir.path().join("sock")).context("create socket dir")?;
        }
        if let Some(policy_dir) = setup.effective_policy_dir(dir.path()) {
            std::fs::create_dir_all(&policy_dir).context("create policy dir")?;
            for (name, text) in &setup.all_policy_files() {
                let file = policy_dir.join(format!("{name}.toml"));
                std::fs::write(&file, text)
                    .with_context(|| format!("write policy {}", file.display()))?;
            }
        }
        let secrets = dir.path().join("secrets.toml");
        std::fs::write(&secrets, setup.render_secrets()?).context("write secrets")?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600))
            .context("chmod secrets")?;
        let mut proxy = Interceptor {
            config_path: dir.path().join("interceptor.toml"),
            log_path: dir.path().join("interceptor.log"),
            dir,
            bin,
            port: 0,
            unix_listener: setup.unix_listener,
            setup,
            child: None,
        };
        // A port that was free a moment ago can be taken by someone else: retry on a new one.
        let mut last_err = None;
        for _ in 0..3 {
            proxy.port = crate::net::free_port()?;
            let config = proxy.setup.render_config(proxy.dir.path(), proxy.port)?;
            std::fs::write(&proxy.config_path, config).context("write config")?;
            match proxy.spawn() {
                Ok(()) => return Ok(proxy),
                Err(e) => {
                    proxy.kill9();
                    if !proxy.logs().contains("in use") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("interceptor did not start")))
    }

    fn spawn(&mut self) -> Result<()> {
        // Readiness is the daemon's own "interceptor ready" line, counted per start (the log
        // is appended to across restarts).
        let ready_before = self.logs().matches(READY_LINE).count();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open interceptor log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        // The daemon reads its log filter from INTERCEPTOR_LOG.
        let wait_ready_line = std::env::var_os("INTERCEPTOR_LOG").is_none()
            && !self.setup.env.iter().any(|(k, _)| k == "INTERCEPTOR_LOG");
        if wait_ready_line {
            cmd.env("INTERCEPTOR_LOG", "info,interceptor=debug");
        }
        cmd.env("RUST_BACKTRACE", "1");
        cmd.envs(self.setup.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let pid = child.id();
        // Owned by self first, so a failure below still kills it (start() calls kill9).
        self.child = Some(child);
        std::fs::write(
            self.dir.path().join(crate::reaper::PROXY_PID_FILE),
            pid.to_string(),
        )
        .context("write pid file")?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let timeout = self.setup.startup_timeout;
        let log_path = self.log_path.clone();
        let child = &mut self.child;
        crate::net::wait_for_tcp(addr, timeout, || {
            if let Some(c) = child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("interceptor exited during startup ({status}); its log:\n{logs}");
            }
            Ok(())
        })
        .with_context(|| format!("interceptor log:\n{}", self.logs()))?;
        // The port accepts (kernel backlog) before the daemon has finished starting, e.g.
        // attaching the eBPF programs or opening the admin socket: wait for its ready line
        // too, unless the caller chose a log filter that may hide it.
        if wait_ready_line {
            let deadline = std::time::Instant::now() + timeout;
            while self.logs().matches(READY_LINE).count() <= ready_before {
                if let Some(c) = self.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!(
                        "interceptor exited during startup ({status}); its log:\n{}",
                        self.logs()
                    );
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "interceptor did not report ready within {timeout:?}; its log:\n{}",
                        self.logs()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the unix listener socket `.s.PGSQL.<port>`, when enabled.
    pub fn unix_socket_dir(&self) -> Option<PathBuf> {
        match &self.setup.unix_socket_at {
            Some((d, _)) => Some(d.clone()),
            None => self.unix_listener.then(|| self.dir.path().join("sock")),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Every audit record, as the auditor's CLI exports it (`audit export --format jsonl`).
    pub fn audit_records(&self) -> Result<Vec<serde_json::Value>> {
        let out = Command::new(&self.bin)
            .args(["audit", "-c"])
            .arg(&self.config_path)
            .args(["export", "--format", "jsonl"])
            .output()
            .context("run interceptor audit export")?;
        if !out.status.success() {
            bail!(
                "audit export failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).context("parse an exported record"))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The audit directory in use when [`InterceptorSetup::with_audit`] was chosen.
    pub fn audit_dir(&self) -> Option<PathBuf> {
        match &self.setup.audit_dir {
            Some(AuditDir::InTemp) => Some(self.dir.path().join("audit")),
            Some(AuditDir::At(p)) => Some(p.clone()),
            None => None,
        }
    }

    /// The policy directory in the config, if any.
    pub fn policy_dir(&self) -> Option<PathBuf> {
        self.setup.effective_policy_dir(self.dir.path())
    }

    /// Everything the process wrote to stdout and stderr so far (all runs).
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Process id of the running interceptor.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// TCP parameters for an identity configured in the setup (password looked up).
    pub fn params(&self, identity: &str) -> ConnParams {
        let pw = self
            .setup
            .identities
            .iter()
            .find(|i| i.name == identity)
            .map(|i| i.password.as_str());
        ConnParams::new("127.0.0.1", self.port, identity, pw)
    }

    /// Unix-socket parameters for an identity (requires the unix listener).
    pub fn unix_params(&self, identity: &str) -> Option<ConnParams> {
        let dir = self.unix_socket_dir()?;
        let mut params = self.params(identity).host(dir.to_string_lossy());
        if let Some((_, port)) = &self.setup.unix_socket_at {
            params.port = *port;
        }
        Some(params)
    }

    /// SIGKILL, no chance to clean up (crash simulation).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 5 s; returns the exit status if it exited on its own.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        crate::os::signal(c.id(), libc::SIGTERM);
        crate::os::wait_with_deadline(&mut c, Duration::from_secs(5))
            .ok()
            .flatten()
    }

    /// Stops the process (if running) and starts it again with the same config and port.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.terminate();
        }
        self.spawn()
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        // terminate() escalates to SIGKILL itself, so nothing outlives the test.
        self.terminate();
    }
}
