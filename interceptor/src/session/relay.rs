//! The relay loop: client → upstream and upstream → client, streaming whole messages.
//!
//! Messages pass through verbatim, a chunk at a time, unless the gate refuses one. A refused
//! statement is replaced by SQL that cannot parse (`interceptor_refused_<nonce>`): PostgreSQL answers
//! it with a syntax error at exactly the place in the response stream where the refused statement's
//! answer belongs, with PostgreSQL's own semantics (the implicit or explicit transaction fails, the
//! rest of an extended-protocol batch is skipped until Sync). The upstream → client side swaps that
//! error for interceptor's own. No reordering, no waiting and no second writer on the client socket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::gate::{Gate, LexState, Recorder, Verdict};
use super::masking::{MaskStream, SessionMask};
use super::protocol::{Action, Cut, Frontend, Owed, OwedCopy, OwedQueue, Owing, Prepared, Running};
use crate::mask::{CopyTarget, RowFields, parse_row_description};
use crate::net::reader::FrameReader;
use crate::net::stream::{BoxedRead, BoxedWrite};
use interceptor_sql::pgparse::Tree;
use interceptor_wire::frame::{FrameError, frames};
use interceptor_wire::message::{self, Cursor, PgError, sqlstate};

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("client: {0}")]
    Client(FrameError),
    #[error("upstream: {0}")]
    Upstream(FrameError),
    #[error("client protocol violation: {0}")]
    Protocol(String),
    #[error("audit trail unavailable: {0}")]
    Audit(crate::audit::AuditError),
}

/// How to raise the message size limit, for the FATAL that reports it.
const RAISE_LIMIT: &str = "raise max_message_bytes in the policy's [limits] for this identity, \
    or in [limits] of interceptor's configuration for everyone";

impl RelayError {
    /// The FATAL the client gets, if it can still hear one.
    pub(crate) fn to_pg(&self) -> Option<PgError> {
        match self {
            RelayError::Client(FrameError::TooLarge { len, max }) => Some(
                PgError::fatal(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "interceptor: a message of {len} bytes from the client exceeds the \
                         limit of {max} bytes (max_message_bytes)"
                    ),
                )
                .with_hint(RAISE_LIMIT),
            ),
            RelayError::Upstream(FrameError::TooLarge { len, max }) => Some(
                PgError::fatal(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "interceptor: a message of {len} bytes from PostgreSQL (a row or a \
                         value) exceeds the limit of {max} bytes (max_message_bytes)"
                    ),
                )
                .with_hint(RAISE_LIMIT),
            ),
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
            RelayError::Audit(_) => Some(PgError::fatal(
                sqlstate::IO_ERROR,
                "interceptor: the audit trail cannot be written, so no statement can run",
            )),
            RelayError::Client(_) => None,
        }
    }
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    ClientTerminated,
    ClientGone,
    UpstreamGone,
    /// Ended by interceptor (an administrator's kill, a shutdown): the client got a FATAL.
    Stopped,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_from_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub statements: AtomicU64,
    pub refused: AtomicU64,
}

/// The policy's row limit for this session and how to stop a statement that passes it.
pub(crate) struct RowLimit {
    pub max_rows: u64,
    pub policy: String,
    /// Asks PostgreSQL to cancel the session's running statement (fire and forget).
    pub cancel: Box<dyn Fn() + Send + Sync>,
}

/// State both directions share.
pub(crate) struct Shared {
    /// The answers PostgreSQL owes, in order: the client → upstream side pushes, the
    /// upstream → client side advances (see [`OwedQueue`]).
    owed: Owing,
    standard_conforming_strings: AtomicBool,
    client_encoding_utf8: AtomicBool,
    pub counters: Counters,
    /// Masking for this session; `None` when no rule applies (no per-message work at all).
    mask: Option<Arc<SessionMask>>,
    row_limit: Option<RowLimit>,
    /// PostgreSQL sent a FATAL (or PANIC): it told the client itself why the session ends.
    upstream_fatal: AtomicBool,
    /// PostgreSQL was idle (no transaction) after batch `idle_before - 1`: the portals bound
    /// up to then ended with their transaction.
    idle_before: AtomicU64,
}

impl Shared {
    pub(crate) fn new(params: &[(String, String)]) -> Self {
        let s = Shared {
            owed: Owing::default(),
            standard_conforming_strings: AtomicBool::new(true),
            client_encoding_utf8: AtomicBool::new(true),
            counters: Counters::default(),
            mask: None,
            row_limit: None,
            upstream_fatal: AtomicBool::new(false),
            idle_before: AtomicU64::new(0),
        };
        for (k, v) in params {
            s.parameter(k, v);
        }
        s
    }

    /// Masks this session's results with `mask`.
    pub(crate) fn with_mask(mut self, mask: Option<Arc<SessionMask>>) -> Self {
        self.mask = mask;
        self
    }

    /// Cuts off results longer than the policy's `max_rows`.
    pub(crate) fn with_row_limit(mut self, limit: Option<RowLimit>) -> Self {
        self.row_limit = limit;
        self
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

    /// Statements forwarded whose results have not all come back yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.owed.running()
    }

    /// PostgreSQL will answer a message about to go upstream with `owed`.
    fn owe(&self, owed: Owed) {
        self.owed.push(owed);
    }

    fn lex(&self) -> LexState {
        LexState {
            standard_conforming_strings: self.standard_conforming_strings.load(Ordering::Relaxed),
            client_encoding_utf8: self.client_encoding_utf8.load(Ordering::Relaxed),
        }
    }
}

/// Relays until either side ends. On a relay error the client is told why before it is closed.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    mut client_rd: BoxedRead,
    mut client_wr: BoxedWrite,
    mut client_reader: FrameReader,
    mut up_rd: BoxedRead,
    mut up_wr: BoxedWrite,
    mut up_reader: FrameReader,
    gate: &mut Gate,
    recorder: &Recorder,
    shared: &Shared,
    cancel: &super::cancel::CancelSignal,
    stop: impl std::future::Future<Output = PgError>,
) -> Result<End, RelayError> {
    // Messages interceptor itself sends the client mid-session (approval notices) go through
    // the upstream → client side, the only writer of the client socket.
    let (notice_tx, mut notice_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let result = {
        let c2u = client_to_upstream(
            &mut client_rd,
            &mut up_wr,
            &mut client_reader,
            gate,
            shared,
            Side {
                notice_tx,
                cancel,
                owed: &shared.owed,
            },
        );
        let u2c = upstream_to_client(
            &mut up_rd,
            &mut client_wr,
            &mut up_reader,
            recorder,
            shared,
            &mut notice_rx,
        );
        tokio::select! {
            r = c2u => r,
            r = u2c => r,
            // Resolves only between statements (or past its grace period), so no message is
            // cut in half.
            fatal = stop => {
                let _ = client_wr.write_all(&fatal.encode()).await;
                let _ = client_wr.flush().await;
                Ok(End::Stopped)
            }
        }
    };
    if let Err(e) = &result
        && let Some(pg) = e.to_pg()
    {
        let _ = client_wr.write_all(&pg.encode()).await;
        if let Err(RelayError::Client(FrameError::TooLarge { len, .. })) = &result {
            // The client is still sending the oversized message: closing now would reset the
            // connection and destroy the FATAL in flight. Read it away first (bounded).
            let _ = client_wr.flush().await;
            drain(&mut client_rd, *len).await;
        }
    }
    if matches!(result, Ok(End::UpstreamGone)) {
        // PostgreSQL closed between messages. When it could not say why first (a backend
        // ended while it was sending a result has no way to send its FATAL), the client still
        // hears that the session is over, never a bare EOF.
        if !shared.upstream_fatal.load(Ordering::Relaxed) {
            let lost = PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "the connection to PostgreSQL was lost",
            );
            let _ = client_wr.write_all(&lost.encode()).await;
        }
        let _ = client_wr.flush().await;
    }
    result
}

/// Reads and discards what the client still sends of a `len`-byte message: until that much
/// arrived, the client paused for half a second, or 30 seconds passed.
async fn drain(rd: &mut BoxedRead, len: usize) {
    let work = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let pause = std::time::Duration::from_millis(500);
            match tokio::time::timeout(pause, rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), work).await;
}

/// What the client → upstream side needs besides the sockets.
struct Side<'a> {
    notice_tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    cancel: &'a super::cancel::CancelSignal,
    owed: &'a Owing,
}

async fn client_to_upstream(
    rd: &mut BoxedRead,
    wr: &mut BoxedWrite,
    reader: &mut FrameReader,
    gate: &mut Gate,
    shared: &Shared,
    side: Side<'_>,
) -> Result<End, RelayError> {
    // Messages forwarded so far that each produce one ReadyForQuery (Query, Sync, FunctionCall).
    let mut batch: u64 = 0;
    let mut first_chunk = true;
    loop {
        // Cancels counted from here on answer the statements of this chunk: a client sends its
        // CancelRequest after the statement, possibly before interceptor starts to hold it.
        // For the first chunk that is every cancel since the client got its key (the session
        // start record is written after the client was told it may send).
        let cancel_mark = if std::mem::take(&mut first_chunk) {
            0
        } else {
            side.cancel.seen()
        };
        let Some(chunk) = reader.read_chunk(rd).await.map_err(RelayError::Client)? else {
            return Ok(End::ClientGone);
        };
        shared
            .counters
            .bytes_from_client
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let mut pending = Pending {
            chunk: &chunk,
            out: None,
            copied_to: 0,
        };
        let mut offset = 0;
        let mut terminate = false;
        for f in frames(&chunk) {
            let start = offset;
            offset += f.raw.len();
            let msg = match Frontend::decode(f.tag, f.body) {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    return Err(RelayError::Protocol(format!(
                        "unknown message type '{}'",
                        f.tag.escape_ascii()
                    )));
                }
                Err(e) => return Err(RelayError::Protocol(e.to_string())),
            };
            gate.transactions_ended_before(shared.idle_before.load(Ordering::Relaxed));
            let substitute = match msg {
                Frontend::Query(sql) => {
                    shared.counters.statements.fetch_add(1, Ordering::Relaxed);
                    let verdict = gate.query(sql, shared.lex()).await;
                    let waiting = Waiting {
                        rd: &mut *rd,
                        reader: &mut *reader,
                        side: &side,
                        cancel_mark,
                    };
                    let Some(verdict) = settle(
                        verdict,
                        Before::AsIs,
                        wr,
                        gate,
                        &mut pending,
                        start,
                        waiting,
                    )
                    .await?
                    else {
                        return Ok(End::ClientGone);
                    };
                    let sub = match verdict {
                        Verdict::Forward { record, tree } => {
                            // Run either way: a refused rewrite is this statement's outcome.
                            let masked = masked(shared, sql, tree).await;
                            let run = Running::new(record);
                            match masked.rewrite {
                                Ok(new) => {
                                    let copies = copy_specs(shared, &masked.copies).await;
                                    shared.owe(Owed::Query { copies, run });
                                    new.map(|sql| message::query(&sql))
                                }
                                Err(err) => Some(refuse(shared, err, Stand::Query, Some(run))),
                            }
                        }
                        Verdict::Refuse(err) => Some(refuse(shared, err, Stand::Query, None)),
                        Verdict::Hold(_) => Some(refuse(shared, still_held(), Stand::Query, None)),
                    };
                    batch += 1;
                    sub
                }
                Frontend::Parse(p) => {
                    let sent = match gate.parse(p.sql, shared.lex()).await {
                        Verdict::Forward { tree, .. } => {
                            let masked = masked(shared, p.sql, tree).await;
                            masked.rewrite.map(|new| {
                                (
                                    new.map(|sql| super::masking::reparse(&p, &sql)),
                                    masked.copies,
                                )
                            })
                        }
                        Verdict::Refuse(err) => Err(err),
                        Verdict::Hold(_) => Err(still_held()),
                    };
                    // The session's statements follow what PostgreSQL gets.
                    match sent {
                        Ok((sub, copies)) => {
                            let prepared = gate.parsed(p.statement, p.sql, copies, batch);
                            shared.owe(Owed::Parse(prepared));
                            sub
                        }
                        Err(err) => {
                            gate.parse_refused(p.statement);
                            Some(refuse(shared, err, Stand::Parse, None))
                        }
                    }
                }
                Frontend::Bind { view, body } => {
                    // The statement's Parse went in an earlier batch and is not answered yet:
                    // what PostgreSQL binds depends on that answer (a failed Parse leaves the
                    // statement it had), so everything before goes out and the answer is
                    // awaited.
                    if let Some(p) = gate
                        .statements()
                        .statement(view.statement)
                        .filter(|p| p.is_pending() && p.batch < batch)
                    {
                        pending.emit(wr, gate, start).await?;
                        if !parse_settled(&p, shared, rd, reader).await? {
                            return Ok(End::ClientGone);
                        }
                    }
                    gate.bind(&view, body, batch);
                    shared.owe(Owed::Bind);
                    None
                }
                Frontend::Execute { portal } => {
                    shared.counters.statements.fetch_add(1, Ordering::Relaxed);
                    let verdict = gate.execute(portal, shared.lex()).await;
                    let waiting = Waiting {
                        rd: &mut *rd,
                        reader: &mut *reader,
                        side: &side,
                        cancel_mark,
                    };
                    let Some(verdict) = settle(
                        verdict,
                        Before::Flushed,
                        wr,
                        gate,
                        &mut pending,
                        start,
                        waiting,
                    )
                    .await?
                    else {
                        return Ok(End::ClientGone);
                    };
                    match verdict {
                        Verdict::Forward { record, .. } => {
                            // The portal as PostgreSQL will run it, with what its COPYs produce.
                            let bound = gate.statements().portal(portal).cloned();
                            let copies = match &bound {
                                Some(p) => copy_specs(shared, &p.statement.copies).await,
                                None => VecDeque::new(),
                            };
                            shared.owe(Owed::Execute {
                                name: portal.into(),
                                portal: bound,
                                copies,
                                run: Running::new(record),
                            });
                            None
                        }
                        Verdict::Refuse(err) => Some(refuse(shared, err, Stand::Parse, None)),
                        Verdict::Hold(_) => Some(refuse(shared, still_held(), Stand::Parse, None)),
                    }
                }
                Frontend::Close { kind, name } => {
                    gate.close(kind, name);
                    None
                }
                Frontend::Sync => {
                    shared.owe(Owed::Sync);
                    batch += 1;
                    None
                }
                Frontend::FunctionCall(call) => {
                    shared.counters.statements.fetch_add(1, Ordering::Relaxed);
                    let (verdict, sql) = gate.function_call(&call, shared.lex()).await;
                    let waiting = Waiting {
                        rd: &mut *rd,
                        reader: &mut *reader,
                        side: &side,
                        cancel_mark,
                    };
                    let Some(verdict) = settle(
                        verdict,
                        Before::AsIs,
                        wr,
                        gate,
                        &mut pending,
                        start,
                        waiting,
                    )
                    .await?
                    else {
                        return Ok(End::ClientGone);
                    };
                    let sub = match verdict {
                        Verdict::Forward { record, tree } => {
                            // Column masking would rewrite the call's SQL; a fast-path call
                            // cannot be rewritten, so it runs only where the SQL would run as
                            // it is (its result still passes the content detectors).
                            let checked = match &sql {
                                Some(sql) => masked(shared, sql, tree).await.rewrite,
                                None => Ok(None),
                            };
                            let run = Running::new(record);
                            match checked {
                                Ok(None) => {
                                    shared.owe(Owed::FunctionCall(run));
                                    None
                                }
                                Ok(Some(_)) => {
                                    Some(refuse(shared, unmaskable_call(), Stand::Query, Some(run)))
                                }
                                Err(err) => Some(refuse(shared, err, Stand::Query, Some(run))),
                            }
                        }
                        Verdict::Refuse(err) => Some(refuse(shared, err, Stand::Query, None)),
                        Verdict::Hold(_) => Some(refuse(shared, still_held(), Stand::Query, None)),
                    };
                    batch += 1;
                    sub
                }
                Frontend::Terminate => {
                    terminate = true;
                    None
                }
                Frontend::Describe { kind, name } => {
                    let statements = gate.statements();
                    shared.owe(if kind == b'S' {
                        Owed::DescribeStatement(statements.statement(name))
                    } else {
                        Owed::DescribePortal {
                            name: name.into(),
                            portal: statements.portal(name).cloned(),
                        }
                    });
                    None
                }
                Frontend::Passthrough => None,
            };
            if let Some(sub) = substitute {
                pending.substitute(start, offset, &sub);
            }
            if terminate {
                break;
            }
        }
        // Write-ahead: every record of this chunk is durable before any of it is forwarded.
        pending.emit(wr, gate, offset).await?;
        if terminate {
            return Ok(End::ClientTerminated);
        }
    }
}

/// What of the chunk being read has gone upstream, and the substitutes built so far.
struct Pending<'c> {
    chunk: &'c [u8],
    /// Substitutes and the unchanged bytes between them, not yet written.
    out: Option<BytesMut>,
    /// The chunk up to here is in `out` or already written.
    copied_to: usize,
}

impl Pending<'_> {
    /// The message at `start..end` goes upstream as `sub` instead.
    fn substitute(&mut self, start: usize, end: usize, sub: &[u8]) {
        let o = self
            .out
            .get_or_insert_with(|| BytesMut::with_capacity(self.chunk.len() + 64));
        o.extend_from_slice(&self.chunk[self.copied_to..start]);
        o.extend_from_slice(sub);
        self.copied_to = end;
    }

    /// Forwards what the chunk holds before `upto` (audit records made durable first);
    /// nothing is ever written twice.
    async fn emit(
        &mut self,
        wr: &mut BoxedWrite,
        gate: &mut Gate,
        upto: usize,
    ) -> Result<(), RelayError> {
        gate.flush().await.map_err(RelayError::Audit)?;
        let rest = &self.chunk[self.copied_to..upto];
        let result = match self.out.take() {
            Some(mut o) => {
                o.extend_from_slice(rest);
                wr.write_all(&o).await
            }
            None => wr.write_all(rest).await,
        };
        self.copied_to = upto;
        result.map_err(|e| RelayError::Upstream(FrameError::Io(e)))
    }
}

/// Waits until PostgreSQL answered the Parse of `p` (already forwarded). `Ok(false)`: the
/// client went away meanwhile.
async fn parse_settled(
    p: &Prepared,
    shared: &Shared,
    rd: &mut BoxedRead,
    reader: &mut FrameReader,
) -> Result<bool, RelayError> {
    loop {
        let settled = shared.owed.parses_settled();
        tokio::pin!(settled);
        settled.as_mut().enable();
        if !p.is_pending() {
            return Ok(true);
        }
        tokio::select! {
            _ = &mut settled => {}
            // The client may pipeline more; it waits in the buffer. End of stream: gone.
            more = reader.fill(rd) => {
                if more.map_err(RelayError::Client)? == 0 {
                    return Ok(false);
                }
            }
        }
    }
}

/// What goes upstream with the messages before a held statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    /// They go as they are (a Query or FunctionCall ends its own batch).
    AsIs,
    /// With a Flush, so an extended batch's answers so far reach the client while it waits.
    Flushed,
}

/// The client side a held statement waits on.
struct Waiting<'a, 's> {
    rd: &'a mut BoxedRead,
    reader: &'a mut FrameReader,
    side: &'a Side<'s>,
    cancel_mark: u64,
}

/// The verdict to carry out. A held statement first sends everything of the chunk before it
/// (at `upto`), then waits for its resolution. `Ok(None)`: the client went away meanwhile.
async fn settle(
    verdict: Verdict,
    before: Before,
    wr: &mut BoxedWrite,
    gate: &mut Gate,
    pending: &mut Pending<'_>,
    upto: usize,
    waiting: Waiting<'_, '_>,
) -> Result<Option<Verdict>, RelayError> {
    let Verdict::Hold(held) = verdict else {
        return Ok(Some(verdict));
    };
    pending.emit(wr, gate, upto).await?;
    if before == Before::Flushed {
        wr.write_all(&message::message(b'H', &[]))
            .await
            .map_err(|e| RelayError::Upstream(FrameError::Io(e)))?;
    }
    wait_for_approval(
        waiting.rd,
        waiting.reader,
        gate,
        held,
        waiting.side,
        waiting.cancel_mark,
    )
    .await
}

/// Tells the client its statement is pending and waits for the decision, the client's cancel
/// (its CancelRequest with our key) or its disconnect. `None`: the client went away (dropping the
/// wait marks the request aborted).
async fn wait_for_approval(
    rd: &mut BoxedRead,
    reader: &mut FrameReader,
    gate: &mut Gate,
    held: super::gate::Held,
    side: &Side<'_>,
    cancel_mark: u64,
) -> Result<Option<Verdict>, RelayError> {
    if let Some(notice) = held.request.notice() {
        let _ = side.notice_tx.send(notice.encode());
    }
    let id = held.request.id();
    // With nothing of the session running upstream, the client's cancel is the hold's alone.
    let _local = side
        .owed
        .lock()
        .is_empty()
        .then(|| side.cancel.answer_locally());
    let (request, held) = held.take_request();
    let wait = request.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            resolution = &mut wait => return Ok(Some(gate.after_hold(held, resolution))),
            _ = side.cancel.after(cancel_mark) => {
                tracing::info!(approval = id, "client cancelled a held statement");
                return Ok(Some(Verdict::Refuse(PgError::error(
                    sqlstate::QUERY_CANCELED,
                    format!("canceling statement due to user request (approval request {id} withdrawn)"),
                ))));
            }
            more = reader.fill(rd) => {
                // The client may pipeline more messages; they wait in the buffer. End of
                // stream means it is gone.
                if more.map_err(RelayError::Client)? == 0 {
                    tracing::info!(approval = id, "client disconnected while its statement was held");
                    return Ok(None);
                }
            }
        }
    }
}

fn unmaskable_call() -> PgError {
    PgError::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        "interceptor: fast-path call refused: column masking applies to what this function \
         returns, and a fast-path call cannot be rewritten to mask it",
    )
    .with_hint("call the function with SELECT instead")
}

fn still_held() -> PgError {
    PgError::error(
        sqlstate::INTERNAL_ERROR,
        "interceptor: statement still held",
    )
}

/// Each COPY TO STDOUT of a statement about to run with what it produces (masking sessions
/// only: without masking nothing reads them).
async fn copy_specs(shared: &Shared, copies: &[CopyTarget]) -> VecDeque<OwedCopy> {
    match &shared.mask {
        Some(m) if !copies.is_empty() => m.copy_specs(copies).await,
        _ => VecDeque::new(),
    }
}

/// What column masking does to a forwarded statement.
struct Masked {
    /// The statement rewritten (`None`: forward it as it is), or the refusal to send it.
    rewrite: Result<Option<String>, PgError>,
    /// Its COPY TO STDOUT statements, for the masker of their data.
    copies: Vec<CopyTarget>,
}

/// Column masking of a statement the gate let through. `tree` is the gate's parse of `sql`
/// (`None` when its classification came from the cache for a text that differs in its
/// numbers): then PostgreSQL's parser runs once more, only if masking needs a tree at all.
/// The rewrite reads statements with standard strings; with them off a text without a
/// backslash reads the same, one with a backslash is refused under column rules (read the
/// wrong way, a string could hide a masked column from the rewrite).
async fn masked(shared: &Shared, sql: &str, tree: Option<Arc<Tree>>) -> Masked {
    let Some(m) = &shared.mask else {
        return Masked {
            rewrite: Ok(None),
            copies: Vec::new(),
        };
    };
    let scs = shared.lex().standard_conforming_strings;
    let reads_standard = scs || !sql.contains('\\');
    if !reads_standard && m.rules().needs_origins() {
        return Masked {
            rewrite: Err(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "interceptor: column masking applies to this session, and it reads statements \
                 with backslashes only with standard_conforming_strings on",
            )
            .with_hint("SET standard_conforming_strings = on")),
            copies: Vec::new(),
        };
    }
    let tree = tree.or_else(|| {
        let wanted = m.rules().needs_origins() || super::masking::mentions_copy(sql);
        wanted
            .then(|| interceptor_sql::pgparse::parse_tree(sql, scs).ok())
            .flatten()
            .map(Arc::new)
    });
    let copies = tree
        .as_deref()
        .map(crate::mask::copies_to_client)
        .unwrap_or_default();
    let rewrite = m.rewrite(sql, tree.as_deref()).await;
    Masked { rewrite, copies }
}

/// How a refused message's stand-in goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stand {
    /// As a Query, for a Query or FunctionCall: it ends its batch, as they do.
    Query,
    /// As an unnamed Parse, for a Parse or Execute inside an extended batch.
    Parse,
}

/// Registers a refusal and returns the message that makes PostgreSQL fail in its place.
/// `run`: the statement's outcome, when it was let through before being refused.
fn refuse(shared: &Shared, err: PgError, stand: Stand, run: Option<Running>) -> Bytes {
    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    let nonce = format!("interceptor_refused_{}", hex::encode(raw));
    let stand_in = match stand {
        Stand::Query => message::query(&nonce),
        Stand::Parse => message::parse_unnamed(&nonce),
    };
    shared.owe(Owed::Refused {
        nonce,
        error: err.encode(),
        simple: stand == Stand::Query,
        run,
    });
    stand_in
}

async fn upstream_to_client(
    rd: &mut BoxedRead,
    wr: &mut BoxedWrite,
    reader: &mut FrameReader,
    recorder: &Recorder,
    shared: &Shared,
    notices: &mut tokio::sync::mpsc::UnboundedReceiver<Bytes>,
) -> Result<End, RelayError> {
    let mut ready_seen: u64 = 0;
    let mut finished: Vec<Running> = Vec::new();
    let mut mask = shared.mask.clone().map(MaskStream::new);
    let mut scratch = crate::mask::MaskSummary::new();
    loop {
        // read_chunk is cancel-safe: bytes read stay in the reader's buffer.
        let chunk = tokio::select! {
            chunk = reader.read_chunk(rd) => chunk,
            Some(notice) = notices.recv() => {
                wr.write_all(&notice)
                    .await
                    .map_err(|e| RelayError::Client(FrameError::Io(e)))?;
                continue;
            }
        };
        let Some(chunk) = chunk.map_err(RelayError::Upstream)? else {
            return Ok(End::UpstreamGone);
        };
        // Each RowDescription is decoded once, here, for masking (origins, plan) and the
        // recording; sessions without masking decode one only to record its column names.
        let descriptions: Vec<RowFields> = match &mask {
            Some(_) => frames(&chunk)
                .filter(|f| f.tag == b'T')
                .map(|f| parse_row_description(f.body))
                .collect(),
            None => Vec::new(),
        };
        if let Some(m) = &mask
            && let Err(e) = m.session().prepare(&descriptions).await
        {
            // Unresolved origins make the plans fail closed; the session itself goes on.
            tracing::warn!(error = %e, "column origins could not be resolved");
        }
        let mut descriptions = descriptions.iter();
        let mut out: Option<BytesMut> = None;
        let mut copied_to = 0;
        let mut offset = 0;
        let mut parses_settled = false;
        {
            let mut owed = shared.owed.lock();
            for f in frames(&chunk) {
                let start = offset;
                offset += f.raw.len();
                let fields = if f.tag == b'T' {
                    descriptions.next()
                } else {
                    None
                };
                let action = match mask.as_mut() {
                    None => Action::Forward,
                    Some(m) => m.message(f.tag, f.body, fields, &mut owed, &mut scratch),
                };
                let (sub, dropped) = match action {
                    Action::Refuse(error) => {
                        // A result that could not be masked: the client gets the error instead.
                        if let Some(run) = owed.running_mut() {
                            run.outcome.sqlstate = Some(sqlstate::INTERNAL_ERROR.into());
                            run.outcome.error =
                                Some("interceptor: result withheld (masking failed)".into());
                        }
                        (Some(error), None)
                    }
                    Action::Forward => (None, Some(false)),
                    Action::Withhold => (Some(Bytes::new()), Some(true)),
                    Action::Rewrite(b) => (Some(b), Some(false)),
                };
                let sub = if let Some(dropped) = dropped {
                    // What the client gets of this message, for the audit trail: the masked
                    // body when the rewrite is the same message, else PostgreSQL's.
                    let body = match &sub {
                        Some(b) if b.len() >= 5 && b[0] == f.tag => &b[5..],
                        _ => f.body,
                    };
                    if dropped && f.tag == b'D' {
                        sub
                    } else {
                        let swapped = account(
                            &mut owed, recorder, shared, ready_seen, f.tag, f.body, body, fields,
                        );
                        swapped.or(sub)
                    }
                } else {
                    sub
                };
                // The one place the owed queue advances, whatever became of the message.
                parses_settled |= owed.answered(f.tag, &mut finished);
                if f.tag == b'Z' {
                    ready_seen += 1;
                }
                if let Some(sub) = sub {
                    let o = out.get_or_insert_with(|| BytesMut::with_capacity(chunk.len() + 64));
                    o.extend_from_slice(&chunk[copied_to..start]);
                    o.extend_from_slice(&sub);
                    copied_to = offset;
                }
            }
        }
        if parses_settled {
            shared.owed.settled();
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

/// Bookkeeping of one backend message for the audit trail, on the statement it belongs to
/// (`body` is what the client gets, masked; `raw` is PostgreSQL's original; `fields`: a
/// RowDescription as masking decoded it). Reads the owed queue, never advances it. Returns
/// what the client gets instead: interceptor's error for a refusal's stand-in or a statement
/// past `max_rows`, nothing for a row past it.
#[allow(clippy::too_many_arguments)]
fn account(
    owed: &mut OwedQueue,
    recorder: &Recorder,
    shared: &Shared,
    ready_seen: u64,
    tag: u8,
    raw: &[u8],
    body: &[u8],
    fields: Option<&RowFields>,
) -> Option<Bytes> {
    if let Some(limit) = &shared.row_limit
        && let Some(run) = owed.running_mut()
        && let Some(sub) = cut_off(run, limit, tag)
    {
        return Some(sub);
    }
    match tag {
        b'D' => {
            if let Some(run) = owed.running_mut() {
                run.outcome.rows += 1;
                if run.record.is_some() && !run.outcome.columns.is_empty() {
                    if run.outcome.recorded.len() < recorder.rows_cap {
                        run.outcome.recorded.push(text_fields(body));
                    } else {
                        run.outcome.truncated = true;
                    }
                }
            }
        }
        b'T' => {
            if let Some(run) = owed.running_mut()
                && run.record.is_some()
                && recorder.rows_cap > 0
            {
                run.outcome.columns = match fields {
                    Some(Ok(fields)) => fields.iter().map(|f| f.name.clone()).collect(),
                    _ => column_names(body),
                };
            }
        }
        b'C' | b'I' | b's' => {
            let tag = match tag {
                b'C' => Cursor::new(body, "CommandComplete")
                    .utf8()
                    .unwrap_or("")
                    .to_owned(),
                b'I' => "EMPTY".to_owned(),
                _ => "SUSPENDED".to_owned(),
            };
            if let Some(run) = owed.running_mut() {
                run.outcome.command_tags.push(tag);
            }
        }
        b'E' => {
            if is_fatal(raw) {
                shared.upstream_fatal.store(true, Ordering::Relaxed);
            }
            // The refusal's stand-in is recognised on PostgreSQL's own text.
            if let Some(sub) = owed.refusal_answered(raw) {
                return Some(sub);
            }
            if let Some(run) = owed.running_mut() {
                let (code, msg) = message::error_code_and_message(body)
                    .unwrap_or_else(|| (sqlstate::INTERNAL_ERROR.into(), String::new()));
                run.outcome.sqlstate = Some(code);
                run.outcome.error = Some(msg);
            }
        }
        b'Z' if raw.first() == Some(&b'I') => {
            shared
                .idle_before
                .fetch_max(ready_seen + 1, Ordering::Relaxed);
        }
        b'S' => {
            let mut c = Cursor::new(body, "ParameterStatus");
            if let (Ok(k), Ok(v)) = (c.utf8(), c.utf8()) {
                shared.parameter(k, v);
            }
        }
        _ => {}
    }
    None
}

/// An ErrorResponse whose severity ends the session (FATAL or PANIC).
fn is_fatal(body: &[u8]) -> bool {
    message::decode_error_fields(body).is_ok_and(|fields| {
        fields
            .iter()
            .any(|(code, v)| matches!(code, b'S' | b'V') && matches!(v.as_str(), "FATAL" | "PANIC"))
    })
}

/// Enforces `max_rows` on the statement whose answer is arriving: `Some` replaces the message
/// (empty: dropped), `None` lets the normal bookkeeping see it. Rows past the limit never
/// reach the client; PostgreSQL is asked to stop producing them.
fn cut_off(run: &mut Running, limit: &RowLimit, tag: u8) -> Option<Bytes> {
    match (run.cut, tag) {
        // Session state and asynchronous messages still reach the client; so does a COPY FROM
        // STDIN start, which PostgreSQL would otherwise wait on forever.
        (_, b'Z' | b'S' | b'A' | b'N' | b'G' | b'W') => None,
        (Cut::Within, b'D') if run.outcome.rows >= limit.max_rows => {
            run.cut = Cut::Cutting;
            run.outcome.truncated = true;
            (limit.cancel)();
            Some(Bytes::new())
        }
        (Cut::Within, _) => None,
        (Cut::Cutting, b'C' | b'E' | b's' | b'I') => {
            let message = format!(
                "interceptor: the result has more than {} rows, the most policy \"{}\" allows per statement",
                limit.max_rows, limit.policy
            );
            run.outcome.sqlstate = Some(sqlstate::PROGRAM_LIMIT_EXCEEDED.into());
            run.outcome.error = Some(message.clone());
            run.cut = Cut::Reported;
            // An Execute's statement ends here; the queue lets it go with this message.
            Some(
                PgError::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, message)
                    .with_hint("narrow the query (WHERE, LIMIT) or page through it with a cursor")
                    .encode(),
            )
        }
        (Cut::Cutting, _) => Some(Bytes::new()),
        // After the error, the rest of the query message goes nowhere (as PostgreSQL skips it).
        (Cut::Reported, _) => Some(Bytes::new()),
    }
}

/// The fields of a DataRow as text, for the session recording (binary values as hex).
fn text_fields(body: &[u8]) -> Vec<Option<String>> {
    let mut c = Cursor::new(body, "DataRow");
    let Ok(n) = c.i16() else { return Vec::new() };
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let Ok(len) = c.i32() else { break };
        if len < 0 {
            out.push(None);
            continue;
        }
        let Ok(v) = c.take(len as usize) else { break };
        out.push(Some(match std::str::from_utf8(v) {
            Ok(s) => s.to_owned(),
            Err(_) => format!("\\x{}", hex::encode(v)),
        }));
    }
    out
}

/// Column names of a RowDescription.
fn column_names(body: &[u8]) -> Vec<String> {
    let mut c = Cursor::new(body, "RowDescription");
    let Ok(n) = c.i16() else { return Vec::new() };
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let Ok(name) = c.cstr() else { break };
        out.push(String::from_utf8_lossy(name).into_owned());
        if c.take(18).is_err() {
            break;
        }
    }
    out
}
