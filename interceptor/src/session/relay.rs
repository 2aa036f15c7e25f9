//! The relay loop: client → upstream and upstream → client, streaming whole messages.
//!
//! Messages pass through verbatim, a chunk at a time, unless the gate refuses one. A refused
//! statement is replaced by SQL that cannot parse (`interceptor_refused_<nonce>`): PostgreSQL answers
//! it with a syntax error at exactly the place in the response stream where the refused statement's
//! answer belongs, with PostgreSQL's own semantics (the implicit or explicit transaction fails, the
//! rest of an extended-protocol batch is skipped until Sync). The upstream → client side swaps that
//! error for interceptor's own. No reordering, no waiting and no second writer on the client socket.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::gate::{Gate, LexState, Outcome, Recorder, Verdict};
use crate::net::frame::{FrameError, FrameReader, frames};
use crate::net::message::{self, Cursor, PgError, sqlstate};
use crate::net::stream::{BoxedRead, BoxedWrite};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client: {0}")]
    Client(FrameError),
    #[error("upstream: {0}")]
    Upstream(FrameError),
    #[error("client protocol violation: {0}")]
    Protocol(String),
}

impl RelayError {
    /// The FATAL the client gets, if it can still hear one.
    pub fn to_pg(&self) -> Option<PgError> {
        match self {
            RelayError::Client(FrameError::TooLarge { .. }) => Some(PgError::fatal(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("{self}"),
            )),
            RelayError::Client(FrameError::BadLength(_)) | RelayError::Protocol(_) => Some(
                PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("{self}")),
            ),
            RelayError::Upstream(FrameError::Io(_) | FrameError::Truncated) => {
                Some(PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "the connection to PostgreSQL was lost",
                ))
            }
            RelayError::Upstream(_) => Some(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("{self}"),
            )),
            RelayError::Client(_) => None,
        }
    }
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientTerminated,
    ClientGone,
    UpstreamGone,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_from_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub statements: AtomicU64,
    pub refused: AtomicU64,
}

struct PendingRefusal {
    /// Index of the ReadyForQuery that closes the batch the refusal belongs to.
    batch: u64,
    nonce: String,
    error: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Simple,
    Execute,
}

struct InFlight {
    batch: u64,
    kind: Kind,
    record: Option<u64>,
    started: Instant,
    outcome: Outcome,
}

/// State both directions share.
pub struct Shared {
    refusals: Mutex<VecDeque<PendingRefusal>>,
    inflight: Mutex<VecDeque<InFlight>>,
    standard_conforming_strings: AtomicBool,
    client_encoding_utf8: AtomicBool,
    pub counters: Counters,
}

impl Shared {
    pub fn new(params: &[(String, String)]) -> Self {
        let s = Shared {
            refusals: Mutex::new(VecDeque::new()),
            inflight: Mutex::new(VecDeque::new()),
            standard_conforming_strings: AtomicBool::new(true),
            client_encoding_utf8: AtomicBool::new(true),
            counters: Counters::default(),
        };
        for (k, v) in params {
            s.parameter(k, v);
        }
        s
    }

    fn parameter(&self, name: &str, value: &str) {
        match name {
            "standard_conforming_strings" => self
                .standard_conforming_strings
                .store(value.eq_ignore_ascii_case("on"), Ordering::Relaxed),
            "client_encoding" => self.client_encoding_utf8.store(
                value.eq_ignore_ascii_case("UTF8") || value.eq_ignore_ascii_case("UTF-8"),
                Ordering::Relaxed,
            ),
            _ => {}
        }
    }

    fn lex(&self) -> LexState {
        LexState {
            standard_conforming_strings: self.standard_conforming_strings.load(Ordering::Relaxed),
            client_encoding_utf8: self.client_encoding_utf8.load(Ordering::Relaxed),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded queues stay consistent even if a holder panicked (single push/pop operations).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Relays until either side ends. On a relay error the client is told why before it is closed.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut client_rd: BoxedRead,
    mut client_wr: BoxedWrite,
    mut client_reader: FrameReader,
    mut up_rd: BoxedRead,
    mut up_wr: BoxedWrite,
    mut up_reader: FrameReader,
    gate: &mut Gate,
    recorder: &Recorder,
    shared: &Shared,
) -> Result<End, RelayError> {
    let result = {
        let c2u = client_to_upstream(&mut client_rd, &mut up_wr, &mut client_reader, gate, shared);
        let u2c = upstream_to_client(&mut up_rd, &mut client_wr, &mut up_reader, recorder, shared);
        tokio::select! {
            r = c2u => r,
            r = u2c => r,
        }
    };
    if let Err(e) = &result
        && let Some(pg) = e.to_pg()
    {
        let _ = client_wr.write_all(&pg.encode()).await;
    }
    if matches!(result, Ok(End::UpstreamGone)) {
        let _ = client_wr.flush().await;
    }
    result
}

async fn client_to_upstream(
    rd: &mut BoxedRead,
    wr: &mut BoxedWrite,
    reader: &mut FrameReader,
    gate: &mut Gate,
    shared: &Shared,
) -> Result<End, RelayError> {
    // Messages forwarded so far that each produce one ReadyForQuery (Query, Sync, FunctionCall).
    let mut batch: u64 = 0;
    loop {
        let Some(chunk) = reader.read_chunk(rd).await.map_err(RelayError::Client)? else {
            return Ok(End::ClientGone);
        };
        shared
            .counters
            .bytes_from_client
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let mut out: Option<BytesMut> = None;
        let mut copied_to = 0;
        let mut offset = 0;
        let mut terminate = false;
        for f in frames(&chunk) {
            let start = offset;
            offset += f.raw.len();
            let substitute = match f.tag {
                b'Q' => {
                    let sql = message::decode_query(f.body)
                        .map_err(|e| RelayError::Protocol(e.to_string()))?;
                    shared.counters.statements.fetch_add(1, Ordering::Relaxed);
                    let verdict = gate.query(sql, shared.lex()).await;
                    let sub = match verdict {
                        Verdict::Forward { record } => {
                            track(shared, batch, Kind::Simple, record);
                            None
                        }
                        Verdict::Refuse(err) => Some(refuse(shared, batch, err, false)),
                    };
                    batch += 1;
                    sub
                }
                b'P' => {
                    let p = message::decode_parse(f.body)
                        .map_err(|e| RelayError::Protocol(e.to_string()))?;
                    match gate.parse(p.statement, p.sql, shared.lex()).await {
                        Verdict::Forward { .. } => None,
                        Verdict::Refuse(err) => Some(refuse(shared, batch, err, true)),
                    }
                }
                b'B' => {
                    let b = message::decode_bind(f.body)
                        .map_err(|e| RelayError::Protocol(e.to_string()))?;
                    gate.bind(b.portal, b.statement);
                    None
                }
                b'E' => {
                    let (portal, _) = message::decode_execute(f.body)
                        .map_err(|e| RelayError::Protocol(e.to_string()))?;
                    shared.counters.statements.fetch_add(1, Ordering::Relaxed);
                    match gate.execute(portal, shared.lex()).await {
                        Verdict::Forward { record } => {
                            track(shared, batch, Kind::Execute, record);
                            None
                        }
                        Verdict::Refuse(err) => Some(refuse(shared, batch, err, true)),
                    }
                }
                b'C' => {
                    let (kind, name) = message::decode_target(f.body, "Close")
                        .map_err(|e| RelayError::Protocol(e.to_string()))?;
                    gate.close(kind, name);
                    None
                }
                b'S' => {
                    batch += 1;
                    None
                }
                b'F' => {
                    let sub = match gate.function_call().await {
                        Verdict::Forward { .. } => None,
                        Verdict::Refuse(err) => Some(refuse(shared, batch, err, false)),
                    };
                    batch += 1;
                    sub
                }
                b'X' => {
                    terminate = true;
                    None
                }
                b'D' | b'H' | b'd' | b'c' | b'f' => None,
                other => {
                    return Err(RelayError::Protocol(format!(
                        "unknown message type '{}'",
                        other.escape_ascii()
                    )));
                }
            };
            if let Some(sub) = substitute {
                let o = out.get_or_insert_with(|| BytesMut::with_capacity(chunk.len() + 64));
                o.extend_from_slice(&chunk[copied_to..start]);
                o.extend_from_slice(&sub);
                copied_to = offset;
            }
            if terminate {
                break;
            }
        }
        let result = match out {
            None => wr.write_all(&chunk[..offset]).await,
            Some(mut o) => {
                o.extend_from_slice(&chunk[copied_to..offset]);
                wr.write_all(&o).await
            }
        };
        result.map_err(|e| RelayError::Upstream(FrameError::Io(e)))?;
        if terminate {
            return Ok(End::ClientTerminated);
        }
    }
}

fn track(shared: &Shared, batch: u64, kind: Kind, record: Option<u64>) {
    lock(&shared.inflight).push_back(InFlight {
        batch,
        kind,
        record,
        started: Instant::now(),
        outcome: Outcome::default(),
    });
}

/// Registers a refusal and returns the message that makes PostgreSQL fail in its place.
fn refuse(shared: &Shared, batch: u64, err: PgError, extended: bool) -> Bytes {
    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    let nonce = format!("interceptor_refused_{}", hex::encode(raw));
    lock(&shared.refusals).push_back(PendingRefusal {
        batch,
        nonce: nonce.clone(),
        error: err.encode(),
    });
    if extended {
        message::parse_unnamed(&nonce)
    } else {
        message::query(&nonce)
    }
}

async fn upstream_to_client(
    rd: &mut BoxedRead,
    wr: &mut BoxedWrite,
    reader: &mut FrameReader,
    recorder: &Recorder,
    shared: &Shared,
) -> Result<End, RelayError> {
    let mut ready_seen: u64 = 0;
    let mut finished: Vec<InFlight> = Vec::new();
    loop {
        let Some(chunk) = reader.read_chunk(rd).await.map_err(RelayError::Upstream)? else {
            return Ok(End::UpstreamGone);
        };
        let mut out: Option<BytesMut> = None;
        let mut copied_to = 0;
        let mut offset = 0;
        {
            let mut inflight = lock(&shared.inflight);
            for f in frames(&chunk) {
                let start = offset;
                offset += f.raw.len();
                match f.tag {
                    b'D' => {
                        if let Some(front) = inflight.front_mut() {
                            front.outcome.rows += 1;
                        }
                    }
                    b'C' | b'I' | b's' => {
                        let tag = match f.tag {
                            b'C' => Cursor::new(f.body, "CommandComplete")
                                .utf8()
                                .unwrap_or("")
                                .to_owned(),
                            b'I' => "EMPTY".to_owned(),
                            _ => "SUSPENDED".to_owned(),
                        };
                        if let Some(front) = inflight.front_mut() {
                            front.outcome.command_tags.push(tag);
                            if front.kind == Kind::Execute
                                && let Some(done) = inflight.pop_front()
                            {
                                finished.push(done);
                            }
                        }
                    }
                    b'E' => {
                        if let Some(sub) = swap_refusal(shared, ready_seen, f.body) {
                            let o = out
                                .get_or_insert_with(|| BytesMut::with_capacity(chunk.len() + 64));
                            o.extend_from_slice(&chunk[copied_to..start]);
                            o.extend_from_slice(&sub);
                            copied_to = offset;
                        } else if let Some(front) = inflight.front_mut() {
                            let (code, msg) = message::error_code_and_message(f.body)
                                .unwrap_or_else(|| {
                                    (sqlstate::INTERNAL_ERROR.into(), String::new())
                                });
                            front.outcome.sqlstate = Some(code);
                            front.outcome.error = Some(msg);
                            if front.kind == Kind::Execute
                                && let Some(done) = inflight.pop_front()
                            {
                                finished.push(done);
                            }
                        }
                    }
                    b'Z' => {
                        while inflight.front().is_some_and(|i| i.batch <= ready_seen) {
                            if let Some(mut done) = inflight.pop_front() {
                                if done.kind == Kind::Execute {
                                    done.outcome.skipped = true;
                                }
                                finished.push(done);
                            }
                        }
                        ready_seen += 1;
                    }
                    b'S' => {
                        let mut c = Cursor::new(f.body, "ParameterStatus");
                        if let (Ok(k), Ok(v)) = (c.utf8(), c.utf8()) {
                            shared.parameter(k, v);
                        }
                    }
                    _ => {}
                }
            }
        }
        for mut done in finished.drain(..) {
            done.outcome.duration_us = done.started.elapsed().as_micros() as u64;
            recorder.outcome(done.record, done.outcome);
        }
        let result = match out {
            None => wr.write_all(&chunk).await,
            Some(mut o) => {
                o.extend_from_slice(&chunk[copied_to..]);
                wr.write_all(&o).await
            }
        };
        result.map_err(|e| RelayError::Client(FrameError::Io(e)))?;
        shared
            .counters
            .bytes_to_client
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

/// If this ErrorResponse is PostgreSQL's answer to a refusal's stand-in, interceptor's own error.
fn swap_refusal(shared: &Shared, ready_seen: u64, body: &[u8]) -> Option<Bytes> {
    let mut refusals = lock(&shared.refusals);
    // Refusals of batches that already ended were skipped by PostgreSQL after an earlier error.
    while refusals.front().is_some_and(|r| r.batch < ready_seen) {
        refusals.pop_front();
    }
    let front = refusals.front()?;
    if front.batch != ready_seen {
        return None;
    }
    let (code, msg) = message::error_code_and_message(body)?;
    if code == sqlstate::SYNTAX_ERROR && msg.contains(front.nonce.as_str()) {
        return refusals.pop_front().map(|r| r.error);
    }
    None
}

/// Writes a complete message to a writer (used before the relay starts).
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await
}
