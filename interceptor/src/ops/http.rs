//! The operations HTTP endpoint (`[metrics] listen`, loopback by default): `/metrics`
//! (Prometheus / OpenMetrics text), `/healthz` and `/readyz`. Plain HTTP/1.1, one request
//! per connection, GET only: it serves counters, never data or controls.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::session::shared::ServerState;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// Binds `addr` (before the daemon reports ready) and returns the serving task's future.
pub(crate) async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ([metrics] listen)"))?;
    tracing::info!(%addr, "metrics and health endpoint listening");
    Ok(l)
}

pub(crate) async fn serve(listener: TcpListener, state: Arc<ServerState>) -> anyhow::Result<()> {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), one(sock, &state)).await;
        });
    }
}

async fn one(mut sock: TcpStream, state: &ServerState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") && req.method != Some("HEAD") {
                    return respond(&mut sock, 405, "text/plain", "GET only\n").await;
                }
                break req.path.unwrap_or("/").to_owned();
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return respond(&mut sock, 400, "text/plain", "bad request\n").await,
        }
    };
    let path = path.split('?').next().unwrap_or("/");
    match path {
        "/metrics" => {
            let body = crate::metrics::render(&scrape(state));
            respond(
                &mut sock,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/healthz" => respond(&mut sock, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let r = crate::ops::health::readiness(state).await;
            let body = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
            let code = if r.ready { 200 } else { 503 };
            respond(&mut sock, code, "application/json", &body).await
        }
        _ => {
            respond(
                &mut sock,
                404,
                "text/plain",
                "not found: try /metrics, /healthz, /readyz\n",
            )
            .await
        }
    }
}

async fn respond(sock: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// What the metrics mirror from the running daemon, read now.
fn scrape(state: &ServerState) -> crate::metrics::Scrape {
    let audit = state.audit.health();
    let (from_client, to_client) = state.live.bytes();
    crate::metrics::Scrape {
        audit_queued: audit.queued,
        audit_failed: audit.failed.is_some(),
        audit_syncs: state.audit.sync_count(),
        approvals_pending: state
            .approvals
            .as_ref()
            .map(|svc| svc.list(None, false).map(|l| l.len()).unwrap_or(0)),
        from_client,
        to_client,
        kernel: state
            .steering
            .as_ref()
            .and_then(|st| crate::ebpf::status(st.pin_dir()).ok())
            .map(|s| s.counters),
    }
}
