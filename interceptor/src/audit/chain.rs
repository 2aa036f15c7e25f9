//! The hash chain: how a record is stored and linked to its predecessor.
//!
//! A stored record is `sha256(prev_hash || body) || body`, where `body` is the record's encoding
//! ([`body`]: compact binary for statements and outcomes, JSON otherwise) exactly as written. Hashing the stored bytes (not a re-serialization) makes the
//! stored bytes the canonical form, so verification never depends on serializer details.

use sha2::{Digest, Sha256};

use super::body;
use super::record::{Record, RecordId};

pub(crate) const HASH_LEN: usize = 32;

/// A SHA-256 chain hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainHash(pub [u8; HASH_LEN]);

impl ChainHash {
    /// The predecessor of record 0.
    pub(crate) const GENESIS: ChainHash = ChainHash([0u8; HASH_LEN]);

    pub(crate) fn link(prev: &ChainHash, body: &[u8]) -> ChainHash {
        let mut h = Sha256::new();
        h.update(prev.0);
        h.update(body);
        ChainHash(h.finalize().into())
    }

    pub(crate) fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_hex(s: &str) -> Option<ChainHash> {
        let bytes = hex::decode(s).ok()?;
        let arr: [u8; HASH_LEN] = bytes.try_into().ok()?;
        Some(ChainHash(arr))
    }

    pub(crate) fn from_slice(b: &[u8]) -> Option<ChainHash> {
        let arr: [u8; HASH_LEN] = b.try_into().ok()?;
        Some(ChainHash(arr))
    }
}

/// Key prefixes inside the `log` tree. Records and signed marks live in one tree so a group
/// commit (records + new head + checkpoint) is one atomic sled batch.
pub(crate) const RECORD_PREFIX: u8 = b'r';
pub(crate) const CHECKPOINT_PREFIX: u8 = b'c';
pub(crate) const HEAD_KEY: &[u8] = b"m:head";
pub(crate) const BASE_KEY: &[u8] = b"m:base";

pub(crate) fn record_key(seq: RecordId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RECORD_PREFIX;
    k[1..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

pub(crate) fn checkpoint_key(seq: RecordId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = CHECKPOINT_PREFIX;
    k[1..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

/// The sequence number in a record or checkpoint key, if the key is well-formed.
pub(crate) fn seq_of_key(key: &[u8]) -> Option<RecordId> {
    let arr: [u8; 8] = key.get(1..)?.try_into().ok()?;
    Some(RecordId(u64::from_be_bytes(arr)))
}

/// A stored record split into its parts (not yet checked).
pub(crate) struct StoredRecord<'a> {
    pub hash: ChainHash,
    pub body: &'a [u8],
}

pub(crate) fn split_stored(value: &[u8]) -> Option<StoredRecord<'_>> {
    if value.len() < HASH_LEN {
        return None;
    }
    let (h, body) = value.split_at(HASH_LEN);
    Some(StoredRecord {
        hash: ChainHash::from_slice(h)?,
        body,
    })
}

/// Encodes a record and links it; returns the stored bytes and the new chain hash.
pub(crate) fn seal(prev: &ChainHash, record: &Record) -> Result<(Vec<u8>, ChainHash), String> {
    // One buffer: the hash's place, then the body, then the hash over the body written in.
    let mut stored = Vec::with_capacity(HASH_LEN + 160);
    stored.resize(HASH_LEN, 0);
    body::encode(record, &mut stored)?;
    let hash = ChainHash::link(prev, &stored[HASH_LEN..]);
    stored[..HASH_LEN].copy_from_slice(&hash.0);
    Ok((stored, hash))
}

pub(crate) fn decode_record(value: &[u8]) -> Option<(ChainHash, Record)> {
    let s = split_stored(value)?;
    Some((s.hash, body::decode(s.body)?))
}
