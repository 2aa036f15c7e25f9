//! Ed25519 signed marks over the hash chain: the head (after every group commit), periodic
//! checkpoints, and the base left by retention. The operator's daemon holds the private key;
//! auditors verify with the public key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditError;
use super::chain::ChainHash;
use super::record::{RecordId, Timestamp};

/// What a signed mark asserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MarkKind {
    /// The last durable record is `seq` with chain hash `hash`.
    Head,
    /// A periodic checkpoint: record `seq` has chain hash `hash` (kept for auditors).
    Checkpoint,
    /// The log starts at `seq` (older records were removed by retention); `hash` is the chain
    /// hash of record `seq - 1`, from which verification continues.
    Base,
}

impl MarkKind {
    fn tag(self) -> u8 {
        match self {
            MarkKind::Head => 1,
            MarkKind::Checkpoint => 2,
            MarkKind::Base => 3,
        }
    }
}

/// A (possibly signed) statement about the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub kind: MarkKind,
    pub seq: RecordId,
    /// Hex SHA-256 chain hash.
    pub hash: String,
    pub at: Timestamp,
    /// First 8 bytes (hex) of SHA-256 of the public key that signed.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Hex Ed25519 signature over [`Mark::signed_bytes`]; `None` when no key is configured.
    #[serde(default)]
    pub signature: Option<String>,
}

impl Mark {
    /// Domain-separated message: a signature over a head can never be replayed as a base.
    fn signed_bytes(kind: MarkKind, seq: RecordId, hash: &ChainHash, at: Timestamp) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(b"interceptor-audit-mark-v1\0");
        m.push(kind.tag());
        m.extend_from_slice(&seq.0.to_be_bytes());
        m.extend_from_slice(&hash.0);
        m.extend_from_slice(&at.unix_micros().to_be_bytes());
        m
    }

    pub(crate) fn new(
        kind: MarkKind,
        seq: RecordId,
        hash: ChainHash,
        key: Option<&SigningKey>,
    ) -> Mark {
        let at = Timestamp::now();
        let (key_id, signature) = match key {
            Some(k) => {
                let sig = k.sign(&Mark::signed_bytes(kind, seq, &hash, at));
                (
                    Some(key_id(&k.verifying_key())),
                    Some(hex::encode(sig.to_bytes())),
                )
            }
            None => (None, None),
        };
        Mark {
            kind,
            seq,
            hash: hash.to_hex(),
            at,
            key_id,
            signature,
        }
    }

    pub(crate) fn chain_hash(&self) -> Option<ChainHash> {
        ChainHash::from_hex(&self.hash)
    }

    /// Checks the signature against `key`. Unsigned or malformed marks fail.
    pub(crate) fn verify(&self, key: &VerifyingKey) -> Result<(), String> {
        let hash = self
            .chain_hash()
            .ok_or_else(|| "malformed hash".to_string())?;
        let sig_hex = self
            .signature
            .as_deref()
            .ok_or_else(|| "not signed".to_string())?;
        let sig_bytes: [u8; 64] = hex::decode(sig_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "malformed signature".to_string())?;
        let sig = Signature::from_bytes(&sig_bytes);
        key.verify(
            &Mark::signed_bytes(self.kind, self.seq, &hash, self.at),
            &sig,
        )
        .map_err(|_| "bad signature (wrong key or altered mark)".to_string())
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, AuditError> {
        serde_json::to_vec(self).map_err(|e| AuditError::Encode(e.to_string()))
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Mark> {
        serde_json::from_slice(bytes).ok()
    }
}

pub(crate) fn key_id(key: &VerifyingKey) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex::encode(&d[..8])
}

/// Reads a private key: PKCS#8 PEM, or 32 raw bytes as 64 hex characters.
pub(crate) fn load_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditError::Key {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    check_private_permissions(path)?;
    let bad = |message: &str| AuditError::Key {
        path: path.to_owned(),
        message: message.to_string(),
    };
    let trimmed = text.trim();
    if trimmed.starts_with("-----BEGIN") {
        // The pkcs8 error is generic and never contains key material.
        return SigningKey::from_pkcs8_pem(trimmed)
            .map_err(|_| bad("not an Ed25519 PKCS#8 private key"));
    }
    let raw: [u8; 32] = hex::decode(trimmed)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("expected PKCS#8 PEM or 64 hex characters"))?;
    Ok(SigningKey::from_bytes(&raw))
}

/// A private key readable by group or others is refused: anyone who can read it can forge
/// checkpoints.
fn check_private_permissions(path: &Path) -> Result<(), AuditError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| AuditError::Key {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(AuditError::Key {
            path: path.to_owned(),
            message: "private key must not be accessible by group or others (chmod 600)".into(),
        });
    }
    Ok(())
}

/// Reads a public key: SPKI PEM, or 32 raw bytes as 64 hex characters.
#[cfg(test)]
pub(crate) fn load_verifying_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditError::Key {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    parse_verifying_key(&text).map_err(|message| AuditError::Key {
        path: path.to_owned(),
        message,
    })
}

pub(crate) fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    let trimmed = text.trim();
    if trimmed.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(trimmed)
            .map_err(|_| "not an Ed25519 public key (SPKI PEM)".to_string());
    }
    let raw: [u8; 32] = hex::decode(trimmed)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "expected SPKI PEM or 64 hex characters".to_string())?;
    VerifyingKey::from_bytes(&raw).map_err(|_| "invalid Ed25519 public key".to_string())
}

/// Files written by [`generate_keypair`].
#[derive(Debug, Clone)]
pub(crate) struct GeneratedKey {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub public_key_hex: String,
    pub key_id: String,
}

/// Generates a key pair: `out` (PKCS#8 PEM, mode 0600, never overwritten) and `out.pub`
/// (SPKI PEM) for auditors.
pub(crate) fn generate_keypair(out: &Path) -> Result<GeneratedKey, AuditError> {
    let err = |path: &Path, message: String| AuditError::Key {
        path: path.to_owned(),
        message,
    };
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| err(out, "cannot encode private key".into()))?;
    let public = key.verifying_key();
    let pub_pem = public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|_| err(out, "cannot encode public key".into()))?;
    let mut pub_path = out.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);

    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| err(out, e.to_string()))?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| err(out, e.to_string()))?;
    std::fs::write(&pub_path, pub_pem.as_bytes()).map_err(|e| err(&pub_path, e.to_string()))?;
    Ok(GeneratedKey {
        private_key: out.to_owned(),
        public_key: pub_path,
        public_key_hex: hex::encode(public.as_bytes()),
        key_id: key_id(&public),
    })
}
