//! The write-ahead files in front of sled.
//!
//! A group commit is one frame appended with a single `write(2)` (and, with
//! `durability = "fsync"`, one `fdatasync`); the same key/value pairs then go into sled's
//! in-memory tree. Why: a sled flush plus the syncs its files need cost 1.6–3.7 ms per commit
//! here and hundreds of milliseconds for a few seconds' worth of dirty records; a frame write
//! plus `fdatasync` costs the disk's sync latency alone, and a frame write without sync
//! microseconds.
//!
//! Frames go to numbered segments (`wal.<n>`). Every few seconds the writer starts a new
//! segment and a background thread flushes and syncs sled, then deletes the older segments:
//! their frames are in sled's files by then. So sled's slow flush never holds up a commit.
//!
//! Frame: `len u32 LE | crc32 u32 LE | payload`, payload = `first_seq u64 LE | n u32 LE |
//! (klen u32 LE | key | vlen u32 LE | value) * n`. Replay ([`recover`]) applies frames in order
//! and stops at the first torn or corrupt one, or at one whose `first_seq` does not follow the
//! previous frame.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::AuditError;

/// Segment files are `wal.<n>` inside the audit directory.
const PREFIX: &str = "wal.";

/// Frames larger than this are corrupt (a batch holds at most `MAX_PENDING` records, each
/// bounded by the record size caps).
const MAX_FRAME: usize = 1 << 30;

/// One group commit: the pairs for sled's `log` tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub first_seq: u64,
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(crate) struct Wal {
    dir: PathBuf,
    /// Number of the segment being appended to.
    n: u64,
    path: PathBuf,
    file: File,
    /// Bytes appended to the current segment.
    len: u64,
    /// Bytes written but not yet `fdatasync`ed.
    unsynced: bool,
    buf: Vec<u8>,
}

/// The segments in `dir`, oldest first.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{n:020}"))
}

fn create_segment(dir: &Path, n: u64) -> Result<(PathBuf, File), AuditError> {
    let path = segment_path(dir, n);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| AuditError::io(&path, e))?;
    // The new name must be on disk before a frame in it is acknowledged.
    sync_dir(dir)?;
    Ok((path, file))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}

/// Deletes the segments numbered `upto` and below (their frames are durable in sled).
pub(crate) fn remove_upto(dir: &Path, upto: u64) -> Result<(), AuditError> {
    let mut removed = false;
    for (n, path) in segments(dir)? {
        if n <= upto {
            std::fs::remove_file(&path).map_err(|e| AuditError::io(&path, e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

impl Wal {
    /// Starts a new segment after any already in `dir` (call [`recover`] and apply first).
    pub(crate) fn open(dir: &Path) -> Result<Wal, AuditError> {
        let n = segments(dir)?.last().map_or(0, |(n, _)| n + 1);
        let (path, file) = create_segment(dir, n)?;
        Ok(Wal {
            dir: dir.to_owned(),
            n,
            path,
            file,
            len: 0,
            unsynced: false,
            buf: Vec::new(),
        })
    }

    /// Appends one frame with a single write. Not durable until [`Wal::sync`].
    pub(crate) fn append(
        &mut self,
        first_seq: u64,
        pairs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), AuditError> {
        // Writes to a removed file would succeed and vanish: a commit must fail instead.
        use std::os::unix::fs::MetadataExt;
        let links = self
            .file
            .metadata()
            .map_err(|e| AuditError::io(&self.path, e))?
            .nlink();
        if links == 0 {
            return Err(AuditError::io(
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the write-ahead file was removed",
                ),
            ));
        }
        self.buf.clear();
        encode(&mut self.buf, first_seq, pairs);
        self.file
            .write_all(&self.buf)
            .map_err(|e| AuditError::io(&self.path, e))?;
        self.len += self.buf.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// `fdatasync`s what was appended, if anything.
    pub(crate) fn sync(&mut self) -> Result<(), AuditError> {
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| AuditError::io(&self.path, e))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// A second handle on the current segment for an `fdatasync` the caller runs later (off
    /// the writer lock), or `None` when nothing awaits one. What is appended after this call
    /// counts as unsynced again; what came before is durable once that sync returns.
    pub(crate) fn sync_later(&mut self) -> Result<Option<File>, AuditError> {
        if !self.unsynced {
            return Ok(None);
        }
        let file = self
            .file
            .try_clone()
            .map_err(|e| AuditError::io(&self.path, e))?;
        self.unsynced = false;
        Ok(Some(file))
    }

    pub(crate) fn has_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Bytes in the current segment.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Cuts the current segment back to `len` bytes: drops what a failed append or sync left
    /// of a frame (a partial write, or a whole frame of unknown durability), so the segment
    /// stays parseable and the frame can be written again.
    pub(crate) fn truncate(&mut self, len: u64) -> Result<(), AuditError> {
        self.file
            .set_len(len)
            .map_err(|e| AuditError::io(&self.path, e))?;
        self.len = len;
        Ok(())
    }

    /// Seals the current segment and starts the next; returns the sealed number and, when
    /// the sealed one holds unsynced frames, a handle to `fdatasync` it with.
    pub(crate) fn rotate(&mut self) -> Result<(u64, Option<File>), AuditError> {
        let unsynced = self.sync_later()?;
        let sealed = self.n;
        let (path, file) = create_segment(&self.dir, sealed + 1)?;
        self.n = sealed + 1;
        self.path = path;
        self.file = file;
        self.len = 0;
        Ok((sealed, unsynced))
    }
}

fn encode(out: &mut Vec<u8>, first_seq: u64, pairs: &[(Vec<u8>, Vec<u8>)]) {
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    let payload_len = (out.len() - 8) as u32;
    let crc = crc32fast::hash(&out[8..]);
    out[..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// What [`recover`] found.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub frames: Vec<Frame>,
    /// Bytes after the last good frame (a write torn by a crash, or damage), ignored.
    pub discarded_bytes: u64,
}

/// Reads the frames of every segment in `dir`, oldest first.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, AuditError> {
    let mut replay = Replay::default();
    for (_, path) in segments(dir)? {
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| AuditError::io(&path, e))?;
        replay.segment(&data);
    }
    Ok(replay.finish())
}

/// [`recover`]'s reading of segment contents, oldest first.
#[derive(Default)]
pub(crate) struct Replay {
    frames: Vec<Frame>,
    discarded_bytes: u64,
    stopped: bool,
}

impl Replay {
    pub(crate) fn segment(&mut self, data: &[u8]) {
        if self.stopped {
            // Nothing after a bad frame can be trusted to follow it.
            self.discarded_bytes += data.len() as u64;
            return;
        }
        let mut at = 0usize;
        while let Some((frame, used)) = decode(&data[at..]) {
            // Records of a frame follow the previous frame's; anything else is stale.
            if let Some(prev) = self.frames.last()
                && frame.first_seq <= prev.first_seq
            {
                break;
            }
            self.frames.push(frame);
            at += used;
        }
        if at < data.len() {
            self.discarded_bytes += (data.len() - at) as u64;
            self.stopped = true;
        }
    }

    pub(crate) fn finish(self) -> Recovered {
        Recovered {
            frames: self.frames,
            discarded_bytes: self.discarded_bytes,
        }
    }
}

/// One frame from the start of `data` and the bytes it used; `None` if torn or corrupt.
fn decode(data: &[u8]) -> Option<(Frame, usize)> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let payload = data.get(8..8usize.checked_add(len)?)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut c = payload;
    let first_seq = u64::from_le_bytes(take(&mut c, 8)?.try_into().ok()?);
    let n = u32::from_le_bytes(take(&mut c, 4)?.try_into().ok()?) as usize;
    let mut pairs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let klen = u32::from_le_bytes(take(&mut c, 4)?.try_into().ok()?) as usize;
        let k = take(&mut c, klen)?.to_vec();
        let vlen = u32::from_le_bytes(take(&mut c, 4)?.try_into().ok()?) as usize;
        let v = take(&mut c, vlen)?.to_vec();
        pairs.push((k, v));
    }
    if !c.is_empty() {
        return None;
    }
    Some((Frame { first_seq, pairs }, 8 + len))
}

fn take<'a>(c: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if c.len() < n {
        return None;
    }
    let (head, rest) = c.split_at(n);
    *c = rest;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(tag: u8, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| (vec![tag, i as u8], vec![i as u8; i * 7]))
            .collect()
    }

    fn frame(first_seq: u64, tag: u8, n: usize) -> Frame {
        Frame {
            first_seq,
            pairs: pairs(tag, n),
        }
    }

    #[test]
    fn frames_come_back_in_order_across_segments_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(0, &pairs(1, 3)).unwrap();
        wal.append(3, &pairs(2, 0)).unwrap();
        let (sealed, _) = wal.rotate().unwrap();
        wal.append(4, &pairs(3, 5)).unwrap();
        wal.sync().unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.discarded_bytes, 0);
        assert_eq!(
            r.frames,
            vec![frame(0, 1, 3), frame(3, 2, 0), frame(4, 3, 5)]
        );
        remove_upto(dir.path(), sealed).unwrap();
        assert_eq!(recover(dir.path()).unwrap().frames, vec![frame(4, 3, 5)]);
        // A writer opened later starts after the existing segments.
        drop(wal);
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(9, &pairs(4, 1)).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.frames, vec![frame(4, 3, 5), frame(9, 4, 1)]);
        remove_upto(dir.path(), u64::MAX).unwrap();
        assert!(segments(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_torn_or_damaged_tail_is_dropped_and_earlier_frames_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(0, &pairs(1, 2)).unwrap();
        wal.append(2, &pairs(2, 2)).unwrap();
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let full = std::fs::read(&path).unwrap();
        let first_len = {
            let mut b = Vec::new();
            encode(&mut b, 0, &pairs(1, 2));
            b.len()
        };
        // Every truncation point inside the second frame keeps exactly the first one.
        for cut in first_len..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let r = recover(dir.path()).unwrap();
            assert_eq!(r.frames.len(), 1, "cut at {cut}");
            assert_eq!(r.discarded_bytes as usize, cut - first_len);
        }
        // A flipped bit in the second frame's payload: its CRC fails.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(recover(dir.path()).unwrap().frames.len(), 1);
        // Frames in a later segment do not follow a damaged one.
        wal.rotate().unwrap();
        wal.append(4, &pairs(3, 1)).unwrap();
        assert_eq!(recover(dir.path()).unwrap().frames.len(), 1);
        // An absurd length is not trusted.
        std::fs::write(&path, u32::MAX.to_le_bytes()).unwrap();
        assert!(recover(dir.path()).unwrap().frames.is_empty());
    }

    #[test]
    fn frames_that_do_not_follow_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(10, &pairs(1, 1)).unwrap();
        wal.append(5, &pairs(2, 1)).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.frames, vec![frame(10, 1, 1)]);
        assert!(r.discarded_bytes > 0);
    }

    #[test]
    fn appending_to_a_removed_segment_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(0, &pairs(1, 1)).unwrap();
        remove_upto(dir.path(), u64::MAX).unwrap();
        assert!(wal.append(1, &pairs(1, 1)).is_err());
    }
}
