//! The TOML configuration model and its validation. See `interceptor.example.toml` for the
//! annotated reference.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::config::AuditConfig;
use crate::console::ConsoleConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    pub upstream: UpstreamConfig,
    /// Where upstream role passwords come from.
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// Static identities (bots and humans without an IdP), keyed by subject.
    #[serde(default, rename = "identity")]
    pub identities: BTreeMap<String, StaticIdentity>,
    /// The audit trail is not optional: no statement runs without a durable record.
    pub audit: AuditConfig,
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub limits: Limits,
    /// OIDC: clients present a JWT as their password (over TLS only).
    #[serde(default)]
    pub oidc: Option<crate::identity::oidc::OidcConfig>,
    /// mTLS: client certificates chained to a CA become identities.
    #[serde(default)]
    pub mtls: Option<crate::identity::mtls::MtlsConfig>,
    /// Just-in-time approvals of held statements and time-bound grants.
    #[serde(default)]
    pub approvals: Option<crate::approval::ApprovalConfig>,
    /// The web console for approvers and auditors, on the approvals admin listener.
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// Kernel interception: steer every connection to PostgreSQL's port(s) into interceptor.
    #[serde(default)]
    pub ebpf: crate::ebpf::SteeringConfig,
    /// Prometheus metrics and health endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint; loopback unless a scraper elsewhere must reach it.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// TCP addresses to listen on, e.g. `["127.0.0.1:6432", "[::1]:6432"]`.
    #[serde(default)]
    pub tcp: Vec<SocketAddr>,
    /// Directory in which to create the unix socket `.s.PGSQL.<unix_port>`.
    #[serde(default)]
    pub unix_socket_dir: Option<PathBuf>,
    /// Port number used in the unix socket file name (clients pass it as `-p`).
    #[serde(default = "default_pg_port")]
    pub unix_port: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse clients that do not negotiate TLS.
    #[serde(default)]
    pub require: bool,
    /// CA bundle for client certificates (mTLS). When set, clients may present a certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plaintext (the default for a unix socket).
    #[default]
    Disable,
    /// TLS if the server offers it.
    Prefer,
    /// TLS without certificate verification.
    Require,
    /// TLS with the server certificate verified against `ca` and the host name.
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A directory (unix socket, preferred) or a host name / IP address.
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA bundle used with `tls = "verify-full"`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// The password methods PostgreSQL may ask interceptor for, like libpq's `require_auth`.
    /// MD5 and cleartext are refused over unencrypted TCP even when listed.
    #[serde(default = "default_upstream_auth")]
    pub auth: Vec<UpstreamAuth>,
}

/// How PostgreSQL may authenticate interceptor's upstream login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UpstreamAuth {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// Cleartext password.
    #[serde(rename = "password")]
    Password,
    /// PostgreSQL asks for nothing (trust, peer): no credential is sent.
    #[serde(rename = "none")]
    None,
}

impl UpstreamAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamAuth::ScramSha256 => "scram-sha-256",
            UpstreamAuth::Md5 => "md5",
            UpstreamAuth::Password => "password",
            UpstreamAuth::None => "none",
        }
    }
}

fn default_upstream_auth() -> Vec<UpstreamAuth> {
    vec![UpstreamAuth::ScramSha256, UpstreamAuth::None]
}

impl UpstreamConfig {
    /// A host starting with `/` is a socket directory, as in libpq.
    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        self.host
            .starts_with('/')
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// A TOML file `[roles] name = "password"`; must not be group- or world-readable.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticIdentity {
    /// A SCRAM-SHA-256 verifier (`interceptor hash-password`), never a clear password.
    pub secret: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (`*.toml`), reloaded when they change.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket for the CLI (audit queries, approvals) while the daemon runs.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest protocol message accepted from a client or server, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Time a client has to finish startup and authentication.
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_ms: u64,
    /// Connections that have not finished authenticating yet, beyond which new ones are refused
    /// (SQLSTATE 53300) instead of holding file descriptors until `auth_timeout_ms`.
    #[serde(default = "default_max_unauthenticated")]
    pub max_unauthenticated: usize,
    /// On SIGTERM: how long running statements may take to finish before their sessions end
    /// (FATAL 57P01). Keep it below the unit's `TimeoutStopSec`.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_ms: u64,
}

fn default_shutdown_grace() -> u64 {
    20_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: default_max_message(),
            auth_timeout_ms: default_auth_timeout(),
            max_unauthenticated: default_max_unauthenticated(),
            shutdown_grace_ms: default_shutdown_grace(),
        }
    }
}

fn default_pg_port() -> u16 {
    5432
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_max_message() -> usize {
    64 * 1024 * 1024
}
fn default_auth_timeout() -> u64 {
    30_000
}
fn default_max_unauthenticated() -> usize {
    256
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        config.resolve_relative_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.tcp.is_empty() && self.listen.unix_socket_dir.is_none() {
            return Err(ConfigError::Invalid(
                "[listen] needs at least one of `tcp` or `unix_socket_dir`".into(),
            ));
        }
        if self.limits.max_unauthenticated == 0 {
            return Err(ConfigError::Invalid(
                "[limits] max_unauthenticated must be at least 1".into(),
            ));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "[limits] max_message_bytes must be at least 1024".into(),
            ));
        }
        if (self.oidc.is_some() || self.mtls.is_some()) && self.tls.is_none() {
            return Err(ConfigError::Invalid(
                "[oidc] and [mtls] need [tls]: tokens and certificates are only accepted over TLS"
                    .into(),
            ));
        }
        if let Some(c) = &self.console {
            validate_console(c, self).map_err(ConfigError::Invalid)?;
        }
        if self.upstream.tls == UpstreamTls::VerifyFull && self.upstream.ca.is_none() {
            return Err(ConfigError::Invalid(
                "[upstream] tls = \"verify-full\" needs `ca`".into(),
            ));
        }
        for (name, id) in &self.identities {
            if !id.secret.starts_with("SCRAM-SHA-256$") {
                return Err(ConfigError::Invalid(format!(
                    "[identity.{name}] secret must be a SCRAM-SHA-256 verifier \
                     (run `interceptor hash-password`), not a clear password"
                )));
            }
        }
        Ok(())
    }

    /// Paths in the config are relative to the config file, like most daemons do.
    fn resolve_relative_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
            if let Some(ca) = &mut tls.client_ca {
                fix(ca);
            }
        }
        if let Some(ca) = &mut self.upstream.ca {
            fix(ca);
        }
        if let Some(f) = &mut self.secrets.file {
            fix(f);
        }
        fix(&mut self.audit.dir);
        if let Some(k) = &mut self.audit.signing_key {
            fix(k);
        }
        if let Some(p) = &mut self.policy {
            fix(&mut p.dir);
        }
        if let Some(a) = &mut self.admin {
            fix(&mut a.socket);
        }
        if let Some(d) = &mut self.listen.unix_socket_dir {
            fix(d);
        }
        if let Some(o) = &mut self.oidc {
            if let Some(f) = &mut o.jwks_file {
                fix(f);
            }
            if let Some(f) = &mut o.ca_file {
                fix(f);
            }
        }
        if let Some(a) = &mut self.approvals {
            fix(&mut a.dir);
            if let Some(s) = &mut a.socket {
                fix(s);
            }
        }
        if let Some(f) = self
            .console
            .as_mut()
            .and_then(|c| c.client_secret_file.as_mut())
        {
            fix(f);
        }
        if let Some(m) = &mut self.mtls {
            fix(&mut m.ca_file);
            for f in &mut m.crl_files {
                fix(f);
            }
        }
    }
}

/// Checks what the rest of the config must provide for `[console]`.
fn validate_console(console: &ConsoleConfig, config: &Config) -> Result<(), String> {
    let public = console.public_url.to_ascii_lowercase();
    if !public.starts_with("https://") {
        return Err(format!(
            "[console] public_url `{}` must be https: the console's cookies are Secure",
            console.public_url
        ));
    }
    let Some(approvals) = &config.approvals else {
        return Err("[console] needs [approvals] with `http_listen`".into());
    };
    if approvals.http_listen.is_none() {
        return Err("[console] needs [approvals] http_listen".into());
    }
    if config.tls.is_none() {
        return Err("[console] needs [tls]: the console is served over HTTPS only".into());
    }
    match (&config.oidc, &console.client_id) {
        (Some(oidc), Some(id)) if !oidc.audience.iter().any(|a| a == id) => Err(format!(
            "[console] client_id `{id}` must be one of [oidc] audience \
             (ID tokens are issued for the client)"
        )),
        (None, Some(_)) => Err("[console] client_id needs [oidc]".into()),
        (_, None) if config.mtls.is_none() => {
            Err("[console] needs a way to sign in: client_id with [oidc], or [mtls]".into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../interceptor.example.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.listen.tcp.len(), 2);
        assert!(config.identities.contains_key("reporting-bot"));
    }

    #[test]
    fn clear_passwords_and_unknown_keys_are_refused() {
        let base =
            "[listen]\ntcp=[\"127.0.0.1:1\"]\n[upstream]\nhost=\"/tmp\"\n[audit]\ndir=\"/tmp/a\"\n";
        let clear = format!("{base}[identity.a]\nsecret=\"hunter2\"\n");
        assert!(
            Config::parse(&clear)
                .unwrap_err()
                .to_string()
                .contains("hash-password")
        );
        let typo = format!("{base}[limitz]\n");
        assert!(Config::parse(&typo).is_err());
        assert!(Config::parse("[listen]\n[upstream]\nhost=\"/tmp\"\n").is_err());
    }
}
