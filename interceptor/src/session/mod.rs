//! One client connection: startup, authentication, upstream login and the relay loop.

pub mod auth;
pub mod cancel;
pub mod gate;
pub mod relay;
pub mod startup;
pub mod upstream;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::net::message::{self, PgError, sqlstate};
use crate::net::stream::Stream;
use crate::server::ServerState;
use cancel::UpstreamKey;
use gate::{Gate, Recorder, SessionFacts};
use startup::Opening;

/// Where a client connected from.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp {
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    },
    Unix {
        uid: Option<u32>,
        gid: Option<u32>,
        pid: Option<i32>,
    },
}

impl Peer {
    /// What the kernel attests about the client process, where it can.
    fn process(&self) -> Option<crate::identity::ProcessIdentity> {
        match self {
            Peer::Unix {
                uid: Some(uid),
                gid,
                pid: Some(pid),
            } => Some(crate::identity::process::describe(
                *pid as u32,
                *uid,
                gid.unwrap_or(u32::MAX),
            )),
            _ => None,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp { peer, .. } => write!(f, "{peer}"),
            Peer::Unix { uid, pid, .. } => write!(
                f,
                "unix(uid={},pid={})",
                uid.map_or("?".into(), |u| u.to_string()),
                pid.map_or("?".into(), |p| p.to_string())
            ),
        }
    }
}

/// Startup parameters forwarded upstream. Everything else (notably `options`, which could carry
/// `-c role=...` or `-c session_authorization=...`) is refused or dropped: the upstream session's
/// settings are interceptor's to choose.
const PASSTHROUGH: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "datestyle",
    "TimeZone",
    "timezone",
    "IntervalStyle",
    "intervalstyle",
    "extra_float_digits",
];

pub async fn handle(stream: Stream, peer: Peer, server: Arc<ServerState>) {
    let span = tracing::info_span!(
        "session",
        peer = %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty
    );
    async move {
        if let Err(e) = run(stream, &peer, &server).await {
            tracing::info!(error = %e, "session ended with an error");
        }
    }
    .instrument(span)
    .await
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Startup(#[from] startup::StartupError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error("timed out during startup")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn run(stream: Stream, peer: &Peer, server: &ServerState) -> Result<(), SessionError> {
    let limits = &server.config.limits;
    let auth_deadline = Duration::from_millis(limits.auth_timeout_ms);
    let opening = tokio::time::timeout(
        auth_deadline,
        startup::negotiate(
            stream,
            server.tls.as_ref(),
            server.config.tls.as_ref().is_some_and(|t| t.require),
            limits.max_message_bytes,
        ),
    )
    .await
    .map_err(|_| SessionError::Timeout)??;

    let (mut stream, mut reader, params, negotiate) = match opening {
        Opening::Closed => return Ok(()),
        Opening::Cancel { pid, secret } => {
            match server.cancel.resolve(pid, secret) {
                Some(key) => {
                    tracing::info!(upstream_pid = key.pid, "forwarding cancel request");
                    server.upstream.cancel(key.pid, key.secret).await?;
                }
                None => tracing::info!("ignoring cancel request with an unknown key"),
            }
            return Ok(());
        }
        Opening::Startup {
            stream,
            reader,
            params,
            negotiate,
        } => (stream, reader, params, negotiate),
    };

    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(user) = get("user").map(str::to_owned) else {
        return fatal(
            &mut stream,
            PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
    };
    let database = get("database").unwrap_or(&user).to_owned();
    tracing::Span::current().record("user", user.as_str());
    tracing::Span::current().record("database", database.as_str());
    if get("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
        return fatal(
            &mut stream,
            PgError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "replication connections are not allowed through interceptor",
            ),
        )
        .await;
    }
    if get("options").is_some_and(|v| !v.trim().is_empty()) {
        return fatal(
            &mut stream,
            PgError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "startup `options` are not allowed through interceptor",
            )
            .with_hint("unset PGOPTIONS; session settings are chosen by interceptor's policy"),
        )
        .await;
    }
    if let Some((minor, unrecognized)) = &negotiate {
        stream
            .write_all(&message::negotiate_protocol_version(*minor, unrecognized))
            .await?;
    }

    let identity = tokio::time::timeout(
        auth_deadline,
        auth::authenticate(&mut stream, &mut reader, &server.identities, &user),
    )
    .await
    .map_err(|_| SessionError::Timeout)?;
    let mut identity = match identity {
        Ok(i) => i,
        Err(e) => {
            let _ = stream.write_all(&e.to_pg().encode()).await;
            return Err(e.into());
        }
    };

    identity.process = peer.process();

    let policy = server.policy.current();
    let route = match policy.route(&identity, &database) {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(
                identity = identity.subject,
                reason = refusal.message,
                "login refused by policy"
            );
            return fatal(
                &mut stream,
                PgError::fatal(
                    refusal.sqlstate,
                    format!("interceptor: {}", refusal.message),
                ),
            )
            .await;
        }
    };
    let role = route.upstream_role.clone();
    let password = server.secrets.password_for(&role);
    let passthrough: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| PASSTHROUGH.contains(&k.as_str()))
        .cloned()
        .collect();
    let upstream = match server
        .upstream
        .login(&role, password.as_ref(), &database, &passthrough)
        .await
    {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, role, "upstream login failed");
            let pg = match &e {
                upstream::UpstreamError::Refused { code, message } if code == "3D000" => {
                    PgError::fatal(sqlstate::INVALID_AUTHORIZATION, message.clone())
                }
                _ => PgError::fatal(
                    sqlstate::CANNOT_CONNECT_NOW,
                    "interceptor could not open a session on PostgreSQL",
                )
                .with_detail(e.to_string())
                .with_hint("the database server may be down; try again or contact the operator"),
            };
            let _ = stream.write_all(&pg.encode()).await;
            return Err(e.into());
        }
    };

    let key = server.cancel.register(UpstreamKey {
        pid: upstream.backend_pid,
        secret: upstream.backend_secret,
    });
    let mut hello = bytes::BytesMut::new();
    hello.extend_from_slice(&message::auth_ok());
    for (k, v) in &upstream.params {
        hello.extend_from_slice(&message::parameter_status(k, v));
    }
    hello.extend_from_slice(&message::backend_key_data(key.pid, key.secret));
    for n in &upstream.notices {
        hello.extend_from_slice(n);
    }
    hello.extend_from_slice(&message::ready_for_query(upstream.status));
    stream.write_all(&hello).await?;

    let facts = Arc::new(SessionFacts {
        session_id: server.next_session_id(),
        identity,
        database,
        upstream_role: role,
        policy: route.policy.clone(),
    });
    tracing::info!(
        session = facts.session_id,
        identity = facts.identity.subject,
        role = facts.upstream_role,
        "session started"
    );
    let shared = relay::Shared::new(&upstream.params);
    let mut gate = Gate::new(facts.clone(), server.policy.clone());
    let recorder = Recorder::new(facts.clone());
    let (client_rd, client_wr) = stream.into_split();
    let (up_rd, up_wr) = upstream.stream.into_split();
    let end = relay::run(
        client_rd,
        client_wr,
        reader,
        up_rd,
        up_wr,
        upstream.reader,
        &mut gate,
        &recorder,
        &shared,
    )
    .await;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        session = facts.session_id,
        end = ?end.as_ref().ok(),
        statements = shared.counters.statements.load(Relaxed),
        refused = shared.counters.refused.load(Relaxed),
        bytes_in = shared.counters.bytes_from_client.load(Relaxed),
        bytes_out = shared.counters.bytes_to_client.load(Relaxed),
        "session ended"
    );
    end?;
    Ok(())
}

async fn fatal(stream: &mut Stream, err: PgError) -> Result<(), SessionError> {
    let _ = stream.write_all(&err.encode()).await;
    Err(SessionError::Refused(err.message))
}
