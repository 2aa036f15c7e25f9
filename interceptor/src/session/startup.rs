//! The startup phase: TLS and GSS negotiation, then a StartupMessage or a CancelRequest.

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::net::frame::{FrameError, FrameReader};
use crate::net::message::{self, PgError, sqlstate};
use crate::net::stream::Stream;

/// Startup packets are small; PostgreSQL caps them at 10 000 bytes as well.
const MAX_STARTUP: usize = 10_000;

const PROTOCOL_3_0: i32 = 3 << 16;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// What the client asked for.
pub enum Opening {
    Startup {
        stream: Stream,
        reader: FrameReader,
        params: Vec<(String, String)>,
        /// Options we did not understand (`_pq_.*`) or a newer minor version: answered with
        /// NegotiateProtocolVersion once authentication succeeds.
        negotiate: Option<(i32, Vec<String>)>,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// The client went away before saying anything useful.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Runs the startup phase. Refusals are sent to the client as FATAL before returning the error.
pub async fn negotiate(
    mut stream: Stream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    require_tls: bool,
    max_message: usize,
) -> Result<Opening, StartupError> {
    let mut reader = FrameReader::new(max_message);
    loop {
        let Some(packet) = reader.read_startup(&mut stream, MAX_STARTUP).await? else {
            return Ok(Opening::Closed);
        };
        if packet.len() < 4 {
            return refuse(&mut stream, "startup packet too short").await;
        }
        let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
        match code {
            SSL_REQUEST if packet.len() == 4 => {
                let acceptor = match (tls, &stream) {
                    (Some(a), Stream::Tcp(_)) => a,
                    _ => {
                        stream.write_all(b"N").await.map_err(FrameError::Io)?;
                        continue;
                    }
                };
                // Bytes sent after SSLRequest but before the handshake would be trusted as if
                // they came over TLS (CVE-2021-23214): refuse them.
                if reader.buffered() > 0 {
                    return refuse(&mut stream, "unexpected data after SSLRequest").await;
                }
                stream.write_all(b"S").await.map_err(FrameError::Io)?;
                let Stream::Tcp(tcp) = stream else {
                    return Err(StartupError::Refused("TLS over a non-TCP stream".into()));
                };
                let tls_stream = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
                stream = Stream::TlsServer(Box::new(tls_stream));
            }
            GSSENC_REQUEST if packet.len() == 4 => {
                stream.write_all(b"N").await.map_err(FrameError::Io)?;
            }
            CANCEL_REQUEST if packet.len() == 12 => {
                let pid = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
                let secret = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                return Ok(Opening::Cancel { pid, secret });
            }
            // A known request code with the wrong length: name it (it is not a protocol version).
            CANCEL_REQUEST | SSL_REQUEST | GSSENC_REQUEST => {
                let (what, expected) = match code {
                    CANCEL_REQUEST => ("CancelRequest", 16),
                    SSL_REQUEST => ("SSLRequest", 8),
                    _ => ("GSSENCRequest", 8),
                };
                return refuse(
                    &mut stream,
                    &format!(
                        "malformed {what}: {} bytes, expected {expected}",
                        packet.len() + 4
                    ),
                )
                .await;
            }
            version if version >> 16 == 3 => {
                return startup(stream, reader, packet, version, require_tls).await;
            }
            _ => {
                return refuse(
                    &mut stream,
                    &format!(
                        "unsupported frontend protocol {}.{}: interceptor speaks 3.0",
                        code >> 16,
                        code & 0xffff
                    ),
                )
                .await;
            }
        }
    }
}

async fn startup(
    mut stream: Stream,
    reader: FrameReader,
    packet: Bytes,
    version: i32,
    require_tls: bool,
) -> Result<Opening, StartupError> {
    if require_tls && !stream.is_tls() {
        let err = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "interceptor requires TLS: connect with sslmode=require or stronger",
        );
        let _ = stream.write_all(&err.encode()).await;
        return Err(StartupError::Refused("plaintext connection refused".into()));
    }
    let all = match message::decode_startup_params(&packet[4..]) {
        Ok(p) => p,
        Err(_) => return refuse(&mut stream, "malformed startup packet").await,
    };
    let (unrecognized, params): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|(k, _)| k.starts_with("_pq_."));
    let unrecognized: Vec<String> = unrecognized.into_iter().map(|(k, _)| k).collect();
    let negotiate =
        (version != PROTOCOL_3_0 || !unrecognized.is_empty()).then_some((0, unrecognized));
    Ok(Opening::Startup {
        stream,
        reader,
        params,
        negotiate,
    })
}

async fn refuse<T>(stream: &mut Stream, why: &str) -> Result<T, StartupError> {
    let err = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, why);
    let _ = stream.write_all(&err.encode()).await;
    Err(StartupError::Refused(why.to_owned()))
}
