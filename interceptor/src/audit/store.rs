//! The sled store: the hash-chained `log` tree plus derived indexes, and real durability.
//!
//! Durability: sled's `flush()` writes with `sync_file_range` on Linux, which does not flush the
//! disk cache or file metadata (sled issue #1452), and it never syncs its `blobs/` files. After
//! every flush [`Store::sync`] therefore calls `fdatasync` on sled's log file `db`, `fsync` on
//! every blob file not yet synced, and `fsync` on the directories whose entries changed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AuditError;
use super::block::{self, BLOCK_PREFIX, BlockBuilder, block_key};
use super::chain::{self, BASE_KEY, CHECKPOINT_PREFIX, HEAD_KEY, RECORD_PREFIX};
use super::record::{AuditEvent, Peer, Record, RecordId, SessionId, Timestamp};
use super::signing::Mark;

/// Trees: `log` (records + marks, the tamper-evident part), `sessions` (session summaries),
/// `session_records` (session id ++ seq), `meta` (index bookkeeping).
#[derive(Clone)]
pub(crate) struct Store {
    dir: PathBuf,
    db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) sessions: sled::Tree,
    pub(crate) session_records: sled::Tree,
    pub(crate) meta: sled::Tree,
}

const INDEXED_UPTO: &[u8] = b"indexed_upto";
const SESSION_HWM: &[u8] = b"session_hwm";
const MAX_CACHED_SESSIONS: usize = 100_000;

/// What the index knows about a session (derived from its records; rebuilt if lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionSummary {
    pub session: SessionId,
    pub subject: Option<String>,
    pub display_name: Option<String>,
    /// How the identity was proven (`scram_sha256`, `oidc`, `client_certificate`, ...).
    pub proof: Option<String>,
    pub database: Option<String>,
    pub upstream_role: Option<String>,
    pub peer: Option<Peer>,
    /// The kernel-attested local process (`uid U pid P EXE`), when there was one.
    #[serde(default)]
    pub process: Option<String>,
    pub started_at: Option<Timestamp>,
    pub start_seq: Option<RecordId>,
    pub ended_at: Option<Timestamp>,
    pub end_seq: Option<RecordId>,
    pub end_reason: Option<String>,
    pub statements: u64,
    pub denied: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub first_seq: RecordId,
    /// Last record applied to this summary (makes re-indexing idempotent).
    pub last_seq: Option<RecordId>,
    pub last_at: Option<Timestamp>,
}

impl SessionSummary {
    fn new(session: SessionId, seq: RecordId) -> SessionSummary {
        SessionSummary {
            session,
            subject: None,
            display_name: None,
            proof: None,
            database: None,
            upstream_role: None,
            peer: None,
            process: None,
            started_at: None,
            start_seq: None,
            ended_at: None,
            end_seq: None,
            end_reason: None,
            statements: 0,
            denied: 0,
            bytes_from_client: 0,
            bytes_to_client: 0,
            first_seq: seq,
            last_seq: None,
            last_at: None,
        }
    }

    /// Folds one record in; records at or before `last_seq` were already applied.
    pub(crate) fn apply(&mut self, rec: &Record) {
        if self.last_seq.is_some_and(|l| rec.seq <= l) {
            return;
        }
        self.last_seq = Some(rec.seq);
        self.last_at = Some(rec.at);
        match &rec.event {
            AuditEvent::SessionStart(s) => {
                self.subject = Some(s.identity.subject.clone());
                self.display_name = Some(s.identity.display_name.clone());
                self.proof = serde_json::to_value(&s.identity.proof)
                    .ok()
                    .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(str::to_owned));
                self.database = Some(s.database.clone());
                self.upstream_role = Some(s.upstream_role.clone());
                self.peer = Some(s.peer.clone());
                self.process = s.identity.process.as_ref().map(|p| {
                    format!(
                        "uid {} pid {} {}",
                        p.uid,
                        p.pid,
                        p.exe.as_deref().unwrap_or(p.comm.as_str())
                    )
                });
                self.started_at = Some(rec.at);
                self.start_seq = Some(rec.seq);
            }
            AuditEvent::Statement(s) => {
                self.statements += 1;
                if s.decision.eq_ignore_ascii_case("deny") {
                    self.denied += 1;
                }
            }
            AuditEvent::SessionEnd(e) => {
                self.ended_at = Some(rec.at);
                self.end_seq = Some(rec.seq);
                self.end_reason = Some(e.reason.clone());
                self.bytes_from_client = e.bytes_from_client;
                self.bytes_to_client = e.bytes_to_client;
            }
            _ => {}
        }
    }
}

pub(crate) fn session_record_key(session: SessionId, seq: RecordId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&session.0.to_be_bytes());
    k[8..].copy_from_slice(&seq.0.to_be_bytes());
    k
}

fn u64_value(v: Option<sled::IVec>) -> Option<u64> {
    let arr: [u8; 8] = v?.as_ref().try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. Fails if another process holds it.
    pub(crate) fn open(dir: &Path) -> Result<Store, AuditError> {
        std::fs::create_dir_all(dir).map_err(|e| AuditError::io(dir, e))?;
        let db = open_db(dir)?;
        let tree = |name: &str| db.open_tree(name).map_err(AuditError::from);
        let store = Store {
            dir: dir.to_owned(),
            log: tree("log")?,
            sessions: tree("sessions")?,
            session_records: tree("session_records")?,
            meta: tree("meta")?,
            db,
        };
        store.fold_record_keys()?;
        store.replay_wal()?;
        Ok(store)
    }

    /// Moves records stored under keys of their own (stores written before records were kept
    /// in blocks) into blocks, byte for byte, so the chain verifies as before.
    fn fold_record_keys(&self) -> Result<(), AuditError> {
        let well_formed = |k: &sled::IVec| k.len() == 9;
        if !self
            .log
            .scan_prefix([RECORD_PREFIX])
            .keys()
            .any(|k| k.is_ok_and(|k| well_formed(&k)))
        {
            return Ok(());
        }
        let mut moved = 0u64;
        let mut batch = sled::Batch::default();
        let mut block = BlockBuilder::default();
        for item in self.log.scan_prefix([RECORD_PREFIX]) {
            let (k, v) = item?;
            // A malformed key stays where it is, for verification to report.
            let Some(seq) = chain::seq_of_key(&k).filter(|_| k.len() == 9) else {
                continue;
            };
            if let Some((bk, bv)) = block.push_closing(seq, &v) {
                batch.insert(&bk[..], bv);
            }
            batch.remove(k);
            moved += 1;
            if moved.is_multiple_of(64 * 1024) {
                if let Some((bk, bv)) = block.take() {
                    batch.insert(&bk[..], bv);
                }
                self.log.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        if let Some((bk, bv)) = block.take() {
            batch.insert(&bk[..], bv);
        }
        self.log.apply_batch(batch)?;
        self.sync(&mut HashSet::new())?;
        tracing::info!(
            records = moved,
            "audit: moved the store's records into blocks"
        );
        Ok(())
    }

    /// Applies group commits that reached the write-ahead segments but not sled's files (the
    /// process stopped before the background store sync), makes them durable in sled and
    /// deletes the segments. Frames sled already holds are skipped: re-applying an older frame
    /// would move the head mark back.
    fn replay_wal(&self) -> Result<(), AuditError> {
        let segments = super::wal::segments(&self.dir)?;
        let Some(&(last, _)) = segments.last() else {
            return Ok(());
        };
        let recovered = super::wal::recover(&self.dir)?;
        if recovered.discarded_bytes > 0 {
            tracing::warn!(
                bytes = recovered.discarded_bytes,
                "audit: ignored the torn or damaged tail of the write-ahead file (a commit \
                 interrupted before it was acknowledged)"
            );
        }
        let mut applied_upto = self.head()?.map(|h| h.seq.0);
        let mut applied = 0usize;
        for frame in recovered.frames {
            if applied_upto.is_some_and(|h| frame.first_seq <= h) {
                continue;
            }
            self.log.apply_batch(block::fold_pairs(&frame.pairs))?;
            applied += 1;
            applied_upto = self.head()?.map(|h| h.seq.0);
        }
        self.sync(&mut HashSet::new())?;
        super::wal::remove_upto(&self.dir, last)?;
        if applied > 0 {
            tracing::info!(
                commits = applied,
                "audit: recovered group commits from the write-ahead file"
            );
        }
        Ok(())
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes everything written so far durable (see the module docs for why sled's flush is
    /// not enough). `synced_blobs` remembers blob files already fsynced.
    pub(crate) fn sync(&self, synced_blobs: &mut HashSet<PathBuf>) -> Result<(), AuditError> {
        self.db.flush()?;
        let db_file = self.dir.join("db");
        File::open(&db_file)
            .and_then(|f| f.sync_data())
            .map_err(|e| AuditError::io(&db_file, e))?;
        let blobs = self.dir.join("blobs");
        let mut new_blob = false;
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut present = HashSet::new();
            for entry in entries {
                let path = entry.map_err(|e| AuditError::io(&blobs, e))?.path();
                if !synced_blobs.contains(&path) {
                    File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| AuditError::io(&path, e))?;
                    new_blob = true;
                }
                present.insert(path);
            }
            *synced_blobs = present;
        }
        if new_blob {
            sync_dir(&blobs)?;
        }
        Ok(())
    }

    /// Makes the directory entries of sled's files durable (once, at open).
    pub(crate) fn sync_dirs(&self) -> Result<(), AuditError> {
        sync_dir(&self.dir)?;
        let blobs = self.dir.join("blobs");
        if blobs.is_dir() {
            sync_dir(&blobs)?;
        }
        Ok(())
    }

    pub(crate) fn head(&self) -> Result<Option<Mark>, AuditError> {
        self.mark(HEAD_KEY)
    }

    pub(crate) fn base(&self) -> Result<Option<Mark>, AuditError> {
        self.mark(BASE_KEY)
    }

    fn mark(&self, key: &[u8]) -> Result<Option<Mark>, AuditError> {
        match self.log.get(key)? {
            None => Ok(None),
            Some(v) => Mark::decode(&v).map(Some).ok_or_else(|| {
                AuditError::Corrupt(format!("undecodable mark {}", String::from_utf8_lossy(key)))
            }),
        }
    }

    pub(crate) fn checkpoints(&self) -> Result<Vec<Mark>, AuditError> {
        let mut out = Vec::new();
        for item in self.log.scan_prefix([CHECKPOINT_PREFIX]) {
            let (k, v) = item?;
            let m = Mark::decode(&v).ok_or_else(|| {
                AuditError::Corrupt(format!("undecodable checkpoint at key {}", hex::encode(&k)))
            })?;
            out.push(m);
        }
        Ok(out)
    }

    /// The record `seq`, looked up in the block whose key is the last at or before it.
    pub(crate) fn record(&self, seq: RecordId) -> Result<Option<Record>, AuditError> {
        let Some((k, v)) = self
            .log
            .range(block_key(RecordId(0))..=block_key(seq))
            .next_back()
            .transpose()?
        else {
            return Ok(None);
        };
        for entry in block::entries(&v) {
            match entry {
                Ok((s, stored)) if s == seq => {
                    return decode(Stored::Record {
                        seq,
                        stored: stored.to_vec(),
                    })
                    .map(|(_, r)| Some(r));
                }
                Ok(_) => {}
                Err(_) => return decode(Stored::Malformed { key: k.to_vec() }).map(|_| None),
            }
        }
        Ok(None)
    }

    /// The stored records with `seq >= from`, in the log's order, and the blocks that did not
    /// parse where they lie (verification reports those; other readers fail on them).
    pub(crate) fn scan(&self, from: RecordId) -> Scan {
        let start = self
            .log
            .range(block_key(RecordId(0))..=block_key(from))
            .next_back()
            .and_then(|item| item.ok())
            .map_or_else(|| block_key(from).to_vec(), |(k, _)| k.to_vec());
        Scan {
            blocks: self.log.range(start..vec![BLOCK_PREFIX + 1]),
            pending: Vec::new().into_iter(),
            from,
        }
    }

    /// Records with `seq > after` (all if `None`), in order, at most `limit`.
    pub(crate) fn records_after(
        &self,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<(chain::ChainHash, Record)>, AuditError> {
        let from = match after {
            None => RecordId(0),
            Some(s) => match s.0.checked_add(1) {
                Some(n) => RecordId(n),
                None => return Ok(Vec::new()),
            },
        };
        self.scan(from)
            .take(limit)
            .map(|item| item.and_then(decode))
            .collect()
    }

    /// The last record in the log (by key).
    pub(crate) fn last_record(&self) -> Result<Option<(chain::ChainHash, Record)>, AuditError> {
        let last = self
            .log
            .range(vec![BLOCK_PREFIX]..vec![BLOCK_PREFIX + 1])
            .next_back()
            .transpose()?;
        let Some((k, v)) = last else {
            return Ok(None);
        };
        let mut found = None;
        for entry in block::entries(&v) {
            match entry {
                Ok((seq, stored)) => found = Some((seq, stored)),
                Err(_) => return decode(Stored::Malformed { key: k.to_vec() }).map(Some),
            }
        }
        found
            .map(|(seq, stored)| {
                decode(Stored::Record {
                    seq,
                    stored: stored.to_vec(),
                })
            })
            .transpose()
    }

    pub(crate) fn session_summary(
        &self,
        session: SessionId,
    ) -> Result<Option<SessionSummary>, AuditError> {
        match self.sessions.get(session.0.to_be_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| AuditError::Corrupt(format!("session index {session}: {e}"))),
        }
    }

    pub(crate) fn all_sessions(&self) -> Result<Vec<SessionSummary>, AuditError> {
        let mut out = Vec::new();
        for item in self.sessions.iter() {
            let (_, v) = item?;
            let s: SessionSummary = serde_json::from_slice(&v)
                .map_err(|e| AuditError::Corrupt(format!("session index: {e}")))?;
            out.push(s);
        }
        Ok(out)
    }

    /// Sequence numbers of a session's records, in order.
    pub(crate) fn session_seqs(&self, session: SessionId) -> Result<Vec<RecordId>, AuditError> {
        let mut out: Vec<RecordId> = self
            .session_ref_entries(session)?
            .into_iter()
            .flat_map(|(_, seqs)| seqs)
            .collect();
        // A batch re-indexed after a crash may list a record under a second key.
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The session's index entries: each key (session ++ first seq) with the sequence numbers
    /// it lists (one entry per session per applied batch; an empty value, as older stores
    /// wrote, lists the key's own seq).
    pub(crate) fn session_ref_entries(
        &self,
        session: SessionId,
    ) -> Result<Vec<(sled::IVec, Vec<RecordId>)>, AuditError> {
        let mut out = Vec::new();
        for item in self.session_records.scan_prefix(session.0.to_be_bytes()) {
            let (k, v) = item?;
            let seqs = if v.is_empty() {
                k.get(8..16)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(|b| vec![RecordId(u64::from_be_bytes(b))])
                    .unwrap_or_default()
            } else {
                v.chunks_exact(8)
                    .filter_map(|c| <[u8; 8]>::try_from(c).ok())
                    .map(|b| RecordId(u64::from_be_bytes(b)))
                    .collect()
            };
            out.push((k, seqs));
        }
        Ok(out)
    }

    pub(crate) fn indexed_upto(&self) -> Result<Option<RecordId>, AuditError> {
        Ok(u64_value(self.meta.get(INDEXED_UPTO)?).map(RecordId))
    }

    pub(crate) fn session_hwm(&self) -> Result<u64, AuditError> {
        Ok(u64_value(self.meta.get(SESSION_HWM)?).unwrap_or(0))
    }

    /// Applies a batch of committed records to the indexes (idempotent). `cache` holds the
    /// summaries of open sessions so the writer need not read them back for every batch.
    pub(crate) fn index(
        &self,
        records: &[Record],
        cache: &mut HashMap<SessionId, SessionSummary>,
    ) -> Result<(), AuditError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        let mut touched: BTreeSet<SessionId> = BTreeSet::new();
        // One index entry per session per batch: its key names the first record, its value
        // lists them all.
        let mut refs: HashMap<SessionId, (RecordId, Vec<u8>)> = HashMap::new();
        let mut hwm = self.session_hwm()?;
        for rec in records {
            let Some(sid) = rec.event.session() else {
                continue;
            };
            hwm = hwm.max(sid.0);
            refs.entry(sid)
                .or_insert_with(|| (rec.seq, Vec::new()))
                .1
                .extend_from_slice(&rec.seq.0.to_be_bytes());
            let summary = match cache.entry(sid) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(
                    self.session_summary(sid)?
                        .unwrap_or_else(|| SessionSummary::new(sid, rec.seq)),
                ),
            };
            summary.apply(rec);
            touched.insert(sid);
        }
        let mut batch = sled::Batch::default();
        for (sid, (first, seqs)) in refs {
            batch.insert(&session_record_key(sid, first), seqs);
        }
        self.session_records.apply_batch(batch)?;
        let mut sums = sled::Batch::default();
        for sid in &touched {
            if let Some(s) = cache.get(sid) {
                let v = serde_json::to_vec(s).map_err(|e| AuditError::Encode(e.to_string()))?;
                sums.insert(&sid.0.to_be_bytes(), v);
                if s.ended_at.is_some() {
                    cache.remove(sid);
                }
            }
        }
        self.sessions.apply_batch(sums)?;
        // Sessions that never end (crashed clients) must not grow the cache without bound.
        if cache.len() > MAX_CACHED_SESSIONS {
            cache.clear();
        }
        let mut meta = sled::Batch::default();
        meta.insert(INDEXED_UPTO, &last.seq.0.to_be_bytes());
        meta.insert(SESSION_HWM, &hwm.to_be_bytes());
        self.meta.apply_batch(meta)?;
        Ok(())
    }

    /// Re-applies records the index may have missed (after a crash between the log write and
    /// the index write).
    pub(crate) fn reindex(&self) -> Result<(), AuditError> {
        let mut after = self.indexed_upto()?;
        loop {
            let page = self.records_after(after, 1024)?;
            let Some((_, last)) = page.last() else {
                return Ok(());
            };
            after = Some(last.seq);
            let recs: Vec<Record> = page.into_iter().map(|(_, r)| r).collect();
            self.index(&recs, &mut HashMap::new())?;
        }
    }

    /// Bytes of record data in the log (what the size bound limits) and bytes on disk.
    pub(crate) fn space(&self) -> Result<Space, AuditError> {
        let mut record_bytes = 0u64;
        let mut records = 0u64;
        for item in self.scan(RecordId(0)) {
            if let Stored::Record { stored, .. } = item? {
                // What the record took under a key of its own (the quantity the bound has
                // always counted), so the bound means the same whatever the block layout.
                record_bytes += (chain::record_key(RecordId(0)).len() + stored.len()) as u64;
                records += 1;
            }
        }
        Ok(Space {
            records,
            record_bytes,
            disk_bytes: dir_size(&self.dir),
        })
    }
}

/// One entry of the log as [`Store::scan`] finds it.
pub(crate) enum Stored {
    Record {
        seq: RecordId,
        stored: Vec<u8>,
    },
    /// A block whose bytes do not parse (from the first bad entry on).
    Malformed {
        key: Vec<u8>,
    },
}

/// Decodes a scanned entry; a malformed block or record is corruption.
pub(crate) fn decode(item: Stored) -> Result<(chain::ChainHash, Record), AuditError> {
    match item {
        Stored::Record { seq, stored } => chain::decode_record(&stored)
            .ok_or_else(|| AuditError::Corrupt(format!("undecodable record {seq}"))),
        Stored::Malformed { key } => Err(AuditError::Corrupt(format!(
            "malformed record block at key {}",
            hex::encode(key)
        ))),
    }
}

/// Iterator behind [`Store::scan`].
pub(crate) struct Scan {
    blocks: sled::Iter,
    pending: std::vec::IntoIter<Stored>,
    from: RecordId,
}

impl Iterator for Scan {
    type Item = Result<Stored, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(s) = self.pending.next() {
                return Some(Ok(s));
            }
            let (k, v) = match self.blocks.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let mut items = Vec::new();
            for entry in block::entries(&v) {
                match entry {
                    Ok((seq, stored)) if seq >= self.from => items.push(Stored::Record {
                        seq,
                        stored: stored.to_vec(),
                    }),
                    Ok(_) => {}
                    Err(_) => {
                        items.push(Stored::Malformed { key: k.to_vec() });
                        break;
                    }
                }
            }
            self.pending = items.into_iter();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Space {
    pub records: u64,
    /// Logical size of the records (keys + values), the quantity `max_size_mib` bounds.
    pub record_bytes: u64,
    /// Size of the store directory on disk (sled reclaims space lazily, so this lags).
    pub disk_bytes: u64,
}

/// Opens sled, waiting briefly for the directory lock: after a store is dropped, sled's
/// background I/O threads may hold it for a moment longer.
pub(crate) fn open_db(dir: &Path) -> Result<sled::Db, AuditError> {
    // sled releases its directory lock only when its background I/O threads drop their last
    // handle, which can take long on a loaded machine (seen: > 10 s with a parallel test run).
    // Only a reopen inside one process waits here; a restarted daemon finds the lock free.
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
    let started = std::time::Instant::now();
    loop {
        let r = sled::Config::new()
            .path(dir)
            // Durability comes from the write-ahead segments; the store thread flushes sled
            // explicitly every few seconds (then drops the segments sled holds), so sled's
            // own background flusher would only add writes.
            .flush_every_ms(None)
            // The trail is written far more than read: sled's default 1 GiB page cache would
            // grow the daemon's memory with every record it ever wrote.
            .cache_capacity(16 * 1024 * 1024)
            .open();
        match r {
            Ok(db) => return Ok(db),
            // sled reports a held lock as ErrorKind::Other with this text (sled 0.34 config.rs).
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(AuditError::Store(format!(
                    "cannot open audit store {}: {e}",
                    dir.display()
                )));
            }
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}
