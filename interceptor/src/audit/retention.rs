//! Retention: removes the oldest part of the log (whole sessions where possible) by age and by
//! size, leaving a signed base mark so `verify` starts the chain where the kept log starts.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::block::{self, BlockBuilder, block_key};
use super::chain::{self, BASE_KEY};
use super::config::AuditConfig;
use super::record::{RecordId, Timestamp};
use super::signing::{Mark, MarkKind};
use super::store::{Store, Stored, decode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetentionPolicy {
    pub max_age: Option<Duration>,
    /// Bound on the logical record bytes ([`super::Space::record_bytes`]).
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    pub(crate) fn from_config(cfg: &AuditConfig) -> RetentionPolicy {
        RetentionPolicy {
            max_age: (cfg.retention_days > 0)
                .then(|| Duration::from_secs(cfg.retention_days.saturating_mul(86_400))),
            max_bytes: (cfg.max_size_mib > 0).then(|| cfg.max_size_mib.saturating_mul(1 << 20)),
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.max_age.is_some() || self.max_bytes.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RetentionReport {
    pub removed_records: u64,
    pub removed_sessions: u64,
    /// First record kept (the new base), if anything was removed.
    pub new_start: Option<RecordId>,
    pub record_bytes_before: u64,
    pub record_bytes_after: u64,
}

/// Applies `policy` to the log whose last committed record is `last`. In the daemon it runs on
/// the store thread, the only writer of sled, so it never races an apply.
pub(crate) fn apply(
    store: &Store,
    key: Option<&SigningKey>,
    policy: &RetentionPolicy,
    last: Option<RecordId>,
    now: Timestamp,
    synced_blobs: &mut HashSet<PathBuf>,
) -> Result<RetentionReport, AuditError> {
    let before = store.space()?.record_bytes;
    let mut report = RetentionReport {
        removed_records: 0,
        removed_sessions: 0,
        new_start: None,
        record_bytes_before: before,
        record_bytes_after: before,
    };
    let Some(last) = last else {
        return Ok(report);
    };
    let start = store.base()?.map_or(RecordId(0), |b| b.seq);
    let end = RecordId(last.0 + 1);

    // Sizes and times of the kept records, oldest first.
    let mut entries: Vec<(RecordId, Timestamp, u64)> = Vec::new();
    for item in store.scan(start) {
        let item = item?;
        let size = match &item {
            Stored::Record { stored, .. } => stored.len(),
            Stored::Malformed { .. } => 0,
        };
        let (_, rec) = decode(item)?;
        if rec.seq > last {
            break;
        }
        entries.push((
            rec.seq,
            rec.at,
            (chain::record_key(rec.seq).len() + size) as u64,
        ));
    }

    let mut cut = start;
    if let Some(age) = policy.max_age {
        let cutoff = now.saturating_sub(age);
        cut = entries
            .iter()
            .find(|(_, at, _)| *at >= cutoff)
            .map_or(end, |(seq, _, _)| *seq);
        // Keep sessions that are still active after the cut whole.
        for s in store.all_sessions()? {
            if s.first_seq < cut && s.last_seq.is_some_and(|l| l >= cut) {
                cut = cut.min(s.first_seq.max(start));
            }
        }
    }
    if let Some(max) = policy.max_bytes {
        // Remove down to 90% of the bound so retention does not run on every commit.
        let target = max - max / 10;
        let mut kept: u64 = entries.iter().map(|e| e.2).sum();
        let mut size_cut = start;
        for (seq, _, size) in &entries {
            if kept <= target {
                break;
            }
            kept -= size;
            size_cut = RecordId(seq.0 + 1);
        }
        cut = cut.max(size_cut);
    }
    let cut = cut.min(end);
    if cut <= start {
        return Ok(report);
    }

    // 1. The signed base first: if we crash after it, verify ignores the leftover records
    //    below it and the next run deletes them.
    let prev_hash = match cut.0.checked_sub(1) {
        Some(p) => store
            .scan(RecordId(p))
            .next()
            .transpose()?
            .and_then(|item| match item {
                Stored::Record { seq, stored } if seq.0 == p => {
                    chain::split_stored(&stored).map(|s| s.hash)
                }
                _ => None,
            })
            .ok_or_else(|| AuditError::Corrupt(format!("record #{p} missing or malformed")))?,
        None => chain::ChainHash::GENESIS,
    };
    let base = Mark::new(MarkKind::Base, cut, prev_hash, key);
    store.log.insert(BASE_KEY, base.encode()?)?;
    store.sync(synced_blobs)?;

    // 2. Delete records, checkpoints and index entries below the cut.
    let mut batch = sled::Batch::default();
    // Blocks wholly below the cut go; the block the cut falls in is rewritten with the
    // records from the cut on, under the key of its new first record.
    for item in store
        .log
        .range(block_key(RecordId(0)).to_vec()..block_key(cut).to_vec())
    {
        let (k, v) = item?;
        let mut kept = BlockBuilder::default();
        for entry in block::entries(&v) {
            let Ok((seq, stored)) = entry else {
                return Err(AuditError::Corrupt(format!(
                    "malformed record block at key {}",
                    hex::encode(&k)
                )));
            };
            if seq < cut {
                report.removed_records += 1;
            } else {
                kept.push(seq, stored);
            }
        }
        batch.remove(k.clone());
        if let Some((nk, nv)) = kept.take() {
            batch.insert(&nk[..], nv);
        }
    }
    for item in store
        .log
        .range(vec![chain::CHECKPOINT_PREFIX]..chain::checkpoint_key(cut).to_vec())
    {
        let (k, _) = item?;
        batch.remove(k);
    }
    store.log.apply_batch(batch)?;

    let mut sessions = sled::Batch::default();
    let mut refs = sled::Batch::default();
    for s in store.all_sessions()? {
        if s.first_seq >= cut {
            continue;
        }
        let whole = s.last_seq.is_none_or(|l| l < cut);
        for (key, seqs) in store.session_ref_entries(s.session)? {
            let kept: Vec<RecordId> = seqs.iter().copied().filter(|q| *q >= cut).collect();
            if kept.len() == seqs.len() {
                continue;
            }
            refs.remove(key);
            if let Some(first) = kept.first() {
                let value: Vec<u8> = kept.iter().flat_map(|q| q.0.to_be_bytes()).collect();
                refs.insert(&super::store::session_record_key(s.session, *first), value);
            }
        }
        if whole {
            sessions.remove(&s.session.0.to_be_bytes());
            report.removed_sessions += 1;
        } else {
            let mut partial = s.clone();
            partial.first_seq = cut;
            let v = serde_json::to_vec(&partial).map_err(|e| AuditError::Encode(e.to_string()))?;
            sessions.insert(&s.session.0.to_be_bytes(), v);
        }
    }
    store.session_records.apply_batch(refs)?;
    store.sessions.apply_batch(sessions)?;
    store.sync(synced_blobs)?;

    report.new_start = Some(cut);
    report.record_bytes_after = store.space()?.record_bytes;
    Ok(report)
}
