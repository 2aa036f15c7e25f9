//! What every session shares (identities, upstream, policy, audit, approvals, counters), and
//! what loading the configuration builds for it. The daemon makes one; sessions, the admin
//! socket and the health endpoint read it.

use std::sync::Arc;

use anyhow::Context;

use super::auth::{Authenticators, StaticIdentities};
use super::cancel::CancelRegistry;
use super::live::LiveSessions;
use super::upstream::UpstreamTarget;
use crate::audit::AuditLog;
use crate::config::{Config, UpstreamTls};
use crate::ebpf::Steering;
use crate::net::tls;
use crate::policy::{PolicyHandle, PolicySet};
use crate::secrets::Secrets;

/// Everything sessions share.
pub(crate) struct ServerState {
    pub config: Config,
    /// Static identities and the OIDC/mTLS verifiers sessions authenticate with: read through
    /// [`ServerState::identities`], replaced on SIGHUP.
    pub identities: std::sync::RwLock<Arc<Authenticators>>,
    /// Upstream role passwords: read through [`ServerState::secrets`], re-read on SIGHUP.
    pub secrets: std::sync::RwLock<Arc<Secrets>>,
    pub upstream: Arc<UpstreamTarget>,
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
    pub live: LiveSessions,
}

/// Open sessions per identity, for the policy's `max_sessions`.
#[derive(Default)]
pub(crate) struct SessionCounts {
    open: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// Holds one session slot; released on drop.
pub(crate) struct SessionSlot<'a> {
    counts: &'a SessionCounts,
    subject: String,
}

impl SessionCounts {
    pub(crate) fn acquire(&self, subject: &str, max: u32) -> Option<SessionSlot<'_>> {
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
pub(crate) struct Loaded {
    identities: Authenticators,
    secrets: Secrets,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    policy: PolicyHandle,
}

impl Loaded {
    pub(crate) fn load(config: &Config) -> anyhow::Result<Loaded> {
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
        // The certificate is loaded once (TLS is not reloaded), so its channel binding data is
        // fixed for the process's life.
        let tls_end_point = match &config.tls {
            Some(t) => {
                let chain = tls::load_certs(&t.cert)?;
                let end_point = chain.first().and_then(|leaf| tls::server_end_point(leaf));
                if end_point.is_none() {
                    tracing::warn!(
                        cert = %t.cert.display(),
                        "the TLS certificate's signature algorithm has no tls-server-end-point \
                         hash: SCRAM-SHA-256-PLUS (channel binding) is not offered"
                    );
                }
                end_point
            }
            None => None,
        };
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
                tls_end_point,
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
    pub(crate) fn roles_without_secret(&self) -> Vec<(String, String)> {
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
    pub(crate) fn new(
        config: Config,
        steering: Option<Arc<Steering>>,
    ) -> anyhow::Result<ServerState> {
        let loaded = Loaded::load(&config)?;
        let upstream = Arc::new(UpstreamTarget::new(
            &config.upstream,
            loaded.upstream_tls,
            config.limits.max_message_bytes,
            steering.clone(),
        ));
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
    pub(crate) fn identities(&self) -> Arc<Authenticators> {
        self.identities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The upstream secrets new sessions use.
    pub(crate) fn secrets(&self) -> Arc<Secrets> {
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
    pub(crate) fn reload_credentials(&self, new: &Config, loaded: Loaded) -> Vec<&'static str> {
        let mut applied = vec!["secrets"];
        *self
            .secrets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded.secrets);
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        if same(&self.config.tls, &new.tls) && same(&self.config.mtls, &new.mtls) {
            let mut identities = loaded.identities;
            // Channel binding names the certificate the TLS acceptor serves, which was loaded
            // at start: a certificate file replaced on disk must not change it until a restart
            // loads both (else every SCRAM-SHA-256-PLUS login would fail its binding check).
            identities.tls_end_point = self.identities().tls_end_point.clone();
            *self
                .identities
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(identities);
            applied.extend(["identity", "oidc"]);
        }
        applied
    }
}
