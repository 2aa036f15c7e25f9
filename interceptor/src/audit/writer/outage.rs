//! A write failure the writer retries: the audit disk full (ENOSPC), or another I/O error while
//! writing the write-ahead segment or the head mark.
//!
//! While the trail cannot be written:
//! * statements and new sessions are refused with the error they always got (a statement
//!   record, anything that waits for durability and every barrier fail); records of what has
//!   already happened (outcomes, result rows, session ends, approvals, reloads, kernel events)
//!   are queued as usual, up to the queue's cap, and written once the trail is writable again;
//! * the records of the failed commit, and those queued behind it, are kept in order and
//!   written first, in one frame, after what the failed write left of its frame is cut off: the
//!   chain has no hole and the segment stays parseable. Their sessions were refused, so each
//!   statement record among them is followed by an outcome saying it did not run, and each
//!   session start by a session end saying the session was refused;
//! * the retry backs off from [`FIRST_RETRY`] to [`MAX_RETRY`]; `/readyz` is not ready and
//!   `interceptor_audit_unwritable` is 1 (both read the queue's failure), and a log line marks
//!   entering and leaving the state.
//!
//! Not retried (the log stops for good, as before): sled failing (it latches its own I/O errors
//! until reopened, so a restart is needed; the records are in the write-ahead segments), a
//! failed background `fdatasync` (of a segment with `durability = "write"`, or of the head-mark
//! file: the kernel may have dropped pages already acknowledged), a record that cannot be encoded, an inconsistent chain. So that a
//! filling disk meets a write-ahead commit (retried) before sled (not retried), sled is handed
//! records and synced only while the disk has room for it ([`Writer::store_has_room`]); a disk
//! filled by someone else in the moment between that check and sled's write still stops it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::super::applier::Applier;
use super::super::record::{AuditEvent, Record, SessionEnd, StatementOutcome};
use super::{AuditError, Job, Shared, Writer};

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How often a still unwritable trail is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Free space sled's flush may need beyond twice the records it brings up to date (its log
/// segments are allocated whole).
const SYNC_MARGIN: u64 = 8 * 1024 * 1024;
/// What a refused statement's follow-up outcome says.
const NOT_RUN: &str = "not run: the audit trail could not be written";
const SQLSTATE_IO_ERROR: &str = "58030";

#[derive(Default)]
pub(super) struct State {
    current: Option<Outage>,
    /// sled's sync is being put off for lack of space (logged once per episode).
    sync_deferred: bool,
}

impl State {
    pub(super) fn active(&self) -> bool {
        self.current.is_some()
    }
}

struct Outage {
    since: Instant,
    /// What `/readyz`, refused appends and barriers say.
    message: String,
    /// Records of the failed commit and those queued behind it, in sequence order.
    held: Vec<Record>,
    /// Length of the write-ahead segment before the failed frame.
    good_len: u64,
    attempts: u32,
    next_try: Instant,
    last_report: Instant,
}

/// Whether an append is queued while the trail is unwritable: only a record of something that
/// already happened, never one that lets something happen.
pub(super) fn admits(outage: bool, event: &AuditEvent, waits: bool) -> bool {
    outage
        && !waits
        && !matches!(
            event,
            AuditEvent::Statement(_) | AuditEvent::SessionStart(_)
        )
}

/// Failures a later attempt can get past: I/O on the write-ahead segment or the head mark.
fn recoverable(e: &AuditError) -> bool {
    matches!(e, AuditError::Io { .. })
}

impl Writer {
    /// A commit failed with `e`; `records` were its records, `good_len` the segment's length
    /// before its frame.
    pub(super) fn commit_failed(
        &mut self,
        shared: &Shared,
        e: AuditError,
        records: Vec<Record>,
        good_len: u64,
    ) {
        if !recoverable(&e) {
            tracing::error!(error = %e, "audit commit failed; refusing further appends");
            shared.fail(&e.to_string());
            return;
        }
        self.enter_outage(shared, e, records, good_len);
    }

    /// A background step (head-mark sync, a new segment) failed.
    pub(super) fn background_failed(&mut self, shared: &Shared, e: AuditError) {
        if !recoverable(&e) {
            tracing::error!(error = %e, "audit sync failed; refusing further appends");
            shared.fail(&e.to_string());
            return;
        }
        let good_len = self.wal.len();
        self.enter_outage(shared, e, Vec::new(), good_len);
    }

    fn enter_outage(
        &mut self,
        shared: &Shared,
        e: AuditError,
        mut held: Vec<Record>,
        good_len: u64,
    ) {
        let message = format!("the audit trail cannot be written (retrying): {e}");
        {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            if q.failed.is_some() && !q.outage {
                // Stopped for good meanwhile (the store thread failed).
                return;
            }
            q.failed = Some(message.clone());
            q.outage = true;
            // Queued behind the failed batch: their sessions' barriers fail from now on, so
            // they are refused like the batch's own; kept with it, in order.
            for p in q.pending.drain(..) {
                if let Some(w) = p.waiter {
                    let _ = w.send(Err(AuditError::Failed(message.clone())));
                }
                held.push(Record {
                    seq: p.seq,
                    at: p.at,
                    event: p.event,
                });
            }
        }
        // The writer thread may sleep for long; the outage is its to ride out.
        shared.wake.notify_all();
        tracing::error!(
            error = %e,
            held = held.len(),
            "audit trail unwritable: refusing statements and new sessions until it can be \
             written again (retrying)"
        );
        let now = Instant::now();
        self.outage.current = Some(Outage {
            since: now,
            message,
            held,
            good_len,
            attempts: 0,
            next_try: now + FIRST_RETRY,
            last_report: now,
        });
    }

    /// One round of an outage, on the writer thread: waits until the next attempt is due (or a
    /// job or the shutdown arrives) without holding the writer lock, so callers committing on
    /// their own thread are refused at once rather than blocked; refuses the jobs; then, under
    /// the writer lock, makes the attempt. The run loop calls it until the outage is over.
    pub(super) fn ride_out(shared: &Shared, applier: &Applier) {
        let (next_try, message) = match shared.writer.lock() {
            Ok(w) => match &w.outage.current {
                Some(o) => (o.next_try, o.message.clone()),
                None => return,
            },
            Err(_) => return,
        };
        let (jobs, shutdown, stopped) = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            loop {
                let left = next_try.saturating_duration_since(Instant::now());
                if !q.jobs.is_empty() || q.shutdown || !q.outage || left.is_zero() {
                    break;
                }
                q.idle = true;
                q.deaf = false;
                let Ok((guard, _)) = shared.wake.wait_timeout(q, left) else {
                    return;
                };
                q = guard;
                q.idle = false;
            }
            (std::mem::take(&mut q.jobs), q.shutdown, !q.outage)
        };
        for job in jobs {
            refuse(job, &message);
        }
        let Ok(mut w) = shared.writer.lock() else {
            return;
        };
        if stopped {
            let lost = w.outage.current.take().map_or(0, |o| o.held.len());
            tracing::error!(
                lost,
                "audit log stopped for good during an outage; the records of the failed commit \
                 are not written"
            );
            return;
        }
        if !shutdown && Instant::now() < next_try {
            return;
        }
        match w.try_recover(shared, applier) {
            Ok(()) => {}
            Err(e) if shutdown => {
                let lost = w.outage.current.take().map_or(0, |o| o.held.len());
                tracing::error!(
                    error = %e,
                    lost,
                    "audit trail still unwritable at shutdown; records not written"
                );
                shared.fail(&e.to_string());
            }
            Err(e) => {
                if let Some(o) = w.outage.current.as_mut() {
                    o.attempts = o.attempts.saturating_add(1);
                    let backoff = FIRST_RETRY
                        .saturating_mul(1u32 << o.attempts.min(8))
                        .min(MAX_RETRY);
                    o.next_try = Instant::now() + backoff;
                    if o.last_report.elapsed() >= REPORT_EVERY {
                        o.last_report = Instant::now();
                        tracing::error!(
                            error = %e,
                            unwritable_secs = o.since.elapsed().as_secs(),
                            "audit trail still unwritable; statements are refused"
                        );
                    }
                }
            }
        }
    }

    /// One attempt: cut the segment back to before the failed frame and write the held
    /// records again (or, with none, redo the background step that failed).
    fn try_recover(&mut self, shared: &Shared, applier: &Applier) -> Result<(), AuditError> {
        let Some(o) = self.outage.current.as_mut() else {
            return Ok(());
        };
        let good_len = o.good_len;
        let held = std::mem::take(&mut o.held);
        let r = self.wal.truncate(good_len).and_then(|()| {
            if held.is_empty() {
                // The periodic fdatasyncs it defers run here (the outage holds the lock
                // anyway); their failure is not retried, as elsewhere.
                self.background_step(shared, applier, false)?;
                for file in std::mem::take(&mut self.deferred) {
                    file.sync_data().map_err(|e| {
                        AuditError::Failed(format!("audit write-ahead sync failed: {e}"))
                    })?;
                }
                Ok(())
            } else {
                let started = Instant::now();
                let r = self.commit(&held);
                crate::metrics::audit_commit(started.elapsed());
                r
            }
        });
        if let Err(e) = r {
            if let Some(o) = self.outage.current.as_mut() {
                o.held = held;
            }
            return Err(e);
        }
        let Some(o) = self.outage.current.take() else {
            return Ok(());
        };
        let follow_ups: Vec<AuditEvent> = held.iter().filter_map(follow_up).collect();
        let written = held.len();
        if !held.is_empty() {
            shared
                .syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut h) = shared.committed.lock() {
                *h = self.head.clone();
            }
            self.unapplied.extend(held);
        }
        let resumed = match shared.queue.lock() {
            Ok(mut q) if q.outage => {
                q.outage = false;
                q.failed = None;
                true
            }
            _ => false,
        };
        if !resumed {
            return Ok(());
        }
        tracing::info!(
            unwritable_ms = o.since.elapsed().as_millis() as u64,
            written,
            refused = follow_ups.len(),
            "audit trail writable again; statements are accepted"
        );
        for event in follow_ups {
            if let Err(e) = shared.push(event, None) {
                tracing::error!(error = %e, "audit: cannot record a refused statement's outcome");
            }
        }
        Ok(())
    }

    /// Whether the audit disk has room for sled to take and flush what the current segment
    /// holds. sled latches its own I/O errors (it must be reopened, i.e. the daemon restarted),
    /// so it is handed records and synced only while there is room; meanwhile the segments keep
    /// them (and a full disk meets a write-ahead commit, which recovers). The records kept back
    /// are bounded by the free space left: once it is gone, commits fail.
    pub(super) fn store_has_room(&mut self) -> bool {
        let need = self.wal.len().saturating_mul(2).saturating_add(SYNC_MARGIN);
        match free_bytes(self.store.dir()) {
            Some(free) if free < need => {
                if !self.outage.sync_deferred {
                    tracing::warn!(
                        free,
                        need,
                        "audit disk nearly full: the store (sled) is not updated until there is \
                         room (the write-ahead segments keep the records meanwhile)"
                    );
                    self.outage.sync_deferred = true;
                }
                false
            }
            _ => {
                if std::mem::take(&mut self.outage.sync_deferred) {
                    tracing::info!("audit disk has room again: the store is updated again");
                }
                true
            }
        }
    }
}

/// Answers a job that arrived while the trail is unwritable.
fn refuse(job: Job, message: &str) {
    let e = || AuditError::Failed(message.to_owned());
    match job {
        Job::Barrier(w) | Job::IndexBarrier(w) => {
            let _ = w.send(Err(e()));
        }
        Job::Retention(tx) => {
            let _ = tx.send(Err(e()));
        }
    }
}

/// The record that says a held record's statement or session did not go ahead.
fn follow_up(r: &Record) -> Option<AuditEvent> {
    match &r.event {
        AuditEvent::Statement(s) => Some(AuditEvent::Outcome(StatementOutcome {
            session: s.session,
            statement: r.seq,
            command_tags: Vec::new(),
            rows: None,
            skipped: true,
            sqlstate: Some(SQLSTATE_IO_ERROR.to_owned()),
            error_message: Some(NOT_RUN.to_owned()),
            duration_us: 0,
            masking: Default::default(),
            result: None,
        })),
        AuditEvent::SessionStart(s) => Some(AuditEvent::SessionEnd(SessionEnd {
            session: s.session,
            bytes_from_client: 0,
            bytes_to_client: 0,
            statements: 0,
            reason: "refused: the audit trail could not be written".to_owned(),
        })),
        _ => None,
    }
}

/// Bytes an unprivileged writer may still allocate on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `st` is written by statvfs on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // Both are u64 on the 64-bit targets interceptor ships for.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_of_the_past_are_queued_during_an_outage() {
        use crate::audit::record::{PolicyReload, SessionId};
        let end = AuditEvent::SessionEnd(SessionEnd {
            session: SessionId(1),
            bytes_from_client: 0,
            bytes_to_client: 0,
            statements: 0,
            reason: "x".into(),
        });
        let reload = AuditEvent::PolicyReload(PolicyReload {
            version: "v".into(),
            files: vec![],
            ok: true,
            error: None,
        });
        assert!(admits(true, &end, false));
        assert!(admits(true, &reload, false));
        assert!(
            !admits(true, &end, true),
            "nothing that waits for durability"
        );
        assert!(
            !admits(false, &end, false),
            "a permanent failure admits nothing"
        );
    }

    #[test]
    fn free_bytes_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some());
        assert!(free_bytes(&dir.path().join("missing")).is_none());
    }
}
