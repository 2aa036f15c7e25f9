//! OIDC identities: a client presents a JWT from the organisation's IdP (Okta, Azure AD, Google,
//! Keycloak, …) as its PostgreSQL password; the gateway verifies it against the issuer's JWKS
//! and maps its claims to an [`Identity`].
//!
//! Verification fails closed: pinned asymmetric algorithms only, signature before claims,
//! `iss`/`aud`/`exp` required, bounded clock leeway, and no key means no login.
//!
//! ```toml
//! [oidc]
//! issuer = "https://sso.example.com/realms/corp"   # Keycloak; keys via OIDC discovery
//! audience = ["interceptor"]
//! subject_claim = "preferred_username"
//! groups_claim = ["realm_access.roles", "groups"]
//! allowed_algs = ["RS256", "ES256"]
//! leeway_secs = 60
//! placeholder_users = ["oidc"]                     # `psql -U oidc` with the token as password
//! # jwks_url = "https://sso.example.com/realms/corp/protocol/openid-connect/certs"
//! # jwks_file = "/etc/interceptor/jwks.json"
//! ```

mod claims;
mod keys;
mod source;
mod token;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use serde::{Deserialize, Deserializer};

use crate::identity::error::{IdentityError, sanitize};
use crate::identity::{Identity, Proof};

use keys::{KeySet, NoKey};
pub(crate) use source::{FileJwksSource, HttpJwksSource, JwksSource, MAX_DOCUMENT_BYTES};
pub(crate) use source::{agent_for, check_url};

/// Largest clock leeway accepted in the config: more would keep expired tokens alive.
pub(crate) const MAX_LEEWAY_SECS: u64 = 300;

/// `[oidc]` in the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Expected `iss`, exactly as the IdP writes it (e.g. `https://login.microsoftonline.com/<tenant>/v2.0`).
    pub issuer: String,
    /// Other spellings of the same issuer that tokens may carry (Google issues both
    /// `https://accounts.google.com` and `accounts.google.com`). Keys still come from `issuer`.
    #[serde(default)]
    pub issuer_aliases: Vec<String>,
    /// Accepted `aud` values (one string or a list); the token must name at least one.
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// A local JWKS file. Exclusive with `jwks_url`; with neither, the JWKS is found through
    /// `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The IdP's JWKS URL (https; plain http only to loopback).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA bundle for HTTPS to an IdP with a private CA (default: the Mozilla roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Clock leeway for `exp` / `nbf`, at most [`MAX_LEEWAY_SECS`].
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Claim (or dotted path) naming the subject: `sub`, `email`, `preferred_username`, `upn`, …
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Claims (or dotted paths) holding groups: `groups`, `roles`, `realm_access.roles`, …
    #[serde(default = "default_groups_claim", deserialize_with = "one_or_many")]
    pub groups_claim: Vec<String>,
    /// Pinned signature algorithms; HMAC and `none` are refused.
    #[serde(default = "default_algs")]
    pub allowed_algs: Vec<String>,
    /// Whether the PostgreSQL user name must be the subject (or a placeholder).
    #[serde(default = "default_true")]
    pub bind_user: bool,
    /// User names a client may send instead of its subject, e.g. `["oidc"]`.
    #[serde(default)]
    pub placeholder_users: Vec<String>,
    /// Least time between two JWKS loads (bounds refreshes forced by unknown `kid`s).
    #[serde(default = "default_refresh_min")]
    pub jwks_refresh_min_secs: u64,
    /// Keys older than this are reloaded before use (stale keys are kept if that fails).
    #[serde(default = "default_max_age")]
    pub jwks_max_age_secs: u64,
    /// Keys that could not be reloaded for this long are dropped and logins fail until the
    /// IdP answers again: a key the IdP has withdrawn must not stay trusted forever.
    #[serde(default = "default_max_stale")]
    pub jwks_max_stale_secs: u64,
    /// Time limit for one HTTP exchange with the IdP.
    #[serde(default = "default_http_timeout")]
    pub http_timeout_secs: u64,
}

fn default_leeway() -> u64 {
    60
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn default_groups_claim() -> Vec<String> {
    vec!["groups".into()]
}
fn default_algs() -> Vec<String> {
    ["RS256", "ES256"].iter().map(|s| s.to_string()).collect()
}
fn default_true() -> bool {
    true
}
fn default_refresh_min() -> u64 {
    30
}
fn default_max_age() -> u64 {
    3600
}
fn default_max_stale() -> u64 {
    24 * 3600
}
fn default_http_timeout() -> u64 {
    10
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The loaded keys and when they were loaded.
#[derive(Debug, Default)]
struct KeyCache {
    keys: Option<Arc<KeySet>>,
    loaded_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

/// Verifies OIDC JWTs for one issuer. Create once at startup, share (it is `Send + Sync`).
#[derive(Debug)]
pub(crate) struct OidcVerifier {
    issuer: String,
    /// Template validation (issuer, audience, leeway, required claims); `algorithms` is set per
    /// token to the single pinned algorithm its header names.
    validation: Validation,
    allowed_algs: Vec<Algorithm>,
    subject_claim: String,
    groups_claims: Vec<String>,
    bind_user: bool,
    placeholder_users: Vec<String>,
    refresh_min: Duration,
    max_age: Duration,
    max_stale: Duration,
    source: Arc<dyn JwksSource>,
    cache: tokio::sync::RwLock<KeyCache>,
    /// Serialises refreshes so a burst of unknown `kid`s causes one fetch.
    refresh_lock: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl OidcVerifier {
    /// Validates the config and sets up the key source. A `jwks_file` is read now, so a missing
    /// or unusable file stops startup; HTTP sources load on first use (or [`Self::prefetch`]).
    pub(crate) fn new(cfg: &OidcConfig) -> Result<Self, IdentityError> {
        let timeout = Duration::from_secs(cfg.http_timeout_secs.max(1));
        let ca = cfg.ca_file.as_deref();
        match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(_), Some(_)) => Err(IdentityError::Config(
                "set only one of `jwks_file` and `jwks_url`".into(),
            )),
            (Some(path), None) => {
                let file = FileJwksSource::new(path);
                // At startup an unreadable file is a configuration error, not an outage.
                let text = file
                    .read_blocking()
                    .map_err(|e| IdentityError::Config(e.to_string()))?;
                let set = KeySet::parse(&text).map_err(|e| {
                    IdentityError::Config(format!("JWKS file {}: {e}", path.display()))
                })?;
                let verifier = Self::with_source(cfg, Arc::new(file))?;
                verifier.install(set, Instant::now());
                Ok(verifier)
            }
            (None, Some(url)) => {
                Self::with_source(cfg, Arc::new(HttpJwksSource::from_url(url, ca, timeout)?))
            }
            (None, None) => Self::with_source(
                cfg,
                Arc::new(HttpJwksSource::discover(&cfg.issuer, ca, timeout)?),
            ),
        }
    }

    /// Like [`Self::new`] with a caller-supplied key source (its `jwks_*` settings are ignored).
    /// Keys are loaded on first use.
    pub(crate) fn with_source(
        cfg: &OidcConfig,
        source: Arc<dyn JwksSource>,
    ) -> Result<Self, IdentityError> {
        let config = |m: String| IdentityError::Config(format!("[oidc] {m}"));
        if cfg.issuer.trim().is_empty() {
            return Err(config("`issuer` is empty".into()));
        }
        if cfg.audience.is_empty() || cfg.audience.iter().any(|a| a.is_empty()) {
            return Err(config(
                "`audience` must name at least one non-empty audience".into(),
            ));
        }
        if cfg.leeway_secs > MAX_LEEWAY_SECS {
            return Err(config(format!(
                "`leeway_secs` must be at most {MAX_LEEWAY_SECS}"
            )));
        }
        if cfg.subject_claim.is_empty() || cfg.groups_claim.iter().any(|g| g.is_empty()) {
            return Err(config("claim names must not be empty".into()));
        }
        if cfg.jwks_refresh_min_secs == 0 {
            return Err(config("`jwks_refresh_min_secs` must be at least 1".into()));
        }
        let mut allowed_algs = Vec::new();
        for name in &cfg.allowed_algs {
            let alg = Algorithm::from_str(name)
                .map_err(|_| config(format!("unknown algorithm `{name}` in `allowed_algs`")))?;
            // A shared-secret algorithm has no place with a public JWKS: accepting it is the
            // classic confusion where the public key becomes the HMAC secret.
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(config(format!(
                    "`{name}` is a shared-secret algorithm and is not allowed"
                )));
            }
            if !allowed_algs.contains(&alg) {
                allowed_algs.push(alg);
            }
        }
        if allowed_algs.is_empty() {
            return Err(config("`allowed_algs` is empty".into()));
        }

        let max_age = Duration::from_secs(cfg.jwks_max_age_secs.max(cfg.jwks_refresh_min_secs));
        if Duration::from_secs(cfg.jwks_max_stale_secs) < max_age {
            return Err(config(
                "`jwks_max_stale_secs` must be at least `jwks_max_age_secs`".into(),
            ));
        }

        let mut validation = Validation::new(allowed_algs[0]);
        let issuers: Vec<&str> = std::iter::once(cfg.issuer.as_str())
            .chain(cfg.issuer_aliases.iter().map(String::as_str))
            .filter(|i| !i.is_empty())
            .collect();
        validation.set_issuer(&issuers);
        validation.set_audience(&cfg.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;

        Ok(OidcVerifier {
            issuer: cfg.issuer.clone(),
            validation,
            allowed_algs,
            subject_claim: cfg.subject_claim.clone(),
            groups_claims: cfg.groups_claim.clone(),
            bind_user: cfg.bind_user,
            placeholder_users: cfg.placeholder_users.clone(),
            refresh_min: Duration::from_secs(cfg.jwks_refresh_min_secs),
            max_age,
            max_stale: Duration::from_secs(cfg.jwks_max_stale_secs),
            source,
            cache: tokio::sync::RwLock::new(KeyCache::default()),
            refresh_lock: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many times keys were fetched from the source.
    #[cfg(test)]
    pub(crate) fn jwks_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Verifies a token and maps its claims. Does not look at the PostgreSQL user name: use
    /// [`Self::verify_login`] for a login.
    pub(crate) async fn verify(&self, token: &str) -> Result<Identity, IdentityError> {
        // Pasted tokens often carry a trailing newline; whitespace is never part of a JWT.
        let token = token.trim_matches(|c: char| c.is_ascii_whitespace());
        let header = token::inspect(token, &self.allowed_algs)?;
        let keys = self.keys_for(header.alg, header.kid.as_deref()).await?;
        let candidates = keys
            .select(header.alg, header.kid.as_deref())
            .map_err(|_| IdentityError::UnknownKey {
                kid: describe_kid(header.kid.as_deref()),
            })?;

        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return self.identity_from_claims(&data.claims),
                Err(e) => match map_jwt_error(e.kind()) {
                    // Without a `kid` several keys may be tried; only a signature failure
                    // means "try the next one". Any other failure came after a good signature.
                    IdentityError::BadSignature => continue,
                    other => return Err(other),
                },
            }
        }
        Err(IdentityError::BadSignature)
    }

    /// Verifies a login: the token must be valid and, when `bind_user` is set, `pg_user` must
    /// be the token's subject or one of `placeholder_users`.
    pub(crate) async fn verify_login(
        &self,
        pg_user: &str,
        token: &str,
    ) -> Result<Identity, IdentityError> {
        let identity = self.verify(token).await?;
        self.check_user(&identity, pg_user)?;
        Ok(identity)
    }

    /// The user-name binding on its own.
    pub(crate) fn check_user(
        &self,
        identity: &Identity,
        pg_user: &str,
    ) -> Result<(), IdentityError> {
        if !self.bind_user
            || pg_user == identity.subject
            || self.placeholder_users.iter().any(|p| p == pg_user)
        {
            return Ok(());
        }
        Err(IdentityError::UserMismatch {
            user: sanitize(pg_user, 64),
        })
    }

    fn identity_from_claims(&self, claims: &serde_json::Value) -> Result<Identity, IdentityError> {
        let subject = claims::subject(claims, &self.subject_claim)?;
        Ok(Identity {
            display_name: claims::display_name(claims, &subject),
            groups: claims::groups(claims, &self.groups_claims),
            proof: Proof::Oidc {
                issuer: self.issuer.clone(),
            },
            process: None,
            subject,
        })
    }

    /// A key set that has a key for this `alg`/`kid`, refreshing (rate limited) when the keys
    /// are missing, too old, or do not know the `kid` (the IdP may have rotated keys).
    async fn keys_for(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Arc<KeySet>, IdentityError> {
        let (keys, age) = {
            let cache = self.cache.read().await;
            (cache.keys.clone(), cache.loaded_at.map(|t| t.elapsed()))
        };
        let stale = age.is_none_or(|a| a >= self.max_age);
        let keys = match (keys, stale) {
            (Some(keys), false) => keys,
            // Old keys still work while a reload is under way or the IdP is briefly away:
            // logins do not queue behind a slow IdP. Past `max_stale` they are dropped.
            (Some(keys), true) => match self.refresh(Wait::No).await {
                Ok(true) => self.current().await.unwrap_or(keys),
                _ if age.is_some_and(|a| a >= self.max_stale) => {
                    return Err(IdentityError::ProviderUnavailable(
                        "signing keys are too old and could not be reloaded".into(),
                    ));
                }
                _ => keys,
            },
            (None, _) => {
                self.refresh(Wait::Yes).await?;
                self.current().await.ok_or_else(|| {
                    IdentityError::ProviderUnavailable("no keys loaded yet".into())
                })?
            }
        };
        match keys.select(alg, kid) {
            Ok(_) => return Ok(keys),
            Err(NoKey::Mismatch) => return Err(IdentityError::KeyAlgorithmMismatch),
            Err(NoKey::Unknown) => {}
        }
        if let Ok(true) = self.refresh(Wait::Yes).await
            && let Some(fresh) = self.current().await
        {
            match fresh.select(alg, kid) {
                Ok(_) => return Ok(fresh),
                Err(NoKey::Mismatch) => return Err(IdentityError::KeyAlgorithmMismatch),
                Err(NoKey::Unknown) => {}
            }
        }
        Err(IdentityError::UnknownKey {
            kid: describe_kid(kid),
        })
    }

    async fn current(&self) -> Option<Arc<KeySet>> {
        self.cache.read().await.keys.clone()
    }

    fn install(&self, set: KeySet, at: Instant) {
        // Only called from `new`, before the verifier is shared: the lock is free.
        if let Ok(mut cache) = self.cache.try_write() {
            cache.keys = Some(Arc::new(set));
            cache.loaded_at = Some(at);
            cache.last_attempt = Some(at);
        }
    }

    /// Reloads the keys unless the last attempt is younger than `jwks_refresh_min_secs`.
    /// `Ok(true)`: new keys installed; `Ok(false)`: skipped (rate limit, or another reload
    /// is running and `wait` is [`Wait::No`]).
    async fn refresh(&self, wait: Wait) -> Result<bool, IdentityError> {
        let _serial = match wait {
            Wait::Yes => self.refresh_lock.lock().await,
            Wait::No => match self.refresh_lock.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(false),
            },
        };
        {
            let mut cache = self.cache.write().await;
            if cache
                .last_attempt
                .is_some_and(|t| t.elapsed() < self.refresh_min)
            {
                return Ok(false);
            }
            // Failures count too, so a dead IdP is not hammered.
            cache.last_attempt = Some(Instant::now());
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self
            .source
            .fetch()
            .await
            .and_then(|text| KeySet::parse(&text).map_err(IdentityError::ProviderUnavailable));
        match result {
            Ok(set) => {
                tracing::info!(issuer = %self.issuer, keys = set.len(), "OIDC signing keys loaded");
                let mut cache = self.cache.write().await;
                cache.keys = Some(Arc::new(set));
                cache.loaded_at = Some(Instant::now());
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "loading OIDC signing keys failed");
                Err(e)
            }
        }
    }
}

/// Whether a caller waits for a reload another task is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

fn describe_kid(kid: Option<&str>) -> String {
    match kid {
        Some(k) => format!("\"{}\"", sanitize(k, 64)),
        None => "(no kid)".into(),
    }
}

/// Maps the JWT library's errors to ours; its own messages are not passed on (some quote
/// parts of the token).
fn map_jwt_error(kind: &ErrorKind) -> IdentityError {
    match kind {
        ErrorKind::InvalidSignature => IdentityError::BadSignature,
        ErrorKind::ExpiredSignature => IdentityError::Expired,
        ErrorKind::ImmatureSignature => IdentityError::NotYetValid,
        ErrorKind::InvalidIssuer => IdentityError::WrongIssuer,
        ErrorKind::InvalidAudience => IdentityError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => IdentityError::MissingClaim(sanitize(c, 32)),
        ErrorKind::InvalidClaimFormat(c) => IdentityError::InvalidClaim {
            claim: sanitize(c, 32),
            reason: "wrong type".into(),
        },
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => IdentityError::KeyAlgorithmMismatch,
        // An ECDSA/EdDSA/RSA key that does not parse for this algorithm cannot have signed it.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            IdentityError::BadSignature
        }
        ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            IdentityError::MalformedToken("token payload is not base64url JSON".into())
        }
        _ => IdentityError::MalformedToken("token could not be verified".into()),
    }
}
