//! The daemon: listeners, shared state and the accept loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};

use crate::config::{Config, UpstreamTls};
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
    pub config: Config,
    pub identities: Authenticators,
    pub secrets: Secrets,
    pub upstream: UpstreamTarget,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancel: CancelRegistry,
    pub policy: PolicyHandle,
    session_ids: AtomicU64,
}

impl ServerState {
    pub fn new(config: Config) -> anyhow::Result<ServerState> {
        let identities = StaticIdentities::new(&config.identities).map_err(anyhow::Error::msg)?;
        let secrets = Secrets::load(config.secrets.file.as_deref())?;
        let mtls = config.mtls.clone().or_else(|| {
            config
                .tls
                .as_ref()
                .and_then(|t| t.client_ca.clone())
                .map(crate::identity::mtls::MtlsConfig::with_ca_file)
        });
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                &t.cert,
                &t.key,
                mtls.as_ref(),
            )?)),
            None => None,
        };
        let oidc = match &config.oidc {
            Some(o) => Some(crate::identity::oidc::OidcVerifier::new(o)?),
            None => None,
        };
        let identities = Authenticators {
            statics: identities,
            oidc,
            mtls,
        };
        let upstream_tls = match config.upstream.tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Prefer | UpstreamTls::Require => Some(tls::client_config(None, false)?),
            UpstreamTls::VerifyFull => {
                Some(tls::client_config(config.upstream.ca.as_deref(), true)?)
            }
        };
        let upstream = UpstreamTarget::new(
            &config.upstream,
            upstream_tls,
            config.limits.max_message_bytes,
        );
        // Default deny: without a policy directory every login is refused.
        let policy = match &config.policy {
            Some(p) => PolicyHandle::load(&p.dir)
                .with_context(|| format!("cannot load policies from {}", p.dir.display()))?,
            None => PolicyHandle::new(PolicySet::empty()),
        };
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(ServerState {
            config,
            identities,
            secrets,
            upstream,
            tls,
            cancel: CancelRegistry::default(),
            policy,
            session_ids: AtomicU64::new(start),
        })
    }

    /// Session ids are unique across restarts (seeded from the start time in microseconds).
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let state = Arc::new(ServerState::new(config)?);
    let mut tasks = tokio::task::JoinSet::new();
    match &state.config.policy {
        Some(p) => {
            let mut events = state.policy.spawn_watcher(p.dir.clone());
            tasks.spawn(async move {
                while let Ok(event) = events.recv().await {
                    match event {
                        PolicyEvent::Reloaded { version, policies } => {
                            tracing::info!(version, ?policies, "policies reloaded")
                        }
                        PolicyEvent::ReloadFailed { error, .. } => {
                            tracing::error!(%error, "policy reload failed; keeping the previous policies")
                        }
                    }
                }
                Ok(())
            });
        }
        None => tracing::warn!("no [policy] configured: every login is refused (default deny)"),
    }
    for addr in &state.config.listen.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(%addr, "listening");
        tasks.spawn(accept_tcp(listener, state.clone()));
    }
    let mut socket_path: Option<PathBuf> = None;
    if let Some(dir) = &state.config.listen.unix_socket_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
        let path = dir.join(format!(".s.PGSQL.{}", state.config.listen.unix_port));
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
        tasks.spawn(accept_unix(listener, state.clone()));
        socket_path = Some(path);
    }
    tracing::info!(upstream = state.upstream.describe(), "interceptor ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = term.recv() => tracing::info!("terminated, shutting down"),
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "listener failed");
            }
        }
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
        tokio::spawn(session::handle(
            Stream::Tcp(tcp),
            Peer::Tcp { peer, local },
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
