//! Tail and store integrity: the log compared with the head-mark file ([`super::headmark`]),
//! checked by `audit verify` and before the daemon extends the chain.
//!
//! The daemon refuses to start when the store is empty but the mark says records were
//! committed (a wiped or replaced store), when the log ends before the marked head or its
//! record there has another hash (a lost or rewritten tail), or when `verify` rejects the store
//! (deleted, edited or inserted records). `--accept-audit-gap` starts anyway and appends an
//! [`AuditGap`] record saying what was accepted; problems at or before an accepted gap do not
//! stop later starts.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::AuditError;
use super::chain;
use super::config::AuditConfig;
use super::headmark::{self, Read};
use super::record::{AuditEvent, RecordId};
use super::signing::Mark;
use super::store::{Store, Stored};
use super::verify::{self, Problem, VerifyMode, VerifyReport};

use super::record::AuditGap;

/// The head-mark file of `cfg`'s store.
pub(crate) fn head_mark_path(cfg: &AuditConfig) -> PathBuf {
    cfg.head_mark
        .clone()
        .unwrap_or_else(|| headmark::default_path(&cfg.dir))
}

fn problem(seq: Option<RecordId>, message: String) -> Problem {
    Problem {
        seq,
        key: seq
            .map(|s| hex::encode(chain::record_key(s)))
            .unwrap_or_default(),
        message,
    }
}

/// Adds to `report` what the head-mark file at `path` says is missing or different.
pub(crate) fn compare_with_head_mark(
    report: &mut VerifyReport,
    store: &Store,
    path: &Path,
    key: Option<&VerifyingKey>,
) -> Result<(), AuditError> {
    let mark = match headmark::read(path)? {
        Read::Mark(m) => m,
        Read::Missing => {
            if report.last.is_some() {
                report.warnings.push(format!(
                    "no head-mark file at {}: a lost tail of the log cannot be detected",
                    path.display()
                ));
            }
            return Ok(());
        }
        Read::Damaged => {
            report.problems.push(problem(
                None,
                format!(
                    "head-mark file {} is damaged (both slots invalid)",
                    path.display()
                ),
            ));
            report.ok = false;
            return Ok(());
        }
    };
    let before = report.problems.len();
    if let Some(k) = key
        && let Err(e) = mark.verify(k)
    {
        report.problems.push(problem(
            Some(mark.seq),
            format!("head-mark file {}: {e}", path.display()),
        ));
    }
    check_against(report, store, &mark)?;
    if report.problems.len() > before {
        report.ok = false;
    }
    Ok(())
}

fn check_against(report: &mut VerifyReport, store: &Store, mark: &Mark) -> Result<(), AuditError> {
    let first_missing = match report.last {
        None => store.base()?.map_or(RecordId(0), |b| b.seq),
        Some(l) => RecordId(l.0 + 1),
    };
    if report.last.is_none_or(|l| l < mark.seq) {
        let what = if report.last.is_none() {
            "the log is empty (store wiped or replaced)"
        } else {
            "the tail of the log is gone (lost write-ahead tail or deleted records)"
        };
        let range = if first_missing == mark.seq {
            format!("record {}", mark.seq)
        } else {
            format!("records {first_missing} to {}", mark.seq)
        };
        report.problems.push(problem(
            Some(first_missing),
            format!(
                "{range} missing: the head-mark file says {} was committed, but {what}",
                mark.seq
            ),
        ));
        return Ok(());
    }
    let hash = match store.scan(mark.seq).next().transpose()? {
        Some(Stored::Record { seq, stored }) if seq == mark.seq => {
            chain::split_stored(&stored).map(|s| s.hash)
        }
        _ => None,
    };
    if hash.is_none() || hash != mark.chain_hash() {
        report.problems.push(problem(
            Some(mark.seq),
            format!(
                "record {} does not match the head-mark file's hash (the tail was rewritten)",
                mark.seq
            ),
        ));
    }
    Ok(())
}

/// The start-up check: the whole store verified, then compared with the head-mark file.
/// Returns the problems not already accepted by an earlier [`AuditGap`] record.
pub(crate) fn check_at_start(
    store: &Store,
    cfg: &AuditConfig,
    key: Option<&VerifyingKey>,
) -> Result<(VerifyReport, Vec<Problem>), AuditError> {
    let started = std::time::Instant::now();
    let mut report = verify::verify(store, key, VerifyMode::Offline)?;
    compare_with_head_mark(&mut report, store, &head_mark_path(cfg), key)?;
    tracing::info!(
        records = report.records,
        ms = started.elapsed().as_millis() as u64,
        ok = report.ok,
        "audit: store verified against the head-mark file"
    );
    if report.ok {
        return Ok((report, Vec::new()));
    }
    let accepted = accepted_upto(store)?;
    let open = report
        .problems
        .iter()
        .filter(|p| !(p.seq.is_some() && p.seq <= accepted))
        .cloned()
        .collect();
    Ok((report, open))
}

/// The last record an [`AuditGap`] accepted (the store's last record when it was written).
fn accepted_upto(store: &Store) -> Result<Option<RecordId>, AuditError> {
    let mut upto = None;
    for item in store.scan(RecordId(0)) {
        if let Stored::Record { stored, .. } = item?
            && let Some((_, rec)) = chain::decode_record(&stored)
            && let AuditEvent::AuditGap(_) = rec.event
        {
            upto = Some(rec.seq);
        }
    }
    Ok(upto)
}

/// The error the daemon stops with when problems remain and no gap was accepted.
pub(crate) fn refusal(problems: &[Problem], path: &Path) -> AuditError {
    let mut lines: Vec<String> = problems.iter().take(5).map(|p| p.message.clone()).collect();
    if problems.len() > 5 {
        lines.push(format!("... and {} more", problems.len() - 5));
    }
    AuditError::Inconsistent(format!(
        "{} (head-mark file {}). Inspect with `interceptor audit verify`; to continue the chain \
         over the loss, start once with --accept-audit-gap (recorded as an audit_gap record)",
        lines.join("; "),
        path.display()
    ))
}

/// The record appended when the operator accepted the problems.
pub(crate) fn gap_event(problems: &[Problem], report: &VerifyReport, path: &Path) -> AuditEvent {
    let expected_head = match headmark::read(path) {
        Ok(Read::Mark(m)) => Some(m.seq),
        _ => None,
    };
    AuditEvent::AuditGap(AuditGap {
        problems: problems.iter().map(|p| p.message.clone()).collect(),
        expected_head,
        found_last: report.last,
    })
}

/// Refuses a store whose start-up check found problems, or records the operator's acceptance
/// of them as an `audit_gap` record (durable before anything is served).
pub(crate) fn settle(
    log: &super::AuditLog,
    cfg: &AuditConfig,
    (report, problems): (VerifyReport, Vec<Problem>),
) -> Result<(), AuditError> {
    if problems.is_empty() {
        return Ok(());
    }
    let path = head_mark_path(cfg);
    if !cfg.accept_gap {
        return Err(refusal(&problems, &path));
    }
    for p in &problems {
        tracing::warn!(
            problem = p.message,
            "audit: continuing over an accepted gap"
        );
    }
    let event = gap_event(&problems, &report, &path);
    let (tx, rx) = tokio::sync::oneshot::channel();
    log.inner.shared.push(event, Some(tx))?;
    // Called from inside the runtime at start-up: wait on a plain thread.
    std::thread::spawn(move || rx.blocking_recv())
        .join()
        .map_err(|_| AuditError::Closed)?
        .unwrap_or(Err(AuditError::Closed))
}
