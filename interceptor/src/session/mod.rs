//! One client connection, in phases: startup, authenticate, route (policy), login upstream,
//! relay, end. Each phase is a function that takes what it needs from the one before.

pub(crate) mod activity;
pub(crate) mod auth;
pub(crate) mod cancel;
pub(crate) mod fastpath;
pub(crate) mod gate;
pub(crate) mod live;
pub(crate) mod masking;
pub(crate) mod protocol;
pub(crate) mod relay;
#[cfg(test)]
mod relay_tests;
pub(crate) mod shared;
pub(crate) mod startup;
pub(crate) mod upstream;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use self::shared::ServerState;
use crate::net::stream::Stream;
use cancel::UpstreamKey;
use gate::{Gate, Recorder, SessionFacts};
use interceptor_wire::message::{self, PgError, sqlstate};
use startup::Opening;

/// Where a client connected from.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    Tcp {
        peer: std::net::SocketAddr,
        /// Kernel-attested client process (local clients, when the eBPF programs saw it).
        process: Option<crate::identity::ProcessIdentity>,
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
            Peer::Tcp { process, .. } => process.clone(),
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

/// SQLSTATEs PostgreSQL answers a bad startup setting with.
const SETTING_ERRORS: &[&str] = &["42704", "22023", "22P02", "55P02", "42501", "3F000"];

pub(crate) async fn handle(stream: Stream, peer: Peer, server: Arc<ServerState>) {
    let span = tracing::info_span!(
        "session",
        peer = %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty,
        id = tracing::field::Empty,
        identity = tracing::field::Empty
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

/// A client that finished the startup phase: its stream, the parameters it sent.
struct Started {
    /// Counts the connection among those not yet authenticated until authentication ends.
    pending: Option<crate::net::admission::Pending>,
    stream: Stream,
    reader: crate::net::reader::FrameReader,
    params: Vec<(String, String)>,
    user: String,
    database: String,
}

impl Started {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the policy decided for an authenticated identity before anything reaches PostgreSQL.
struct Routed<'a> {
    identity: crate::identity::Identity,
    route: crate::policy::Route,
    rules: crate::mask::MaskRules,
    password: Option<crate::secrets::Secret>,
    passthrough: Vec<(String, String)>,
    /// Holds the identity's place under `max_sessions` for the session's life.
    _slot: Option<shared::SessionSlot<'a>>,
}

/// The phases of one connection, in order; each takes what it needs and hands on what the
/// next one needs. A refusal ends the session with a FATAL (see [`fatal`]).
async fn run(stream: Stream, peer: &Peer, server: &Arc<ServerState>) -> Result<(), SessionError> {
    let Some(mut started) = startup_phase(stream, server).await? else {
        return Ok(());
    };
    let identity = authenticate_phase(&mut started, peer, server).await?;
    let routed = route_phase(&mut started, identity, server).await?;
    let (upstream, key) = login_phase(&mut started, &routed, server).await?;
    relay_phase(started, routed, upstream, key, peer, server).await
}

/// Admission, TLS/GSS negotiation and the startup packet; a CancelRequest is served here.
/// `None`: the connection ended without a session (closed, or a cancel request).
async fn startup_phase(
    mut stream: Stream,
    server: &Arc<ServerState>,
) -> Result<Option<Started>, SessionError> {
    let limits = &server.config.limits;
    let pending = match server.admission.admit() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("refusing a connection: too many awaiting authentication");
            return fatal(&mut stream, e).await;
        }
    };
    let opening = tokio::time::timeout(
        Duration::from_millis(limits.auth_timeout_ms),
        startup::negotiate(
            stream,
            server.tls.as_ref(),
            server.config.tls.as_ref().is_some_and(|t| t.require),
            limits.max_message_bytes,
        ),
    )
    .await
    .map_err(|_| SessionError::Timeout)??;

    let (mut stream, reader, params, negotiate) = match opening {
        Opening::Closed => return Ok(None),
        Opening::Cancel { pid, secret } => {
            match server.cancel.resolve(pid, secret) {
                Some(cancel::Resolved::Forward(key)) => {
                    tracing::info!(upstream_pid = key.pid, "forwarding cancel request");
                    server.upstream.cancel(key.pid, key.secret).await?;
                }
                Some(cancel::Resolved::Local) => {
                    tracing::info!("cancel request answered by interceptor (a held statement)");
                }
                None => tracing::info!("ignoring cancel request with an unknown key"),
            }
            return Ok(None);
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
    if let Some((minor, unrecognized)) = &negotiate {
        stream
            .write_all(&message::negotiate_protocol_version(*minor, unrecognized))
            .await?;
    }
    Ok(Some(Started {
        pending: Some(pending),
        stream,
        reader,
        params,
        user,
        database,
    }))
}

/// Proves who the client is (SCRAM, OIDC token, certificate) and attaches the kernel-attested
/// process.
async fn authenticate_phase(
    started: &mut Started,
    peer: &Peer,
    server: &Arc<ServerState>,
) -> Result<crate::identity::Identity, SessionError> {
    let identity = tokio::time::timeout(
        Duration::from_millis(server.config.limits.auth_timeout_ms),
        auth::authenticate(
            &mut started.stream,
            &mut started.reader,
            &server.identities(),
            &started.user,
        ),
    )
    .await
    .map_err(|_| SessionError::Timeout)?;
    let mut identity = match identity {
        Ok(i) => i,
        Err(e) => {
            let pg = e.to_pg();
            crate::metrics::refusal(&pg.code);
            let _ = started.stream.write_all(&pg.encode()).await;
            return Err(e.into());
        }
    };
    identity.process = peer.process();
    // Authenticated: no longer counted among the connections that have not proven who they are.
    drop(started.pending.take());
    tracing::Span::current().record("identity", identity.subject.as_str());
    Ok(identity)
}

/// The policy that routes this identity to this database: its upstream role, its limits
/// (`max_sessions` taken here), its masking rules, the startup settings it lets through.
async fn route_phase<'a>(
    started: &mut Started,
    identity: crate::identity::Identity,
    server: &'a Arc<ServerState>,
) -> Result<Routed<'a>, SessionError> {
    let stream = &mut started.stream;
    let policy = server.policy.current();
    let route = match policy.route(&identity, &started.database) {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(
                identity = identity.subject,
                reason = refusal.message,
                "login refused by policy"
            );
            return fatal(
                stream,
                PgError::fatal(
                    refusal.sqlstate,
                    format!("interceptor: {}", refusal.message),
                ),
            )
            .await;
        }
    };
    let slot = match route.limits.max_sessions {
        Some(max) => match server.sessions.acquire(&identity.subject, max) {
            Some(slot) => Some(slot),
            None => {
                return fatal(
                    stream,
                    PgError::fatal(
                        "53300",
                        format!(
                            "interceptor: identity \"{}\" already has {max} open sessions, the most policy \"{}\" allows",
                            identity.subject, route.policy
                        ),
                    )
                    .with_hint("close an idle session and retry"),
                )
                .await;
            }
        },
        None => None,
    };
    // Masking is decided before anything reaches PostgreSQL: rules that cannot be built end
    // the session (fail closed), never an unmasked one.
    let rules = match mask_rules(server, &route.mask, &identity) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, policy = route.policy, "masking rules unusable: refusing the session");
            return fatal(
                stream,
                PgError::fatal(
                    sqlstate::INTERNAL_ERROR,
                    "interceptor: the masking rules for this session are invalid, so it cannot start",
                ),
            )
            .await;
        }
    };
    let password = server.secrets().password_for(&route.upstream_role);
    // Every startup setting is forwarded or refused by name, as the policy decides.
    let passthrough = match startup::decide_settings(
        &started.params,
        &server.policy.current(),
        &identity,
        &started.database,
        &route,
    ) {
        Ok(p) => p,
        Err(refused) => {
            tracing::info!(reason = refused.message, "startup setting refused");
            return fatal(
                stream,
                PgError::fatal(refused.sqlstate, refused.message).with_hint(refused.hint),
            )
            .await;
        }
    };
    Ok(Routed {
        identity,
        route,
        rules,
        password,
        passthrough,
        _slot: slot,
    })
}

/// Logs in to PostgreSQL as the routed role (interceptor's own credentials) and greets the
/// client with PostgreSQL's parameters and interceptor's cancel key.
async fn login_phase<'a>(
    started: &mut Started,
    routed: &Routed<'_>,
    server: &'a Arc<ServerState>,
) -> Result<(upstream::Upstream, cancel::CancelKey<'a>), SessionError> {
    let role = &routed.route.upstream_role;
    // The policy may give these identities a larger (or smaller) message limit.
    let max_message = routed
        .route
        .limits
        .max_message_bytes
        .unwrap_or(server.config.limits.max_message_bytes);
    started.reader.set_max(max_message);
    let login_started = std::time::Instant::now();
    let login = server
        .upstream
        .login_limited(
            role,
            routed.password.as_ref(),
            &started.database,
            &routed.passthrough,
            max_message,
        )
        .await;
    crate::metrics::METRICS
        .upstream_login_seconds
        .observe(login_started.elapsed().as_secs_f64());
    let upstream = match login {
        Ok(u) => u,
        Err(e) => {
            crate::metrics::METRICS.upstream_errors.inc();
            tracing::warn!(error = %e, role, "upstream login failed");
            let pg = match &e {
                upstream::UpstreamError::Refused { code, message } if code == "3D000" => {
                    PgError::fatal(sqlstate::INVALID_AUTHORIZATION, message.clone())
                }
                // PostgreSQL's own verdict on a startup setting (unknown name, bad value, not
                // settable by this role): the client hears it as PostgreSQL said it.
                upstream::UpstreamError::Refused { code, message }
                    if SETTING_ERRORS.contains(&code.as_str()) =>
                {
                    PgError::fatal(code.clone(), message.clone())
                }
                upstream::UpstreamError::NoPassword(r) => PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("interceptor has no password for upstream role \"{r}\""),
                )
                .with_hint("the operator must add it to the secrets file (`interceptor check-config` finds this)"),
                _ => PgError::fatal(
                    sqlstate::CANNOT_CONNECT_NOW,
                    "interceptor could not open a session on PostgreSQL",
                )
                .with_detail(e.to_string())
                .with_hint("the database server may be down; try again or contact the operator"),
            };
            crate::metrics::refusal(&pg.code);
            let _ = started.stream.write_all(&pg.encode()).await;
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
    started.stream.write_all(&hello).await?;
    Ok((upstream, key))
}

/// Records the session's start (durably: no session without it), relays until either side
/// ends, and records the end.
async fn relay_phase(
    started: Started,
    routed: Routed<'_>,
    upstream: upstream::Upstream,
    key: cancel::CancelKey<'_>,
    peer: &Peer,
    server: &Arc<ServerState>,
) -> Result<(), SessionError> {
    let application_name = started.param("application_name").map(str::to_owned);
    let Started {
        mut stream,
        reader,
        database,
        ..
    } = started;
    // `_slot` keeps the identity's `max_sessions` place until the session ends.
    let Routed {
        identity,
        route,
        rules,
        password,
        _slot,
        ..
    } = routed;
    let role = route.upstream_role.clone();
    let session_id = server.audit.new_session_id();
    tracing::Span::current().record("id", session_id.0);
    let start = crate::audit::AuditEvent::SessionStart(crate::audit::SessionStart {
        session: session_id,
        identity: identity.clone(),
        peer: match peer {
            Peer::Tcp { peer, .. } => crate::audit::Peer::Tcp {
                addr: peer.to_string(),
            },
            Peer::Unix { .. } => crate::audit::Peer::Unix {
                path: server
                    .config
                    .listen
                    .unix_socket_dir
                    .as_ref()
                    .map(|d| d.display().to_string()),
            },
        },
        tls: tls_info(&stream),
        database: database.clone(),
        upstream_role: role.clone(),
        application_name,
    });
    if let Err(e) = server.audit.append_durable(start).await {
        tracing::error!(error = %e, "AUDIT TRAIL UNAVAILABLE: refusing the session (fail closed)");
        return fatal(
            &mut stream,
            PgError::fatal(
                sqlstate::IO_ERROR,
                "interceptor: the audit trail cannot be written, so no session can start",
            ),
        )
        .await;
    }
    let facts = Arc::new(SessionFacts {
        session_id,
        identity,
        database,
        upstream_role: role,
        policy: route.policy.clone(),
        activity: Default::default(),
    });
    tracing::info!(
        session = facts.session_id.0,
        identity = facts.identity.subject,
        role = facts.upstream_role,
        "session started"
    );
    let side_login = masking::SideLogin {
        upstream: server.upstream.clone(),
        role: facts.upstream_role.clone(),
        password: password.clone(),
        database: facts.database.clone(),
    };
    let mask = masking::SessionMask::new(rules, side_login.clone());
    let row_limit = route.limits.max_rows.map(|max_rows| {
        let server = server.clone();
        let (pid, secret) = (upstream.backend_pid, upstream.backend_secret);
        relay::RowLimit {
            max_rows,
            policy: route.policy.clone(),
            cancel: Box::new(move || {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = server.upstream.cancel(pid, secret).await {
                        tracing::warn!(error = %e, "could not cancel a statement past max_rows");
                    }
                });
            }),
        }
    });
    let shared = Arc::new(
        relay::Shared::new(&upstream.params)
            .with_mask(mask.clone())
            .with_row_limit(row_limit),
    );
    let live = server.live.register(
        facts.clone(),
        peer.to_string(),
        shared.clone(),
        (upstream.backend_pid, upstream.backend_secret),
    );
    let mut gate = Gate::new(
        facts.clone(),
        server.policy.clone(),
        server.audit.clone(),
        server.approvals.clone(),
    );
    if let Some(m) = &mask {
        gate.mask_parameters(m.rules().clone());
    }
    gate.resolve_functions_with(fastpath::FunctionCatalog::new(side_login));
    let recorder = Recorder::new(facts.clone(), server.audit.clone());
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
        &key.cancelled,
        live.session.stopped(),
    )
    .await;
    let stop_reason = live.session.stop_reason();
    end_phase(server, &facts, &shared, stop_reason, end)
}

/// Ends what the session held (its approval requests), logs and records how it ended.
fn end_phase(
    server: &ServerState,
    facts: &SessionFacts,
    shared: &relay::Shared,
    stop_reason: Option<String>,
    end: Result<relay::End, relay::RelayError>,
) -> Result<(), SessionError> {
    if let Some(svc) = &server.approvals {
        svc.end_session(facts.session_id.0);
    }
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        session = facts.session_id.0,
        end = ?end.as_ref().ok(),
        statements = shared.counters.statements.load(Relaxed),
        refused = shared.counters.refused.load(Relaxed),
        bytes_in = shared.counters.bytes_from_client.load(Relaxed),
        bytes_out = shared.counters.bytes_to_client.load(Relaxed),
        "session ended"
    );
    let reason = match &end {
        Ok(relay::End::ClientTerminated) => "client_terminate".to_owned(),
        Ok(relay::End::ClientGone) => "client_disconnect".to_owned(),
        Ok(relay::End::UpstreamGone) => "server_closed".to_owned(),
        Ok(relay::End::Stopped) => {
            stop_reason.unwrap_or_else(|| "stopped by interceptor".to_owned())
        }
        Err(e) => format!("error: {e}"),
    };
    let _ = server.audit.append(crate::audit::AuditEvent::SessionEnd(
        crate::audit::SessionEnd {
            session: facts.session_id,
            bytes_from_client: shared.counters.bytes_from_client.load(Relaxed),
            bytes_to_client: shared.counters.bytes_to_client.load(Relaxed),
            statements: shared.counters.statements.load(Relaxed),
            reason,
        },
    ));
    end?;
    Ok(())
}

/// The masking rules of the policy that routed this session, minus the identity's exemptions.
fn mask_rules(
    server: &ServerState,
    sections: &[toml::Value],
    identity: &crate::identity::Identity,
) -> Result<crate::mask::MaskRules, crate::mask::MaskError> {
    if sections.is_empty() {
        return Ok(crate::mask::MaskRules::none());
    }
    // The secrets file gives the key as hex or as text.
    let key: Option<Vec<u8>> = server.secrets().pseudonym_key().map(|k| {
        let k = k.expose().trim();
        hex::decode(k).unwrap_or_else(|_| k.as_bytes().to_vec())
    });
    crate::mask::MaskRules::from_toml(sections, key.as_deref())?.for_identity(identity)
}

fn tls_info(stream: &Stream) -> Option<crate::audit::TlsInfo> {
    let Stream::TlsServer(s) = stream else {
        return None;
    };
    let conn = s.get_ref().1;
    Some(crate::audit::TlsInfo {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher_suite: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        client_cert_sha256: conn.peer_certificates().and_then(|c| c.first()).map(|c| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(c.as_ref()))
        }),
    })
}

/// Ends the session with `err` as a FATAL ErrorResponse; always the refusal as an error.
async fn fatal<T>(stream: &mut Stream, err: PgError) -> Result<T, SessionError> {
    crate::metrics::refusal(&err.code);
    let _ = stream.write_all(&err.encode()).await;
    Err(SessionError::Refused(err.message))
}
