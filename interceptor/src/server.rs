//! The daemon: listeners, the accept loop, and the services beside the sessions (admin socket,
//! approvals API and console, metrics endpoint, policy reloads).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};

use crate::audit::{AuditEvent, PolicyReload};
use crate::config::Config;
use crate::ebpf::Steering;
use crate::net::stream::Stream;
use crate::policy::PolicyEvent;
use crate::session::{self, Peer};

use crate::session::shared::{Loaded, ServerState};

/// `interceptor check-config`: loads what the daemon loads at start (identities, secrets,
/// policies) and returns the policies whose upstream role has no password in the secrets file:
/// `(policy, role)`.
pub fn check_config(config: &Config) -> anyhow::Result<Vec<(String, String)>> {
    Ok(Loaded::load(config)?.roles_without_secret())
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
            pages: Some(Arc::new(ConsolePages(console))),
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
            Peer::Tcp { peer, process },
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

/// The admin listener's `/console` paths: the web console when `[console]` is configured,
/// otherwise "no such endpoint". Composed here, above both the approvals API and the console.
struct ConsolePages(Option<Arc<crate::console::Console>>);

impl crate::approval::api::Pages for ConsolePages {
    fn owns(&self, path: &str) -> bool {
        crate::console::is_console_path(path)
    }

    fn serve<'a>(
        &'a self,
        req: &'a crate::approval::http::HttpRequest,
        cert: Option<&'a [u8]>,
        mut stream: &'a mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>> {
        let console = self.0.as_ref()?;
        Some(Box::pin(async move {
            console.serve(req, cert, &mut stream).await
        }))
    }
}
