//! The admin socket: a unix socket (mode 0600, peers must run as the daemon's user or root)
//! speaking line-delimited JSON, so the CLI can query the store the daemon holds open.
//!
//! Request:  `{"op":"sessions","filter":{...}}` (one line)
//! Response: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}` (one line)

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::query::{self, ExportFilter, SessionFilter};
use super::record::{RecordId, SessionId};
use super::store::Store;
use super::verify::{self, VerifyMode};
use super::{AuditError, AuditLog};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Largest export page served in one response.
pub(crate) const MAX_PAGE: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum AdminRequest {
    Sessions {
        #[serde(default)]
        filter: SessionFilter,
    },
    Show {
        session: SessionId,
    },
    Replay {
        session: SessionId,
    },
    Export {
        #[serde(default)]
        after: Option<RecordId>,
        limit: usize,
        #[serde(default)]
        filter: ExportFilter,
    },
    Verify {
        /// Auditor's public key (SPKI PEM or hex); default: the daemon's own key.
        #[serde(default)]
        public_key: Option<String>,
    },
    Stats,
    Retention,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    fn from_result(r: Result<serde_json::Value, AuditError>) -> AdminResponse {
        match r {
            Ok(v) => AdminResponse {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => AdminResponse {
                ok: false,
                result: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// What a request runs against: the daemon's open log, or a store the CLI opened itself.
pub(crate) enum Target<'a> {
    Live(&'a AuditLog),
    Offline {
        store: &'a Store,
        key: Option<VerifyingKey>,
    },
}

impl Target<'_> {
    fn store(&self) -> &Store {
        match self {
            Target::Live(log) => log.store(),
            Target::Offline { store, .. } => store,
        }
    }
}

fn to_value<T: Serialize>(v: T) -> Result<serde_json::Value, AuditError> {
    serde_json::to_value(v).map_err(|e| AuditError::Encode(e.to_string()))
}

/// Runs one request (blocking: sled reads, possibly a full verify).
pub(crate) fn handle(
    target: &Target<'_>,
    req: AdminRequest,
) -> Result<serde_json::Value, AuditError> {
    let store = target.store();
    match req {
        AdminRequest::Sessions { filter } => to_value(query::list_sessions(store, &filter)?),
        AdminRequest::Show { session } => to_value(query::show_session(store, session)?),
        AdminRequest::Replay { session } => to_value(query::replay(store, session)?),
        AdminRequest::Export {
            after,
            limit,
            filter,
        } => {
            let (records, next) =
                query::export_page(store, after, limit.clamp(1, MAX_PAGE), &filter)?;
            to_value(serde_json::json!({ "records": records, "next": next }))
        }
        AdminRequest::Verify { public_key } => {
            let given = public_key
                .as_deref()
                .map(super::signing::parse_verifying_key)
                .transpose()
                .map_err(AuditError::Request)?;
            let report = match target {
                Target::Live(log) => verify::verify(
                    store,
                    given.as_ref().or(log.verifying_key()),
                    VerifyMode::Live {
                        head: log.visible_head(),
                    },
                )?,
                Target::Offline { key, .. } => {
                    verify::verify(store, given.as_ref().or(key.as_ref()), VerifyMode::Offline)?
                }
            };
            to_value(report)
        }
        AdminRequest::Stats => {
            let syncs = match target {
                Target::Live(log) => Some(log.sync_count()),
                Target::Offline { .. } => None,
            };
            to_value(query::stats(store, syncs)?)
        }
        AdminRequest::Retention => match target {
            Target::Live(log) => to_value(log.run_retention()?),
            Target::Offline { .. } => Err(AuditError::Request(
                "retention runs inside the daemon (or `AuditLog::open` + `run_retention`)".into(),
            )),
        },
    }
}

/// The `op`s answered by [`handle`]; any other `op` goes to the [`Extension`], if any.
pub(crate) const AUDIT_OPS: [&str; 7] = [
    "sessions",
    "show",
    "replay",
    "export",
    "verify",
    "stats",
    "retention",
];

pub(crate) type ExtensionFuture =
    Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send + 'static>>;
/// Handles requests for other modules on the same socket (e.g. approvals): receives the whole
/// request object; its result or error is sent back as `{"ok":...}` like audit requests.
pub(crate) type Extension = Arc<dyn Fn(serde_json::Value) -> ExtensionFuture + Send + Sync>;

/// Binds `path` and serves audit requests until the task is dropped, passing requests with
/// other `op`s to `extension`. Removes a stale socket file left by a previous run, but never a
/// regular file or a socket someone still listens on.
pub(crate) async fn serve_with(
    path: &Path,
    log: AuditLog,
    extension: Option<Extension>,
) -> Result<(), AuditError> {
    let listener = bind(path).await?;
    tracing::info!(socket = %path.display(), "admin socket listening");
    // The socket file was just created by this process, so its owner is our effective uid.
    let own_uid = std::fs::metadata(path)
        .map_err(|e| AuditError::io(path, e))?
        .uid();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // e.g. EMFILE: keep serving once descriptors are available again.
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == own_uid || c.uid() == 0)
            .unwrap_or(false);
        if !allowed {
            tracing::warn!("admin socket: refused a peer running as another user");
            continue;
        }
        let log = log.clone();
        let extension = extension.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, log, extension).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn bind(path: &Path) -> Result<tokio::net::UnixListener, AuditError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(AuditError::Request(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AuditError::Request(format!(
                "another process is serving {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| AuditError::io(path, e))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| AuditError::io(path, e))?;
    // The peer-uid check in `serve` closes the window between bind and chmod.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| AuditError::io(path, e))?;
    Ok(listener)
}

async fn connection(
    stream: tokio::net::UnixStream,
    log: AuditLog,
    extension: Option<Extension>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() as u64 > MAX_REQUEST {
            let resp =
                AdminResponse::from_result(Err(AuditError::Request("request too long".into())));
            write_response(&mut write, &resp).await?;
            return Ok(());
        }
        let resp = AdminResponse::from_result(dispatch(&line, &log, extension.as_ref()).await);
        write_response(&mut write, &resp).await?;
    }
}

async fn dispatch(
    line: &[u8],
    log: &AuditLog,
    extension: Option<&Extension>,
) -> Result<serde_json::Value, AuditError> {
    let bad = |e: String| AuditError::Request(format!("bad request: {e}"));
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    let op = value
        .get("op")
        .and_then(|o| o.as_str())
        .ok_or_else(|| bad("missing \"op\"".into()))?;
    if AUDIT_OPS.contains(&op) {
        let req: AdminRequest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        // Under load the writer updates the session indexes in batches: bring them up to date
        // with everything committed before answering.
        log.sync_index().await?;
        let log = log.clone();
        return tokio::task::spawn_blocking(move || handle(&Target::Live(&log), req))
            .await
            .unwrap_or_else(|_| Err(AuditError::Request("request handler failed".into())));
    }
    match extension {
        Some(ext) => ext(value).await.map_err(AuditError::Request),
        None => Err(AuditError::Request(format!("unknown op `{op}`"))),
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &AdminResponse,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    w.flush().await
}

/// A blocking client for the CLI.
pub(crate) struct AdminClient {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl AdminClient {
    pub(crate) fn connect(path: &Path) -> std::io::Result<AdminClient> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        Ok(AdminClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub(crate) fn request(&mut self, req: &AdminRequest) -> Result<serde_json::Value, AuditError> {
        let value = serde_json::to_value(req).map_err(|e| AuditError::Encode(e.to_string()))?;
        self.request_value(&value)
    }

    /// Sends any request object (for extension ops such as approvals).
    pub(crate) fn request_value(
        &mut self,
        req: &serde_json::Value,
    ) -> Result<serde_json::Value, AuditError> {
        let io = |e: std::io::Error| AuditError::Request(format!("admin socket: {e}"));
        let mut line = serde_json::to_vec(req).map_err(|e| AuditError::Encode(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut resp = String::new();
        self.reader.read_line(&mut resp).map_err(io)?;
        if resp.is_empty() {
            return Err(AuditError::Request(
                "admin socket closed the connection".into(),
            ));
        }
        let resp: AdminResponse = serde_json::from_str(&resp)
            .map_err(|e| AuditError::Request(format!("bad admin response: {e}")))?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(v), _) => Ok(v),
            (true, None, _) => Ok(serde_json::Value::Null),
            (false, _, e) => Err(AuditError::Request(
                e.unwrap_or_else(|| "request failed".into()),
            )),
        }
    }
}
