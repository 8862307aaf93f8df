//! The environment snapshot of berth's own state, both ways: `export` writes the document a backup
//! stores (every object as it is at rest, webhooks, the master key the sealed values need), and
//! `restore` re-applies one: Secrets are opened with the snapshot's key and sealed again under this
//! store's, every object goes through the store's normal, validated, all-or-nothing write, and
//! nothing the snapshot lacks is deleted.

use crate::crypto::{MasterKey, Sealer};
use crate::store::{Store, StoreError, WriteMode};
use crate::webhook::{Webhook, Webhooks};
use berth_api_types::backup::{EnvironmentDocument, ENVIRONMENT_FORMAT, NOT_INCLUDED};
use berth_api_types::typed::decode_object;
use berth_api_types::wire::{ApplyOutcome, ApplyResult};
use berth_api_types::{DynObject, Kind};
use chrono::Utc;
use serde::{Deserialize, Serialize};

/// The document a backup stores.
pub async fn export(store: &Store, key: &MasterKey) -> Result<EnvironmentDocument, StoreError> {
    let objects = store
        .export_objects()?
        .into_iter()
        .map(|o| serde_json::to_value(o).expect("objects always encode"))
        .collect();
    let webhooks = Webhooks::open(store)?
        .list()
        .await?
        .into_iter()
        .map(|w| serde_json::to_value(w).expect("webhooks always encode"))
        .collect();
    Ok(EnvironmentDocument {
        format: ENVIRONMENT_FORMAT.to_string(),
        installation: store.instance().to_string(),
        created: Utc::now(),
        master_key: key.to_base64(),
        objects,
        webhooks,
        not_included: NOT_INCLUDED.iter().map(|s| s.to_string()).collect(),
    })
}

/// The API process's store as the backups' source of the environment.
pub struct StoreEnvironment {
    pub store: Store,
    pub key: MasterKey,
}

#[async_trait::async_trait]
impl berth_controllers::backup::operations::EnvironmentSource for StoreEnvironment {
    async fn export(&self) -> Result<EnvironmentDocument, String> {
        export(&self.store, &self.key)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What a restore did (or, dry, would do).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    pub dry_run: bool,
    /// The snapshot's installation.
    pub installation: String,
    /// Whether this store took the snapshot's installation id (a fresh data directory).
    #[serde(default)]
    pub adopted_installation: bool,
    pub objects: Vec<ApplyResult>,
    /// Webhooks added (ids); existing ones are left as they are.
    #[serde(default)]
    pub webhooks_added: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot's environment document is not usable: {0}")]
    Document(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Checks the document and turns its objects into what an apply takes: Secrets opened with the
/// snapshot's key (the store seals them again with its own on write), status dropped, each
/// object validated as an apply would.
fn objects_of(doc: &EnvironmentDocument) -> Result<(Vec<DynObject>, Sealer), RestoreError> {
    if doc.format != ENVIRONMENT_FORMAT {
        return Err(RestoreError::Document(format!(
            "format `{}` is not `{ENVIRONMENT_FORMAT}` (written by another version of berth?)",
            doc.format
        )));
    }
    let old_key = MasterKey::parse_env(&doc.master_key)
        .map_err(|_| RestoreError::Document("its master key is not 32 bytes of base64".into()))?;
    let sealer = old_key.sealer();
    let mut out = Vec::with_capacity(doc.objects.len());
    for (i, raw) in doc.objects.iter().enumerate() {
        let mut value = raw.clone();
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let name = value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        if kind == Kind::Secret.as_str() {
            let blob = value
                .pointer("/spec/sealed")
                .and_then(|b| b.as_str())
                .ok_or_else(|| {
                    RestoreError::Document(format!("Secret `{name}` is not sealed in the snapshot"))
                })?;
            let plain = sealer
                .open(format!("secret/{name}").as_bytes(), blob)
                .map_err(|_| {
                    RestoreError::Document(format!(
                        "Secret `{name}` does not open with the snapshot's master key"
                    ))
                })?;
            value["spec"] = serde_json::from_slice(&plain).map_err(|_| {
                RestoreError::Document(format!("Secret `{name}` holds no JSON spec"))
            })?;
        }
        if let Some(m) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            // Identity and versions are this store's to assign; labels and annotations are the
            // user's and come back as they were.
            for k in ["uid", "generation", "resourceVersion", "creationTimestamp"] {
                m.remove(k);
            }
        }
        if let Some(o) = value.as_object_mut() {
            o.remove("status");
        }
        let obj = decode_object(&value).map_err(|errors| {
            let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
            RestoreError::Document(format!(
                "object {i} ({kind} `{name}`) does not validate: {}",
                why.join("; ")
            ))
        })?;
        out.push(obj);
    }
    Ok((out, sealer))
}

/// Re-applies the document's objects in one all-or-nothing write (dry: computes the same outcome
/// and writes nothing), then adds the webhooks this store does not have.
pub async fn restore(
    store: &Store,
    doc: &EnvironmentDocument,
    dry_run: bool,
) -> Result<RestorePlan, RestoreError> {
    let (objects, old_sealer) = objects_of(doc)?;
    let written = store
        .write(objects, WriteMode::Upsert, None, dry_run)
        .await?;
    let mut plan = RestorePlan {
        dry_run,
        installation: doc.installation.clone(),
        adopted_installation: store.instance() == doc.installation,
        objects: written.into_iter().map(|(r, _)| r).collect(),
        webhooks_added: Vec::new(),
    };
    let hooks = Webhooks::open(store)?;
    for raw in &doc.webhooks {
        let hook: Webhook = serde_json::from_value(raw.clone())
            .map_err(|e| RestoreError::Document(format!("a webhook record: {e}")))?;
        if hooks.get(&hook.id)?.is_some() {
            continue;
        }
        plan.webhooks_added.push(hook.id.clone());
        if !dry_run {
            hooks.restore(hook, &old_sealer).await?;
        }
    }
    Ok(plan)
}

/// One line per object for a person: `created service/web`, `unchanged network/berth-internal`.
pub fn describe(plan: &RestorePlan) -> Vec<String> {
    let verb = |o: ApplyOutcome| match o {
        ApplyOutcome::Created => "create",
        ApplyOutcome::Configured => "update",
        ApplyOutcome::Unchanged => "unchanged",
    };
    let mut lines: Vec<String> = plan
        .objects
        .iter()
        .map(|r| format!("{} {}/{}", verb(r.outcome), r.kind.lower(), r.name))
        .collect();
    lines.extend(
        plan.webhooks_added
            .iter()
            .map(|id| format!("create webhook/{id}")),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{secret, svc, test_key};
    use serde_json::json;

    #[tokio::test]
    async fn a_snapshot_restores_into_another_store_with_its_secrets_resealed() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let key_a = test_key();
        let a = Store::open(a_dir.path(), &key_a).await.unwrap();
        a.write(
            vec![
                svc("web", 2),
                secret("db", json!({"data": {"password": "aGVsbG8="}})),
            ],
            WriteMode::Upsert,
            None,
            false,
        )
        .await
        .unwrap();
        let doc = export(&a, &key_a).await.unwrap();
        // Sealed in the document: the value is not there in clear.
        let text = serde_json::to_string(&doc).unwrap();
        assert!(!text.contains("aGVsbG8="), "a Secret's value is in clear");

        // A fresh store takes the installation id, then the objects under its own master key.
        let b_db = crate::store::open_sled(b_dir.path()).unwrap();
        assert!(Store::adopt_installation(&b_db, &doc.installation).unwrap());
        let key_b = MasterKey::random("test b");
        let b = Store::open_db(b_db, "b", &key_b).await.unwrap();
        assert_eq!(b.instance(), a.instance());
        let dry = restore(&b, &doc, true).await.unwrap();
        assert!(dry
            .objects
            .iter()
            .all(|r| r.outcome == ApplyOutcome::Created));
        assert!(
            b.get(Kind::Service, "web").unwrap().is_none(),
            "dry run wrote"
        );
        let done = restore(&b, &doc, false).await.unwrap();
        assert!(done.adopted_installation);
        assert_eq!(
            b.get(Kind::Service, "web").unwrap().unwrap().spec["replicas"],
            2
        );
        let s = b.get(Kind::Secret, "db").unwrap().unwrap();
        assert_eq!(s.spec["data"]["password"], "aGVsbG8=");

        // Again: nothing changes, and an object the snapshot lacks stays.
        b.write(vec![svc("extra", 1)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        let again = restore(&b, &doc, false).await.unwrap();
        assert!(again
            .objects
            .iter()
            .all(|r| r.outcome == ApplyOutcome::Unchanged));
        assert!(b.get(Kind::Service, "extra").unwrap().is_some());
        // A store that holds objects keeps its own id.
        let b_db = b.db().clone();
        assert!(!Store::adopt_installation(&b_db, "other").unwrap());
    }

    #[tokio::test]
    async fn a_damaged_document_changes_nothing_and_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key();
        let s = Store::open(dir.path(), &key).await.unwrap();
        s.write(
            vec![secret("db", json!({"data": {"password": "aGVsbG8="}}))],
            WriteMode::Upsert,
            None,
            false,
        )
        .await
        .unwrap();
        let mut doc = export(&s, &key).await.unwrap();
        doc.objects
            .push(json!({"apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "bad"}, "spec": {"replicas": 1}}));
        let e = restore(&s, &doc, false).await.unwrap_err().to_string();
        assert!(
            e.contains("(Service `bad`) does not validate: spec: missing field `image`"),
            "{e}"
        );
        assert!(s.get(Kind::Service, "bad").unwrap().is_none());
        doc.objects.pop();
        doc.master_key = MasterKey::random("x").to_base64();
        let e = restore(&s, &doc, false).await.unwrap_err().to_string();
        assert_eq!(
            e,
            "the snapshot's environment document is not usable: Secret `db` does not open with the snapshot's master key"
        );
    }
}
