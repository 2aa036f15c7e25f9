//! The authenticated admin API over HTTP/1.1: on TCP callers present a client certificate
//! (mTLS) or an OIDC token (`Authorization: Bearer`); on the local unix socket they are identified by their uid
//! (SO_PEERCRED) through `local_approvers`.
//!
//! `GET /approvals[?all=1]`, `GET /approvals/{id}`, `POST /approvals/{id}/approve`
//! (`{"reason"?, "scope"?: "once"|"session"}`), `POST /approvals/{id}/deny` (`{"reason"}`),
//! `POST /grants` ([`GrantRequest`]), `GET /grants[?all=1]`, `DELETE /grants/{id}`.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use super::grant::GrantRequest;
use super::http::{HttpRequest, read_request, write_response};
use super::model::Scope;
use super::service::ApprovalService;
use super::{ApprovalError, LocalApprover};
use crate::identity::mtls::{MtlsConfig, identity_from_cert};
use crate::identity::oidc::OidcVerifier;
use crate::identity::{Identity, ProcessIdentity, Proof};

/// Time a caller has to send its whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a TLS client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How TCP callers prove who they are.
#[derive(Clone, Default)]
pub(crate) struct AdminAuth {
    /// Verifies `Authorization: Bearer` tokens.
    pub oidc: Option<Arc<OidcVerifier>>,
    /// TLS for the TCP listener; its client verifier decides which certificates pass the
    /// handshake (see `identity::mtls::server_config`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Maps a client certificate that passed the handshake to an identity.
    pub mtls: Option<MtlsConfig>,
    /// Paths of the TCP listener that another service answers (the web console).
    pub pages: Option<Arc<dyn Pages>>,
}

/// Paths on the admin listener that another service answers (the web console under
/// `/console`). Whoever runs both composes them: approvals know only that such paths exist.
pub(crate) trait Pages: Send + Sync {
    /// Whether `path` belongs to that service rather than to the JSON API.
    fn owns(&self, path: &str) -> bool;

    /// Answers a TCP caller's request for such a path (`cert`: the client certificate the TLS
    /// handshake verified); `None` when that service is not running here (the caller gets 404).
    fn serve<'a>(
        &'a self,
        req: &'a HttpRequest,
        cert: Option<&'a [u8]>,
        stream: &'a mut (dyn AsyncWrite + Unpin + Send),
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>;
}

pub(crate) struct AdminApi {
    service: ApprovalService,
    auth: AdminAuth,
}

/// Who is on the other end of a connection, before authentication.
#[derive(Debug, Clone)]
enum Peer {
    /// `cert`: the leaf certificate a TLS client presented (already verified by the handshake).
    Tcp { cert: Option<Vec<u8>> },
    Local {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    scope: Option<Scope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Binds both listeners the config names and serves them until the handles are aborted.
/// A non-loopback `http_listen` needs TLS: tokens must not cross the network in clear.
pub(crate) async fn spawn(
    service: ApprovalService,
    auth: AdminAuth,
) -> Result<Vec<JoinHandle<()>>, ApprovalError> {
    let api = Arc::new(AdminApi { service, auth });
    let mut tasks = Vec::new();
    if let Some(addr) = api.service.config().http_listen {
        if !addr.ip().is_loopback() && api.auth.tls.is_none() {
            return Err(ApprovalError::Config(format!(
                "http_listen {addr} is not loopback: the admin API needs TLS there"
            )));
        }
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(%addr, "approvals admin API listening");
        tasks.push(tokio::spawn(api.clone().serve_tcp(listener)));
    }
    if let Some(path) = api.service.config().socket.clone() {
        let listener = bind_unix(&path)?;
        tracing::info!(path = %path.display(), "approvals admin socket listening");
        tasks.push(tokio::spawn(api.clone().serve_unix(listener)));
    }
    Ok(tasks)
}

/// Binds the admin socket (replacing a stale socket, never another kind of file) with
/// mode 0660.
pub(crate) fn bind_unix(path: &Path) -> Result<UnixListener, ApprovalError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(ApprovalError::Config(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

impl AdminApi {
    #[cfg(test)]
    pub(crate) fn new(service: ApprovalService, auth: AdminAuth) -> Self {
        AdminApi { service, auth }
    }

    /// Serves TCP callers, over TLS when [`AdminAuth::tls`] is set.
    pub(crate) async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let acceptor = self.auth.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let api = self.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Some(acceptor) = acceptor else {
                            return api.handle(stream, Peer::Tcp { cert: None }).await;
                        };
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => {
                                let cert = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| c.as_ref().to_vec());
                                api.handle(tls, Peer::Tcp { cert }).await
                            }
                            Ok(Err(e)) => {
                                tracing::info!(error = %e, "admin API TLS handshake failed")
                            }
                            Err(_) => tracing::info!("admin API TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub(crate) async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let peer = match stream.peer_cred() {
                        Ok(c) => Peer::Local {
                            uid: c.uid(),
                            gid: c.gid(),
                            pid: c.pid(),
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "no peer credentials on admin socket");
                            continue;
                        }
                    };
                    let api = self.clone();
                    tokio::spawn(async move { api.handle(stream, peer).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin + Send>(&self, mut stream: S, peer: Peer) {
        let (status, body) =
            match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
                Err(_) => (400, json!({"error": "request not received in time"})),
                Ok(Err(e)) => (e.http_status(), json!({"error": e.to_string()})),
                Ok(Ok(req)) if self.auth.pages.as_ref().is_some_and(|p| p.owns(&req.path)) => {
                    let served = match (&self.auth.pages, &peer) {
                        (Some(pages), Peer::Tcp { cert }) => {
                            pages.serve(&req, cert.as_deref(), &mut stream)
                        }
                        _ => None,
                    };
                    match served {
                        Some(answer) => return answer.await,
                        None => (404, json!({"error": "no such endpoint"})),
                    }
                }
                Ok(Ok(req)) => match self.respond(&req, peer).await {
                    Ok(ok) => ok,
                    Err(e) => (e.http_status(), json!({"error": e.to_string()})),
                },
            };
        if let Err(e) = write_response(&mut stream, status, &body).await {
            tracing::debug!(error = %e, "admin API client went away");
        }
    }

    async fn authenticate(&self, req: &HttpRequest, peer: Peer) -> Result<Identity, ApprovalError> {
        match peer {
            Peer::Local { uid, gid, pid } => {
                let known = self.service.config().local_approvers.get(&uid.to_string());
                known
                    .map(|a| local_identity(a, uid, gid, pid))
                    .ok_or_else(|| {
                        ApprovalError::Unauthenticated(format!(
                            "uid {uid} is not in [approvals.local_approvers]"
                        ))
                    })
            }
            Peer::Tcp { cert: Some(der) } if self.auth.mtls.is_some() => {
                let cfg = self.auth.mtls.as_ref().ok_or_else(|| {
                    ApprovalError::Unauthenticated("client certificates are not accepted".into())
                })?;
                identity_from_cert(&der, cfg)
                    .map_err(|e| ApprovalError::Unauthenticated(e.to_string()))
            }
            Peer::Tcp { .. } => {
                let token = req
                    .authorization
                    .as_deref()
                    .and_then(|h| {
                        h.strip_prefix("Bearer ")
                            .or_else(|| h.strip_prefix("bearer "))
                    })
                    .ok_or_else(|| {
                        ApprovalError::Unauthenticated("a bearer token is needed".into())
                    })?;
                let verifier = self.auth.oidc.as_ref().ok_or_else(|| {
                    ApprovalError::Unauthenticated("no OIDC issuer is configured".into())
                })?;
                // The verifier's errors never contain the token.
                verifier
                    .verify(token)
                    .await
                    .map_err(|e| ApprovalError::Unauthenticated(e.to_string()))
            }
        }
    }

    async fn respond(&self, req: &HttpRequest, peer: Peer) -> Result<(u16, Value), ApprovalError> {
        let who = self.authenticate(req, peer).await?;
        tracing::debug!(subject = %who.subject, method = %req.method, path = %req.path, "admin API call");
        let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
        let all = query
            .split('&')
            .any(|kv| kv == "all" || kv == "all=1" || kv == "all=true");
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let id = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| ApprovalError::BadRequest(format!("{s:?} is not an id")))
        };
        let service = &self.service;
        let method = req.method.as_str();
        match (method, segments.as_slice()) {
            ("GET", ["approvals"]) => Ok((200, json_of(&service.list(Some(&who), all)?))),
            ("GET", ["approvals", n]) => Ok((200, json_of(&service.show(id(n)?, Some(&who))?))),
            ("POST", ["approvals", n, action @ ("approve" | "deny")]) => {
                let body: DecideBody = parse_body(&req.body)?;
                let approve = *action == "approve";
                let r = service
                    .decide(
                        id(n)?,
                        &who,
                        approve,
                        body.reason,
                        body.scope.unwrap_or_default(),
                    )
                    .await?;
                Ok((200, json_of(&r)))
            }
            ("GET", ["grants"]) => Ok((200, json_of(&service.grants(Some(&who), all)?))),
            ("POST", ["grants"]) => {
                let body: GrantRequest = parse_body(&req.body)?;
                Ok((201, json_of(&service.request_grant(&who, body).await?)))
            }
            ("DELETE", ["grants", n]) => {
                let body: RevokeBody = parse_body(&req.body)?;
                Ok((
                    200,
                    json_of(&service.revoke(id(n)?, &who, body.reason).await?),
                ))
            }
            (_, ["approvals", ..] | ["grants", ..]) => {
                Ok((405, json!({"error": "method not allowed"})))
            }
            _ => Ok((404, json!({"error": "no such endpoint"}))),
        }
    }
}

fn json_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// An empty body is `{}`.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApprovalError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApprovalError::BadRequest(format!("body: {e}")))
}

fn local_identity(a: &LocalApprover, uid: u32, gid: u32, pid: Option<i32>) -> Identity {
    Identity {
        subject: a.subject.clone(),
        display_name: a.display_name.clone().unwrap_or_else(|| a.subject.clone()),
        groups: a.groups.clone(),
        proof: Proof::Kernel,
        process: Some(ProcessIdentity {
            pid: pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            uid,
            gid,
            comm: String::new(),
            exe: None,
            cgroup_id: 0,
            cgroup_path: None,
        }),
    }
}
