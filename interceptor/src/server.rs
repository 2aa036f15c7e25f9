//! The daemon: listeners, shared state and the accept loop.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};

use crate::audit::{AuditEvent, AuditLog, PolicyReload};
use crate::config::{Config, UpstreamTls};
use crate::ebpf::Steering;
use crate::net::stream::Stream;
use crate::net::tls;
use crate::policy::{PolicyEvent, PolicyHandle, PolicySet};
use crate::secrets::Secrets;
use crate::session::auth::{Authenticators, StaticIdentities};
use crate::session::cancel::CancelRegistry;
use crate::session::upstream::UpstreamTarget;
use crate::session::{self, Peer};

/// Everything sessions share.
pub struct ServerState {
    /// The configuration the server started with (SIGHUP replaces only what
    /// [`ServerState::reload_credentials`] names).
    pub config: Config,
    /// Static identities and the OIDC/mTLS verifiers sessions authenticate with: read through
    /// [`ServerState::identities`], replaced on SIGHUP.
    pub identities: std::sync::RwLock<Arc<Authenticators>>,
    /// Upstream role passwords: read through [`ServerState::secrets`], re-read on SIGHUP.
    pub secrets: std::sync::RwLock<Arc<Secrets>>,
    pub upstream: UpstreamTarget,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancel: CancelRegistry,
    pub policy: PolicyHandle,
    pub audit: AuditLog,
    pub steering: Option<Arc<Steering>>,
    pub sessions: SessionCounts,
    pub approvals: Option<crate::approval::ApprovalService>,
    /// The client-facing TLS configuration (shared with the approvals admin API).
    pub tls_config: Option<Arc<rustls::ServerConfig>>,
    /// Bounds connections that have not authenticated yet.
    pub admission: crate::net::admission::Admission,
    /// Sessions open now (`interceptor sessions`), and how to end them.
    pub live: crate::ops::sessions::LiveSessions,
}

/// Open sessions per identity, for the policy's `max_sessions`.
#[derive(Default)]
pub struct SessionCounts {
    open: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// Holds one session slot; released on drop.
pub struct SessionSlot<'a> {
    counts: &'a SessionCounts,
    subject: String,
}

impl SessionCounts {
    pub fn acquire(&self, subject: &str, max: u32) -> Option<SessionSlot<'_>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(subject.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SessionSlot {
            counts: self,
            subject: subject.to_owned(),
        })
    }
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.subject) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

/// Everything loaded from the configuration that needs no exclusive store: what
/// `interceptor check-config` validates, also while the daemon runs.
pub struct Loaded {
    identities: Authenticators,
    secrets: Secrets,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    policy: PolicyHandle,
}

impl Loaded {
    pub fn load(config: &Config) -> anyhow::Result<Loaded> {
        let statics = StaticIdentities::new(&config.identities).map_err(anyhow::Error::msg)?;
        let secrets = Secrets::load(config.secrets.file.as_deref())?;
        let mtls = config.mtls.clone().or_else(|| {
            config
                .tls
                .as_ref()
                .and_then(|t| t.client_ca.clone())
                .map(crate::identity::mtls::MtlsConfig::with_ca_file)
        });
        let tls_config = match &config.tls {
            Some(t) => Some(tls::server_config(&t.cert, &t.key, mtls.as_ref())?),
            None => None,
        };
        let tls = tls_config.clone().map(tokio_rustls::TlsAcceptor::from);
        let oidc = match &config.oidc {
            Some(o) => Some(Arc::new(crate::identity::oidc::OidcVerifier::new(o)?)),
            None => None,
        };
        let upstream_tls = match config.upstream.tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Prefer | UpstreamTls::Require => Some(tls::client_config(None, false)?),
            UpstreamTls::VerifyFull => {
                Some(tls::client_config(config.upstream.ca.as_deref(), true)?)
            }
        };
        // Default deny: without a policy directory every login is refused.
        let policy = match &config.policy {
            Some(p) => PolicyHandle::load(&p.dir)
                .with_context(|| format!("cannot load policies from {}", p.dir.display()))?,
            None => PolicyHandle::new(PolicySet::empty()),
        };
        Ok(Loaded {
            identities: Authenticators {
                statics,
                oidc,
                mtls,
            },
            secrets,
            tls,
            tls_config,
            upstream_tls,
            policy,
        })
    }
}

impl Loaded {
    /// Policies whose upstream role has no password in the secrets file (or its environment
    /// variable): `(policy, role)`. Logins under them fail unless PostgreSQL trusts the role.
    pub fn roles_without_secret(&self) -> Vec<(String, String)> {
        self.policy
            .current()
            .policies()
            .iter()
            .filter(|p| self.secrets.password_for(&p.upstream_role).is_none())
            .map(|p| (p.name.clone(), p.upstream_role.clone()))
            .collect()
    }
}

impl ServerState {
    /// Loads the configuration and opens the stores (audit, approvals).
    pub fn new(config: Config, steering: Option<Arc<Steering>>) -> anyhow::Result<ServerState> {
        let loaded = Loaded::load(&config)?;
        let upstream = UpstreamTarget::new(
            &config.upstream,
            loaded.upstream_tls,
            config.limits.max_message_bytes,
            steering.clone(),
        );
        let audit = AuditLog::open(&config.audit).with_context(|| {
            format!(
                "cannot open the audit trail in {}",
                config.audit.dir.display()
            )
        })?;
        let approvals = match &config.approvals {
            Some(cfg) => Some(
                crate::approval::ApprovalService::open(
                    cfg.clone(),
                    crate::approval::audit_sink::to_audit(audit.clone()),
                )
                .context("cannot open the approvals store")?,
            ),
            None => None,
        };
        let admission = crate::net::admission::Admission::new(config.limits.max_unauthenticated);
        Ok(ServerState {
            config,
            identities: std::sync::RwLock::new(Arc::new(loaded.identities)),
            secrets: std::sync::RwLock::new(Arc::new(loaded.secrets)),
            upstream,
            tls: loaded.tls,
            cancel: CancelRegistry::default(),
            policy: loaded.policy,
            audit,
            steering,
            sessions: SessionCounts::default(),
            approvals,
            tls_config: loaded.tls_config,
            admission,
            live: Default::default(),
        })
    }

    /// The authenticators new sessions use.
    pub fn identities(&self) -> Arc<Authenticators> {
        self.identities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The upstream secrets new sessions use.
    pub fn secrets(&self) -> Arc<Secrets> {
        self.secrets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// SIGHUP: puts what of `new` (already loaded into `loaded`) can change while running into
    /// effect for new sessions, and returns those configuration sections. The secrets file is
    /// always read again (a rotated upstream password needs no config change). Identities
    /// (`[identity.*]`, `[oidc]`) are replaced unless `[tls]` or `[mtls]` changed: the TLS
    /// acceptor checking client certificates is built at start, so the set stays whole until
    /// a restart. Open sessions keep the identity they logged in with.
    pub fn reload_credentials(&self, new: &Config, loaded: Loaded) -> Vec<&'static str> {
        let mut applied = vec!["secrets"];
        *self
            .secrets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded.secrets);
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        if same(&self.config.tls, &new.tls) && same(&self.config.mtls, &new.mtls) {
            *self
                .identities
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded.identities);
            applied.extend(["identity", "oidc"]);
        }
        applied
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_reloadable(config, None).await
}

/// [`run`]; SIGHUP reloads the policies and checks `config_path` again.
pub async fn run_reloadable(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for addr in &config.listen.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(%addr, "listening");
        listeners.push(listener);
    }
    // Every listener is bound before anything slow (opening the audit store) so that clients
    // that connect early wait in the backlog instead of finding no socket.
    let mut socket_path: Option<PathBuf> = None;
    let mut unix_listener = None;
    if let Some(dir) = &config.listen.unix_socket_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
        let path = dir.join(format!(".s.PGSQL.{}", config.listen.unix_port));
        // A stale socket from a crashed run would make bind fail.
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        // Any local user may connect, as with PostgreSQL's own socket: authentication decides.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        tracing::info!(path = %path.display(), "listening");
        unix_listener = Some(listener);
        socket_path = Some(path);
    }
    let steering = if config.ebpf.enabled {
        use std::os::fd::AsFd;
        // Slot order matters to the kernel program: the IPv4 listener, then the IPv6 one.
        let v4 = listeners
            .iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()));
        let v6 = listeners
            .iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv6()));
        let fds: Vec<_> = v4.into_iter().chain(v6).map(|l| l.as_fd()).collect();
        let steering = Steering::attach(&config.ebpf, &fds)
            .context("cannot attach the kernel programs ([ebpf] enabled = true)")?;
        tracing::info!(ports = ?config.ebpf.ports, "kernel steering attached: connections to PostgreSQL's port(s) now land here");
        Some(Arc::new(steering))
    } else {
        None
    };
    let metrics_listener = match &config.metrics {
        Some(m) => Some(crate::ops::http::bind(m.listen).await?),
        None => None,
    };
    let state = Arc::new(ServerState::new(config, steering)?);
    if let Some(l) = metrics_listener {
        // Not in `tasks`: it keeps answering (readyz: not ready) during a graceful stop.
        tokio::spawn(crate::ops::http::serve(l, state.clone()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_tcp(listener, state.clone()));
    }
    if let Some(listener) = unix_listener {
        tasks.spawn(accept_unix(listener, state.clone()));
    }
    if let Some(svc) = &state.approvals {
        let _sweeper = svc.spawn_sweeper(std::time::Duration::from_secs(1));
        let console = match &state.config.console {
            Some(cfg) => Some(Arc::new(
                crate::console::Console::new(
                    cfg.clone(),
                    state.config.oidc.as_ref(),
                    svc.clone(),
                    state.audit.clone(),
                    state.identities().oidc.clone(),
                    state.identities().mtls.clone(),
                    state.tls_config.is_some(),
                )
                .context("cannot start the web console")?,
            )),
            None => None,
        };
        let auth = crate::approval::api::AdminAuth {
            oidc: state.identities().oidc.clone(),
            tls: state.tls_config.clone(),
            mtls: state.identities().mtls.clone(),
            console,
        };
        let handles = crate::approval::api::spawn(svc.clone(), auth)
            .await
            .context("cannot start the approvals admin API")?;
        tracing::info!(listeners = handles.len(), "approvals admin API started");
    }
    if let Some(admin) = &state.config.admin {
        let path = admin.socket.clone();
        let log = state.audit.clone();
        let ext = crate::ops::admin::extension(state.clone());
        tasks.spawn(async move {
            crate::audit::admin::serve_with(&path, log, Some(ext))
                .await
                .map_err(|e| anyhow::anyhow!("admin socket {}: {e}", path.display()))
        });
    }
    match &state.config.policy {
        Some(p) => {
            let mut events = state.policy.spawn_watcher(p.dir.clone());
            let audit = state.audit.clone();
            tasks.spawn(async move {
                while let Ok(event) = events.recv().await {
                    let record = match event {
                        PolicyEvent::Reloaded { version, policies } => {
                            tracing::info!(version, ?policies, "policies reloaded");
                            PolicyReload {
                                version: version.to_string(),
                                files: policies,
                                ok: true,
                                error: None,
                            }
                        }
                        PolicyEvent::ReloadFailed { version, error } => {
                            tracing::error!(%error, "policy reload failed; keeping the previous policies");
                            PolicyReload {
                                version: version.to_string(),
                                files: Vec::new(),
                                ok: false,
                                error: Some(error),
                            }
                        }
                    };
                    if let Err(e) = audit.append(AuditEvent::PolicyReload(record)) {
                        tracing::error!(error = %e, "cannot record a policy reload");
                    }
                }
                Ok(())
            });
        }
        None => tracing::warn!("no [policy] configured: every login is refused (default deny)"),
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    crate::ops::health::set_listening(true);
    tracing::info!(upstream = state.upstream.describe(), "interceptor ready");
    crate::ops::notify::ready("accepting connections");

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted, shutting down");
                break;
            }
            _ = term.recv() => {
                tracing::info!("terminated, shutting down");
                break;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let (s, p) = (state.clone(), config_path.clone());
                let _ = tokio::task::spawn_blocking(move || crate::ops::reload::reload(&s, p.as_deref())).await;
            }
            Some(r) = tasks.join_next() => {
                if let Ok(Err(e)) = r {
                    tracing::error!(error = %e, "listener failed");
                }
                break;
            }
        }
    }
    // Graceful stop: no new sessions; running statements may finish within the grace period;
    // then every session ends with FATAL 57P01 (its end is audited as usual).
    crate::ops::notify::stopping();
    crate::ops::health::set_listening(false);
    tasks.abort_all();
    let grace = std::time::Duration::from_millis(state.config.limits.shutdown_grace_ms);
    let open = state.live.len();
    if open > 0 {
        tracing::info!(
            sessions = open,
            grace_ms = grace.as_millis() as u64,
            "ending open sessions"
        );
        state.live.stop_all(grace);
        let deadline = std::time::Instant::now() + grace + std::time::Duration::from_secs(2);
        while !state.live.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // Records of the sessions just ended reach the disk before the process exits.
    if let Err(e) = state.audit.sync().await {
        tracing::error!(error = %e, "audit sync at shutdown failed");
    }
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

async fn accept_tcp(listener: TcpListener, state: Arc<ServerState>) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: keep serving the sessions we have, retry shortly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(peer);
        let process = state
            .steering
            .as_ref()
            .and_then(|s| s.identity_for(peer, local));
        if process
            .as_ref()
            .is_some_and(|p| p.pid == std::process::id())
        {
            // Our own upstream connection came back to us: never serve it (it would loop).
            tracing::error!(%peer, "refusing a connection from interceptor itself (steering loop)");
            continue;
        }
        tokio::spawn(session::handle(
            Stream::Tcp(tcp),
            Peer::Tcp {
                peer,
                local,
                process,
            },
            state.clone(),
        ));
    }
}

async fn accept_unix(listener: UnixListener, state: Arc<ServerState>) -> anyhow::Result<()> {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let cred = sock.peer_cred().ok();
        let peer = Peer::Unix {
            uid: cred.as_ref().map(|c| c.uid()),
            gid: cred.as_ref().map(|c| c.gid()),
            pid: cred.as_ref().and_then(|c| c.pid()),
        };
        tokio::spawn(session::handle(Stream::Unix(sock), peer, state.clone()));
    }
}
