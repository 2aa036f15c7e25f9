//! rustls configurations: the server side for clients, the client side for the upstream.
//!
//! Only the `ring` provider is compiled in and it is passed explicitly, so no process-wide default
//! provider is needed.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot read {path}: {message}")]
    Pem { path: String, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        // Never include key material, only what went wrong.
        message: e.to_string(),
    })
}

/// The acceptor's configuration. With an mTLS configuration, clients may (or must) present a
/// certificate chained to its CA; the verifier is the identity module's.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    mtls: Option<&crate::identity::mtls::MtlsConfig>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match mtls {
        Some(m) => {
            let verifier = crate::identity::mtls::client_cert_verifier(m)
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    Ok(Arc::new(config))
}

/// The `tls-server-end-point` channel binding data of a server certificate (RFC 5929 §4.1): its
/// DER hashed with the hash of its signature algorithm, SHA-256 where that is MD5 or SHA-1.
/// `None` where the algorithm has no single hash (Ed25519, Ed448) or is not known: PostgreSQL
/// cannot bind to such a certificate either, and only SCRAM-SHA-256 is offered then.
pub(crate) fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_parser::prelude::FromDer;
    #[derive(Clone, Copy)]
    enum Hash {
        Sha224,
        Sha256,
        Sha384,
        Sha512,
    }
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    let algorithm = &cert.signature_algorithm;
    let by_hash_oid = |oid: &str| match oid {
        // MD5 and SHA-1 are replaced by SHA-256.
        "1.2.840.113549.2.5" | "1.3.14.3.2.26" | "2.16.840.1.101.3.4.2.1" => Some(Hash::Sha256),
        "2.16.840.1.101.3.4.2.4" => Some(Hash::Sha224),
        "2.16.840.1.101.3.4.2.2" => Some(Hash::Sha384),
        "2.16.840.1.101.3.4.2.3" => Some(Hash::Sha512),
        _ => None,
    };
    let hash = match algorithm.algorithm.to_id_string().as_str() {
        // md5WithRSA, sha1WithRSA (PKCS#1 and OIW), ecdsa-with-SHA1, dsa-with-SHA1,
        // sha256WithRSA, ecdsa-with-SHA256, dsa-with-SHA256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.3.14.3.2.29"
        | "1.2.840.10045.4.1"
        | "1.2.840.10040.4.3"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.3.2"
        | "2.16.840.1.101.3.4.3.2" => Hash::Sha256,
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" | "2.16.840.1.101.3.4.3.1" => Hash::Sha224,
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Hash::Sha384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Hash::Sha512,
        // RSASSA-PSS names its hash in its parameters.
        "1.2.840.113549.1.1.10" => {
            match x509_parser::signature_algorithm::SignatureAlgorithm::try_from(algorithm).ok()? {
                x509_parser::signature_algorithm::SignatureAlgorithm::RSASSA_PSS(params) => {
                    by_hash_oid(&params.hash_algorithm_oid().to_id_string())?
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(match hash {
        Hash::Sha224 => sha2::Sha224::digest(cert_der).to_vec(),
        Hash::Sha256 => sha2::Sha256::digest(cert_der).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// The upstream connector's configuration: verified against `ca`, or (tls = require) encrypted
/// without verification, as libpq's `sslmode=require` does.
pub(crate) fn client_config(
    ca: Option<&Path>,
    verify: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = if verify {
        let mut roots = RootCertStore::empty();
        if let Some(ca) = ca {
            for c in load_certs(ca)? {
                roots.add(c)?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `tls = "require"`: encryption without authentication of the server, checked signatures only.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        // ecdsa-with-SHA256: SHA-256 of the DER.
        let der = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        // ecdsa-with-SHA384: the certificate's own hash, SHA-384.
        let der = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let h = server_end_point(&der).unwrap();
        assert_eq!(h.len(), 48);
        assert_eq!(h, sha2::Sha384::digest(&der).to_vec());
        // Ed25519 has no separate hash: no binding (PostgreSQL offers none either).
        assert_eq!(server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        assert_eq!(server_end_point(b"not a certificate"), None);
    }

    /// A self-signed certificate made by OpenSSL with `sign` options, as DER.
    fn openssl_cert(sign: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let (key, pem) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=x",
            ])
            .args(["-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&pem)
            .args(sign)
            .output()
            .expect("openssl (the RSA certificates are made with it)");
        assert!(ok.status.success(), "{ok:?}");
        load_certs(&pem).unwrap().remove(0).to_vec()
    }

    #[test]
    fn end_point_hash_of_rsa_certificates() {
        let der = openssl_cert(&["-sha512"]);
        assert_eq!(
            server_end_point(&der).unwrap(),
            sha2::Sha512::digest(&der).to_vec()
        );
        // SHA-1 is replaced by SHA-256.
        let der = openssl_cert(&["-sha1"]);
        assert_eq!(
            server_end_point(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        // RSASSA-PSS: the hash named in the parameters.
        let der = openssl_cert(&["-sha384", "-sigopt", "rsa_padding_mode:pss"]);
        assert_eq!(
            server_end_point(&der).unwrap(),
            sha2::Sha384::digest(&der).to_vec()
        );
    }
}
