//! mTLS identities: a client certificate chained to the configured CA names the actor.
//!
//! Two halves: [`client_cert_verifier`] plugs into the TLS acceptor (rustls, `ring` provider),
//! so chain, validity, EKU and revocation are checked during the handshake; after it,
//! [`identity_from_cert`] maps the accepted leaf certificate to an [`Identity`].
//!
//! ```toml
//! [mtls]
//! ca_file = "/etc/interceptor/client-ca.pem"
//! crl_files = ["/etc/interceptor/client-ca.crl.pem"]
//! subject_from = "uri"                       # cn | email | uri | dns
//! uri_prefix = "spiffe://example.org/"
//! [mtls.groups]
//! "spiffe://example.org/ns/etl/sa/loader" = ["etl"]
//! ```

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
#[cfg(test)]
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::identity::error::IdentityError;
use crate::identity::{Identity, Proof};

/// Longest subject or group name accepted.
const MAX_NAME_LEN: usize = 256;

/// Which certificate field names the subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSubjectSource {
    /// The subject's common name (CN).
    #[default]
    Cn,
    /// An rfc822Name (e-mail) subject alternative name.
    Email,
    /// A URI subject alternative name, e.g. a SPIFFE ID `spiffe://example.org/ns/etl/sa/loader`.
    Uri,
    /// A dNSName subject alternative name (machine identities).
    Dns,
}

/// `[mtls]` in the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM bundle of the CA(s) client certificates must chain to.
    pub ca_file: PathBuf,
    /// PEM CRLs from that CA; a revoked certificate fails the handshake.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// Refuse TLS clients without a certificate (otherwise they may log in by other means).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Which field names the subject.
    #[serde(default)]
    pub subject_from: CertSubjectSource,
    /// With `subject_from = "uri"`: only URIs starting with this prefix count (e.g. the SPIFFE
    /// trust domain `spiffe://example.org/`).
    #[serde(default)]
    pub uri_prefix: Option<String>,
    /// Take the subject's OU attributes as groups (only sensible if the CA controls OUs).
    #[serde(default)]
    pub ou_as_groups: bool,
    /// Static groups per mapped subject.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
}

impl MtlsConfig {
    /// Defaults for a CA file alone (e.g. `[tls] client_ca` of the main config): optional
    /// client certificates, subject from the CN, no groups.
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> Self {
        MtlsConfig {
            ca_file: ca_file.into(),
            crl_files: Vec::new(),
            require_client_cert: false,
            subject_from: CertSubjectSource::Cn,
            uri_prefix: None,
            ou_as_groups: false,
            groups: BTreeMap::new(),
        }
    }
}

fn cert_error(reason: impl Into<String>) -> IdentityError {
    IdentityError::Certificate(reason.into())
}

fn load_roots(path: &Path) -> Result<RootCertStore, IdentityError> {
    let config = |e: &dyn std::fmt::Display| {
        IdentityError::Config(format!("client CA file {}: {e}", path.display()))
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| config(&e))? {
        roots
            .add(cert.map_err(|e| config(&e))?)
            .map_err(|e| config(&e))?;
    }
    if roots.is_empty() {
        return Err(config(&"no certificate in file"));
    }
    Ok(roots)
}

fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    let mut crls = Vec::new();
    for path in paths {
        let iter = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| IdentityError::Config(format!("CRL file {}: {e}", path.display())))?;
        for crl in iter {
            crls.push(
                crl.map_err(|e| {
                    IdentityError::Config(format!("CRL file {}: {e}", path.display()))
                })?,
            );
        }
    }
    Ok(crls)
}

/// The client-certificate verifier for the TLS acceptor: certificates must chain to
/// `ca_file`, be valid now, allow client authentication and not be revoked by `crl_files`.
/// Clients without a certificate pass the handshake unless `require_client_cert` is set.
pub(crate) fn client_cert_verifier(
    cfg: &MtlsConfig,
) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    let roots = load_roots(&cfg.ca_file)?;
    let crls = load_crls(&cfg.crl_files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !crls.is_empty() {
        builder = builder.with_crls(crls);
    }
    if !cfg.require_client_cert {
        builder = builder.allow_unauthenticated();
    }
    builder
        .build()
        .map_err(|e| IdentityError::Config(format!("client certificate verifier: {e}")))
}

/// Reads the gateway's own certificate chain and private key (PEM files) for [`server_config`].
#[cfg(test)]
pub(crate) fn load_server_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            IdentityError::Config(format!("TLS certificate {}: {e}", cert_file.display()))
        })?;
    if chain.is_empty() {
        return Err(IdentityError::Config(format!(
            "TLS certificate {}: no certificate in file",
            cert_file.display()
        )));
    }
    // The key's bytes never reach the message: only the file name and the parse error kind.
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| IdentityError::Config(format!("TLS key {}: {e}", key_file.display())))?;
    Ok((chain, key))
}

/// A rustls server config with the `ring` provider, safe default protocol versions, the
/// gateway's certificate, and `client_verifier` (or no client authentication when `None`).
#[cfg(test)]
pub(crate) fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IdentityError::Config(format!("TLS: {e}")))?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(cert_chain, key)
        .map_err(|e| IdentityError::Config(format!("TLS certificate or key: {e}")))?;
    Ok(Arc::new(config))
}

fn usable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

/// Exactly one value, so a certificate can never map to two different subjects.
fn exactly_one<'a>(values: Vec<&'a str>, what: &str) -> Result<&'a str, IdentityError> {
    match values.as_slice() {
        [one] => Ok(one),
        [] => Err(cert_error(format!("certificate has no {what}"))),
        _ => Err(cert_error(format!("certificate has more than one {what}"))),
    }
}

fn common_names<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, IdentityError> {
    cert.subject()
        .iter_common_name()
        .map(|cn| {
            cn.as_str()
                .map_err(|_| cert_error("subject CN is not a string"))
        })
        .collect()
}

fn alt_names<'a>(
    cert: &'a X509Certificate<'_>,
    pick: impl Fn(&GeneralName<'a>) -> Option<&'a str>,
) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| cert_error("malformed subject alternative name extension"))?;
    Ok(san
        .map(|ext| ext.value.general_names.iter().filter_map(&pick).collect())
        .unwrap_or_default())
}

fn subject_of(cert: &X509Certificate<'_>, cfg: &MtlsConfig) -> Result<String, IdentityError> {
    let subject = match cfg.subject_from {
        CertSubjectSource::Cn => exactly_one(common_names(cert)?, "subject CN")?,
        CertSubjectSource::Email => exactly_one(
            alt_names(cert, |n| match n {
                GeneralName::RFC822Name(e) => Some(*e),
                _ => None,
            })?,
            "e-mail SAN",
        )?,
        CertSubjectSource::Dns => exactly_one(
            alt_names(cert, |n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })?,
            "DNS SAN",
        )?,
        CertSubjectSource::Uri => {
            let prefix = cfg.uri_prefix.as_deref().unwrap_or("");
            exactly_one(
                alt_names(cert, |n| match n {
                    GeneralName::URI(u) if u.starts_with(prefix) => Some(*u),
                    _ => None,
                })?,
                "URI SAN matching the configured prefix",
            )?
        }
    };
    if !usable_name(subject) {
        return Err(cert_error(
            "certificate subject name is empty, too long or has control characters",
        ));
    }
    Ok(subject.to_owned())
}

/// Maps a client's leaf certificate (DER) to an identity.
///
/// Call it only with a certificate the handshake's [`client_cert_verifier`] accepted (rustls'
/// `peer_certificates()[0]`): this function does not check the chain. It re-checks the
/// validity period so a long-lived session cannot be set up from an expired certificate.
pub(crate) fn identity_from_cert(
    cert_der: &[u8],
    cfg: &MtlsConfig,
) -> Result<Identity, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(cert_der)
        .map_err(|_| cert_error("certificate is not valid DER X.509"))?;
    if !rest.is_empty() {
        return Err(cert_error("trailing data after the certificate"));
    }
    if !cert.validity().is_valid() {
        return Err(cert_error("certificate is expired or not yet valid"));
    }
    let subject = subject_of(&cert, cfg)?;

    let mut groups: Vec<String> = cfg.groups.get(&subject).cloned().unwrap_or_default();
    if cfg.ou_as_groups {
        for ou in cert.subject().iter_organizational_unit() {
            match ou.as_str() {
                Ok(ou) if usable_name(ou) => groups.push(ou.to_owned()),
                _ => tracing::warn!("unusable OU in client certificate ignored"),
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    groups.retain(|g| seen.insert(g.clone()));

    let display_name = common_names(&cert)
        .ok()
        .and_then(|cns| cns.first().copied().filter(|cn| usable_name(cn)))
        .unwrap_or(&subject)
        .to_owned();
    Ok(Identity {
        display_name,
        groups,
        proof: Proof::ClientCertificate {
            subject: cert.subject().to_string(),
            sha256: hex::encode(Sha256::digest(cert_der)),
        },
        process: None,
        subject,
    })
}
