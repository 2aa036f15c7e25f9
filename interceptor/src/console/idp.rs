//! OIDC sign-in for the console: the authorization code flow with PKCE (S256) and a nonce,
//! against the issuer of `[oidc]`. The ID token is validated by the same [`OidcVerifier`] as
//! every other token (pinned algorithms, issuer, audience = our client id, expiry).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::identity::Identity;
use crate::identity::oidc::{MAX_DOCUMENT_BYTES, OidcConfig, OidcVerifier, agent_for, check_url};

use super::ConsoleConfig;
use super::session::PendingLogin;

#[derive(Debug, Clone)]
struct Endpoints {
    authorize: String,
    token: String,
}

pub(super) struct IdpClient {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    redirect_uri: String,
    scopes: String,
    agent: ureq::Agent,
    verifier: Arc<OidcVerifier>,
    /// Configured, or discovered at the first sign-in (and kept).
    endpoints: tokio::sync::Mutex<Option<Endpoints>>,
}

/// Why a sign-in failed; shown to the person signing in (never a token or secret).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct SignInError(pub String);

impl IdpClient {
    pub(super) fn new(
        cfg: &ConsoleConfig,
        client_id: &str,
        oidc: &OidcConfig,
        verifier: Arc<OidcVerifier>,
    ) -> anyhow::Result<IdpClient> {
        let timeout = Duration::from_secs(oidc.http_timeout_secs.max(1));
        let agent = agent_for(&oidc.issuer, oidc.ca_file.as_deref(), timeout)?;
        let endpoints = match (&cfg.authorization_endpoint, &cfg.token_endpoint) {
            (Some(a), Some(t)) => {
                check_url(a)?;
                check_url(t)?;
                Some(Endpoints {
                    authorize: a.clone(),
                    token: t.clone(),
                })
            }
            (None, None) => None,
            _ => anyhow::bail!(
                "[console] set both authorization_endpoint and token_endpoint, or neither"
            ),
        };
        let client_secret = match &cfg.client_secret_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| {
                        anyhow::anyhow!("[console] client_secret_file {}: {e}", p.display())
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(IdpClient {
            issuer: oidc.issuer.clone(),
            client_id: client_id.to_owned(),
            client_secret,
            redirect_uri: cfg.redirect_uri(),
            scopes: cfg.scopes.clone(),
            agent,
            verifier,
            endpoints: tokio::sync::Mutex::new(endpoints),
        })
    }

    pub(super) fn issuer(&self) -> &str {
        &self.issuer
    }

    async fn endpoints(&self) -> Result<Endpoints, SignInError> {
        let mut cached = self.endpoints.lock().await;
        if let Some(e) = cached.as_ref() {
            return Ok(e.clone());
        }
        let agent = self.agent.clone();
        let issuer = self.issuer.clone();
        let found = tokio::task::spawn_blocking(move || discover(&agent, &issuer))
            .await
            .map_err(|e| SignInError(format!("discovery task: {e}")))??;
        *cached = Some(found.clone());
        Ok(found)
    }

    /// Where to send the browser to sign in.
    pub(super) async fn authorize_url(&self, login: &PendingLogin) -> Result<String, SignInError> {
        let endpoints = self.endpoints().await?;
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(login.verifier.as_bytes()));
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.scopes)
            .append_pair("state", &login.state)
            .append_pair("nonce", &login.nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if endpoints.authorize.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{query}", endpoints.authorize))
    }

    /// Redeems `code` and validates the ID token it returns.
    pub(super) async fn redeem(
        &self,
        code: &str,
        login: &PendingLogin,
    ) -> Result<Identity, SignInError> {
        let endpoints = self.endpoints().await?;
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "authorization_code")
                .append_pair("code", code)
                .append_pair("redirect_uri", &self.redirect_uri)
                .append_pair("client_id", &self.client_id)
                .append_pair("code_verifier", &login.verifier);
            if let Some(secret) = &self.client_secret {
                form.append_pair("client_secret", secret);
            }
            form.finish()
        };
        let agent = self.agent.clone();
        let url = endpoints.token.clone();
        let answer = tokio::task::spawn_blocking(move || post_form(&agent, &url, &body))
            .await
            .map_err(|e| SignInError(format!("token request task: {e}")))??;
        let id_token = answer
            .get("id_token")
            .and_then(|v| v.as_str())
            .ok_or_else(|| SignInError("the token endpoint returned no id_token".into()))?;
        let identity = self
            .verifier
            .verify(id_token)
            .await
            .map_err(|e| SignInError(format!("ID token refused: {e}")))?;
        // The signature, issuer, audience and expiry are checked; the nonce ties the token to
        // this sign-in (a token issued for another browser's sign-in cannot be replayed here).
        if unverified_claim(id_token, "nonce").as_deref() != Some(login.nonce.as_str()) {
            return Err(SignInError(
                "ID token refused: its nonce is not this sign-in's".into(),
            ));
        }
        Ok(identity)
    }
}

fn discover(agent: &ureq::Agent, issuer: &str) -> Result<Endpoints, SignInError> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let fail = |m: String| SignInError(format!("{url}: {m}"));
    let mut resp = agent.get(&url).call().map_err(|e| fail(e.to_string()))?;
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_DOCUMENT_BYTES)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| fail("not JSON".into()))?;
    if doc.get("issuer").and_then(|v| v.as_str()) != Some(issuer) {
        return Err(fail("discovery document is for a different issuer".into()));
    }
    let field = |k: &str| {
        let v = doc
            .get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| fail(format!("no {k}")))?;
        check_url(v).map_err(|e| fail(e.to_string()))?;
        Ok::<_, SignInError>(v.to_owned())
    };
    Ok(Endpoints {
        authorize: field("authorization_endpoint")?,
        token: field("token_endpoint")?,
    })
}

fn post_form(agent: &ureq::Agent, url: &str, body: &str) -> Result<serde_json::Value, SignInError> {
    let fail = |m: String| SignInError(format!("token endpoint: {m}"));
    let mut resp = agent
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .send(body)
        .map_err(|e| fail(e.to_string()))?;
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_DOCUMENT_BYTES)
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    serde_json::from_str(&text).map_err(|_| fail("answer is not JSON".into()))
}

/// A claim of a JWT whose signature was already verified.
fn unverified_claim(jwt: &str, name: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}
