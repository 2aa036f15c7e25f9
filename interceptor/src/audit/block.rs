//! Record blocks: the `log` tree holds committed records in blocks, one sled entry per run of
//! records applied together rather than one per record.
//!
//! sled's cost is per entry (a node update, its serialisation, an allocation or two, its share
//! of every later consolidation), and the store thread applies thousands of records per batch;
//! one entry per block divides that cost by the records in a block. Blocks are small enough that
//! a whole leaf of them stays below sled's blob threshold: sled splits a leaf once it holds more
//! than 16 entries, and writes a page image over a quarter of its 512 KiB segment as a file of
//! its own (created, written, later unlinked, at every consolidation of that page). With 16 KiB
//! blocks a full leaf was 272 KiB, and those files cost a busy proxy more than its records.
//!
//! A block's value is a version byte, then entries `seq (u64 BE) || len (u32 BE) || stored`,
//! where `stored` is the chain's stored form of the record ([`super::chain::seal`]), byte for
//! byte. Each entry carries its own sequence number, so a removed entry is a gap in the
//! sequence, exactly as a removed record was when records had keys of their own. The key is
//! `BLOCK_PREFIX || seq of the block's first entry (u64 BE)`, so blocks sort in chain order and
//! the block holding a record is the last one whose key is at or before it.

use super::chain::{self, RECORD_PREFIX};
use super::record::RecordId;

pub(super) const BLOCK_PREFIX: u8 = b'b';
/// A block holds at most this many bytes, unless one record alone is larger (records are a few
/// hundred bytes each). 17 entries of this size (a full sled leaf) stay under sled's 128 KiB
/// blob threshold.
pub(super) const MAX_BLOCK_BYTES: usize = 6 * 1024;
const VERSION: u8 = 1;
const ENTRY_HEADER: usize = 8 + 4;

pub(super) fn block_key(first: RecordId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = BLOCK_PREFIX;
    k[1..].copy_from_slice(&first.0.to_be_bytes());
    k
}

/// Accumulates consecutive stored records into one block.
#[derive(Default)]
pub(super) struct BlockBuilder {
    first: Option<RecordId>,
    last: Option<RecordId>,
    buf: Vec<u8>,
}

impl BlockBuilder {
    /// Whether `seq` would not continue this block (a block holds one run of sequence
    /// numbers, so that finding a record by its block key stays exact).
    pub(super) fn breaks_run(&self, seq: RecordId) -> bool {
        self.last.is_some_and(|l| l.0.checked_add(1) != Some(seq.0))
    }

    /// Whether `len` more stored bytes would take a non-empty block over its size.
    fn would_overflow(&self, len: usize) -> bool {
        !self.buf.is_empty() && self.buf.len() + ENTRY_HEADER + len > MAX_BLOCK_BYTES
    }

    pub(super) fn push(&mut self, seq: RecordId, stored: &[u8]) {
        if self.first.is_none() {
            self.first = Some(seq);
            self.buf.reserve(1 + ENTRY_HEADER + stored.len());
            self.buf.push(VERSION);
        }
        self.last = Some(seq);
        self.buf.extend_from_slice(&seq.0.to_be_bytes());
        // A stored record is bounded far below 4 GiB by the writer's record size limit.
        self.buf
            .extend_from_slice(&(stored.len().min(u32::MAX as usize) as u32).to_be_bytes());
        self.buf.extend_from_slice(stored);
    }

    /// Adds a record, first closing the current block (returned) if the record does not
    /// continue its run or would not fit.
    pub(super) fn push_closing(
        &mut self,
        seq: RecordId,
        stored: &[u8],
    ) -> Option<([u8; 9], Vec<u8>)> {
        let closed = if self.breaks_run(seq) || self.would_overflow(stored.len()) {
            self.take()
        } else {
            None
        };
        self.push(seq, stored);
        closed
    }

    /// The block's key and value, leaving the builder empty.
    pub(super) fn take(&mut self) -> Option<([u8; 9], Vec<u8>)> {
        let first = self.first.take()?;
        self.last = None;
        Some((block_key(first), std::mem::take(&mut self.buf)))
    }
}

/// A block's bytes did not parse from `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Malformed {
    pub offset: usize,
}

/// The entries of a block, in stored order: `(seq, stored record)`. Stops after the first
/// malformed entry.
pub(super) fn entries(value: &[u8]) -> Entries<'_> {
    Entries {
        value,
        offset: 0,
        done: false,
    }
}

pub(super) struct Entries<'a> {
    value: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(RecordId, &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let malformed = |this: &mut Self| {
            this.done = true;
            Some(Err(Malformed {
                offset: this.offset,
            }))
        };
        if self.offset == 0 {
            match self.value.first() {
                Some(&VERSION) => self.offset = 1,
                _ => return malformed(self),
            }
        }
        let rest = &self.value[self.offset..];
        if rest.is_empty() {
            self.done = true;
            return None;
        }
        let Some((header, body)) = rest.split_at_checked(ENTRY_HEADER) else {
            return malformed(self);
        };
        let seq = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[8..].try_into().unwrap_or_default()) as usize;
        let Some(stored) = body.get(..len) else {
            return malformed(self);
        };
        self.offset += ENTRY_HEADER + len;
        Some(Ok((RecordId(seq), stored)))
    }
}

/// Turns a group commit's pairs (records under their own keys, as the write-ahead frames
/// carry them, plus marks) into the batch the `log` tree stores: the records folded into
/// blocks, everything else as it is.
pub(super) fn fold_pairs<'a>(
    pairs: impl IntoIterator<Item = &'a (Vec<u8>, Vec<u8>)>,
) -> sled::Batch {
    let mut batch = sled::Batch::default();
    let mut block = BlockBuilder::default();
    for (k, v) in pairs {
        let seq = (k.first() == Some(&RECORD_PREFIX) && k.len() == 9)
            .then(|| chain::seq_of_key(k))
            .flatten();
        let Some(seq) = seq else {
            batch.insert(k.as_slice(), v.as_slice());
            continue;
        };
        if let Some((bk, bv)) = block.push_closing(seq, v) {
            batch.insert(&bk[..], bv);
        }
    }
    if let Some((bk, bv)) = block.take() {
        batch.insert(&bk[..], bv);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_stop_at_damage() {
        let mut b = BlockBuilder::default();
        b.push(RecordId(7), b"seven");
        assert!(!b.breaks_run(RecordId(8)));
        assert!(b.breaks_run(RecordId(9)));
        b.push(RecordId(8), b"");
        let (k, v) = b.take().expect("block");
        assert_eq!(k, block_key(RecordId(7)));
        assert!(b.take().is_none());
        let got: Vec<_> = entries(&v).collect();
        assert_eq!(
            got,
            vec![
                Ok((RecordId(7), &b"seven"[..])),
                Ok((RecordId(8), &b""[..]))
            ]
        );
        // Truncated inside the second entry's header, then inside the first's body.
        for cut in [v.len() - 3, 1 + ENTRY_HEADER + 2] {
            let got: Vec<_> = entries(&v[..cut]).collect();
            assert!(matches!(got.last(), Some(Err(_))), "cut at {cut}: {got:?}");
        }
        assert_eq!(
            entries(b"").collect::<Vec<_>>(),
            vec![Err(Malformed { offset: 0 })]
        );
        assert_eq!(entries(&[9u8]).next(), Some(Err(Malformed { offset: 0 })));
    }

    #[test]
    fn folding_groups_runs_and_keeps_other_keys() {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (chain::record_key(RecordId(1)).to_vec(), b"a".to_vec()),
            (chain::record_key(RecordId(2)).to_vec(), b"b".to_vec()),
            (chain::record_key(RecordId(4)).to_vec(), b"d".to_vec()),
            (b"m:head".to_vec(), b"head".to_vec()),
        ];
        let tree = sled::Config::new()
            .temporary(true)
            .open()
            .and_then(|db| db.open_tree("log"))
            .expect("sled");
        tree.apply_batch(fold_pairs(&pairs)).expect("apply");
        let keys: Vec<Vec<u8>> = tree
            .iter()
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect();
        assert_eq!(
            keys,
            vec![
                block_key(RecordId(1)).to_vec(),
                block_key(RecordId(4)).to_vec(),
                b"m:head".to_vec()
            ]
        );
        let first = tree.get(block_key(RecordId(1))).expect("get").expect("b1");
        let seqs: Vec<u64> = entries(&first).map(|e| e.expect("entry").0.0).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn a_block_closes_before_it_would_pass_its_size_bound() {
        // Three of these fill a block exactly (version byte and entry headers included).
        let third = vec![b'x'; MAX_BLOCK_BYTES / 3 - ENTRY_HEADER - 1];
        let oversized = vec![b'y'; MAX_BLOCK_BYTES + 1];
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..7)
            .map(|s| (chain::record_key(RecordId(s)).to_vec(), third.clone()))
            .collect();
        pairs.push((chain::record_key(RecordId(7)).to_vec(), oversized));
        pairs.push((chain::record_key(RecordId(8)).to_vec(), third.clone()));
        let tree = sled::Config::new()
            .temporary(true)
            .open()
            .and_then(|db| db.open_tree("log"))
            .expect("sled");
        tree.apply_batch(fold_pairs(&pairs)).expect("apply");
        let sizes: Vec<(u64, usize)> = tree
            .iter()
            .map(|e| {
                let (_, v) = e.expect("entry");
                (entries(&v).count() as u64, v.len())
            })
            .collect();
        // 3 + 3 + 1, the oversized record alone, then the last one.
        let counts: Vec<u64> = sizes.iter().map(|s| s.0).collect();
        assert_eq!(counts, vec![3, 3, 1, 1, 1]);
        for (n, len) in &sizes {
            assert!(
                *n == 1 || *len <= MAX_BLOCK_BYTES,
                "{n} records in {len} bytes"
            );
        }
    }
}
