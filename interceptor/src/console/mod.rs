//! The web console for approvers and auditors, served under `/console` by the approvals admin
//! listener (HTTPS only). People sign in with the configured OIDC issuer (authorization code
//! flow with PKCE) or present a client certificate (`[mtls]`); pages are rendered on the
//! server, every action is a form POST carrying the session's CSRF token, and the only script is
//! a static file that refreshes the pending list.
//!
//! ```toml
//! [console]
//! public_url = "https://db.example:7070"     # where browsers reach `http_listen`
//! client_id = "interceptor-console"          # must be one of [oidc] audience
//! auditors = ["security"]                    # groups that may see the audit pages
//! ```

mod audit_pages;
mod auth;
mod idp;
mod pages;
mod reply;
mod routes;
mod session;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::approval::ApprovalService;
use crate::audit::AuditLog;
use crate::identity::mtls::MtlsConfig;
use crate::identity::oidc::{OidcConfig, OidcVerifier};

pub(crate) use routes::is_console_path;

/// `[console]` in the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The https origin browsers use to reach the admin listener; the OIDC redirect URI is
    /// `{public_url}/console/auth/callback`.
    pub public_url: String,
    /// The console's OIDC client id (it must be one of `[oidc] audience`: the ID token is
    /// validated like any other token). Without `[oidc]`, only client certificates sign in.
    #[serde(default)]
    pub client_id: Option<String>,
    /// A file holding the client secret, for IdPs that do not accept public clients.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Override the endpoints found through `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// Scopes asked for at sign-in.
    #[serde(default = "default_scopes")]
    pub scopes: String,
    /// Groups whose members may read the audit pages (sessions, replay, verify, export).
    #[serde(default)]
    pub auditors: Vec<String>,
    /// How long a console session lasts after sign-in.
    #[serde(default = "default_session_secs")]
    pub session_secs: u64,
}

fn default_scopes() -> String {
    "openid profile email".into()
}

fn default_session_secs() -> u64 {
    8 * 3600
}

impl ConsoleConfig {
    pub fn origin(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }

    pub fn redirect_uri(&self) -> String {
        format!("{}/console/auth/callback", self.origin())
    }
}

/// Everything the console's pages need. One per daemon, shared by every connection.
pub(crate) struct Console {
    cfg: ConsoleConfig,
    service: ApprovalService,
    audit: AuditLog,
    mtls: Option<MtlsConfig>,
    /// OIDC sign-in, when `client_id` and `[oidc]` are configured.
    idp: Option<idp::IdpClient>,
    sessions: session::Sessions,
}

impl Console {
    pub(crate) fn new(
        cfg: ConsoleConfig,
        oidc_cfg: Option<&OidcConfig>,
        service: ApprovalService,
        audit: AuditLog,
        verifier: Option<Arc<OidcVerifier>>,
        mtls: Option<MtlsConfig>,
        tls: bool,
    ) -> anyhow::Result<Console> {
        if !tls {
            anyhow::bail!("[console] needs [tls]: the console is served over HTTPS only");
        }
        let idp = match (&cfg.client_id, oidc_cfg, verifier) {
            (Some(id), Some(oc), Some(v)) => Some(idp::IdpClient::new(&cfg, id, oc, v)?),
            _ => None,
        };
        Ok(Console {
            sessions: session::Sessions::new(std::time::Duration::from_secs(
                cfg.session_secs.max(60),
            )),
            cfg,
            service,
            audit,
            mtls,
            idp,
        })
    }

    fn is_auditor(&self, who: &crate::identity::Identity) -> bool {
        self.cfg.auditors.iter().any(|g| who.in_group(g))
    }
}
