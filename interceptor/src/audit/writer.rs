//! The group-commit writer: one thread owns the chain tip. Callers queue records (their
//! sequence number is assigned at enqueue, under the queue lock, so queue order = chain order);
//! the thread takes everything queued since its last commit, appends it to the write-ahead
//! segment as one frame (synced per `[audit] durability`) and wakes all waiters of that batch:
//! the segment is the log of record. sled (the `log` tree and the session indexes) is brought
//! up to date by the store thread ([`super::applier`]), handed the committed pairs at most
//! [`APPLY_INTERVAL`] apart, so under load one sled batch covers many commits and no statement
//! waits for sled.
//!
//! Wake-ups: only a record somebody waits for (a statement about to be forwarded) or a job
//! wakes the writer, and only when it sleeps. Records nobody waits for (outcomes, result rows,
//! session ends) ride with the next commit, at most [`LAZY_COMMIT`] later.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

pub(crate) use super::applier::Waiter;
use super::applier::{Applier, Progress, StoreJob};
use super::chain::{self, ChainHash, HEAD_KEY};
use super::config::{AuditConfig, Durability};
use super::record::{AuditEvent, Record, RecordId, Timestamp};
use super::retention::{RetentionPolicy, RetentionReport};
use super::signing::{Mark, MarkKind};
use super::store::Store;
use super::wal::Wal;
use super::{AuditError, MAX_PENDING};

mod outage;

/// A periodic checkpoint is kept after this many records or this much time.
const CHECKPOINT_EVERY_RECORDS: u64 = 1000;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// sled's files are brought up to date (and the write-ahead file emptied) this often, or when
/// the write-ahead file grows past [`STORE_SYNC_BYTES`].
const STORE_SYNC_INTERVAL: Duration = Duration::from_secs(5);
const STORE_SYNC_BYTES: u64 = 64 * 1024 * 1024;
/// Longest sled (records and session indexes) lags the write-ahead segments while commits
/// keep coming, and the batch size that hands over sooner.
const APPLY_INTERVAL: Duration = Duration::from_millis(50);
const APPLY_BATCH: usize = 8192;
/// Longest a record nobody waits for stays queued before the writer commits it anyway.
const LAZY_COMMIT: Duration = Duration::from_millis(10);
/// Queued records nobody waits for that wake the writer all the same.
const LAZY_BATCH: usize = 1024;
/// For this long after a commit the writer polls for such records every [`LAZY_COMMIT`].
const ACTIVE: Duration = Duration::from_secs(1);

struct Pending {
    seq: RecordId,
    at: Timestamp,
    event: AuditEvent,
    waiter: Option<Waiter>,
}

enum Job {
    /// Released once everything queued before is durable (in the write-ahead segment).
    Barrier(Waiter),
    /// As a barrier, and sled (records and session indexes) holds it too.
    IndexBarrier(Waiter),
    Retention(std::sync::mpsc::Sender<Result<RetentionReport, AuditError>>),
}

struct Queue {
    next_seq: u64,
    pending: Vec<Pending>,
    jobs: Vec<Job>,
    /// A queued record has a waiter: commit now.
    urgent: bool,
    /// The writer sleeps on `wake` (so a push that needs it must notify).
    idle: bool,
    /// ... for longer than [`LAZY_COMMIT`]: the first record nobody waits for wakes it.
    deaf: bool,
    failed: Option<String>,
    /// `failed` is an outage the writer retries (see [`outage`]), not a permanent failure.
    outage: bool,
    shutdown: bool,
}

pub(crate) struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The chain tip. Lock order: `writer`, then `queue`.
    writer: Mutex<Writer>,
    /// `durability = "write"`: the caller that needs a record durable commits it itself (see
    /// [`Shared::commit_here`]) instead of waking the writer thread and waiting for it.
    inline: bool,
    pub(crate) syncs: AtomicU64,
    committed: Mutex<Option<Mark>>,
    /// The head of the last commit sled holds (set by the store thread).
    visible: Mutex<Option<Mark>>,
}

fn poisoned() -> AuditError {
    AuditError::Failed("audit writer state poisoned".into())
}

impl Shared {
    pub(crate) fn new(writer: Writer) -> Shared {
        let next_seq = writer.next_seq();
        let head = writer.head();
        let inline = writer.durability == Durability::Write;
        Shared {
            writer: Mutex::new(writer),
            inline,
            queue: Mutex::new(Queue {
                next_seq: next_seq.0,
                pending: Vec::new(),
                jobs: Vec::new(),
                urgent: false,
                idle: false,
                deaf: false,
                failed: None,
                outage: false,
                shutdown: false,
            }),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            visible: Mutex::new(head.clone()),
            committed: Mutex::new(head),
        }
    }

    pub(crate) fn push(
        &self,
        event: AuditEvent,
        waiter: Option<Waiter>,
    ) -> Result<RecordId, AuditError> {
        let mut q = self.queue.lock().map_err(|_| poisoned())?;
        if let Some(f) = &q.failed
            && !outage::admits(q.outage, &event, waiter.is_some())
        {
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
        let urgent = waiter.is_some();
        q.pending.push(Pending {
            seq,
            at: Timestamp::now(),
            event,
            waiter,
        });
        q.urgent |= urgent;
        // A busy writer takes the record with its next batch: no wake-up (a futex call) then.
        let wake =
            q.idle && (urgent || (q.deaf && q.pending.len() == 1) || q.pending.len() == LAZY_BATCH);
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        Ok(seq)
    }

    /// Whether callers commit their own records (see [`Shared::commit_here`]).
    pub(crate) fn inline(&self) -> bool {
        self.inline
    }

    /// Commits everything queued so far on the caller's thread. With `durability = "write"`
    /// a commit is a `write(2)` of one frame (microseconds), cheaper than the two thread
    /// wake-ups of handing it to the writer thread and being woken by it, which were most of
    /// a statement's cost. Concurrent callers queue on the writer lock and each commit takes
    /// everything queued, so they still share commits under load. The writer thread keeps the
    /// deferred work: lazy records, syncs, sled, checkpoints.
    pub(crate) fn commit_here(&self) -> Result<(), AuditError> {
        let mut w = self.writer.lock().map_err(|_| poisoned())?;
        let (batch, failed, wake) = {
            let mut q = self.queue.lock().map_err(|_| poisoned())?;
            if q.shutdown {
                return Err(AuditError::Closed);
            }
            if let (true, Some(f)) = (q.outage, &q.failed) {
                // The writer thread's retry writes what is queued (see `outage`).
                return Err(AuditError::Failed(f.clone()));
            }
            let batch = std::mem::take(&mut q.pending);
            // The thread hands committed records to sled; one asleep for long must hear of them.
            let wake = !batch.is_empty() && q.idle && q.deaf;
            (batch, q.failed.clone(), wake)
        };
        if let Some(f) = failed {
            drop(w);
            // Their waiters (if any) learn it too.
            for p in batch {
                if let Some(tx) = p.waiter {
                    let _ = tx.send(Err(AuditError::Failed(f.clone())));
                }
            }
            return Err(AuditError::Failed(f));
        }
        if !batch.is_empty() {
            w.commit_batch(self, batch, None);
        }
        drop(w);
        if wake {
            self.wake.notify_one();
        }
        match self.queue.lock().map_err(|_| poisoned())?.failed.clone() {
            Some(f) => Err(AuditError::Failed(f)),
            None => Ok(()),
        }
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
        let wake = q.idle;
        drop(q);
        if wake {
            self.wake.notify_one();
        }
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

    pub(crate) fn visible_head(&self) -> Option<Mark> {
        self.visible.lock().ok().and_then(|h| h.clone())
    }

    /// Stops the log for good (fail closed): ends any outage the writer was retrying.
    pub(crate) fn fail(&self, message: &str) {
        if let Ok(mut q) = self.queue.lock() {
            if q.failed.is_none() || q.outage {
                q.failed = Some(message.to_string());
            }
            q.outage = false;
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
    retention: RetentionPolicy,
    wal: Wal,
    durability: Durability,
    sync_interval: Duration,
    /// When the write-ahead file was last `fdatasync`ed (with `durability = "write"`).
    last_wal_sync: Instant,
    /// When sled's files were last brought up to date.
    last_store_sync: Instant,
    /// Committed pairs and records not yet handed to the store thread.
    unapplied_pairs: Vec<(Vec<u8>, Vec<u8>)>,
    unapplied: Vec<Record>,
    last_apply: Instant,
    last_commit: Instant,
    /// The head kept outside the store (see [`super::headmark`]).
    head_mark: super::headmark::HeadMarkFile,
    /// Commits happened since the head-mark file was last written: the writer thread writes
    /// it within [`LAZY_COMMIT`], not the committing session (one `pwrite` per wake-up
    /// instead of one per commit, and none on a statement's path).
    mark_behind: bool,
    /// Files whose periodic `fdatasync` is due; the writer thread runs them once it has
    /// released the writer lock, so callers committing meanwhile never wait for the disk.
    deferred: Vec<File>,
    /// A write failure being retried, and the low-space deferral of sled's hand-over and sync.
    outage: outage::State,
}

/// What one commit puts in the write-ahead frame, before it is written: the sealed records,
/// the new head and, when due, a checkpoint.
struct Sealed {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    head: Mark,
    checkpoint: bool,
    prev: ChainHash,
    next_seq: RecordId,
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
        Ok(Writer {
            wal,
            unapplied_pairs: Vec::new(),
            unapplied: Vec::new(),
            last_apply: Instant::now(),
            last_commit: Instant::now(),
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
            retention: RetentionPolicy::from_config(cfg),
            head_mark: super::headmark::HeadMarkFile::open(&super::integrity::head_mark_path(cfg))?,
            mark_behind: false,
            deferred: Vec::new(),
            outage: outage::State::default(),
        })
    }

    pub(crate) fn next_seq(&self) -> RecordId {
        self.next_seq
    }

    pub(crate) fn head(&self) -> Option<Mark> {
        self.head.clone()
    }

    /// The writer thread: commits what callers do not commit themselves, then the deferred
    /// work (sled hand-over, syncs, jobs, retention). It holds the writer lock only while it
    /// works, never while it sleeps or waits for a periodic `fdatasync`.
    pub(crate) fn run(shared: Arc<Shared>) {
        let _stopped = StopGuard(shared.clone());
        let started = shared.writer.lock().map_err(|_| poisoned()).and_then(|w| {
            Applier::start(w.store.clone(), w.key.clone(), w.retention, shared.clone())
        });
        let applier = match started {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "audit writer: cannot start the store thread");
                shared.fail(&e.to_string());
                return;
            }
        };
        loop {
            let Ok((idle_wait, active, outage)) = shared.writer.lock().map(|w| {
                (
                    w.idle_wait(),
                    w.last_commit.elapsed() < ACTIVE,
                    w.outage.active(),
                )
            }) else {
                tracing::error!("audit writer: writer lock poisoned, stopping");
                return;
            };
            if outage {
                // Until the trail can be written again (or the log stops for good).
                Writer::ride_out(&shared, &applier);
                continue;
            }
            let (jobs, shutdown) = {
                let Ok(mut q) = shared.queue.lock() else {
                    tracing::error!("audit writer: queue lock poisoned, stopping");
                    return;
                };
                let mut lazy_deadline: Option<Instant> = None;
                while !q.urgent && q.jobs.is_empty() && !q.shutdown && !q.outage {
                    let mut wait = idle_wait;
                    if q.pending.is_empty() {
                        // Shortly after a commit more records nobody waits for are likely
                        // (outcomes): look for them on a timer rather than be woken for each.
                        if active {
                            wait = wait.min(LAZY_COMMIT);
                        }
                    } else {
                        // Records nobody waits for: commit them soon, not at once.
                        let deadline =
                            *lazy_deadline.get_or_insert_with(|| Instant::now() + LAZY_COMMIT);
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() || q.pending.len() >= LAZY_BATCH {
                            break;
                        }
                        wait = wait.min(left);
                    }
                    q.idle = true;
                    q.deaf = wait > LAZY_COMMIT;
                    let r = shared.wake.wait_timeout(q, wait);
                    match r {
                        Ok((guard, timeout)) => {
                            q = guard;
                            q.idle = false;
                            if timeout.timed_out() && q.pending.is_empty() {
                                break;
                            }
                        }
                        Err(_) => {
                            tracing::error!("audit writer: queue lock poisoned, stopping");
                            return;
                        }
                    }
                }
                q.urgent = false;
                (std::mem::take(&mut q.jobs), q.shutdown)
            };
            let Ok(mut w) = shared.writer.lock() else {
                tracing::error!("audit writer: writer lock poisoned, stopping");
                return;
            };
            if w.outage.active() {
                // Began on a caller's thread (`commit_here`) meanwhile: the jobs go back for
                // the outage loop to answer, the queued records stay for the retry.
                drop(w);
                if let Ok(mut q) = shared.queue.lock() {
                    q.jobs.extend(jobs);
                }
                continue;
            }
            // Taken under the writer lock: queue order is chain order, and a caller committing
            // on its own thread takes the lock first too.
            let (batch, failed) = match shared.queue.lock() {
                Ok(mut q) => (std::mem::take(&mut q.pending), q.failed.clone()),
                Err(_) => {
                    tracing::error!("audit writer: queue lock poisoned, stopping");
                    return;
                }
            };
            if !batch.is_empty() {
                w.commit_batch(&shared, batch, failed);
            }
            w.step(&shared, &applier, jobs, shutdown);
            let deferred = std::mem::take(&mut w.deferred);
            let outage = w.outage.active();
            drop(w);
            for file in deferred {
                if let Err(e) = file.sync_data() {
                    tracing::error!(error = %e, "audit sync failed; refusing further appends");
                    shared.fail(&format!("audit file sync failed: {e}"));
                }
            }
            if shutdown && !outage {
                let empty = shared
                    .queue
                    .lock()
                    .map(|q| q.pending.is_empty() && q.jobs.is_empty())
                    .unwrap_or(true);
                if empty {
                    if let Err(e) = applier.drain() {
                        tracing::error!(error = %e, "audit store not up to date at shutdown");
                    }
                    return;
                }
            }
        }
    }

    /// The work after a commit, under the writer lock: sled hand-over, periodic syncs (left
    /// in `deferred`), jobs, retention.
    fn step(&mut self, shared: &Shared, applier: &Applier, jobs: Vec<Job>, shutdown: bool) {
        // Statement barriers (every forwarded chunk) only need the write-ahead segment;
        // readers that need sled current ask with an index barrier.
        let visible_wanted = jobs
            .iter()
            .any(|j| matches!(j, Job::IndexBarrier(_) | Job::Retention(_)));
        if visible_wanted
            || shutdown
            || self.unapplied.len() >= APPLY_BATCH
            || self.last_apply.elapsed() >= APPLY_INTERVAL
        {
            self.hand_over(shared, applier);
        }
        self.background_sync(shared, applier, shutdown);
        let failed = shared.queue.lock().ok().and_then(|q| q.failed.clone());
        let refused = |f: &String| AuditError::Failed(f.clone());
        for job in jobs {
            match job {
                Job::Barrier(w) => {
                    let _ = w.send(failed.as_ref().map_or(Ok(()), |f| Err(refused(f))));
                }
                Job::IndexBarrier(w) => match &failed {
                    Some(f) => {
                        let _ = w.send(Err(refused(f)));
                    }
                    None => {
                        // Answered by the store thread once it applied everything above.
                        if let Err(e) = applier.send(StoreJob::Visible(w)) {
                            shared.fail(&e.to_string());
                        }
                    }
                },
                Job::Retention(tx) => match &failed {
                    Some(f) => {
                        let _ = tx.send(Err(refused(f)));
                    }
                    None => self.retain(shared, applier, Some(tx)),
                },
            }
        }
        if failed.is_none() && self.retention.is_active() && !shutdown {
            let due = self
                .last_retention
                .is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL);
            if due {
                self.retain(shared, applier, None);
            }
        }
    }

    /// How long the thread may sleep with nothing queued: until the next background step is
    /// due, if one is.
    fn idle_wait(&self) -> Duration {
        let mut wait = Duration::from_secs(30);
        if self.mark_behind {
            wait = wait.min(LAZY_COMMIT);
        }
        if self.wal.has_unsynced() {
            wait = wait.min(
                self.sync_interval
                    .saturating_sub(self.last_wal_sync.elapsed()),
            );
        }
        if self.wal.len() > 0 {
            wait = wait.min(STORE_SYNC_INTERVAL.saturating_sub(self.last_store_sync.elapsed()));
        }
        if !self.unapplied.is_empty() {
            wait = wait.min(APPLY_INTERVAL.saturating_sub(self.last_apply.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// Hands everything committed so far to the store thread (one job, one wake-up).
    fn hand_over(&mut self, shared: &Shared, applier: &Applier) {
        self.last_apply = Instant::now();
        if self.unapplied.is_empty() && self.unapplied_pairs.is_empty() {
            return;
        }
        if !self.store_has_room() {
            return;
        }
        let job = StoreJob::Apply {
            pairs: std::mem::take(&mut self.unapplied_pairs),
            records: std::mem::take(&mut self.unapplied),
            head: self.head.clone(),
        };
        if let Err(e) = applier.send(job) {
            tracing::error!(error = %e, "audit store thread gone; refusing further appends");
            shared.fail(&e.to_string());
        }
    }

    /// The deferred work: the write-ahead file's `fdatasync` (durability `write`) and sled's
    /// sync (handed to the store thread). A failure stops all further appends, as a failed
    /// commit does. At shutdown everything is made durable in sled before returning.
    fn background_sync(&mut self, shared: &Shared, applier: &Applier, shutdown: bool) {
        if self.outage.active() {
            return;
        }
        if let Err(e) = self.background_step(shared, applier, shutdown) {
            self.background_failed(shared, e);
        }
    }

    /// The periodic syncs go to `deferred` (run off the writer lock, also at shutdown before
    /// the store is drained).
    fn background_step(
        &mut self,
        shared: &Shared,
        applier: &Applier,
        shutdown: bool,
    ) -> Result<(), AuditError> {
        self.write_mark()?;
        if self.wal.has_unsynced()
            && (shutdown || self.last_wal_sync.elapsed() >= self.sync_interval)
        {
            // Not retried: after a failed fdatasync the kernel may have dropped the pages of
            // frames already acknowledged, so whether they are on disk is unknown.
            let not_retried = |e: AuditError| AuditError::Failed(e.to_string());
            self.deferred
                .extend(self.wal.sync_later().map_err(not_retried)?);
            self.last_wal_sync = Instant::now();
        }
        if self.wal.len() > 0
            && (shutdown
                || self.wal.len() >= STORE_SYNC_BYTES
                || self.last_store_sync.elapsed() >= STORE_SYNC_INTERVAL)
        {
            self.deferred.push(self.head_mark.sync_later()?);
            self.sync_store(shared, applier)?;
        }
        Ok(())
    }

    /// Brings the head-mark file up to the last commit. Written, not synced: a truncated or
    /// edited tail happens while the kernel is up, and the page cache holds the mark then (it
    /// lags the log by at most [`LAZY_COMMIT`]; a tail cut within that moment is still caught
    /// once the mark is written, unless the daemon dies first); a second fdatasync per commit
    /// would halve the fsync ceiling. The mark is synced with sled's files (every few seconds).
    fn write_mark(&mut self) -> Result<(), AuditError> {
        if !self.mark_behind {
            return Ok(());
        }
        if let Some(head) = &self.head {
            self.head_mark.write(head, false)?;
        }
        self.mark_behind = false;
        Ok(())
    }

    /// Seals the current segment (later commits go to a new one) and asks the store thread to
    /// make sled's files hold everything in it, then delete it. Queued after every apply of
    /// the frames it holds. `false`: put off, the audit disk lacks room for sled's writes.
    fn sync_store(&mut self, shared: &Shared, applier: &Applier) -> Result<bool, AuditError> {
        self.hand_over(shared, applier);
        if !self.unapplied.is_empty() || !self.unapplied_pairs.is_empty() {
            // sled does not hold everything in the segment, so it must not be deleted.
            self.last_store_sync = Instant::now();
            return Ok(false);
        }
        let (sealed, unsynced) = self.wal.rotate()?;
        self.deferred.extend(unsynced);
        self.last_store_sync = Instant::now();
        applier.send(StoreJob::Sync { upto: sealed })?;
        Ok(true)
    }

    /// The commit-batch step: the queued records become one sealed, durable frame, and their
    /// waiters are released. Everything that must be in the frame (records, head mark,
    /// checkpoint) is decided in [`Writer::seal`]; nothing after the frame's write and sync
    /// delays a waiter.
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
        // Where a failed commit's partial frame is cut off before it is retried.
        let good_len = self.wal.len();
        let result = match failed {
            Some(f) => Err(AuditError::Failed(f)),
            None => {
                let started = Instant::now();
                let r = self.commit(&records);
                crate::metrics::audit_commit(started.elapsed());
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
                let records = std::mem::take(&mut records);
                self.commit_failed(shared, e.clone(), records, good_len);
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        // sled and the indexes follow the log: handed to the store thread in batches (see
        // the run loop); after a crash they are rebuilt from the segments at open.
        if result.is_ok() {
            if self.unapplied.is_empty() {
                self.unapplied = records;
            } else {
                self.unapplied.extend(records);
            }
        }
    }

    /// Chains and seals `records` after the current tip, with the new head and, when due, a
    /// checkpoint. Changes nothing: the tip moves only once the frame is written.
    fn seal(&self, records: &[Record]) -> Result<Option<Sealed>, AuditError> {
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(None);
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
            let (stored, hash) = chain::seal(&prev, rec).map_err(AuditError::Encode)?;
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
        Ok(Some(Sealed {
            pairs,
            head,
            checkpoint,
            prev,
            next_seq: expected,
        }))
    }

    fn commit(&mut self, records: &[Record]) -> Result<(), AuditError> {
        let Some(sealed) = self.seal(records)? else {
            return Ok(());
        };
        // The write-ahead frame is the commit: records, head and checkpoint in one CRC-framed
        // write, so they are recovered together or not at all.
        self.wal.append(self.next_seq.0, &sealed.pairs)?;
        match self.durability {
            Durability::Fsync => self.wal.sync()?,
            Durability::Write => {}
        }
        // The head-mark file follows on the writer thread (`write_mark`), after the frame, so
        // the mark never claims more than the log holds.
        self.mark_behind = true;
        let n = records.len() as u64;
        self.last_commit = Instant::now();
        self.prev = sealed.prev;
        self.next_seq = sealed.next_seq;
        self.head = Some(sealed.head);
        if sealed.checkpoint {
            self.since_checkpoint = 0;
            self.last_checkpoint = Some(Instant::now());
        } else {
            self.since_checkpoint += n;
        }
        if self.unapplied_pairs.is_empty() {
            self.unapplied_pairs = sealed.pairs;
        } else {
            self.unapplied_pairs.extend(sealed.pairs);
        }
        Ok(())
    }

    /// Retention runs on the store thread after everything committed so far is in sled and
    /// sled's files are synced with the segments holding it deleted (no frame that re-inserts
    /// removed records may stay behind). Commits go on meanwhile, into a new segment.
    fn retain(
        &mut self,
        shared: &Shared,
        applier: &Applier,
        reply: Option<super::applier::RetentionReply>,
    ) {
        self.last_retention = Some(Instant::now());
        let r = self.sync_store(shared, applier).and_then(|synced| {
            if !synced {
                return Err(AuditError::Request(
                    "retention put off: the audit disk is nearly full".into(),
                ));
            }
            applier.send(StoreJob::Retain {
                last: self.head.as_ref().map(|h| h.seq),
                reply: reply.clone(),
            })
        });
        if let Err(e) = r {
            tracing::error!(error = %e, "audit retention could not start");
            if let Some(tx) = reply {
                let _ = tx.send(Err(e));
            }
        }
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

impl Progress for Shared {
    fn visible(&self, head: Option<Mark>) {
        if let Ok(mut v) = self.visible.lock() {
            *v = head;
        }
    }

    fn fail(&self, message: &str) {
        Shared::fail(self, message);
    }
}
