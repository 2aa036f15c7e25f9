//! Server-side SCRAM-SHA-256 (RFC 5802/7677) for client authentication, without channel binding.
//!
//! Verifiers use PostgreSQL's format (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`), so
//! `interceptor hash-password` and PostgreSQL's own verifiers are interchangeable.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM verifier")]
    BadVerifier,
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    WrongPassword,
}

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Verifier {
    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or(ScramError::BadVerifier)
        };
        Ok(Verifier {
            iterations: iter.parse().map_err(|_| ScramError::BadVerifier)?,
            salt: B64.decode(salt).map_err(|_| ScramError::BadVerifier)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// A verifier no password matches, derived from a per-process secret so that an unknown user
    /// goes through the same exchange as a known one (no user enumeration by timing or shape).
    pub fn decoy(user: &str, process_secret: &[u8; 32]) -> Verifier {
        let mut mac = hmac_sha256(process_secret, user.as_bytes());
        let salt = mac[..16].to_vec();
        mac = hmac_sha256(&mac, b"keys");
        Verifier {
            iterations: 4096,
            salt,
            stored_key: mac,
            server_key: hmac_sha256(&mac, b"server"),
        }
    }
}

/// Makes a verifier for a password (PostgreSQL's format, 4096 iterations).
pub fn hash_password(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; the error case cannot occur.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The server's side of one exchange.
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    gs2_header: String,
    nonce: String,
    server_first: String,
}

impl ServerExchange {
    /// Takes the client-first-message, returns the exchange and the server-first-message.
    pub fn start(verifier: Verifier, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg.split_once(',').ok_or(ScramError::Malformed)?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed)?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed);
        }
        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed)?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed);
        }
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let gs2_header = format!("{flag},{authzid},");
        Ok((
            ServerExchange {
                verifier,
                client_first_bare: bare.to_owned(),
                gs2_header,
                nonce,
                server_first: server_first.clone(),
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = B64
            .decode(channel.ok_or(ScramError::Malformed)?)
            .map_err(|_| ScramError::Malformed)?;
        if channel != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed)?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (i, k) in client_key.iter_mut().enumerate() {
            *k = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&computed, &self.verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Equality whose time does not depend on where the inputs differ (only on their lengths):
/// `subtle` keeps the optimiser from turning the comparison back into an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(password_set: &str, password_tried: &str) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&hash_password(password_set)).unwrap();
        let mut client = ScramSha256::new(password_tried.as_bytes(), ChannelBinding::unsupported());
        let (ex, server_first) = ServerExchange::start(verifier, client.message()).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let server_final = ex.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn real_client_authenticates() {
        run("correct horse", "correct horse").unwrap();
    }

    #[test]
    fn wrong_password_fails() {
        assert_eq!(
            run("correct horse", "battery"),
            Err(ScramError::WrongPassword)
        );
    }

    #[test]
    fn decoy_rejects_everything() {
        let v = Verifier::decoy("nobody", &[7; 32]);
        let mut client = ScramSha256::new(b"", ChannelBinding::unsupported());
        let (ex, sf) = ServerExchange::start(v, client.message()).unwrap();
        client.update(sf.as_bytes()).unwrap();
        assert_eq!(ex.finish(client.message()), Err(ScramError::WrongPassword));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let v = Verifier::decoy("x", &[0; 32]);
        for m in [
            &b""[..],
            b"n",
            b"n,,",
            b"p=tls-server-end-point,,n=,r=abc",
            b"\xff\xfe",
        ] {
            assert!(ServerExchange::start(v.clone(), m).is_err());
        }
        assert!(Verifier::parse("SCRAM-SHA-256$x:y$z").is_err());
    }
}
