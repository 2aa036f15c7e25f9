//! The sled database behind approvals: one tree of requests, one of grants, both keyed by
//! big-endian id and holding JSON. Ids come from sled's persistent id generator.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ApprovalError;
use super::grant::Grant;
use super::model::{Request, RequestId};

pub(crate) struct Store {
    db: sled::Db,
    requests: sled::Tree,
    grants: sled::Tree,
}

impl Store {
    pub(crate) fn open(dir: &Path) -> Result<Store, ApprovalError> {
        let db = sled::open(dir)
            .map_err(|e| ApprovalError::Store(format!("cannot open {}: {e}", dir.display())))?;
        let requests = db.open_tree("requests")?;
        let grants = db.open_tree("grants")?;
        Ok(Store {
            db,
            requests,
            grants,
        })
    }

    /// A fresh id, never reused across restarts (requests and grants share the sequence).
    pub(crate) fn next_id(&self) -> Result<u64, ApprovalError> {
        Ok(self.db.generate_id()? + 1)
    }

    pub(crate) fn put_request(&self, r: &Request) -> Result<(), ApprovalError> {
        put(&self.requests, r.id, r)
    }

    pub(crate) fn request(&self, id: RequestId) -> Result<Option<Request>, ApprovalError> {
        get(&self.requests, id)
    }

    pub(crate) fn requests(&self) -> Result<Vec<Request>, ApprovalError> {
        all(&self.requests)
    }

    pub(crate) fn put_grant(&self, g: &Grant) -> Result<(), ApprovalError> {
        put(&self.grants, g.id, g)
    }

    pub(crate) fn grant(&self, id: u64) -> Result<Option<Grant>, ApprovalError> {
        get(&self.grants, id)
    }

    pub(crate) fn grants(&self) -> Result<Vec<Grant>, ApprovalError> {
        all(&self.grants)
    }

    /// Makes every write so far durable (see crate-notes on sled's flush).
    pub(crate) async fn flush(&self) -> Result<(), ApprovalError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// For synchronous paths (a Drop guard); the background flusher covers it within 500 ms
    /// if this is not reached.
    pub(crate) fn flush_blocking(&self) -> Result<(), ApprovalError> {
        self.db.flush()?;
        Ok(())
    }
}

fn put<T: Serialize>(tree: &sled::Tree, id: u64, value: &T) -> Result<(), ApprovalError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApprovalError::Store(format!("cannot encode record {id}: {e}")))?;
    tree.insert(id.to_be_bytes(), bytes)?;
    Ok(())
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, id: u64) -> Result<Option<T>, ApprovalError> {
    tree.get(id.to_be_bytes())?
        .map(|bytes| decode(id, &bytes))
        .transpose()
}

fn all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, ApprovalError> {
    tree.iter()
        .map(|item| {
            let (key, bytes) = item?;
            let id = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| ApprovalError::Store("malformed key in approvals store".into()))?;
            decode(id, &bytes)
        })
        .collect()
}

/// A record that does not decode is an error, not skipped: a pending request must not vanish.
fn decode<T: DeserializeOwned>(id: u64, bytes: &[u8]) -> Result<T, ApprovalError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApprovalError::Store(format!("record {id} is unreadable: {e}")))
}
