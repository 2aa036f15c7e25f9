//! What `install --apply` changed, in order, so that `uninstall` undoes exactly that.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Change {
    Group {
        name: String,
    },
    User {
        name: String,
    },
    Dir {
        path: PathBuf,
    },
    /// `sha256` of what was written (none for the binary: its length is checked instead).
    File {
        path: PathBuf,
        sha256: Option<String>,
        len: u64,
    },
    /// A file a tool created on the side (the account files' backups).
    Scratch {
        path: PathBuf,
    },
    Enabled {
        unit: String,
    },
    /// A setting appended to PostgreSQL's `postgresql.auto.conf` (`previous`: the setting it
    /// overrode), and how to restart that cluster.
    PgConf {
        file: PathBuf,
        line: String,
        previous: Option<String>,
        restart: Option<Vec<String>>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub changes: Vec<Change>,
}

pub(super) fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

impl Manifest {
    pub(super) fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Root-only (0600), replaced atomically.
    pub(super) fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}
