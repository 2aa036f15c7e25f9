//! The head-mark file: the expected head of the chain (sequence, chain hash, signed with the
//! audit signing key), rewritten at every group commit, outside the audit directory.
//!
//! Why: the log's own head is stored with the records it describes, so losing the tail of the
//! write-ahead file, or the whole store, takes the head along and what is left still verifies.
//! A second copy kept elsewhere lets `audit verify` and the daemon's start notice what went
//! missing. Default place: next to the audit directory (`<dir>.head`), so wiping the directory
//! leaves it behind.
//!
//! Format: two 1 KiB slots written alternately, each `magic | generation u64 LE | len u32 LE |
//! crc32 u32 LE | JSON mark`. A torn write can only damage the slot being written; reading takes
//! the valid slot of the higher generation (not sequence: after an accepted gap the chain goes
//! on from a lower sequence).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::AuditError;
use super::signing::Mark;

const MAGIC: &[u8; 4] = b"IHM1";
const SLOT: usize = 1024;
const HEADER: usize = 4 + 8 + 4 + 4;

/// Where the head mark of the store in `dir` lives unless configured.
pub(crate) fn default_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(".head");
    dir.with_file_name(name)
}

pub(crate) struct HeadMarkFile {
    path: PathBuf,
    file: File,
    /// Generation of the next write; its slot is `generation % 2`.
    generation: u64,
}

impl HeadMarkFile {
    pub(crate) fn open(path: &Path) -> Result<HeadMarkFile, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| AuditError::io(path, e))?;
        let data = std::fs::read(path).map_err(|e| AuditError::io(path, e))?;
        let generation = data
            .chunks(SLOT)
            .filter_map(decode_slot)
            .map(|(g, _)| g + 1)
            .max()
            .unwrap_or(0);
        Ok(HeadMarkFile {
            path: path.to_owned(),
            file,
            generation,
        })
    }

    /// A second handle on the file, to `fdatasync` the last written mark without holding the
    /// writer.
    pub(crate) fn sync_later(&self) -> Result<File, AuditError> {
        self.file
            .try_clone()
            .map_err(|e| AuditError::io(&self.path, e))
    }

    /// Writes `mark` over the older slot; with `sync`, waits until it is on disk.
    pub(crate) fn write(&mut self, mark: &Mark, sync: bool) -> Result<(), AuditError> {
        let json = mark.encode()?;
        if json.len() > SLOT - HEADER {
            return Err(AuditError::Encode("head mark larger than its slot".into()));
        }
        let mut slot = Vec::with_capacity(SLOT);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&self.generation.to_le_bytes());
        slot.extend_from_slice(&(json.len() as u32).to_le_bytes());
        slot.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        slot.extend_from_slice(&json);
        slot.resize(SLOT, 0);
        let offset = (self.generation % 2) * SLOT as u64;
        self.file
            .write_all_at(&slot, offset)
            .map_err(|e| AuditError::io(&self.path, e))?;
        if sync {
            self.file
                .sync_data()
                .map_err(|e| AuditError::io(&self.path, e))?;
        }
        self.generation += 1;
        Ok(())
    }
}

/// What the head-mark file says.
#[derive(Debug)]
pub(crate) enum Read {
    /// No file (a store that never committed with this version, or the file was removed).
    Missing,
    /// The file exists but neither slot is valid.
    Damaged,
    Mark(Mark),
}

pub(crate) fn read(path: &Path) -> Result<Read, AuditError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    if data.is_empty() {
        return Ok(Read::Missing);
    }
    let best = data
        .chunks(SLOT)
        .filter_map(decode_slot)
        .max_by_key(|(g, _)| *g);
    Ok(best.map_or(Read::Damaged, |(_, m)| Read::Mark(m)))
}

fn decode_slot(slot: &[u8]) -> Option<(u64, Mark)> {
    if slot.len() < HEADER || &slot[..4] != MAGIC {
        return None;
    }
    let generation = u64::from_le_bytes(slot[4..12].try_into().ok()?);
    let len = u32::from_le_bytes(slot[12..16].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(slot[16..20].try_into().ok()?);
    let json = slot.get(HEADER..HEADER.checked_add(len)?)?;
    if crc32fast::hash(json) != crc {
        return None;
    }
    Mark::decode(json).map(|m| (generation, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::ChainHash;
    use crate::audit::record::RecordId;
    use crate::audit::signing::MarkKind;

    fn mark(seq: u64) -> Mark {
        Mark::new(
            MarkKind::Head,
            RecordId(seq),
            ChainHash([seq as u8; 32]),
            None,
        )
    }

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.head");
        assert!(matches!(read(&path).unwrap(), Read::Missing));
        let mut f = HeadMarkFile::open(&path).unwrap();
        for s in 0..5 {
            f.write(&mark(s), true).unwrap();
        }
        let Read::Mark(m) = read(&path).unwrap() else {
            panic!("no mark")
        };
        assert_eq!(m.seq, RecordId(4));
        // Damage the newest slot (slot 0 holds seq 4): the previous head is read.
        let mut data = std::fs::read(&path).unwrap();
        data[HEADER + 3] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let Read::Mark(m) = read(&path).unwrap() else {
            panic!("no mark")
        };
        assert_eq!(m.seq, RecordId(3));
        std::fs::write(&path, vec![7u8; 2 * SLOT]).unwrap();
        assert!(matches!(read(&path).unwrap(), Read::Damaged));
    }

    #[test]
    fn a_lower_sequence_written_later_wins() {
        // After an accepted gap the chain continues below the old head.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.head");
        let mut f = HeadMarkFile::open(&path).unwrap();
        f.write(&mark(9), true).unwrap();
        drop(f);
        let mut f = HeadMarkFile::open(&path).unwrap();
        f.write(&mark(6), true).unwrap();
        let Read::Mark(m) = read(&path).unwrap() else {
            panic!("no mark")
        };
        assert_eq!(m.seq, RecordId(6));
    }

    #[test]
    fn default_path_is_beside_the_directory() {
        assert_eq!(
            default_path(Path::new("/var/lib/interceptor/audit")),
            PathBuf::from("/var/lib/interceptor/audit.head")
        );
    }
}
