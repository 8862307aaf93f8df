//! The API server's source of truth, persisted in sled. Every write is one transaction over the
//! object, the event history and the outbox, and is flushed to disk before it is acknowledged, so a
//! `kill -9` right after a reply loses nothing. Events leave through the outbox (see `publisher.rs`):
//! a crash between commit and publish delays an event, it never loses it.

use berth_api_types::{DynObject, Event, EventType, Kind, ObjectMeta};
use berth_controllers::client::{ApplyOutcome, ApplyResult};
use chrono::Utc;
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, Notify};

/// Events kept for `berth events` and `describe`; older ones are trimmed.
const EVENT_HISTORY: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} `{name}` not found")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} `{name}` already exists")]
    AlreadyExists { kind: Kind, name: String },
    #[error("{kind} `{name}` was changed by someone else (resourceVersion {expected} is not current {actual}); get it again and retry")]
    Conflict {
        kind: Kind,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

/// What `modify` does to an existing object.
enum Change {
    /// New status (the only in-place change the API makes outside `write`).
    Status(Value),
    Remove,
}

/// How a write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail if it exists (POST).
    Create,
    /// Fail if it does not exist (PUT/PATCH).
    Replace,
    /// Either (apply).
    Upsert,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    objects: sled::Tree,
    events: sled::Tree,
    outbox: sled::Tree,
    meta: sled::Tree,
    ids: Arc<Mutex<ulid::Generator>>,
    /// Wakes the outbox publisher after a commit.
    pub(crate) outbox_ready: Arc<Notify>,
    /// Live feed for `events --watch` (after commit, in commit order per writer).
    watchers: broadcast::Sender<Event>,
    instance: String,
}

fn key(kind: Kind, name: &str) -> String {
    format!("{}/{}", kind.lower(), name)
}

fn abort<T>(e: StoreError) -> Result<T, ConflictableTransactionError<StoreError>> {
    Err(ConflictableTransactionError::Abort(e))
}

fn decode(bytes: &[u8]) -> Result<DynObject, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Storage(format!("corrupt object: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values always encode")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError::Storage(format!("{}: {e}", dir.display())))?;
        let meta = db.open_tree("meta")?;
        let instance = match meta.get("instance")? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = ulid::Ulid::new().to_string().to_lowercase();
                meta.insert("instance", id.as_bytes())?;
                db.flush()?;
                id
            }
        };
        let (watchers, _) = broadcast::channel(1024);
        Ok(Store {
            objects: db.open_tree("objects")?,
            events: db.open_tree("events")?,
            outbox: db.open_tree("outbox")?,
            meta,
            db,
            ids: Arc::new(Mutex::new(ulid::Generator::new())),
            outbox_ready: Arc::new(Notify::new()),
            watchers,
            instance,
        })
    }

    /// This installation's id, created at first start; stamped on every Swarm object berth creates.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn next_id(&self) -> String {
        let mut g = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        // The generator only fails when 2^80 ids are made in one millisecond.
        g.generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }

    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, StoreError> {
        self.objects
            .get(key(kind, name))?
            .map(|b| decode(&b))
            .transpose()
    }

    pub fn list(&self, kind: Kind) -> Result<Vec<DynObject>, StoreError> {
        self.objects
            .scan_prefix(format!("{}/", kind.lower()))
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    /// Atomically writes a set of validated objects (apply, create, replace). Either every object is
    /// written or none is. `expected_rv`: conditional write (only for a single object).
    pub async fn write(
        &self,
        objects: Vec<DynObject>,
        mode: WriteMode,
        expected_rv: Option<String>,
        dry_run: bool,
    ) -> Result<Vec<(ApplyResult, DynObject)>, StoreError> {
        let now = Utc::now();
        let ids: Vec<String> = objects.iter().map(|_| self.next_id()).collect();
        let uids: Vec<String> = objects
            .iter()
            .map(|_| ulid::Ulid::new().to_string().to_lowercase())
            .collect();
        if dry_run {
            // The same checks against the current state; nothing is written.
            let mut rv = self.current_rv_now()?;
            let mut out = Vec::with_capacity(objects.len());
            for (i, incoming) in objects.iter().enumerate() {
                let old = self.get(incoming.kind, &incoming.metadata.name)?;
                let (obj, outcome) = plan(
                    old,
                    incoming,
                    mode,
                    expected_rv.as_deref(),
                    now,
                    &uids[i],
                    &mut rv,
                )?;
                out.push((result_of(&obj, outcome), obj));
            }
            return Ok(out);
        }
        let trees = (&self.objects, &self.events, &self.outbox, &self.meta);
        let (out, emitted) = trees.transaction(|(objs, events, outbox, meta)| {
            let mut rv = current_rv(meta)?;
            let mut out = Vec::with_capacity(objects.len());
            let mut emitted = Vec::new();
            for (i, incoming) in objects.iter().enumerate() {
                let k = key(incoming.kind, &incoming.metadata.name);
                let old = match objs.get(k.as_bytes())? {
                    Some(b) => Some(decode(&b).or_else(abort)?),
                    None => None,
                };
                let (obj, outcome) = plan(
                    old,
                    incoming,
                    mode,
                    expected_rv.as_deref(),
                    now,
                    &uids[i],
                    &mut rv,
                )
                .or_else(abort)?;
                if outcome != ApplyOutcome::Unchanged {
                    objs.insert(k.as_bytes(), encode(&obj))?;
                    let ev = make_event(&ids[i], EventType::Applied, &obj, now, String::new());
                    record_event(events, outbox, &ev)?;
                    emitted.push(ev);
                }
                out.push((result_of(&obj, outcome), obj));
            }
            meta.insert("rv", &rv.to_be_bytes())?;
            Ok((out, emitted))
        })?;
        self.committed(emitted).await?;
        Ok(out)
    }

    fn current_rv_now(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get("rv")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Replaces an object's status (controllers only). Identical status is not written and emits no
    /// event, so a controller that reconciles without change causes no traffic.
    pub async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
    ) -> Result<DynObject, StoreError> {
        self.modify(kind, name, |obj| {
            if obj.status == status {
                return None;
            }
            Some(Change::Status(status.clone()))
        })
        .await
    }

    pub async fn delete(&self, kind: Kind, name: &str) -> Result<DynObject, StoreError> {
        self.modify(kind, name, |_| Some(Change::Remove)).await
    }

    /// Read-modify-write of one existing object in one transaction, with its event. `change` returns
    /// `None` for "nothing to do" (no write, no event).
    async fn modify(
        &self,
        kind: Kind,
        name: &str,
        change: impl Fn(&DynObject) -> Option<Change>,
    ) -> Result<DynObject, StoreError> {
        let now = Utc::now();
        let id = self.next_id();
        let k = key(kind, name);
        let trees = (&self.objects, &self.events, &self.outbox, &self.meta);
        let (obj, emitted) = trees.transaction(|(objs, events, outbox, meta)| {
            let Some(b) = objs.get(k.as_bytes())? else {
                return abort(StoreError::NotFound {
                    kind,
                    name: name.to_string(),
                });
            };
            let old = decode(&b).or_else(abort)?;
            let Some(change) = change(&old) else {
                return Ok((old, None));
            };
            let rv = current_rv(meta)? + 1;
            meta.insert("rv", &rv.to_be_bytes())?;
            let (mut obj, type_) = match change {
                Change::Status(status) => {
                    let mut obj = old;
                    obj.status = status;
                    (obj, EventType::StatusChanged)
                }
                Change::Remove => {
                    objs.remove(k.as_bytes())?;
                    (old, EventType::Deleted)
                }
            };
            obj.metadata.resource_version = Some(rv.to_string());
            if type_ != EventType::Deleted {
                objs.insert(k.as_bytes(), encode(&obj))?;
            }
            let message = match type_ {
                EventType::StatusChanged => ready_message(&obj),
                _ => String::new(),
            };
            let ev = make_event(&id, type_, &obj, now, message);
            record_event(events, outbox, &ev)?;
            Ok((obj, Some(ev)))
        })?;
        if let Some(ev) = emitted {
            self.committed(vec![ev]).await?;
        }
        Ok(obj)
    }

    /// Makes a commit durable, then lets the publisher and watchers know.
    async fn committed(&self, events: Vec<Event>) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        self.outbox_ready.notify_one();
        for e in events {
            let _ = self.watchers.send(e);
        }
        Ok(())
    }

    /// Recent events, oldest first, filtered by kind and name.
    pub fn recent_events(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for item in self.events.iter().rev() {
            let (_, v) = item?;
            let Ok(e) = serde_json::from_slice::<Event>(&v) else {
                continue;
            };
            if kind.is_some_and(|k| k != e.kind) || name.is_some_and(|n| n != e.name) {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    pub fn watch(&self) -> broadcast::Receiver<Event> {
        self.watchers.subscribe()
    }

    /// The oldest unpublished events, in commit order.
    pub(crate) fn outbox_batch(&self, max: usize) -> Result<Vec<(sled::IVec, Event)>, StoreError> {
        let mut out = Vec::new();
        for item in self.outbox.iter().take(max) {
            let (k, v) = item?;
            match serde_json::from_slice::<Event>(&v) {
                Ok(e) => out.push((k, e)),
                Err(_) => {
                    // Unreadable entries would block the outbox forever.
                    self.outbox.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn outbox_done(&self, key: &sled::IVec) -> Result<(), StoreError> {
        self.outbox.remove(key)?;
        Ok(())
    }

    /// Keeps the event history bounded.
    pub(crate) fn trim_events(&self) -> Result<(), StoreError> {
        let excess = self.events.len().saturating_sub(EVENT_HISTORY);
        for k in self.events.iter().keys().take(excess) {
            self.events.remove(k?)?;
        }
        Ok(())
    }
}

/// What writing `incoming` over `old` results in: the new object and whether anything changed.
/// `generation` moves only when the spec changes; `resourceVersion` on every change.
fn plan(
    old: Option<DynObject>,
    incoming: &DynObject,
    mode: WriteMode,
    expected_rv: Option<&str>,
    now: chrono::DateTime<Utc>,
    uid: &str,
    rv: &mut u64,
) -> Result<(DynObject, ApplyOutcome), StoreError> {
    let (kind, name) = (incoming.kind, incoming.metadata.name.clone());
    match (&old, mode) {
        (Some(_), WriteMode::Create) => return Err(StoreError::AlreadyExists { kind, name }),
        (None, WriteMode::Replace) => return Err(StoreError::NotFound { kind, name }),
        _ => {}
    }
    if let (Some(exp), Some(o)) = (expected_rv, &old) {
        let actual = o.metadata.resource_version.clone().unwrap_or_default();
        if exp != actual {
            return Err(StoreError::Conflict {
                kind,
                name,
                expected: exp.to_string(),
                actual,
            });
        }
    }
    Ok(match old {
        None => {
            *rv += 1;
            let mut obj = incoming.clone();
            obj.metadata = ObjectMeta {
                uid: Some(uid.to_string()),
                generation: 1,
                resource_version: Some(rv.to_string()),
                creation_timestamp: Some(now),
                ..incoming.metadata.clone()
            };
            obj.status = Value::Null;
            (obj, ApplyOutcome::Created)
        }
        Some(old) => {
            let spec_changed = old.spec != incoming.spec;
            let meta_changed = old.metadata.labels != incoming.metadata.labels
                || old.metadata.annotations != incoming.metadata.annotations;
            if !spec_changed && !meta_changed {
                (old, ApplyOutcome::Unchanged)
            } else {
                *rv += 1;
                let mut obj = old;
                obj.spec = incoming.spec.clone();
                obj.metadata.labels = incoming.metadata.labels.clone();
                obj.metadata.annotations = incoming.metadata.annotations.clone();
                if spec_changed {
                    obj.metadata.generation += 1;
                }
                obj.metadata.resource_version = Some(rv.to_string());
                (obj, ApplyOutcome::Configured)
            }
        }
    })
}

fn result_of(obj: &DynObject, outcome: ApplyOutcome) -> ApplyResult {
    ApplyResult {
        kind: obj.kind,
        name: obj.metadata.name.clone(),
        outcome,
        generation: obj.metadata.generation,
    }
}

fn current_rv(meta: &TransactionalTree) -> Result<u64, ConflictableTransactionError<StoreError>> {
    Ok(meta
        .get("rv")?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn make_event(
    id: &str,
    type_: EventType,
    obj: &DynObject,
    time: chrono::DateTime<Utc>,
    message: String,
) -> Event {
    Event {
        id: id.to_string(),
        type_,
        kind: obj.kind,
        name: obj.metadata.name.clone(),
        uid: obj.metadata.uid.clone().unwrap_or_default(),
        generation: obj.metadata.generation,
        resource_version: obj.metadata.resource_version.clone().unwrap_or_default(),
        time,
        message,
    }
}

/// Events are keyed by their ULID (time-ordered), in the history and the outbox alike.
fn record_event(
    events: &TransactionalTree,
    outbox: &TransactionalTree,
    ev: &Event,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    let k = ev.id.as_bytes();
    let v = encode(ev);
    events.insert(k, v.clone())?;
    outbox.insert(k, v)?;
    Ok(())
}

/// The Ready condition's message, as a one-line summary on `StatusChanged` events.
fn ready_message(obj: &DynObject) -> String {
    obj.status
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .map(|c| {
            format!(
                "Ready={} {}",
                c.get("status").and_then(Value::as_str).unwrap_or("?"),
                c.get("message").and_then(Value::as_str).unwrap_or("")
            )
            .trim_end()
            .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::typed::decode_object;
    use serde_json::json;

    fn svc(name: &str, replicas: u64) -> DynObject {
        decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"image": "a:1", "replicas": replicas}
        }))
        .unwrap()
    }

    fn outbox_types(s: &Store) -> Vec<(EventType, String, u64)> {
        s.outbox_batch(100)
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.type_, e.name, e.generation))
            .collect()
    }

    #[tokio::test]
    async fn generation_moves_only_with_spec() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let r = s
            .write(vec![svc("web", 1)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Created);
        assert_eq!(r[0].1.metadata.generation, 1);
        let rv1 = r[0].1.metadata.resource_version.clone().unwrap();

        let r = s
            .write(vec![svc("web", 1)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Unchanged);
        assert_eq!(
            r[0].1.metadata.resource_version.as_deref(),
            Some(rv1.as_str())
        );

        let mut labelled = svc("web", 1);
        labelled.metadata.labels.insert("team".into(), "x".into());
        let r = s
            .write(vec![labelled], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Configured);
        assert_eq!(
            r[0].1.metadata.generation, 1,
            "metadata changes do not bump generation"
        );

        let r = s
            .write(vec![svc("web", 3)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].1.metadata.generation, 2);
        assert!(r[0].1.metadata.labels.is_empty(), "apply replaces labels");

        // Identical status is not a write; a new one is, without touching generation.
        s.update_status(Kind::Service, "web", json!({"a": 1}))
            .await
            .unwrap();
        s.update_status(Kind::Service, "web", json!({"a": 1}))
            .await
            .unwrap();
        let o = s.get(Kind::Service, "web").unwrap().unwrap();
        assert_eq!(o.metadata.generation, 2);
        assert_eq!(o.status, json!({"a": 1}));

        s.delete(Kind::Service, "web").await.unwrap();
        assert!(s.get(Kind::Service, "web").unwrap().is_none());
        assert_eq!(
            outbox_types(&s),
            vec![
                (EventType::Applied, "web".into(), 1),
                (EventType::Applied, "web".into(), 1),
                (EventType::Applied, "web".into(), 2),
                (EventType::StatusChanged, "web".into(), 2),
                (EventType::Deleted, "web".into(), 2),
            ],
            "one event per change, none for no-ops, in commit order"
        );
    }

    #[tokio::test]
    async fn a_batch_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write(vec![svc("b", 1)], WriteMode::Create, None, false)
            .await
            .unwrap();
        let err = s
            .write(
                vec![svc("a", 1), svc("b", 1)],
                WriteMode::Create,
                None,
                false,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
        assert!(
            s.get(Kind::Service, "a").unwrap().is_none(),
            "nothing of a failed batch is kept"
        );
        assert_eq!(outbox_types(&s).len(), 1);
    }

    #[tokio::test]
    async fn dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let r = s
            .write(vec![svc("a", 1)], WriteMode::Upsert, None, true)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Created);
        assert!(s.get(Kind::Service, "a").unwrap().is_none());
        assert!(outbox_types(&s).is_empty());
    }

    #[tokio::test]
    async fn conditional_writes_detect_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let r = s
            .write(vec![svc("a", 1)], WriteMode::Create, None, false)
            .await
            .unwrap();
        let rv = r[0].1.metadata.resource_version.clone().unwrap();
        s.write(
            vec![svc("a", 2)],
            WriteMode::Replace,
            Some(rv.clone()),
            false,
        )
        .await
        .unwrap();
        let err = s
            .write(vec![svc("a", 3)], WriteMode::Replace, Some(rv), false)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        let err = s
            .write(vec![svc("zz", 1)], WriteMode::Replace, None, false)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }));
    }

    #[tokio::test]
    async fn survives_reopen_with_instance_and_counter() {
        let dir = tempfile::tempdir().unwrap();
        let (instance, rv) = {
            let s = Store::open(dir.path()).unwrap();
            let r = s
                .write(vec![svc("a", 1)], WriteMode::Create, None, false)
                .await
                .unwrap();
            (
                s.instance().to_string(),
                r[0].1.metadata.resource_version.clone().unwrap(),
            )
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.instance(), instance);
        assert!(s.get(Kind::Service, "a").unwrap().is_some());
        let r = s
            .write(vec![svc("b", 1)], WriteMode::Create, None, false)
            .await
            .unwrap();
        let rv2: u64 = r[0]
            .1
            .metadata
            .resource_version
            .clone()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            rv2 > rv.parse::<u64>().unwrap(),
            "resourceVersion keeps increasing across restarts"
        );
    }
}
