//! Records that cannot be read: bytes under an object key that do not decode as an object, an
//! object stored under another object's key, or a Secret whose sealed spec does not open. One such
//! record used to stop the server at start and fail every list of its kind. Now it is moved, bytes
//! unchanged, into the `quarantine` tree (found at open, or by a list that meets it), logged by key
//! and reason only (never content), counted in the discovery document, and listed by
//! `berth admin fsck`; everything else is served as before. Webhook records that do not decode
//! go the same way (`Webhooks::list`).
//!
//! A quarantined object is gone from the API: its controller treats it as deleted (a quarantined
//! Service's Swarm service is removed at the next resync). Restore it from the quarantined bytes
//! or a backup, then apply it again.

use super::backend::Tree;
use super::{key, Store, StoreError};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::error;

/// The sled tree quarantined records are kept in.
pub(super) const TREE: &str = "quarantine";

/// One quarantined record: where it was, why it was moved, and its bytes (base64), kept so it can
/// be examined or restored by hand.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quarantined {
    /// The tree it was in (`objects`).
    pub tree: String,
    /// Its key there (`service/web`).
    pub key: String,
    /// What is wrong, without any of its content.
    pub reason: String,
    pub quarantined_at: DateTime<Utc>,
    pub bytes: String,
}

/// Why an object record cannot be served, without quoting any of it: serde's messages can quote
/// content (`unknown variant `...``), so only the position is kept.
pub(super) fn object_problem(store: &Store, k: &[u8], bytes: &[u8]) -> Option<String> {
    let raw: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Some(format!(
                "not JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        }
    };
    let obj: berth_api_types::DynObject = match serde_json::from_value(raw) {
        Ok(o) => o,
        Err(_) => return Some("JSON, but not a berth object".into()),
    };
    if key(obj.kind, &obj.metadata.name).as_bytes() != k {
        return Some(format!(
            "holds {} `{}`, which belongs under another key",
            obj.kind, obj.metadata.name
        ));
    }
    match store.decode_obj(bytes) {
        Ok(_) => None,
        // Names the object only (the store's errors never carry a value).
        Err(e) => Some(e.to_string()),
    }
}

impl Store {
    /// Moves every object record that cannot be served into quarantine (at open). Returns how
    /// many it moved.
    pub(super) async fn quarantine_unreadable(&self) -> Result<usize, StoreError> {
        let mut moved = 0;
        for item in self.objects.iter() {
            let (k, v) = item?;
            if let Some(reason) = object_problem(self, &k, &v) {
                moved += usize::from(self.quarantine_object(&k, &v, &reason).await?);
            }
        }
        if moved > 0 {
            self.db.flush_blocking()?;
        }
        Ok(moved)
    }

    /// Moves one object record into quarantine, if it still holds `bytes` (a write that replaced
    /// it meanwhile wins). Returns whether it moved it.
    pub(super) async fn quarantine_object(
        &self,
        k: &[u8],
        bytes: &[u8],
        reason: &str,
    ) -> Result<bool, StoreError> {
        let objects = self.objects.clone();
        self.quarantine_record(&objects, k, bytes, reason).await
    }

    /// The same for a record of another tree of this store (`aux_tree`), e.g. a webhook.
    pub(crate) async fn quarantine_record(
        &self,
        tree: &Tree,
        k: &[u8],
        bytes: &[u8],
        reason: &str,
    ) -> Result<bool, StoreError> {
        let tree_name = tree.name();
        let name = String::from_utf8_lossy(k).into_owned();
        let record = Quarantined {
            tree: tree_name.into(),
            key: name.clone(),
            reason: reason.to_string(),
            quarantined_at: Utc::now(),
            bytes: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        let value = serde_json::to_vec(&record).expect("a record always encodes");
        // Unique per move: the same key may go bad twice.
        let qkey = format!("{tree_name}/{name}@{}", ulid::Ulid::new());
        let moved = self
            .db
            .transact(&[tree, &self.quarantine], |t| {
                if t[0].get(k)?.as_deref() != Some(bytes) {
                    return Ok(false);
                }
                t[0].remove(k)?;
                t[1].insert(qkey.as_bytes(), &value)?;
                Ok(true)
            })
            .await?;
        if moved {
            error!(
                tree = tree_name,
                key = %name,
                %reason,
                "moved an unreadable record into quarantine (see `berth admin fsck`)"
            );
        }
        Ok(moved)
    }

    /// Every object record that cannot be served (`berth admin fsck`; after the open's quarantine
    /// there should be none). Returns (records checked, problems).
    pub(crate) fn check_objects(&self) -> Result<(usize, Vec<String>), StoreError> {
        let mut problems = Vec::new();
        let mut n = 0;
        for item in self.objects.iter() {
            let (k, v) = item?;
            n += 1;
            if let Some(reason) = object_problem(self, &k, &v) {
                problems.push(format!("{}: {reason}", String::from_utf8_lossy(&k)));
            }
        }
        Ok((n, problems))
    }

    /// Every quarantined record, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.quarantine
            .iter()
            .map(|item| {
                serde_json::from_slice(&item?.1)
                    .map_err(|_| StoreError::Storage("a quarantine entry is unreadable".into()))
            })
            .collect()
    }

    /// How many records are in quarantine (for the discovery document and the start log).
    pub fn quarantined_count(&self) -> usize {
        self.quarantine.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::store::WriteMode;
    use berth_api_types::Kind;
    use serde_json::json;

    #[tokio::test]
    async fn an_unreadable_record_is_quarantined_and_the_rest_served() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = b"\x00\xffnot json at all".to_vec();
        let moved = svc("elsewhere", 1);
        {
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            s.write(
                vec![
                    svc("good", 1),
                    secret("pw", json!({"stringData": {"k": "quokka-123"}})),
                ],
                WriteMode::Upsert,
                None,
                false,
            )
            .await
            .unwrap();
            s.objects
                .insert("service/bad", garbage.clone())
                .await
                .unwrap();
            // A good object under another object's key.
            s.objects
                .insert("service/wrong", super::super::encode(&moved))
                .await
                .unwrap();
            // A Secret whose seal does not open (tampered).
            let mut sealed: serde_json::Value =
                serde_json::from_slice(&s.objects.get("secret/pw").unwrap().unwrap()).unwrap();
            sealed["spec"]["sealed"] = json!("AAAA");
            s.objects
                .insert("secret/pw", serde_json::to_vec(&sealed).unwrap())
                .await
                .unwrap();
            s.db.flush_blocking().unwrap();
        }
        // It used to fail here.
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let names: Vec<String> = s
            .list(Kind::Service)
            .unwrap()
            .into_iter()
            .map(|o| o.metadata.name)
            .collect();
        assert_eq!(names, ["good"]);
        assert!(s.list(Kind::Secret).unwrap().is_empty());
        assert_eq!(s.quarantined_count(), 3);
        let q = s.quarantined().unwrap();
        let bad = q.iter().find(|r| r.key == "service/bad").unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&bad.bytes)
                .unwrap(),
            garbage,
            "the bytes are kept"
        );
        assert!(bad.reason.starts_with("not JSON"), "{}", bad.reason);
        let wrong = q.iter().find(|r| r.key == "service/wrong").unwrap();
        assert!(wrong.reason.contains("another key"), "{}", wrong.reason);
        let pw = q.iter().find(|r| r.key == "secret/pw").unwrap();
        assert!(pw.reason.contains("cannot be decrypted"), "{}", pw.reason);
        for r in &q {
            assert!(!r.reason.contains("quokka"), "{}", r.reason);
        }
        // Writes go on; the name is free again.
        s.write(vec![svc("bad", 2)], WriteMode::Create, None, false)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_list_that_meets_an_unreadable_record_quarantines_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        s.write(vec![svc("good", 1)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        // Goes bad while running.
        s.objects
            .insert("service/bad", b"{".as_slice())
            .await
            .unwrap();
        let names: Vec<String> = s
            .list(Kind::Service)
            .unwrap()
            .into_iter()
            .map(|o| o.metadata.name)
            .collect();
        assert_eq!(names, ["good"]);
        // Moved aside in the background (a read does not wait for a commit).
        for _ in 0..100 {
            if s.quarantined_count() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(s.quarantined_count(), 1);
        assert!(s.objects.get("service/bad").unwrap().is_none());
    }
}
