//! Where JWKS documents come from: a local file, a configured URL, or the issuer's OIDC
//! discovery document. Behind a trait so the verifier does not care, and so tests and other
//! deployments can bring their own source.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::error::IdentityError;

/// Largest JWKS or discovery document read (real ones are a few KiB).
pub(crate) const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024;

pub(crate) type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<String, IdentityError>> + Send + 'a>>;

/// Supplies the current JWKS document (JSON text).
pub(crate) trait JwksSource: Send + Sync + std::fmt::Debug {
    fn fetch(&self) -> FetchFuture<'_>;
}

/// A JWKS kept in a local file (air-gapped hosts, tests, keys pushed by config management).
#[derive(Debug, Clone)]
pub(crate) struct FileJwksSource {
    path: PathBuf,
}

impl FileJwksSource {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        FileJwksSource { path: path.into() }
    }

    /// Reads the file synchronously (used once at startup so a bad file stops the daemon).
    pub(crate) fn read_blocking(&self) -> Result<String, IdentityError> {
        read_bounded(&self.path)
    }
}

fn read_bounded(path: &Path) -> Result<String, IdentityError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        IdentityError::ProviderUnavailable(format!("JWKS file {}: {e}", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(|e| unavailable(&e))?;
    if meta.len() > MAX_DOCUMENT_BYTES {
        return Err(unavailable(&"file is too large"));
    }
    std::fs::read_to_string(path).map_err(|e| unavailable(&e))
}

impl JwksSource for FileJwksSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_bounded(&path))
                .await
                .map_err(|e| IdentityError::ProviderUnavailable(format!("JWKS read task: {e}")))?
        })
    }
}

/// Which URL to ask for keys.
#[derive(Debug, Clone)]
enum HttpTarget {
    /// The JWKS itself.
    Jwks(String),
    /// `{issuer}/.well-known/openid-configuration`, whose `jwks_uri` names the JWKS. Looked up
    /// on every refresh (refreshes are rate limited) so a moved `jwks_uri` is followed.
    Discovery { issuer: String },
}

/// Fetches the JWKS over HTTPS with a small blocking client run off the async threads.
#[derive(Debug, Clone)]
pub(crate) struct HttpJwksSource {
    agent: ureq::Agent,
    target: HttpTarget,
}

impl HttpJwksSource {
    /// Fetches the JWKS at `url`.
    pub(crate) fn from_url(
        url: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, IdentityError> {
        let agent = agent_for(url, ca_file, timeout)?;
        Ok(HttpJwksSource {
            agent,
            target: HttpTarget::Jwks(url.to_owned()),
        })
    }

    /// Finds the JWKS through the issuer's OIDC discovery document.
    pub(crate) fn discover(
        issuer: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, IdentityError> {
        let agent = agent_for(issuer, ca_file, timeout)?;
        Ok(HttpJwksSource {
            agent,
            target: HttpTarget::Discovery {
                issuer: issuer.to_owned(),
            },
        })
    }

    fn fetch_blocking(agent: &ureq::Agent, target: &HttpTarget) -> Result<String, IdentityError> {
        let jwks_url = match target {
            HttpTarget::Jwks(url) => url.clone(),
            HttpTarget::Discovery { issuer } => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = serde_json::from_str(&get(agent, &url)?)
                    .map_err(|_| IdentityError::ProviderUnavailable(format!("{url}: not JSON")))?;
                // OIDC Discovery §4.3: the document must name the issuer we asked about, or an
                // attacker-controlled document could point us at its own keys.
                if doc.get("issuer").and_then(|v| v.as_str()) != Some(issuer.as_str()) {
                    return Err(IdentityError::ProviderUnavailable(format!(
                        "{url}: discovery document is for a different issuer"
                    )));
                }
                let jwks = doc
                    .get("jwks_uri")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| {
                        IdentityError::ProviderUnavailable(format!("{url}: no jwks_uri"))
                    })?;
                check_url(jwks)?;
                jwks.to_owned()
            }
        };
        get(agent, &jwks_url)
    }
}

impl JwksSource for HttpJwksSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let agent = self.agent.clone();
        let target = self.target.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || HttpJwksSource::fetch_blocking(&agent, &target))
                .await
                .map_err(|e| IdentityError::ProviderUnavailable(format!("JWKS fetch task: {e}")))?
        })
    }
}

fn get(agent: &ureq::Agent, url: &str) -> Result<String, IdentityError> {
    let fail =
        |e: &dyn std::fmt::Display| IdentityError::ProviderUnavailable(format!("{url}: {e}"));
    let mut response = agent.get(url).call().map_err(|e| fail(&e))?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_DOCUMENT_BYTES)
        .read_to_string()
        .map_err(|e| fail(&e))
}

/// The shared rule for URLs interceptor dials (see `outbound`), as an identity config error.
pub(crate) fn check_url(url: &str) -> Result<bool, IdentityError> {
    crate::outbound::check(url).map_err(|e| match e {
        // Not echoed: the user-info part is a secret.
        crate::outbound::UrlError::Credentials => {
            IdentityError::Config("IdP URLs must not contain credentials".into())
        }
        e => IdentityError::Config(format!("`{url}` {e}")),
    })
}

pub(crate) fn agent_for(
    url: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<ureq::Agent, IdentityError> {
    let https = check_url(url)?;
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| IdentityError::Config(format!("CA file {}: {e}", path.display())))?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => roots.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(IdentityError::Config(format!(
                        "CA file {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        if roots.is_empty() {
            return Err(IdentityError::Config(format!(
                "CA file {} holds no certificate",
                path.display()
            )));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)));
    }
    let config = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .https_only(https)
        // Redirects only while every hop stays on https.
        .max_redirects(if https { 3 } else { 0 })
        .timeout_global(Some(timeout))
        .build();
    Ok(config.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(check_url("https://login.example.com/keys").is_ok());
        assert!(check_url("http://127.0.0.1:8080/keys").is_ok());
        assert!(check_url("http://localhost/keys").is_ok());
        assert!(check_url("http://[::1]:80/keys").is_ok());
        assert!(check_url("http://idp.example.com/keys").is_err());
        assert!(check_url("http://127.0.0.1.evil.com/keys").is_err());
        assert!(check_url("https://user:pw@idp.example.com/").is_err());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("https:///nohost").is_err());
    }
}
