//! The audit trail: durable, hash-chained records.
//!
//! * **Write-ahead**: the relay calls [`AuditLog::sync`] (or [`AuditLog::append_durable`])
//!   before forwarding a statement; it returns only once the record is in the write-ahead
//!   segment (written, and `fdatasync`ed with `durability = "fsync"`), the log of record.
//! * **Group commit**: one writer thread takes every record queued since its last commit and
//!   makes them durable with a single write (+ sync), so concurrent sessions share the wait.
//!   sled, the store queries read, follows in large batches on its own thread.
//! * **Tamper evidence**: each record is chained with SHA-256 to its predecessor ([`chain`]);
//!   every commit writes an Ed25519-signed head, and checkpoints are kept periodically
//!   ([`signing`]). [`verify::verify`] names the first record that does not fit.
//! * **Fail closed**: once a write or sync fails, every later append fails.

pub(crate) mod admin;
mod applier;
mod block;
pub(crate) mod body;
pub(crate) mod chain;
pub mod cli;
pub(crate) mod config;
pub(crate) mod export;
pub(crate) mod headmark;
pub(crate) mod integrity;
pub(crate) mod query;
pub(crate) mod record;
pub(crate) mod redact;
pub(crate) mod retention;
pub(crate) mod signing;
pub(crate) mod store;
pub(crate) mod verify;
mod wal;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ed25519_dalek::VerifyingKey;

pub(crate) use record::{
    Approval, ApprovalAction, AuditEvent, MaskedColumn, MaskingSummary, Peer, PolicyReload,
    QueryProtocol, RecordId, RecordedRows, SessionEnd, SessionId, SessionStart, StatementOutcome,
    StatementRecord, Timestamp, TlsInfo,
};
pub(crate) use retention::RetentionReport;
pub(crate) use signing::Mark;
pub(crate) use store::Store;

use self::config::AuditConfig;
use writer::{Shared, Writer};

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AuditError {
    #[error("audit store error: {0}")]
    Store(String),
    #[error("audit I/O error on {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("audit record could not be encoded: {0}")]
    Encode(String),
    #[error("audit store is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "audit store is inconsistent, refusing to continue the chain: {0} (run `interceptor audit verify`)"
    )]
    Inconsistent(String),
    #[error("audit key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// A previous write failed: the log refuses all appends (fail closed).
    #[error("audit log unavailable after a write failure: {0}")]
    Failed(String),
    #[error("audit log is shutting down")]
    Closed,
    #[error("audit queue is full ({0} records pending)")]
    Overloaded(usize),
    #[error("{0}")]
    Request(String),
}

impl AuditError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> AuditError {
        AuditError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Store(e.to_string())
    }
}

/// Records queued but not yet committed beyond which appends fail instead of using more memory.
const MAX_PENDING: usize = 200_000;
/// Recorded result data per statement is also capped in bytes, which keeps records small
/// enough for sled's log (large values go to separate blob files).
pub(crate) const MAX_RECORDED_BYTES: usize = 256 * 1024;

/// What [`AuditLog::health`] reports.
#[derive(Debug, Clone)]
pub(crate) struct AuditHealth {
    /// Records queued and not yet committed.
    pub queued: usize,
    /// Why the log refuses appends (fail closed), if it does.
    pub failed: Option<String>,
}

/// The audit log. Cheap to clone; the writer thread stops when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    store: Store,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_session: AtomicU64,
    record_rows: usize,
    verifying_key: Option<VerifyingKey>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("audit writer thread panicked");
        }
    }
}

impl AuditLog {
    /// Opens the store, checks that its tail matches the signed head, and starts the
    /// group-commit thread.
    pub(crate) fn open(cfg: &AuditConfig) -> Result<AuditLog, AuditError> {
        let key = cfg
            .signing_key
            .as_deref()
            .map(signing::load_signing_key)
            .transpose()?;
        if key.is_none() {
            tracing::warn!(
                "audit: no signing_key configured; checkpoints are unsigned and only the hash \
                 chain protects the log"
            );
        }
        let store = Store::open(&cfg.dir)?;
        let verifying_key = key.as_ref().map(|k| k.verifying_key());
        let gap = integrity::check_at_start(&store, cfg, verifying_key.as_ref())?;
        let writer = Writer::resume(store.clone(), key, cfg)?;
        store.reindex()?;
        store.sync_dirs()?;
        let next_session = store.session_hwm()?.saturating_add(1);
        let shared = Arc::new(Shared::new(writer));
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || Writer::run(thread_shared))
            .map_err(|e| AuditError::Store(format!("cannot start audit writer: {e}")))?;
        let log = AuditLog {
            inner: Arc::new(Inner {
                shared,
                store,
                thread: Mutex::new(Some(thread)),
                next_session: AtomicU64::new(next_session),
                record_rows: cfg.record_rows,
                verifying_key,
            }),
        };
        integrity::settle(&log, cfg, gap)?;
        Ok(log)
    }

    /// Queues a record and waits until it is durable (group commit). Used before forwarding
    /// a statement: an error means the statement must be refused.
    pub(crate) async fn append_durable(&self, event: AuditEvent) -> Result<RecordId, AuditError> {
        if self.inner.shared.inline() {
            let seq = self.enqueue(event, None)?;
            self.inner.shared.commit_here()?;
            return Ok(seq);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let seq = self.enqueue(event, Some(tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(seq),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AuditError::Closed),
        }
    }

    /// Queues a record; durable at the next group commit. Used for outcomes and session end.
    pub(crate) fn append(&self, event: AuditEvent) -> Result<RecordId, AuditError> {
        self.enqueue(event, None)
    }

    /// A session id never handed out before in this store.
    pub(crate) fn new_session_id(&self) -> SessionId {
        SessionId(self.inner.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// Result rows recorded per statement (`[audit] record_rows`); the relay need not collect more.
    pub(crate) fn record_rows_cap(&self) -> usize {
        self.inner.record_rows
    }

    /// The store, for queries (sled is safe for concurrent readers). It lags the log of record
    /// slightly: call [`AuditLog::sync_index`] first to see every committed record.
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn verifying_key(&self) -> Option<&VerifyingKey> {
        self.inner.verifying_key.as_ref()
    }

    /// Number of flush+sync rounds done so far (each covers a whole batch).
    pub(crate) fn sync_count(&self) -> u64 {
        self.inner.shared.syncs.load(Ordering::Relaxed)
    }

    /// Queue depth and writability, for metrics and readiness.
    pub(crate) fn health(&self) -> AuditHealth {
        let (queued, failed) = self.inner.shared.health();
        AuditHealth { queued, failed }
    }

    /// The head as of the last completed commit (durable in the write-ahead segment).
    pub(crate) fn committed_head(&self) -> Option<Mark> {
        self.inner.shared.committed_head()
    }

    /// The head of the last commit [`AuditLog::store`] holds: what a live verify checks up to
    /// (sled follows the segments, so this may trail [`AuditLog::committed_head`]).
    pub(crate) fn visible_head(&self) -> Option<Mark> {
        self.inner.shared.visible_head()
    }

    /// Applies retention now (the writer also does so hourly). Blocks until done.
    pub(crate) fn run_retention(&self) -> Result<RetentionReport, AuditError> {
        self.inner.shared.request_retention()
    }

    /// Waits until sled (records and session indexes) holds everything queued so far: it
    /// follows the write-ahead segments by up to [`writer`]'s apply interval. Readers of
    /// [`AuditLog::store`] in a running daemon call this first.
    pub(crate) async fn sync_index(&self) -> Result<(), AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.shared.push_index_barrier(tx)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Waits until everything queued so far is durable (in the write-ahead segment; sled may
    /// not show it yet, see [`AuditLog::sync_index`]).
    pub(crate) async fn sync(&self) -> Result<(), AuditError> {
        if self.inner.shared.inline() {
            return self.inner.shared.commit_here();
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.shared.push_barrier(tx)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    fn enqueue(
        &self,
        event: AuditEvent,
        waiter: Option<writer::Waiter>,
    ) -> Result<RecordId, AuditError> {
        // Statements arrive redacted (see `redact::redact_record`, called where they are classified).
        let event = cap_rows(event, self.inner.record_rows);
        self.inner.shared.push(event, waiter)
    }
}

// The relay shares one log across tasks and threads.
const _: fn() = || {
    fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    assert_shareable::<AuditLog>();
};

/// Enforces the per-statement row cap and [`MAX_RECORDED_BYTES`] on recorded results.
fn cap_rows(event: AuditEvent, max_rows: usize) -> AuditEvent {
    match event {
        AuditEvent::Outcome(mut o) => {
            if let Some(r) = o.result.as_mut() {
                cap(&mut r.rows, &mut r.truncated, max_rows);
            }
            AuditEvent::Outcome(o)
        }
        AuditEvent::ResultRows(mut r) => {
            cap(&mut r.rows, &mut r.truncated, max_rows);
            AuditEvent::ResultRows(r)
        }
        event => event,
    }
}

/// Keeps at most `max_rows` rows and [`MAX_RECORDED_BYTES`] of values; marks a cut.
fn cap(rows: &mut Vec<Vec<Option<String>>>, truncated: &mut bool, max_rows: usize) {
    if rows.len() > max_rows {
        rows.truncate(max_rows);
        *truncated = true;
    }
    let mut bytes = 0usize;
    let mut keep = rows.len();
    for (i, row) in rows.iter().enumerate() {
        bytes += row
            .iter()
            .map(|v| v.as_ref().map_or(4, |s| s.len() + 3))
            .sum::<usize>();
        if bytes > MAX_RECORDED_BYTES {
            keep = i;
            break;
        }
    }
    if keep < rows.len() {
        rows.truncate(keep);
        *truncated = true;
    }
}

/// The write-ahead replay for [`crate::fuzzing`].
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
#[allow(clippy::panic)] // a broken invariant must crash: that is what the fuzzer reports
pub(crate) mod fuzzing {
    use super::{block, chain, signing, wal};

    /// Replays write-ahead bytes as a start does, `data` being two segments split at `cut`:
    /// frames recovered, each record decoded, records folded into blocks and read back (which
    /// must give exactly the records put in). Returns the number of frames recovered.
    pub(crate) fn wal_replay(data: &[u8], cut: usize) -> usize {
        let cut = cut.min(data.len());
        let mut replay = wal::Replay::default();
        replay.segment(&data[..cut]);
        replay.segment(&data[cut..]);
        let recovered = replay.finish();
        for frame in &recovered.frames {
            let _ = block::fold_pairs(&frame.pairs);
            let mut builder = block::BlockBuilder::default();
            let mut put = Vec::new();
            let mut blocks = Vec::new();
            for (k, v) in &frame.pairs {
                match chain::seq_of_key(k).filter(|_| k.len() == 9) {
                    Some(seq) if k.first() == chain::record_key(seq).first() => {
                        let _ = chain::decode_record(v);
                        if let Some(b) = builder.push_closing(seq, v) {
                            blocks.push(b);
                        }
                        put.push((seq, v.clone()));
                    }
                    _ => {
                        let _ = signing::Mark::decode(v);
                    }
                }
            }
            blocks.extend(builder.take());
            let mut got = Vec::new();
            for (_, value) in &blocks {
                for entry in block::entries(value) {
                    match entry {
                        Ok((seq, stored)) => got.push((seq, stored.to_vec())),
                        Err(e) => panic!("a block just built does not read back: {e:?}"),
                    }
                }
            }
            assert!(
                got == put,
                "blocks read back differ from the records put in"
            );
        }
        recovered.frames.len()
    }
}

#[cfg(test)]
mod tests;
