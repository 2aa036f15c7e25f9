//! Throwaway PKI for TLS tests: a CA, a server certificate for `localhost`/127.0.0.1 and client
//! certificates, all written as PEM files (keys mode 0600, as libpq and PostgreSQL demand).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate authority that can sign server and client certificates.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("dir", &self.dir).finish()
    }
}

/// A certificate and its private key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

impl TestCa {
    /// A new CA whose certificate is written to `dir/<name>.crt`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("interceptor-tests {name}"));
        dn.push(DnType::OrganizationName, "interceptor-tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("CA key")?;
        let cert = params.self_signed(&key).context("self-sign CA")?;
        let ca = TestCa {
            cert,
            key,
            dir: dir.to_path_buf(),
        };
        std::fs::write(ca.cert_path_for(name), ca.cert.pem()).context("write CA cert")?;
        Ok(ca)
    }

    fn cert_path_for(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a leaf certificate named `name` (files `name.crt`, `name.key`).
    fn issue(
        &self,
        name: &str,
        common_name: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles> {
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "interceptor-tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("leaf key")?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("sign leaf")?;
        let files = CertFiles {
            cert: self.cert_path_for(name),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).context("write leaf cert")?;
        write_private(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// A server certificate valid for `localhost` and 127.0.0.1 (and ::1).
    pub fn server_cert(&self, name: &str) -> Result<CertFiles> {
        self.issue(
            name,
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject CN is `common_name` (mTLS identity).
    pub fn client_cert(&self, common_name: &str) -> Result<CertFiles> {
        self.issue(
            &format!("client-{common_name}"),
            common_name,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// A CA, a server certificate and a temp dir holding them; add client certs on demand.
#[derive(Debug)]
pub struct TestCerts {
    dir: TempDir,
    pub ca: TestCa,
    /// `ca.crt`: give this to clients as `sslrootcert`.
    pub ca_cert: PathBuf,
    pub server: CertFiles,
}

impl TestCerts {
    pub fn generate() -> Result<TestCerts> {
        let dir = tempfile::Builder::new()
            .prefix("certs")
            .tempdir()
            .context("certs temp dir")?;
        let ca = TestCa::new(dir.path(), "ca")?;
        let server = ca.server_cert("server")?;
        Ok(TestCerts {
            ca_cert: dir.path().join("ca.crt"),
            dir,
            ca,
            server,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client certificate signed by this CA.
    pub fn client(&self, common_name: &str) -> Result<CertFiles> {
        self.ca.client_cert(common_name)
    }
}
