//! `berth admin migrate-store`: moves an installation's whole store from one backend to the
//! other (sled -> NATS when a team adds managers, NATS -> sled to go back), record by record and
//! byte for byte: objects, events, outbox, webhooks, tokens, the audit chain, quarantine, meta,
//! and whatever tree a later version adds, without knowing what they hold. Sealed values stay
//! sealed (same master key), so nothing is decrypted on the way.
//!
//! Runs with every API server stopped (the services in Swarm keep running: nothing here touches
//! the engine). The target must be empty, so a migration never merges two installations. After
//! the copy it compares every tree's record count and a SHA-256 over its keys and values on both
//! sides, prints them, and fails if anything differs.

use super::backend::{Db, Tree};
use super::StoreError;
use sha2::{Digest, Sha256};

/// The records of one commit of the copy: well under NATS' default 1 MB message limit.
const CHUNK_BYTES: usize = 256 * 1024;

/// One tree's fingerprint: how many records and a hash over all of them in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSummary {
    pub name: String,
    pub records: usize,
    pub sha256: String,
}

/// Every non-empty tree of `db`, fingerprinted.
pub fn summarize(db: &Db) -> Result<Vec<TreeSummary>, StoreError> {
    let mut out = Vec::new();
    for name in db.tree_names() {
        let tree = db.tree(&name)?;
        let mut hash = Sha256::new();
        let mut records = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            // Lengths first, so (k="ab", v="c") and (k="a", v="bc") differ.
            hash.update((k.len() as u64).to_be_bytes());
            hash.update(&k);
            hash.update((v.len() as u64).to_be_bytes());
            hash.update(&v);
            records += 1;
        }
        if records > 0 {
            out.push(TreeSummary {
                name,
                records,
                sha256: hex::encode(hash.finalize()),
            });
        }
    }
    Ok(out)
}

/// Copies every record of `from` into `to`, which must hold none, then checks both sides agree.
/// Returns the (equal) summaries.
pub async fn copy(from: &Db, to: &Db) -> Result<Vec<TreeSummary>, StoreError> {
    let existing = summarize(to)?;
    if !existing.is_empty() {
        let held: Vec<String> = existing
            .iter()
            .map(|t| format!("{} ({} records)", t.name, t.records))
            .collect();
        return Err(StoreError::Storage(format!(
            "the target store is not empty: {}; nothing was copied (a migration never merges \
             two installations)",
            held.join(", ")
        )));
    }
    let source = summarize(from)?;
    for t in &source {
        let (src, dst) = (from.tree(&t.name)?, to.tree(&t.name)?);
        copy_tree(&src, &dst, to).await?;
    }
    to.flush_blocking()?;
    let target = summarize(to)?;
    if target != source {
        return Err(StoreError::Storage(format!(
            "the copy differs from the source (source {source:?}, target {target:?}); the target \
             must be emptied before trying again, and the source is unchanged"
        )));
    }
    Ok(source)
}

async fn copy_tree(src: &Tree, dst: &Tree, to: &Db) -> Result<(), StoreError> {
    let mut chunk: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    let mut records = src.iter();
    loop {
        let next = records.next().transpose()?;
        let full = bytes >= CHUNK_BYTES;
        if (next.is_none() || full) && !chunk.is_empty() {
            to.transact(&[dst], |t| {
                for (k, v) in &chunk {
                    t[0].insert(k, v)?;
                }
                Ok(())
            })
            .await?;
            chunk.clear();
            bytes = 0;
        }
        let Some((k, v)) = next else { return Ok(()) };
        bytes += k.len() + v.len();
        chunk.push((k, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sled_db(dir: &std::path::Path) -> Db {
        Db::Sled(sled::Config::new().path(dir).open().unwrap())
    }

    #[tokio::test]
    async fn every_tree_is_copied_byte_for_byte_and_fingerprinted() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (sled_db(a.path()), sled_db(b.path()));
        for (tree, n) in [("objects", 700), ("audit-records", 3), ("webhooks", 1)] {
            let t = from.tree(tree).unwrap();
            for i in 0..n {
                // Values big enough that the copy takes several commits.
                t.insert(format!("k{i:05}"), vec![i as u8; 1000])
                    .await
                    .unwrap();
            }
        }
        from.tree("empty").unwrap();
        let copied = copy(&from, &to).await.unwrap();
        let names: Vec<(&str, usize)> = copied
            .iter()
            .map(|t| (t.name.as_str(), t.records))
            .collect();
        assert_eq!(
            names,
            [("audit-records", 3), ("objects", 700), ("webhooks", 1)]
        );
        assert_eq!(summarize(&to).unwrap(), copied);
        assert_eq!(
            to.tree("objects").unwrap().get("k00699").unwrap(),
            Some(vec![699u16 as u8; 1000])
        );
    }

    #[tokio::test]
    async fn a_target_that_holds_anything_is_refused_and_left_alone() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (sled_db(a.path()), sled_db(b.path()));
        from.tree("objects")
            .unwrap()
            .insert("k", "v")
            .await
            .unwrap();
        to.tree("meta")
            .unwrap()
            .insert("instance", "other")
            .await
            .unwrap();
        let err = copy(&from, &to).await.unwrap_err().to_string();
        assert!(err.contains("not empty: meta (1 records)"), "{err}");
        assert!(to.tree("objects").unwrap().is_empty());
    }

    #[test]
    fn the_fingerprint_tells_a_moved_byte_from_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled_db(dir.path());
        let t = db.tree("x").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(t.insert("ab", "c")).unwrap();
        let one = summarize(&db).unwrap();
        rt.block_on(t.remove("ab")).unwrap();
        rt.block_on(t.insert("a", "bc")).unwrap();
        assert_ne!(summarize(&db).unwrap(), one);
    }
}
