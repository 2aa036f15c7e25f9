//! Server-side SCRAM-SHA-256 (RFC 5802/7677) for client authentication, and SCRAM-SHA-256-PLUS
//! with `tls-server-end-point` channel binding (RFC 5929) over TLS: the client proves that the
//! TLS session it authenticated in ends at this server's certificate, so a man in the middle
//! holding another certificate cannot relay the exchange.
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
pub(crate) enum ScramError {
    #[error("malformed SCRAM verifier")]
    BadVerifier,
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("SCRAM channel binding negotiation error: {0}")]
    ChannelBindingNegotiation(&'static str),
    #[error("SCRAM channel binding check failed")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("password authentication failed")]
    WrongPassword,
}

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone)]
pub(crate) struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Verifier {
    pub(crate) fn parse(s: &str) -> Result<Verifier, ScramError> {
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
    pub(crate) fn decoy(user: &str, process_secret: &[u8; 32]) -> Verifier {
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

/// The SASL mechanisms interceptor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mechanism {
    ScramSha256,
    /// With channel binding; offered only over TLS.
    ScramSha256Plus,
}

impl Mechanism {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
        }
    }

    pub(crate) fn from_name(name: &[u8]) -> Option<Mechanism> {
        match name {
            b"SCRAM-SHA-256" => Some(Mechanism::ScramSha256),
            b"SCRAM-SHA-256-PLUS" => Some(Mechanism::ScramSha256Plus),
            _ => None,
        }
    }

    /// What the server offers, most secure first (as PostgreSQL orders them): with an end
    /// point hash (a TLS connection whose certificate has one) both, else plain SCRAM only.
    pub(crate) fn offered(end_point: Option<&[u8]>) -> &'static [&'static str] {
        match end_point {
            Some(_) => &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
            None => &["SCRAM-SHA-256"],
        }
    }
}

/// The server's side of one exchange.
pub(crate) struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    /// What the client-final-message's `c=` must decode to: the gs2 header, followed by the
    /// channel binding data when the client bound the channel.
    expected_binding: Vec<u8>,
    nonce: String,
    server_first: String,
}

impl ServerExchange {
    /// Takes the client-first-message sent with `mechanism`, returns the exchange and the
    /// server-first-message. `end_point` is this connection's `tls-server-end-point` data when
    /// SCRAM-SHA-256-PLUS was offered on it (TLS), `None` when only SCRAM-SHA-256 was.
    pub(crate) fn start(
        verifier: Verifier,
        mechanism: Mechanism,
        end_point: Option<&[u8]>,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        use ScramError::ChannelBindingNegotiation as Negotiation;
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg.split_once(',').ok_or(ScramError::Malformed)?;
        let plus = mechanism == Mechanism::ScramSha256Plus;
        if plus && end_point.is_none() {
            return Err(Negotiation(
                "SCRAM-SHA-256-PLUS was not offered on this connection",
            ));
        }
        let binding_data: &[u8] = match flag {
            "n" if plus => {
                return Err(Negotiation(
                    "the client chose SCRAM-SHA-256-PLUS without binding the channel",
                ));
            }
            "n" => &[],
            // "y": the client could bind but believes the server cannot. Here it can, so a
            // man in the middle stripped SCRAM-SHA-256-PLUS from the offer (RFC 5802 §6).
            "y" if end_point.is_some() || plus => {
                return Err(Negotiation(
                    "the client supports channel binding but thinks the server does not; \
                     this server does (was the offer tampered with?)",
                ));
            }
            "y" => &[],
            f => match f.strip_prefix("p=") {
                Some(_) if !plus => {
                    return Err(Negotiation(
                        "the client bound the channel but did not choose SCRAM-SHA-256-PLUS",
                    ));
                }
                Some("tls-server-end-point") => end_point.unwrap_or_default(),
                Some(_) => {
                    return Err(Negotiation(
                        "unsupported channel binding type (only tls-server-end-point is)",
                    ));
                }
                None => return Err(ScramError::Malformed),
            },
        };
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
        let mut expected_binding = format!("{flag},{authzid},").into_bytes();
        expected_binding.extend_from_slice(binding_data);
        Ok((
            ServerExchange {
                verifier,
                client_first_bare: bare.to_owned(),
                expected_binding,
                nonce,
                server_first: server_first.clone(),
            },
            server_first,
        ))
    }

    /// Checks the client-final-message; returns the server-final-message on success.
    pub(crate) fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
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
        if !constant_time_eq(&channel, &self.expected_binding) {
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
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const PLAIN: Mechanism = Mechanism::ScramSha256;
    const PLUS: Mechanism = Mechanism::ScramSha256Plus;

    /// One exchange with postgres-protocol's client (the one tokio-postgres uses).
    fn exchange(
        password_set: &str,
        password_tried: &str,
        mechanism: Mechanism,
        offered: Option<&[u8]>,
        client_binding: ChannelBinding,
    ) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&hash_password(password_set)).unwrap();
        let mut client = ScramSha256::new(password_tried.as_bytes(), client_binding);
        let (ex, server_first) =
            ServerExchange::start(verifier, mechanism, offered, client.message())?;
        client.update(server_first.as_bytes()).unwrap();
        let server_final = ex.finish(client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    fn run(password_set: &str, password_tried: &str) -> Result<(), ScramError> {
        exchange(
            password_set,
            password_tried,
            PLAIN,
            None,
            ChannelBinding::unsupported(),
        )
    }

    /// The end point data of two different certificates (any bytes: the exchange only
    /// compares them).
    const OURS: &[u8] = &[0x11; 32];
    const THEIRS: &[u8] = &[0x22; 32];

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
    fn channel_bound_to_our_certificate_authenticates() {
        exchange(
            "pw",
            "pw",
            PLUS,
            Some(OURS),
            ChannelBinding::tls_server_end_point(OURS.to_vec()),
        )
        .unwrap();
    }

    #[test]
    fn channel_bound_to_another_certificate_fails() {
        // What a client sees through a man in the middle that terminates TLS with its own
        // certificate: the right password, the wrong end point.
        assert_eq!(
            exchange(
                "pw",
                "pw",
                PLUS,
                Some(OURS),
                ChannelBinding::tls_server_end_point(THEIRS.to_vec()),
            ),
            Err(ScramError::ChannelBinding)
        );
        // Also with a wrong password: the binding is checked first, as PostgreSQL does.
        assert_eq!(
            exchange(
                "pw",
                "other",
                PLUS,
                Some(OURS),
                ChannelBinding::tls_server_end_point(THEIRS.to_vec()),
            ),
            Err(ScramError::ChannelBinding)
        );
    }

    #[test]
    fn binding_data_cut_or_extended_fails() {
        for data in [&OURS[..31], &[OURS, &[0][..]].concat()[..], &[][..]] {
            assert_eq!(
                exchange(
                    "pw",
                    "pw",
                    PLUS,
                    Some(OURS),
                    ChannelBinding::tls_server_end_point(data.to_vec()),
                ),
                Err(ScramError::ChannelBinding),
                "{data:?}"
            );
        }
    }

    #[test]
    fn downgrade_to_plain_scram_is_refused_where_plus_was_offered() {
        // "y": the client could bind but was shown an offer without SCRAM-SHA-256-PLUS.
        assert!(matches!(
            exchange("pw", "pw", PLAIN, Some(OURS), ChannelBinding::unrequested()),
            Err(ScramError::ChannelBindingNegotiation(_))
        ));
        // Over plain TCP nothing was offered, so "y" is honest.
        exchange("pw", "pw", PLAIN, None, ChannelBinding::unrequested()).unwrap();
        // "n" (a client without channel binding) is fine over TLS too.
        exchange("pw", "pw", PLAIN, Some(OURS), ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn mechanism_and_gs2_flag_must_agree() {
        let neg = |r: Result<(), ScramError>| {
            assert!(
                matches!(r, Err(ScramError::ChannelBindingNegotiation(_))),
                "{r:?}"
            )
        };
        // PLUS without binding.
        neg(exchange(
            "pw",
            "pw",
            PLUS,
            Some(OURS),
            ChannelBinding::unsupported(),
        ));
        // Binding under the plain mechanism.
        neg(exchange(
            "pw",
            "pw",
            PLAIN,
            Some(OURS),
            ChannelBinding::tls_server_end_point(OURS.to_vec()),
        ));
        // PLUS where it was not offered (plain TCP).
        neg(exchange(
            "pw",
            "pw",
            PLUS,
            None,
            ChannelBinding::tls_server_end_point(OURS.to_vec()),
        ));
        // Another binding type.
        let v = Verifier::parse(&hash_password("pw")).unwrap();
        assert!(matches!(
            ServerExchange::start(v, PLUS, Some(OURS), b"p=tls-unique,,n=,r=abc"),
            Err(ScramError::ChannelBindingNegotiation(_))
        ));
    }

    #[test]
    fn final_message_must_repeat_the_first_gs2_header() {
        // Bound in the first message, unbound in the final one (and the other way round).
        let v = Verifier::parse(&hash_password("pw")).unwrap();
        let (ex, sf) = ServerExchange::start(
            v.clone(),
            PLUS,
            Some(OURS),
            b"p=tls-server-end-point,,n=,r=abc",
        )
        .unwrap();
        let nonce = sf.split(',').next().unwrap().trim_start_matches("r=");
        let fake = format!(
            "c={},r={nonce},p={}",
            B64.encode("n,,"),
            B64.encode([0; 32])
        );
        assert_eq!(ex.finish(fake.as_bytes()), Err(ScramError::ChannelBinding));
        let (ex, sf) = ServerExchange::start(v, PLAIN, Some(OURS), b"n,,n=,r=abc").unwrap();
        let nonce = sf.split(',').next().unwrap().trim_start_matches("r=");
        let mut c = b"p=tls-server-end-point,,".to_vec();
        c.extend_from_slice(OURS);
        let fake = format!("c={},r={nonce},p={}", B64.encode(c), B64.encode([0; 32]));
        assert_eq!(ex.finish(fake.as_bytes()), Err(ScramError::ChannelBinding));
    }

    #[test]
    fn mechanisms_offered() {
        assert_eq!(Mechanism::offered(None), ["SCRAM-SHA-256"]);
        assert_eq!(
            Mechanism::offered(Some(OURS)),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        for m in [PLAIN, PLUS] {
            assert_eq!(Mechanism::from_name(m.name().as_bytes()), Some(m));
        }
        assert_eq!(Mechanism::from_name(b"SCRAM-SHA-1"), None);
    }

    #[test]
    fn decoy_rejects_everything() {
        let v = Verifier::decoy("nobody", &[7; 32]);
        let mut client = ScramSha256::new(b"", ChannelBinding::unsupported());
        let (ex, sf) = ServerExchange::start(v, PLAIN, None, client.message()).unwrap();
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
            b"x,,n=,r=abc",
            b"\xff\xfe",
        ] {
            assert!(ServerExchange::start(v.clone(), PLAIN, None, m).is_err());
            assert!(
                ServerExchange::start(v.clone(), PLUS, Some(OURS), &m[..m.len().min(2)]).is_err()
            );
        }
        assert!(Verifier::parse("SCRAM-SHA-256$x:y$z").is_err());
    }
}
