//! The store thread: brings sled (the `log` tree and the session indexes) up to date with what
//! the writer committed to the write-ahead segments, off the commit path.
//!
//! A statement waits only for its frame in the write-ahead segment. The writer hands the
//! committed pairs over here in large batches (at most [`super::writer`]'s apply interval
//! apart), so sled's per-insert cost is paid by this thread, in parallel with the next
//! commit's `fdatasync`, never by a waiting statement. Everything sled does happens here, in
//! the order the writer asked for it: applies, syncs of sled's files (after which the sealed
//! segments are deleted), retention and visibility barriers. So a sync never covers less than
//! the frames of the segments it deletes, and retention never races an apply.
//!
//! Readers in the daemon (the admin socket) ask for a visibility barrier first
//! ([`super::AuditLog::sync_index`]), so they see every committed record.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use ed25519_dalek::SigningKey;

use super::AuditError;
use super::record::{Record, RecordId, SessionId, Timestamp};
use super::retention::{self, RetentionPolicy, RetentionReport};
use super::signing::Mark;
use super::store::{SessionSummary, Store};
use super::wal;

/// Answered once the records before it are durable (or with why they are not).
pub(crate) type Waiter = tokio::sync::oneshot::Sender<Result<(), AuditError>>;

/// What the store thread reports back to the side that commits (the writer's shared state),
/// so the store thread needs nothing of the writer.
pub(crate) trait Progress: Send + Sync {
    /// sled now holds everything up to `head`: live readers may verify up to it.
    fn visible(&self, head: Option<Mark>);
    /// sled cannot be written: the log refuses further appends (fail closed).
    fn fail(&self, message: &str);
}

/// Records handed over but not yet applied beyond which the writer waits (backpressure: sled
/// slower than the disk must not grow memory without bound). Each costs about two copies of
/// its JSON (the pair for sled and the record for the indexes), so 16 Ki records hold the
/// daemon's memory to tens of MiB when sled falls behind a burst.
const MAX_BACKLOG: usize = 16 * 1024;

pub(crate) type RetentionReply = std::sync::mpsc::Sender<Result<RetentionReport, AuditError>>;

pub(crate) enum StoreJob {
    /// Committed group commits: their pairs for the `log` tree and their records for the
    /// indexes.
    Apply {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        records: Vec<Record>,
        /// The head mark among `pairs` (of the last commit handed over).
        head: Option<Mark>,
    },
    /// Flush and sync sled's files, then delete the write-ahead segments numbered `upto` and
    /// below (every frame in them was applied before this job).
    Sync { upto: u64 },
    /// Reply once everything handed over before is applied and indexed.
    Visible(Waiter),
    /// As `Visible`, for the writer's own thread.
    Drain(std::sync::mpsc::Sender<Result<(), AuditError>>),
    Retain {
        last: Option<RecordId>,
        reply: Option<RetentionReply>,
    },
}

struct Queue {
    jobs: Vec<StoreJob>,
    /// Records in queued `Apply` jobs plus the batch being applied.
    backlog: usize,
    shutdown: bool,
}

struct Handoff {
    queue: Mutex<Queue>,
    /// Jobs queued (store thread) or backlog shrunk (writer).
    wake: Condvar,
    room: Condvar,
}

/// The writer's handle on the store thread.
pub(crate) struct Applier {
    handoff: Arc<Handoff>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn stopped() -> AuditError {
    AuditError::Failed("the audit store thread stopped".into())
}

impl Applier {
    pub(crate) fn start(
        store: Store,
        key: Option<SigningKey>,
        retention: RetentionPolicy,
        shared: Arc<dyn Progress>,
    ) -> Result<Applier, AuditError> {
        let handoff = Arc::new(Handoff {
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                backlog: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            room: Condvar::new(),
        });
        let mut worker = Worker {
            store,
            key,
            retention,
            shared,
            summaries: HashMap::new(),
            index_stale: false,
            synced_blobs: HashSet::new(),
            failed: None,
        };
        let h = handoff.clone();
        let thread = std::thread::Builder::new()
            .name("audit-store".into())
            .spawn(move || worker.run(&h))
            .map_err(|e| AuditError::Store(format!("cannot start audit store thread: {e}")))?;
        Ok(Applier {
            handoff,
            thread: Some(thread),
        })
    }

    /// Queues a job (one lock and at most one wake-up). An `Apply` waits while the store
    /// thread is more than [`MAX_BACKLOG`] records behind.
    pub(crate) fn send(&self, job: StoreJob) -> Result<(), AuditError> {
        let mut q = self.handoff.queue.lock().map_err(|_| stopped())?;
        if let StoreJob::Apply { records, .. } = &job {
            while q.backlog > MAX_BACKLOG && !q.shutdown {
                q = self.handoff.room.wait(q).map_err(|_| stopped())?;
            }
            q.backlog += records.len();
        }
        if q.shutdown {
            return Err(stopped());
        }
        q.jobs.push(job);
        drop(q);
        self.handoff.wake.notify_one();
        Ok(())
    }

    /// Waits until every job queued before has been done; the first failure, if any.
    pub(crate) fn drain(&self) -> Result<(), AuditError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(StoreJob::Drain(tx))?;
        rx.recv().map_err(|_| stopped())?
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        if let Ok(mut q) = self.handoff.queue.lock() {
            q.shutdown = true;
        }
        self.handoff.wake.notify_all();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("audit store thread panicked");
        }
    }
}

struct Worker {
    store: Store,
    key: Option<SigningKey>,
    retention: RetentionPolicy,
    shared: Arc<dyn Progress>,
    /// Summaries of open sessions (see [`Store::index`]).
    summaries: HashMap<SessionId, SessionSummary>,
    /// The last index update failed: re-index from the log before the next one.
    index_stale: bool,
    synced_blobs: HashSet<PathBuf>,
    /// Set once sled could not be brought up to date; every later job fails with it.
    failed: Option<AuditError>,
}

impl Worker {
    fn run(&mut self, h: &Handoff) {
        loop {
            let jobs = {
                let Ok(mut q) = h.queue.lock() else {
                    self.fail(stopped());
                    return;
                };
                while q.jobs.is_empty() && !q.shutdown {
                    q = match h.wake.wait(q) {
                        Ok(q) => q,
                        Err(_) => {
                            self.fail(stopped());
                            return;
                        }
                    };
                }
                if q.jobs.is_empty() && q.shutdown {
                    return;
                }
                std::mem::take(&mut q.jobs)
            };
            self.run_jobs(jobs, h);
        }
    }

    /// Consecutive applies are merged into one sled batch per tree.
    fn run_jobs(&mut self, jobs: Vec<StoreJob>, h: &Handoff) {
        let mut pairs = Vec::new();
        let mut records = Vec::new();
        let mut head = None;
        for job in jobs {
            match job {
                StoreJob::Apply {
                    pairs: p,
                    records: r,
                    head: h,
                } => {
                    head = h.or(head);
                    if pairs.is_empty() {
                        pairs = p;
                    } else {
                        pairs.extend(p);
                    }
                    if records.is_empty() {
                        records = r;
                    } else {
                        records.extend(r);
                    }
                }
                other => {
                    self.apply(&mut pairs, &mut records, head.take(), h);
                    self.other(other);
                }
            }
        }
        self.apply(&mut pairs, &mut records, head, h);
    }

    fn apply(
        &mut self,
        pairs: &mut Vec<(Vec<u8>, Vec<u8>)>,
        records: &mut Vec<Record>,
        head: Option<Mark>,
        h: &Handoff,
    ) {
        if records.is_empty() && pairs.is_empty() {
            return;
        }
        let n = records.len();
        if self.failed.is_none() {
            let batch = super::block::fold_pairs(pairs.iter());
            pairs.clear();
            // Records, head and checkpoint of many commits appear together or not at all.
            match self.store.log.apply_batch(batch) {
                Ok(()) => {
                    if head.is_some() {
                        self.shared.visible(head);
                    }
                    self.index(records);
                }
                Err(e) => self.fail(e.into()),
            }
        }
        pairs.clear();
        records.clear();
        if let Ok(mut q) = h.queue.lock() {
            q.backlog = q.backlog.saturating_sub(n);
        }
        h.room.notify_all();
    }

    fn index(&mut self, records: &[Record]) {
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

    fn other(&mut self, job: StoreJob) {
        match job {
            StoreJob::Apply { .. } => {}
            StoreJob::Sync { upto } => {
                if self.failed.is_none() {
                    let r = self
                        .store
                        .sync(&mut self.synced_blobs)
                        .and_then(|()| wal::remove_upto(self.store.dir(), upto));
                    if let Err(e) = r {
                        self.fail(e);
                    }
                }
            }
            StoreJob::Visible(w) => {
                let _ = w.send(self.status());
            }
            StoreJob::Drain(tx) => {
                let _ = tx.send(self.status());
            }
            StoreJob::Retain { last, reply } => {
                let r = self.status().and_then(|()| self.retain(last));
                match reply {
                    Some(tx) => {
                        let _ = tx.send(r);
                    }
                    None => match r {
                        Ok(r) if r.removed_records > 0 => tracing::info!(
                            removed_records = r.removed_records,
                            removed_sessions = r.removed_sessions,
                            "audit retention applied"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "audit retention failed"),
                    },
                }
            }
        }
    }

    fn retain(&mut self, last: Option<RecordId>) -> Result<RetentionReport, AuditError> {
        // Retention rewrites summaries; read them back from the store afterwards.
        self.summaries.clear();
        retention::apply(
            &self.store,
            self.key.as_ref(),
            &self.retention,
            last,
            Timestamp::now(),
            &mut self.synced_blobs,
        )
    }

    fn status(&self) -> Result<(), AuditError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// sled could not take what was committed: appends stop (fail closed), as after a failed
    /// commit. The records stay in the write-ahead segments, which are then never deleted.
    fn fail(&mut self, e: AuditError) {
        tracing::error!(error = %e, "audit store update failed; refusing further appends");
        self.shared.fail(&e.to_string());
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }
}
