//! Authenticating the client. Every method ends in the same [`Identity`].

use std::collections::HashMap;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::config::StaticIdentity;
use crate::identity::scram::{Mechanism, ScramError, ServerExchange, Verifier};
use crate::identity::{Identity, Proof};
use crate::net::reader::FrameReader;
use crate::net::stream::Stream;
use interceptor_wire::frame::FrameError;
use interceptor_wire::message::{self, Cursor, PgError, sqlstate};

/// Static identities with their parsed verifiers.
pub(crate) struct StaticIdentities {
    entries: HashMap<String, (Verifier, StaticIdentity)>,
    decoy_secret: [u8; 32],
}

impl StaticIdentities {
    pub(crate) fn new(
        config: &std::collections::BTreeMap<String, StaticIdentity>,
    ) -> Result<Self, String> {
        let mut entries = HashMap::new();
        for (name, id) in config {
            let v = Verifier::parse(&id.secret).map_err(|_| {
                format!("[identity.{name}] secret is not a valid SCRAM-SHA-256 verifier")
            })?;
            entries.insert(name.clone(), (v, id.clone()));
        }
        let mut decoy_secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut decoy_secret);
        Ok(StaticIdentities {
            entries,
            decoy_secret,
        })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&StaticIdentity> {
        self.entries.get(name).map(|(_, s)| s)
    }
}

/// Every way a client can prove who it is.
pub(crate) struct Authenticators {
    pub statics: StaticIdentities,
    pub oidc: Option<std::sync::Arc<crate::identity::oidc::OidcVerifier>>,
    pub mtls: Option<crate::identity::mtls::MtlsConfig>,
    /// The `tls-server-end-point` data of the certificate clients see over TLS; with it,
    /// SCRAM-SHA-256-PLUS is offered on TLS connections.
    pub tls_end_point: Option<Vec<u8>>,
}

/// Authenticates the client, choosing the method as PostgreSQL's pg_hba would for this gateway:
/// a verified client certificate (mTLS) first, then a static identity by SCRAM, then an OIDC token
/// sent as a cleartext password over TLS. Anything else fails like a wrong password.
pub(crate) async fn authenticate(
    stream: &mut Stream,
    reader: &mut FrameReader,
    auth: &Authenticators,
    user: &str,
) -> Result<Identity, AuthError> {
    if let (Some(mtls), Some(cert)) = (&auth.mtls, peer_certificate(stream)) {
        let identity = crate::identity::mtls::identity_from_cert(&cert, mtls)
            .map_err(|e| AuthError::Identity(e.sqlstate(), e.to_string()))?;
        if identity.subject != user {
            return Err(AuthError::Identity(
                sqlstate::INVALID_AUTHORIZATION,
                format!(
                    "user name \"{user}\" does not match the client certificate's identity \"{}\"",
                    identity.subject
                ),
            ));
        }
        return Ok(identity);
    }
    if auth.statics.get(user).is_some() || auth.oidc.is_none() {
        // Channel binding only where the client's TLS session ends here (not over plain TCP).
        let end_point = match stream {
            Stream::TlsServer(_) => auth.tls_end_point.as_deref(),
            _ => None,
        };
        return authenticate_scram(stream, reader, &auth.statics, end_point, user).await;
    }
    let Some(oidc) = &auth.oidc else {
        return Err(AuthError::Failed(user.to_owned()));
    };
    if !stream.is_tls() {
        return Err(AuthError::Identity(
            sqlstate::INVALID_AUTHORIZATION,
            "OIDC tokens are only accepted over TLS: connect with sslmode=require or stronger"
                .into(),
        ));
    }
    send(stream, message::auth_cleartext()).await?;
    let body = expect_password_message(stream, reader).await?;
    let mut c = Cursor::new(&body, "PasswordMessage");
    let token = c.utf8().map_err(|e| AuthError::Protocol(e.to_string()))?;
    oidc.verify_login(user, token)
        .await
        .map_err(|e| AuthError::Identity(e.sqlstate(), e.to_string()))
}

fn peer_certificate(stream: &Stream) -> Option<Vec<u8>> {
    match stream {
        Stream::TlsServer(s) => s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec()),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("protocol violation during authentication: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("client closed the connection during authentication")]
    Closed,
    /// A token or certificate was rejected; the message never contains the credential.
    #[error("{1}")]
    Identity(&'static str, String),
}

impl AuthError {
    /// What the client is told.
    pub(crate) fn to_pg(&self) -> PgError {
        match self {
            AuthError::Failed(_) => PgError::fatal(sqlstate::INVALID_PASSWORD, self.to_string()),
            AuthError::Identity(code, msg) => PgError::fatal(*code, msg.clone()),
            _ => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
        }
    }
}

/// Authenticates `user` with SCRAM-SHA-256 (or SCRAM-SHA-256-PLUS, when `end_point` is this TLS
/// connection's channel binding data) against the static identities. Unknown users run the
/// same exchange against a decoy verifier and fail at the same point as a wrong password.
async fn authenticate_scram(
    stream: &mut Stream,
    reader: &mut FrameReader,
    identities: &StaticIdentities,
    end_point: Option<&[u8]>,
    user: &str,
) -> Result<Identity, AuthError> {
    let known = identities.entries.get(user);
    let verifier = match known {
        Some((v, _)) => v.clone(),
        None => Verifier::decoy(user, &identities.decoy_secret),
    };
    let offered = Mechanism::offered(end_point);
    send(stream, message::auth_sasl(offered)).await?;

    let body = expect_password_message(stream, reader).await?;
    let (mechanism, data) =
        message::decode_sasl_initial(&body).map_err(|e| AuthError::Protocol(e.to_string()))?;
    let mechanism = Mechanism::from_name(mechanism)
        .filter(|m| offered.contains(&m.name()))
        .ok_or_else(|| AuthError::Protocol("unsupported SASL mechanism".into()))?;
    let (exchange, server_first) = ServerExchange::start(verifier, mechanism, end_point, data)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    send(stream, message::auth_sasl_continue(server_first.as_bytes())).await?;

    let body = expect_password_message(stream, reader).await?;
    let server_final = match exchange.finish(&body) {
        Ok(f) => f,
        Err(ScramError::WrongPassword) => return Err(AuthError::Failed(user.to_owned())),
        Err(e) => return Err(AuthError::Protocol(e.to_string())),
    };
    let Some((_, id)) = known else {
        return Err(AuthError::Failed(user.to_owned()));
    };
    send(stream, message::auth_sasl_final(server_final.as_bytes())).await?;
    Ok(Identity {
        subject: user.to_owned(),
        display_name: id.display_name.clone().unwrap_or_else(|| user.to_owned()),
        groups: id.groups.clone(),
        proof: match mechanism {
            Mechanism::ScramSha256Plus => Proof::ScramSha256Plus,
            Mechanism::ScramSha256 => Proof::ScramSha256,
        },
        process: None,
    })
}

async fn expect_password_message(
    stream: &mut Stream,
    reader: &mut FrameReader,
) -> Result<Bytes, AuthError> {
    match reader.read_message(stream).await? {
        Some((b'p', body)) => Ok(body),
        Some((tag, _)) => Err(AuthError::Protocol(format!(
            "expected a password message, got '{}'",
            tag.escape_ascii()
        ))),
        None => Err(AuthError::Closed),
    }
}

async fn send(stream: &mut Stream, bytes: Bytes) -> Result<(), AuthError> {
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| AuthError::Frame(FrameError::Io(e)))
}
