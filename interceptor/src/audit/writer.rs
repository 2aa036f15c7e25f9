//! The group-commit writer: one thread owns the chain tip. Callers queue records (their
//! sequence number is assigned at enqueue, under the queue lock, so queue order = chain order);
//! the thread takes everything queued since its last commit, appends it to the write-ahead
//! file as one frame (synced per `[audit] durability`), applies it to sled's in-memory tree and
//! wakes all waiters of that batch. sled's own files are flushed and synced by a second thread
//! (see [`super::wal`]); the session indexes are updated when the queue runs dry or every
//! [`INDEX_INTERVAL`], so under load one index update covers many commits.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use super::chain::{self, ChainHash, HEAD_KEY};
use super::record::{AuditEvent, Record, RecordId, SessionId, Timestamp};
use super::retention::{self, RetentionPolicy, RetentionReport};
use super::signing::{Mark, MarkKind};
use super::store::{SessionSummary, Store};
use super::wal::{self, Wal};
use super::{AuditError, MAX_PENDING};
use crate::config::{AuditConfig, Durability};

pub(crate) type Waiter = tokio::sync::oneshot::Sender<Result<(), AuditError>>;

/// A periodic checkpoint is kept after this many records or this much time.
const CHECKPOINT_EVERY_RECORDS: u64 = 1000;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// sled's files are brought up to date (and the write-ahead file emptied) this often, or when
/// the write-ahead file grows past [`STORE_SYNC_BYTES`].
const STORE_SYNC_INTERVAL: Duration = Duration::from_secs(5);
const STORE_SYNC_BYTES: u64 = 64 * 1024 * 1024;
/// Longest the session indexes lag the log while commits keep coming.
const INDEX_INTERVAL: Duration = Duration::from_millis(50);
const INDEX_BATCH: usize = 4096;

struct Pending {
    seq: RecordId,
    at: Timestamp,
    event: AuditEvent,
    waiter: Option<Waiter>,
}

enum Job {
    Barrier(Waiter),
    /// As a barrier, and the session indexes are brought up to date first.
    IndexBarrier(Waiter),
    Retention(std::sync::mpsc::Sender<Result<RetentionReport, AuditError>>),
}

struct Queue {
    next_seq: u64,
    pending: Vec<Pending>,
    jobs: Vec<Job>,
    failed: Option<String>,
    shutdown: bool,
}

pub(crate) struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    pub(crate) syncs: AtomicU64,
    committed: Mutex<Option<Mark>>,
}

fn poisoned() -> AuditError {
    AuditError::Failed("audit writer state poisoned".into())
}

impl Shared {
    pub(crate) fn new(next_seq: RecordId, head: Option<Mark>) -> Shared {
        Shared {
            queue: Mutex::new(Queue {
                next_seq: next_seq.0,
                pending: Vec::new(),
                jobs: Vec::new(),
                failed: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            committed: Mutex::new(head),
        }
    }

    pub(crate) fn push(
        &self,
        event: AuditEvent,
        waiter: Option<Waiter>,
    ) -> Result<RecordId, AuditError> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        if let Some(f) = &q.failed {
            return Err(AuditError::Failed(f.clone()));
        }
        if q.shutdown {
            return Err(AuditError::Closed);
        }
        if q.pending.len() >= MAX_PENDING {
            return Err(AuditError::Overloaded(q.pending.len()));
        }
        let seq = RecordId(q.next_seq);
        q.next_seq += 1;
        q.pending.push(Pending {
            seq,
            at: Timestamp::now(),
            event,
            waiter,
        });
        drop(q);
        self.wake.notify_one();
        Ok(seq)
    }

    /// Queues a job for the writer, unless the log failed or is closing.
    fn push_job(&self, job: Job) -> Result<(), AuditError> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        if let Some(f) = &q.failed {
            return Err(AuditError::Failed(f.clone()));
        }
        if q.shutdown {
            return Err(AuditError::Closed);
        }
        q.jobs.push(job);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    pub(crate) fn push_barrier(&self, waiter: Waiter) -> Result<(), AuditError> {
        self.push_job(Job::Barrier(waiter))
    }

    pub(crate) fn push_index_barrier(&self, waiter: Waiter) -> Result<(), AuditError> {
        self.push_job(Job::IndexBarrier(waiter))
    }

    pub(crate) fn request_retention(&self) -> Result<RetentionReport, AuditError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.push_job(Job::Retention(tx))?;
        rx.recv().map_err(|_| AuditError::Closed)?
    }

    pub(crate) fn shutdown(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.shutdown = true;
        }
        self.wake.notify_all();
    }

    /// Records queued and not yet committed, and the failure that stopped the log, if any.
    pub(crate) fn health(&self) -> (usize, Option<String>) {
        match self.queue.lock() {
            Ok(q) => (q.pending.len(), q.failed.clone()),
            Err(_) => (0, Some("audit writer state poisoned".into())),
        }
    }

    pub(crate) fn committed_head(&self) -> Option<Mark> {
        self.committed.lock().ok().and_then(|h| h.clone())
    }

    fn fail(&self, message: &str) {
        if let Ok(mut q) = self.queue.lock()
            && q.failed.is_none()
        {
            q.failed = Some(message.to_string());
        }
    }
}

/// The chain tip and everything needed to extend it.
pub(crate) struct Writer {
    store: Store,
    key: Option<SigningKey>,
    next_seq: RecordId,
    prev: ChainHash,
    head: Option<Mark>,
    since_checkpoint: u64,
    /// `None` until the first commit of this run, which always leaves a checkpoint.
    last_checkpoint: Option<Instant>,
    last_retention: Option<Instant>,
    synced_blobs: HashSet<PathBuf>,
    retention: RetentionPolicy,
    /// Summaries of open sessions (see [`Store::index`]).
    summaries: HashMap<SessionId, SessionSummary>,
    /// The last index update failed: re-index from the log before the next one.
    index_stale: bool,
    wal: Wal,
    durability: Durability,
    sync_interval: Duration,
    /// When the write-ahead file was last `fdatasync`ed (with `durability = "write"`).
    last_wal_sync: Instant,
    /// When sled's files were last brought up to date.
    last_store_sync: Instant,
    syncer: Syncer,
    /// Committed records not yet in the session indexes.
    pending_index: Vec<Record>,
    last_index: Instant,
}

/// The thread that flushes and syncs sled's files, then deletes the write-ahead segments they
/// now cover. One request at a time.
struct Syncer {
    tx: Option<mpsc::Sender<u64>>,
    done: mpsc::Receiver<Result<(), AuditError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: bool,
}

impl Syncer {
    fn start(store: Store) -> Result<Syncer, AuditError> {
        let (tx, rx) = mpsc::channel::<u64>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || {
                let mut synced_blobs = HashSet::new();
                for upto in rx {
                    let r = store
                        .sync(&mut synced_blobs)
                        .and_then(|()| wal::remove_upto(store.dir(), upto));
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| AuditError::Store(format!("cannot start audit sync thread: {e}")))?;
        Ok(Syncer {
            tx: Some(tx),
            done,
            thread: Some(thread),
            in_flight: false,
        })
    }

    fn request(&mut self, upto: u64) -> Result<(), AuditError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(upto).ok())
            .ok_or_else(|| AuditError::Failed("the audit sync thread stopped".into()))?;
        self.in_flight = true;
        Ok(())
    }

    /// The result of a finished request, if one finished.
    fn poll(&mut self) -> Result<(), AuditError> {
        if !self.in_flight {
            return Ok(());
        }
        match self.done.try_recv() {
            Ok(r) => {
                self.in_flight = false;
                r
            }
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(AuditError::Failed("the audit sync thread stopped".into()))
            }
        }
    }

    fn wait(&mut self) -> Result<(), AuditError> {
        if !self.in_flight {
            return Ok(());
        }
        self.in_flight = false;
        self.done
            .recv()
            .map_err(|_| AuditError::Failed("the audit sync thread stopped".into()))?
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("audit sync thread panicked");
        }
    }
}

impl Writer {
    /// Picks up the chain where the signed head left it. A tail that does not match the head
    /// (records after it, or missing records) means someone edited the store: refuse to extend
    /// the chain over it (fail closed) until an operator has looked at `audit verify`.
    pub(crate) fn resume(
        store: Store,
        key: Option<SigningKey>,
        cfg: &AuditConfig,
    ) -> Result<Writer, AuditError> {
        let head = store.head()?;
        let base = store.base()?;
        let last = store.last_record()?;
        let (next_seq, prev) = match (&head, &last) {
            (None, None) => match &base {
                None => (RecordId(0), ChainHash::GENESIS),
                Some(b) => (
                    b.seq,
                    b.chain_hash()
                        .ok_or_else(|| AuditError::Inconsistent("malformed base mark".into()))?,
                ),
            },
            (None, Some((_, r))) => {
                return Err(AuditError::Inconsistent(format!(
                    "records up to {} but no head mark",
                    r.seq
                )));
            }
            (Some(h), last) => {
                let hh = h
                    .chain_hash()
                    .ok_or_else(|| AuditError::Inconsistent("malformed head mark".into()))?;
                match last {
                    Some((lh, r)) if r.seq == h.seq && *lh == hh => {}
                    None if base
                        .as_ref()
                        .is_some_and(|b| b.seq.0 == h.seq.0 + 1 && b.hash == h.hash) => {}
                    Some((_, r)) => {
                        return Err(AuditError::Inconsistent(format!(
                            "signed head covers record {} but the last record is {}",
                            h.seq, r.seq
                        )));
                    }
                    None => {
                        return Err(AuditError::Inconsistent(format!(
                            "signed head covers record {} but the log is empty",
                            h.seq
                        )));
                    }
                }
                if let Some(k) = &key
                    && h.signature.is_some()
                    && let Err(e) = h.verify(&k.verifying_key())
                {
                    return Err(AuditError::Inconsistent(format!("head mark: {e}")));
                }
                (RecordId(h.seq.0 + 1), hh)
            }
        };
        let wal = Wal::open(store.dir())?;
        let syncer = Syncer::start(store.clone())?;
        Ok(Writer {
            wal,
            syncer,
            pending_index: Vec::new(),
            last_index: Instant::now(),
            durability: cfg.durability,
            sync_interval: Duration::from_millis(cfg.sync_interval_ms.max(1)),
            last_wal_sync: Instant::now(),
            last_store_sync: Instant::now(),
            store,
            key,
            next_seq,
            prev,
            head,
            since_checkpoint: 0,
            last_checkpoint: None,
            last_retention: None,
            synced_blobs: HashSet::new(),
            retention: RetentionPolicy::from_config(cfg),
            summaries: HashMap::new(),
            index_stale: false,
        })
    }

    pub(crate) fn next_seq(&self) -> RecordId {
        self.next_seq
    }

    pub(crate) fn head(&self) -> Option<Mark> {
        self.head.clone()
    }

    pub(crate) fn run(mut self, shared: std::sync::Arc<Shared>) {
        let _stopped = StopGuard(shared.clone());
        loop {
            let (batch, jobs, shutdown) = {
                let Ok(mut q) = shared.queue.lock() else {
                    tracing::error!("audit writer: queue lock poisoned, stopping");
                    return;
                };
                while q.pending.is_empty() && q.jobs.is_empty() && !q.shutdown {
                    match shared.wake.wait_timeout(q, self.idle_wait()) {
                        Ok((guard, timeout)) => {
                            q = guard;
                            if timeout.timed_out() {
                                break;
                            }
                        }
                        Err(_) => {
                            tracing::error!("audit writer: queue lock poisoned, stopping");
                            return;
                        }
                    }
                }
                (
                    std::mem::take(&mut q.pending),
                    std::mem::take(&mut q.jobs),
                    q.shutdown,
                )
            };
            let failed = shared.queue.lock().ok().and_then(|q| q.failed.clone());
            if !batch.is_empty() {
                self.commit_batch(&shared, batch, failed.clone());
            }
            // Statement barriers (every forwarded chunk) do not force an index update; readers
            // that need it fresh ask with an index barrier.
            let index_wanted = jobs
                .iter()
                .any(|j| matches!(j, Job::IndexBarrier(_) | Job::Retention(_)));
            if index_wanted
                || shutdown
                || self.pending_index.len() >= INDEX_BATCH
                || self.last_index.elapsed() >= INDEX_INTERVAL
            {
                self.flush_index();
            }
            self.background_sync(&shared, shutdown);
            let failed = shared.queue.lock().ok().and_then(|q| q.failed.clone());
            for job in jobs {
                match job {
                    Job::Barrier(w) | Job::IndexBarrier(w) => {
                        let r = match &failed {
                            Some(f) => Err(AuditError::Failed(f.clone())),
                            None => Ok(()),
                        };
                        let _ = w.send(r);
                    }
                    Job::Retention(tx) => {
                        let r = match &failed {
                            Some(f) => Err(AuditError::Failed(f.clone())),
                            None => self.retain(),
                        };
                        let _ = tx.send(r);
                    }
                }
            }
            if failed.is_none() && self.retention.is_active() && !shutdown {
                let due = self
                    .last_retention
                    .is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL);
                if due {
                    match self.retain() {
                        Ok(r) if r.removed_records > 0 => tracing::info!(
                            removed_records = r.removed_records,
                            removed_sessions = r.removed_sessions,
                            "audit retention applied"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "audit retention failed"),
                    }
                }
            }
            if shutdown {
                let empty = shared
                    .queue
                    .lock()
                    .map(|q| q.pending.is_empty() && q.jobs.is_empty())
                    .unwrap_or(true);
                if empty {
                    return;
                }
            }
        }
    }

    /// How long the thread may sleep with nothing queued: until the next background step is
    /// due, if one is.
    fn idle_wait(&self) -> Duration {
        let mut wait = Duration::from_secs(30);
        if self.wal.has_unsynced() {
            wait = wait.min(
                self.sync_interval
                    .saturating_sub(self.last_wal_sync.elapsed()),
            );
        }
        if self.wal.len() > 0 {
            wait = wait.min(STORE_SYNC_INTERVAL.saturating_sub(self.last_store_sync.elapsed()));
        }
        if self.syncer.in_flight {
            // To notice a failed store sync soon.
            wait = wait.min(Duration::from_millis(20));
        }
        if !self.pending_index.is_empty() {
            wait = wait.min(INDEX_INTERVAL.saturating_sub(self.last_index.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// The deferred work: the write-ahead file's `fdatasync` (durability `write`) and sled's
    /// sync (handed to the sync thread). A failure stops all further appends, as a failed
    /// commit does. At shutdown everything is made durable in sled before returning.
    fn background_sync(&mut self, shared: &Shared, shutdown: bool) {
        let r = self.background_step(shutdown);
        if let Err(e) = r {
            tracing::error!(error = %e, "audit sync failed; refusing further appends");
            shared.fail(&e.to_string());
        }
    }

    fn background_step(&mut self, shutdown: bool) -> Result<(), AuditError> {
        self.syncer.poll()?;
        if self.wal.has_unsynced()
            && (shutdown || self.last_wal_sync.elapsed() >= self.sync_interval)
        {
            self.wal.sync()?;
            self.last_wal_sync = Instant::now();
        }
        if shutdown {
            return self.sync_store_now();
        }
        if !self.syncer.in_flight
            && self.wal.len() > 0
            && (self.wal.len() >= STORE_SYNC_BYTES
                || self.last_store_sync.elapsed() >= STORE_SYNC_INTERVAL)
        {
            // Later commits go to a new segment while the sync thread catches sled up.
            let sealed = self.wal.rotate()?;
            self.last_store_sync = Instant::now();
            self.syncer.request(sealed)?;
        }
        Ok(())
    }

    /// Makes sled's files hold everything committed and deletes every sealed segment.
    fn sync_store_now(&mut self) -> Result<(), AuditError> {
        self.syncer.wait()?;
        self.store.sync(&mut self.synced_blobs)?;
        let sealed = self.wal.rotate()?;
        wal::remove_upto(self.store.dir(), sealed)?;
        self.last_store_sync = Instant::now();
        Ok(())
    }

    fn flush_index(&mut self) {
        if !self.pending_index.is_empty() {
            let records = std::mem::take(&mut self.pending_index);
            self.update_index(&records);
        }
        self.last_index = Instant::now();
    }

    fn commit_batch(&mut self, shared: &Shared, batch: Vec<Pending>, failed: Option<String>) {
        let mut waiters = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for p in batch {
            if let Some(w) = p.waiter {
                waiters.push(w);
            }
            records.push(Record {
                seq: p.seq,
                at: p.at,
                event: p.event,
            });
        }
        let result = match failed {
            Some(f) => Err(AuditError::Failed(f)),
            None => {
                let started = Instant::now();
                let r = self.commit(&records);
                crate::ops::metrics::audit_commit(started.elapsed());
                r
            }
        };
        match &result {
            Ok(()) => {
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut h) = shared.committed.lock() {
                    *h = self.head.clone();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit commit failed; refusing further appends");
                shared.fail(&e.to_string());
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        // The indexes are derived from the log, so they are updated after the waiters are
        // released, batched (see the run loop); their writes become durable with the next
        // store sync (or are rebuilt from the log at open).
        if result.is_ok() {
            self.pending_index.extend(records);
        }
    }

    fn update_index(&mut self, records: &[Record]) {
        let r = if self.index_stale {
            self.summaries.clear();
            self.store.reindex()
        } else {
            self.store.index(records, &mut self.summaries)
        };
        match r {
            Ok(()) => self.index_stale = false,
            Err(e) => {
                tracing::error!(error = %e, "audit index update failed; will re-index");
                self.index_stale = true;
            }
        }
    }

    fn commit(&mut self, records: &[Record]) -> Result<(), AuditError> {
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(());
        };
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(records.len() + 2);
        let mut prev = self.prev;
        let mut expected = self.next_seq;
        for rec in records {
            if rec.seq != expected {
                return Err(AuditError::Inconsistent(format!(
                    "writer expected record {expected}, got {}",
                    rec.seq
                )));
            }
            let (stored, hash) =
                chain::seal(&prev, rec).map_err(|e| AuditError::Encode(e.to_string()))?;
            pairs.push((chain::record_key(rec.seq).to_vec(), stored));
            prev = hash;
            expected = RecordId(expected.0 + 1);
        }
        let head = Mark::new(MarkKind::Head, last, prev, self.key.as_ref());
        pairs.push((HEAD_KEY.to_vec(), head.encode()?));
        let n = records.len() as u64;
        let checkpoint = self.since_checkpoint + n >= CHECKPOINT_EVERY_RECORDS
            || self
                .last_checkpoint
                .is_none_or(|t| t.elapsed() >= CHECKPOINT_INTERVAL);
        if checkpoint {
            let cp = Mark::new(MarkKind::Checkpoint, last, prev, self.key.as_ref());
            pairs.push((chain::checkpoint_key(last).to_vec(), cp.encode()?));
        }
        // The write-ahead frame is the commit; sled's files catch up in the background.
        self.wal.append(self.next_seq.0, &pairs)?;
        match self.durability {
            Durability::Fsync => self.wal.sync()?,
            Durability::Write => {}
        }
        // One atomic batch: records, head and checkpoint appear together or not at all (for
        // readers now, and in sled's files at the next store sync).
        let mut batch = sled::Batch::default();
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        self.store.log.apply_batch(batch)?;
        self.prev = prev;
        self.next_seq = expected;
        self.head = Some(head);
        if checkpoint {
            self.since_checkpoint = 0;
            self.last_checkpoint = Some(Instant::now());
        } else {
            self.since_checkpoint += n;
        }
        Ok(())
    }

    fn retain(&mut self) -> Result<RetentionReport, AuditError> {
        self.last_retention = Some(Instant::now());
        // Retention removes records from sled: no frame that re-inserts them may stay behind.
        self.flush_index();
        self.sync_store_now()?;
        // Retention rewrites summaries; read them back from the store afterwards.
        self.summaries.clear();
        let last = self.head.as_ref().map(|h| h.seq);
        retention::apply(
            &self.store,
            self.key.as_ref(),
            &self.retention,
            last,
            Timestamp::now(),
            &mut self.synced_blobs,
        )
    }
}

/// Runs when the writer thread ends for any reason (including a panic inside sled): from then
/// on appends fail instead of queueing records nobody will write, and queued waiters get an
/// error instead of waiting forever.
struct StopGuard(std::sync::Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut q = match self.0.queue.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if q.failed.is_none() && !q.shutdown {
            q.failed = Some("the audit writer stopped".into());
        }
        let reason = q
            .failed
            .clone()
            .unwrap_or_else(|| "the audit log was closed".into());
        for p in q.pending.drain(..) {
            if let Some(w) = p.waiter {
                let _ = w.send(Err(AuditError::Failed(reason.clone())));
            }
        }
        for job in q.jobs.drain(..) {
            match job {
                Job::Barrier(w) | Job::IndexBarrier(w) => {
                    let _ = w.send(Err(AuditError::Failed(reason.clone())));
                }
                Job::Retention(tx) => {
                    let _ = tx.send(Err(AuditError::Failed(reason.clone())));
                }
            }
        }
    }
}
