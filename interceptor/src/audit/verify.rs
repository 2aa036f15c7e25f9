//! Verification of the whole log: the hash chain, the signed head, checkpoints and base.
//! Every finding names the record (sequence number) and the sled key it concerns.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::body;
use super::chain::{self, BASE_KEY, CHECKPOINT_PREFIX, ChainHash, HEAD_KEY, RECORD_PREFIX};
use super::record::RecordId;
use super::signing::Mark;
use super::store::{Store, Stored};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Problem {
    /// The record concerned (for a gap: the first missing one).
    pub seq: Option<RecordId>,
    /// The sled key in the `log` tree, hex.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VerifyReport {
    pub ok: bool,
    pub records: u64,
    pub first: Option<RecordId>,
    pub last: Option<RecordId>,
    pub checkpoints: u64,
    /// True when every mark's signature was checked against a public key.
    pub signatures_checked: bool,
    pub key_id: Option<String>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<String>,
}

/// How much of the log to check.
#[derive(Debug, Clone)]
pub(crate) enum VerifyMode {
    /// The store is closed (CLI): everything, including records after the head.
    Offline,
    /// The daemon is writing: check up to the head of its last completed commit.
    Live { head: Option<Mark> },
}

struct Checker<'a> {
    key: Option<&'a VerifyingKey>,
    report: VerifyReport,
}

impl Checker<'_> {
    fn problem(&mut self, seq: Option<RecordId>, key: &[u8], message: String) {
        self.report.problems.push(Problem {
            seq,
            key: hex::encode(key),
            message,
        });
    }

    fn check_signature(&mut self, mark: &Mark, key_bytes: &[u8], what: &str) {
        if let Some(k) = self.key
            && let Err(e) = mark.verify(k)
        {
            self.problem(
                Some(mark.seq),
                key_bytes,
                format!("{what} for record {}: {e}", mark.seq),
            );
        }
    }
}

pub(crate) fn verify(
    store: &Store,
    key: Option<&VerifyingKey>,
    mode: VerifyMode,
) -> Result<VerifyReport, AuditError> {
    let mut c = Checker {
        key,
        report: VerifyReport {
            ok: false,
            records: 0,
            first: None,
            last: None,
            checkpoints: 0,
            signatures_checked: key.is_some(),
            key_id: key.map(super::signing::key_id),
            problems: Vec::new(),
            warnings: Vec::new(),
        },
    };
    if key.is_none() {
        c.report.warnings.push(
            "no public key given: signatures not checked, only the hash chain (anyone able to \
             write the store could rewrite it consistently)"
                .into(),
        );
    }

    let read_mark = |c: &mut Checker, k: &[u8]| -> Result<Option<Mark>, AuditError> {
        match store.log.get(k)? {
            None => Ok(None),
            Some(v) => match Mark::decode(&v) {
                Some(m) => Ok(Some(m)),
                None => {
                    c.problem(None, k, "mark is not decodable (modified)".into());
                    Ok(None)
                }
            },
        }
    };

    let base = read_mark(&mut c, BASE_KEY)?;
    if let Some(b) = &base {
        c.check_signature(b, BASE_KEY, "base mark");
    }
    let head = match &mode {
        VerifyMode::Offline => read_mark(&mut c, HEAD_KEY)?,
        VerifyMode::Live { head } => head.clone(),
    };
    let limit = match &mode {
        VerifyMode::Offline => None,
        VerifyMode::Live { head } => Some(head.as_ref().map_or(RecordId(0), |h| h.seq)),
    };
    let live_empty = matches!(&mode, VerifyMode::Live { head: None });

    let mut checkpoints: BTreeMap<RecordId, (Vec<u8>, Mark)> = BTreeMap::new();
    for item in store.log.scan_prefix([CHECKPOINT_PREFIX]) {
        let (k, v) = item?;
        match (chain::seq_of_key(&k), Mark::decode(&v)) {
            (Some(seq), Some(m)) if seq == m.seq => {
                checkpoints.insert(seq, (k.to_vec(), m));
            }
            (seq, _) => c.problem(seq, &k, "checkpoint is malformed or moved".into()),
        }
    }
    c.report.checkpoints = checkpoints.len() as u64;

    let (start, mut prev) = match &base {
        None => (RecordId(0), Some(ChainHash::GENESIS)),
        Some(b) => (b.seq, b.chain_hash()),
    };
    let mut expected = start;
    let mut leftovers = 0u64;
    let mut last: Option<(RecordId, ChainHash, Vec<u8>)> = None;
    let mut hashes_at_checkpoints: BTreeMap<RecordId, ChainHash> = BTreeMap::new();

    if !live_empty {
        // Records live in blocks; anything under the old per-record prefix was put there by
        // hand (the store moves such records into blocks when it opens).
        for item in store.log.scan_prefix([RECORD_PREFIX]) {
            let (k, _) = item?;
            c.problem(
                chain::seq_of_key(&k).filter(|_| k.len() == 9),
                &k,
                "record stored outside the log's blocks (inserted)".into(),
            );
        }
        for item in store.scan(RecordId(0)) {
            let (seq, v) = match item? {
                Stored::Record { seq, stored } => (seq, stored),
                Stored::Malformed { key } => {
                    c.problem(None, &key, "malformed record block (modified)".into());
                    prev = None;
                    continue;
                }
            };
            let k = chain::record_key(seq);
            if limit.is_some_and(|l| seq > l) {
                break;
            }
            if seq < start {
                leftovers += 1;
                continue;
            }
            if seq < expected {
                // Blocks list their entries in chain order; an entry behind its predecessor
                // was moved or copied there.
                c.problem(
                    Some(seq),
                    &k,
                    format!("record {seq} appears again or out of order (moved or inserted)"),
                );
                prev = None;
                continue;
            }
            if seq > expected {
                let msg = if seq.0 == expected.0 + 1 {
                    format!("record {expected} is missing (deleted)")
                } else {
                    format!("records {expected} to #{} are missing (deleted)", seq.0 - 1)
                };
                c.problem(Some(expected), &chain::record_key(expected), msg);
                prev = None;
            }
            let Some(stored) = chain::split_stored(&v) else {
                c.problem(
                    Some(seq),
                    &k,
                    format!("record {seq} is truncated (modified)"),
                );
                prev = None;
                expected = RecordId(seq.0 + 1);
                continue;
            };
            match body::decode(stored.body) {
                None => c.problem(
                    Some(seq),
                    &k,
                    format!("record {seq} is not a valid record (modified)"),
                ),
                Some(r) if r.seq != seq => c.problem(
                    Some(seq),
                    &k,
                    format!(
                        "key of record {seq} holds record {} (reordered or moved)",
                        r.seq
                    ),
                ),
                Some(_) => {}
            }
            if let Some(p) = prev
                && ChainHash::link(&p, stored.body) != stored.hash
            {
                c.problem(
                    Some(seq),
                    &k,
                    format!(
                        "record {seq} does not match its chain hash (modified, inserted, or \
                         its predecessor was replaced)"
                    ),
                );
            }
            if checkpoints.contains_key(&seq) {
                hashes_at_checkpoints.insert(seq, stored.hash);
            }
            if c.report.first.is_none() {
                c.report.first = Some(seq);
            }
            c.report.records += 1;
            prev = Some(stored.hash);
            expected = RecordId(seq.0 + 1);
            last = Some((seq, stored.hash, k.to_vec()));
        }
    }
    if leftovers > 0 {
        c.report.warnings.push(format!(
            "{leftovers} records before the base {start} remain from an interrupted retention run"
        ));
    }
    c.report.last = last.as_ref().map(|l| l.0);

    // The head: the tail must end exactly where the signed head says.
    let last_seq = last.as_ref().map(|l| l.0);
    match (&head, &last) {
        (None, None) => {}
        (None, Some((seq, _, k))) => c.problem(
            Some(*seq),
            k,
            "no head mark: the end of the log cannot be checked (head deleted)".into(),
        ),
        (Some(h), _) => {
            c.check_signature(h, HEAD_KEY, "head mark");
            let end_is_base = last.is_none()
                && base
                    .as_ref()
                    .is_some_and(|b| b.seq.0 == h.seq.0 + 1 && b.hash == h.hash);
            match last_seq {
                _ if end_is_base => {}
                None => c.problem(
                    Some(h.seq),
                    &chain::record_key(h.seq),
                    format!(
                        "log truncated: the signed head covers record {} but no records remain",
                        h.seq
                    ),
                ),
                Some(l) if l < h.seq => c.problem(
                    Some(RecordId(l.0 + 1)),
                    &chain::record_key(RecordId(l.0 + 1)),
                    format!(
                        "log truncated: the signed head covers record {} but the log ends at {l}",
                        h.seq
                    ),
                ),
                Some(l) if l > h.seq => c.problem(
                    Some(RecordId(h.seq.0 + 1)),
                    &chain::record_key(RecordId(h.seq.0 + 1)),
                    format!(
                        "records #{} to {l} follow the signed head {} (inserted)",
                        h.seq.0 + 1,
                        h.seq
                    ),
                ),
                Some(_) => {
                    if let Some((seq, hash, k)) = &last
                        && h.chain_hash() != Some(*hash)
                    {
                        c.problem(
                            Some(*seq),
                            k,
                            format!("record {seq} does not match the signed head (modified)"),
                        );
                    }
                }
            }
        }
    }

    for (seq, (k, m)) in &checkpoints {
        c.check_signature(m, k, "checkpoint");
        if *seq < start {
            continue; // removed by retention; the base mark vouches for the new start
        }
        if limit.is_some_and(|l| *seq > l) {
            continue;
        }
        match hashes_at_checkpoints.get(seq) {
            Some(h) if m.chain_hash() == Some(*h) => {}
            Some(_) => c.problem(
                Some(*seq),
                &chain::record_key(*seq),
                format!("record {seq} does not match its signed checkpoint (modified)"),
            ),
            None if last_seq.is_none_or(|l| *seq > l) => c.problem(
                Some(*seq),
                &chain::record_key(*seq),
                format!(
                    "log truncated: checkpoint covers record {seq} but the log ends at {}",
                    last_seq.map_or("nothing".to_string(), |l| l.to_string())
                ),
            ),
            None => {} // already reported as missing
        }
    }

    c.report.ok = c.report.problems.is_empty();
    Ok(c.report)
}
