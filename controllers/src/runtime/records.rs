//! A controller's records, in its own sled database: small JSON records per object name (what it
//! last applied). It lets a restarted controller tell "nothing changed"
//! from "changed while I was down" without touching the engine or rewriting every status.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("controller records: {0}")]
pub struct RecordsError(String);

#[derive(Clone)]
pub struct Records {
    db: sled::Db,
    tree: sled::Tree,
}

impl Records {
    /// Opens (creating) `<dir>`; `tree` separates record families (e.g. `applied`).
    pub fn open(dir: &Path, tree: &str) -> Result<Self, RecordsError> {
        // The records are a few hundred bytes per object and read once per reconcile: a small
        // cache is plenty, and sled's default (1 GiB) would let it grow with the object count.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(4 << 20)
            .open()
            .map_err(|e| RecordsError(format!("{}: {e}", dir.display())))?;
        let tree = db
            .open_tree(tree)
            .map_err(|e| RecordsError(e.to_string()))?;
        Ok(Records { db, tree })
    }

    /// A throwaway state for tests and for controllers run without a data directory.
    pub fn temporary() -> Result<Self, RecordsError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|e| RecordsError(e.to_string()))?;
        let tree = db
            .open_tree("state")
            .map_err(|e| RecordsError(e.to_string()))?;
        Ok(Records { db, tree })
    }

    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let bytes = self.tree.get(name).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records are hints, not truth (the engine is observed on every reconcile), so they are written
    /// without waiting for fsync.
    pub fn put<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RecordsError> {
        let bytes = serde_json::to_vec(value).map_err(|e| RecordsError(e.to_string()))?;
        self.tree
            .insert(name, bytes)
            .map_err(|e| RecordsError(e.to_string()))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) {
        let _ = self.tree.remove(name);
    }

    pub fn names(&self) -> Vec<String> {
        self.tree
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| String::from_utf8(k.to_vec()).ok())
            .collect()
    }

    /// Blocking flush on tokio's blocking pool (sled's `flush_async` can starve its own I/O pool;
    /// see `Store::committed` in the operator).
    pub async fn flush(&self) {
        let db = self.db.clone();
        let _ = tokio::task::spawn_blocking(move || db.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Records::open(dir.path(), "applied").unwrap();
            s.put("web", &serde_json::json!({"hash": "abc"})).unwrap();
            s.db.flush().unwrap();
        }
        let s = Records::open(dir.path(), "applied").unwrap();
        let v: serde_json::Value = s.get("web").unwrap();
        assert_eq!(v["hash"], "abc");
        assert_eq!(s.names(), vec!["web".to_string()]);
        s.remove("web");
        assert!(s.get::<serde_json::Value>("web").is_none());
    }
}
