//! The API server's source of truth, persisted in sled. Every write is one transaction over the
//! object, the event history and the outbox, and is flushed to disk before it is acknowledged, so a
//! `kill -9` right after a reply loses nothing. Events leave through the outbox (`outbox.rs`): a
//! crash between commit and publish delays an event, it never loses it.
//!
//! This layer knows no kind's rules: what may be deleted, what an apply keeps, which Network must
//! exist are `admission.rs`, asked through `admission::admit`. Secrets are sealed before they reach
//! sled (`seal.rs`); events carry no spec, so neither the history nor the outbox holds a value.
//!
//! One async write lock serialises every write. That makes "is this Secret still used by a Service?"
//! and the delete that follows one step: no Service can start using it in between.

mod admission;
pub mod outbox;
mod seal;

pub use admission::{ensure_backup_plan, ensure_network};

use crate::crypto::{MasterKey, Sealer};
use crate::deploy_auth::DeployKey;
use berth_api_types::wire::{ApplyOutcome, ApplyResult};
use berth_api_types::{DynObject, Event, EventType, Kind, ObjectMeta};
use chrono::Utc;
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, Notify};

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
    /// Deleting an object a Service still refers to.
    #[error("{kind} `{name}` is used by {}; remove those references first", users.join(", "))]
    InUse {
        kind: Kind,
        name: String,
        users: Vec<String>,
    },
    /// Deleting an object berth itself needs.
    #[error("{kind} `{name}` {why}")]
    Protected {
        kind: Kind,
        name: String,
        why: String,
    },
    /// The master key cannot open what this store holds: it is not the key the store was used with.
    #[error("the master key ({source_}) cannot decrypt the Secrets in {dir}: it is not the key they were sealed with; start with the original key (BERTH_MASTER_KEY or <data-dir>/master.key)")]
    WrongKey { dir: String, source_: String },
    #[error("storage failure: {0}")]
    Storage(String),
}

impl StoreError {
    /// The HTTP status and reason the API answers this error with; `InProcessApi`
    /// reports the same, so a controller cannot tell the two apart.
    pub fn status_and_reason(&self) -> (u16, &'static str) {
        match self {
            StoreError::NotFound { .. } => (404, "NotFound"),
            StoreError::AlreadyExists { .. } => (409, "AlreadyExists"),
            StoreError::Conflict { .. } => (409, "Conflict"),
            StoreError::InUse { .. } => (409, "InUse"),
            StoreError::Protected { .. } => (409, "Protected"),
            StoreError::Storage(_) | StoreError::WrongKey { .. } => (500, "StorageError"),
        }
    }
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

/// sled's page cache (see `Store::open`).
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    objects: sled::Tree,
    events: sled::Tree,
    outbox: sled::Tree,
    meta: sled::Tree,
    ids: Arc<Mutex<ulid::Generator>>,
    /// Wakes the outbox publisher after a commit.
    outbox_ready: Arc<Notify>,
    /// Live feed for `events --watch` (after commit, in commit order per writer).
    watchers: broadcast::Sender<Event>,
    instance: String,
    /// Seals Secret specs on write and opens them on read.
    sealer: Sealer,
    /// Signs and verifies deploy events (the webhook bridge and the applier both reach it here).
    deploy_key: DeployKey,
    /// Held by every write (see the module comment).
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Group commit: writers that commit while a flush runs share the next one.
    durability: Arc<Durability>,
    /// Tests set it to make every write fail as a broken disk would.
    #[cfg(test)]
    pub(crate) fail_writes: Arc<std::sync::atomic::AtomicBool>,
}

/// Counts commits and what the last fsync covered, so that concurrent writers share one fsync
/// (group commit) instead of queueing one each: a 100-service apply made ~660 fsyncs, up to
/// 0.4 s each on a busy disk. Every write is still on disk before it is acknowledged.
#[derive(Default)]
struct Durability {
    /// Commits so far; a writer takes its number after its transaction committed.
    commits: std::sync::atomic::AtomicU64,
    /// The highest commit number a finished fsync covers.
    flushed: std::sync::atomic::AtomicU64,
    /// One fsync at a time; who waits here usually finds their commit covered when it is its turn.
    flushing: tokio::sync::Mutex<()>,
}

pub(crate) fn key(kind: Kind, name: &str) -> String {
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
    /// Opens (or creates) the store. A store that was used with another master key is refused with
    /// `WrongKey`; Secrets stored unsealed (by a version before encryption) are sealed here.
    pub fn open(dir: &Path, key: &MasterKey) -> Result<Self, StoreError> {
        // sled's page cache defaults to 1 GiB and fills with every object read or written, so RSS
        // grew with the number of objects (253 MB after 10,000 Configs). The working set is far
        // smaller: reads are by key or one kind's prefix, and every write is flushed at once.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
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
        let sealer = key.sealer();
        seal::check_key(&db, &meta, &sealer, dir, key)?;
        let (watchers, _) = broadcast::channel(1024);
        let store = Store {
            objects: db.open_tree("objects")?,
            events: db.open_tree("events")?,
            outbox: db.open_tree("outbox")?,
            meta,
            db,
            ids: Arc::new(Mutex::new(ulid::Generator::new())),
            outbox_ready: Arc::new(Notify::new()),
            watchers,
            instance,
            sealer,
            deploy_key: key.deploy_key(),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
            durability: Arc::default(),
            #[cfg(test)]
            fail_writes: Arc::default(),
        };
        store.seal_unsealed()?;
        Ok(store)
    }

    /// Makes a store that holds no objects yet take the installation id `id` (an environment
    /// restore into a fresh data directory: the restored installation then owns, and adopts, the
    /// Swarm objects the snapshot's installation made). Returns whether it did; a store that
    /// holds objects keeps its own id. Must run before [`Store::open`] on the same directory.
    pub fn adopt_installation(dir: &Path, id: &str) -> Result<bool, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|e| StoreError::Storage(format!("{}: {e}", dir.display())))?;
        let objects = db.open_tree("objects")?;
        if !objects.is_empty() {
            return Ok(false);
        }
        let meta = db.open_tree("meta")?;
        meta.insert("instance", id.as_bytes())?;
        db.flush()?;
        Ok(true)
    }

    /// A flag in the store's meta (things done once per installation).
    pub(crate) fn meta_flag(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.meta.get(format!("flag/{name}"))?.is_some())
    }

    pub(crate) async fn set_meta_flag(&self, name: &str) -> Result<(), StoreError> {
        self.meta.insert(format!("flag/{name}"), b"1".as_slice())?;
        self.flush().await
    }

    /// Every stored object as it is at rest (Secrets sealed), without status: the environment
    /// snapshot's content.
    pub fn export_objects(&self) -> Result<Vec<DynObject>, StoreError> {
        self.objects
            .iter()
            .values()
            .map(|v| {
                let mut obj = decode(&v?)?;
                obj.status = serde_json::Value::Null;
                Ok(obj)
            })
            .collect()
    }

    /// This installation's id, created at first start; stamped on every Swarm object berth creates.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A named tree of the same database for records that are not objects (webhooks): they get
    /// the same durability and the same data directory without going through the object path.
    pub(crate) fn aux_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// The master key's sealer, for other secrets kept in the store (webhook signing secrets).
    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// The key deploy events on the bus are signed with (see `deploy_auth`).
    pub(crate) fn deploy_key(&self) -> &DeployKey {
        &self.deploy_key
    }

    /// Makes everything written so far durable (same blocking-pool flush as `committed`).
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Storage(format!("flush task failed: {e}")))??;
        Ok(())
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
            .map(|b| self.decode_obj(&b))
            .transpose()
    }

    pub fn list(&self, kind: Kind) -> Result<Vec<DynObject>, StoreError> {
        self.objects
            .scan_prefix(format!("{}/", kind.lower()))
            .values()
            .map(|v| self.decode_obj(&v?))
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
                    self,
                    old,
                    incoming,
                    mode,
                    expected_rv.as_deref(),
                    Stamp { uid: &uids[i], now },
                    &mut rv,
                )?;
                out.push((result_of(&obj, outcome), obj));
            }
            return Ok(out);
        }
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Storage("injected write failure".into()));
        }
        let guard = self.write_lock.lock().await;
        let trees = (&self.objects, &self.events, &self.outbox, &self.meta);
        let (out, emitted) = trees.transaction(|(objs, events, outbox, meta)| {
            let mut rv = current_rv(meta)?;
            let mut out = Vec::with_capacity(objects.len());
            let mut emitted = Vec::new();
            for (i, incoming) in objects.iter().enumerate() {
                let k = key(incoming.kind, &incoming.metadata.name);
                // Plaintext on both sides, so "unchanged" and `generation` see through the sealing.
                let old = match objs.get(k.as_bytes())? {
                    Some(b) => Some(self.decode_obj(&b).or_else(abort)?),
                    None => None,
                };
                let (obj, outcome) = plan(
                    self,
                    old,
                    incoming,
                    mode,
                    expected_rv.as_deref(),
                    Stamp { uid: &uids[i], now },
                    &mut rv,
                )
                .or_else(abort)?;
                if outcome != ApplyOutcome::Unchanged {
                    objs.insert(k.as_bytes(), self.encode_obj(&obj))?;
                    let ev = make_event(&ids[i], EventType::Applied, &obj, now, String::new());
                    record_event(events, outbox, &ev)?;
                    emitted.push(ev);
                }
                out.push((result_of(&obj, outcome), obj));
            }
            meta.insert("rv", &rv.to_be_bytes())?;
            Ok((out, emitted))
        })?;
        drop(guard);
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

    /// Replaces an object's status (controllers only). With `expected_rv`, only if the object is
    /// still at that resourceVersion (`Conflict` otherwise, nothing written): a controller that read
    /// an older object must not overwrite what another writer put there since. Identical status is
    /// not written and emits no event, so a controller that reconciles without change causes no
    /// traffic.
    pub async fn update_status(
        &self,
        kind: Kind,
        name: &str,
        status: Value,
        expected_rv: Option<&str>,
    ) -> Result<DynObject, StoreError> {
        self.modify(kind, name, |obj| {
            if let Some(exp) = expected_rv {
                let actual = obj.metadata.resource_version.as_deref().unwrap_or_default();
                if exp != actual {
                    return Err(StoreError::Conflict {
                        kind,
                        name: name.to_string(),
                        expected: exp.to_string(),
                        actual: actual.to_string(),
                    });
                }
            }
            if obj.status == status {
                return Ok(None);
            }
            Ok(Some(Change::Status(status.clone())))
        })
        .await
    }

    /// Deletes an object, unless admission refuses (something still uses it, or berth needs it;
    /// `default_network` is the Network services join when they list none). The check and the
    /// delete happen under the write lock, so no write can add a reference in between.
    pub async fn delete(
        &self,
        kind: Kind,
        name: &str,
        default_network: &str,
    ) -> Result<DynObject, StoreError> {
        let guard = self.write_lock.lock().await;
        if self.objects.contains_key(key(kind, name))? {
            admission::admit(
                self,
                admission::Op::Delete {
                    kind,
                    name,
                    default_network,
                },
            )?;
        }
        let result = self.modify_locked(kind, name, |_| Ok(Some(Change::Remove)));
        drop(guard);
        self.finish(result).await
    }

    /// Read-modify-write of one existing object in one transaction, with its event. `change` returns
    /// `None` for "nothing to do" (no write, no event), or an error to refuse the change.
    async fn modify(
        &self,
        kind: Kind,
        name: &str,
        change: impl Fn(&DynObject) -> Result<Option<Change>, StoreError>,
    ) -> Result<DynObject, StoreError> {
        let guard = self.write_lock.lock().await;
        let result = self.modify_locked(kind, name, change);
        drop(guard);
        self.finish(result).await
    }

    /// Makes the result of `modify_locked` durable and announces its event (after the lock is released).
    async fn finish(
        &self,
        result: Result<(DynObject, Option<Event>), StoreError>,
    ) -> Result<DynObject, StoreError> {
        let (obj, emitted) = result?;
        if let Some(ev) = emitted {
            self.committed(vec![ev]).await?;
        }
        Ok(obj)
    }

    /// The transaction of `modify`; the caller holds the write lock.
    fn modify_locked(
        &self,
        kind: Kind,
        name: &str,
        change: impl Fn(&DynObject) -> Result<Option<Change>, StoreError>,
    ) -> Result<(DynObject, Option<Event>), StoreError> {
        let now = Utc::now();
        let id = self.next_id();
        let k = key(kind, name);
        let trees = (&self.objects, &self.events, &self.outbox, &self.meta);
        let result = trees.transaction(|(objs, events, outbox, meta)| {
            let Some(b) = objs.get(k.as_bytes())? else {
                return abort(StoreError::NotFound {
                    kind,
                    name: name.to_string(),
                });
            };
            let old = self.decode_obj(&b).or_else(abort)?;
            let Some(change) = change(&old).or_else(abort)? else {
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
                objs.insert(k.as_bytes(), self.encode_obj(&obj))?;
            }
            let message = match type_ {
                EventType::StatusChanged => ready_message(&obj),
                _ => String::new(),
            };
            let ev = make_event(&id, type_, &obj, now, message);
            record_event(events, outbox, &ev)?;
            Ok((obj, Some(ev)))
        })?;
        Ok(result)
    }

    /// Makes a commit durable, then lets the publisher and watchers know.
    async fn committed(&self, events: Vec<Event>) -> Result<(), StoreError> {
        self.make_durable().await?;
        self.outbox_ready.notify_one();
        for e in events {
            let _ = self.watchers.send(e);
        }
        Ok(())
    }

    /// Makes everything committed so far durable, sharing the fsync with every writer that
    /// commits meanwhile (group commit, see `Durability`). For records kept beside the objects
    /// (the audit log) that must be on disk before they are acknowledged.
    ///
    /// The fsync runs as a blocking flush on tokio's blocking pool, not through sled's
    /// `flush_async`: that one waits on sled's own small I/O thread pool, and enough concurrent
    /// callers occupy every thread of it with waiters while the I/O they wait for needs one of those
    /// threads (sled 0.34, spacejam/sled#1308). Seen here as every reconcile hanging under load.
    pub(crate) async fn make_durable(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let d = &self.durability;
        let mine = d.commits.fetch_add(1, Ordering::AcqRel) + 1;
        if d.flushed.load(Ordering::Acquire) < mine {
            let _turn = d.flushing.lock().await;
            if d.flushed.load(Ordering::Acquire) < mine {
                // Every commit numbered up to here is in sled's log already: this fsync covers it.
                let upto = d.commits.load(Ordering::Acquire);
                let db = self.db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Storage(format!("flush task failed: {e}")))??;
                d.flushed.fetch_max(upto, Ordering::AcqRel);
            }
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
}

/// What a newly created object is stamped with.
struct Stamp<'a> {
    uid: &'a str,
    now: chrono::DateTime<Utc>,
}

/// What writing `incoming` over `old` results in: the new object and whether anything changed.
/// `generation` moves only when the spec changes; `resourceVersion` on every change.
fn plan(
    store: &Store,
    old: Option<DynObject>,
    incoming: &DynObject,
    mode: WriteMode,
    expected_rv: Option<&str>,
    stamp: Stamp<'_>,
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
                uid: Some(stamp.uid.to_string()),
                generation: 1,
                resource_version: Some(rv.to_string()),
                creation_timestamp: Some(stamp.now),
                ..incoming.metadata.clone()
            };
            obj.status = Value::Null;
            (obj, ApplyOutcome::Created)
        }
        Some(old) => {
            let mut incoming = incoming.clone();
            if matches!(mode, WriteMode::Upsert) {
                admission::admit(
                    store,
                    admission::Op::Upsert {
                        old: &old,
                        incoming: &mut incoming,
                    },
                )?;
            }
            let incoming = &incoming;
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
pub(crate) mod testing {
    //! Objects and stores for the store's tests.
    use super::*;
    use crate::crypto::MasterKey;
    use berth_api_types::typed::decode_object;
    use serde_json::json;

    pub fn test_key() -> MasterKey {
        MasterKey::from_bytes([42u8; 32], "test key")
    }

    pub fn svc(name: &str, replicas: u64) -> DynObject {
        decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"image": "a:1", "replicas": replicas}
        }))
        .unwrap()
    }

    pub fn outbox_types(s: &Store) -> Vec<(EventType, String, u64)> {
        s.outbox_batch(100)
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.type_, e.name, e.generation))
            .collect()
    }

    pub fn obj(v: Value) -> DynObject {
        decode_object(&v).unwrap()
    }

    pub fn secret(name: &str, data: Value) -> DynObject {
        obj(
            json!({"apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": name}, "spec": data}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn generation_moves_only_with_spec() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
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
        s.update_status(Kind::Service, "web", json!({"a": 1}), None)
            .await
            .unwrap();
        s.update_status(Kind::Service, "web", json!({"a": 1}), None)
            .await
            .unwrap();
        let o = s.get(Kind::Service, "web").unwrap().unwrap();
        assert_eq!(o.metadata.generation, 2);
        assert_eq!(o.status, json!({"a": 1}));

        s.delete(Kind::Service, "web", "berth-internal")
            .await
            .unwrap();
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
        let s = Store::open(dir.path(), &test_key()).unwrap();
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
        let s = Store::open(dir.path(), &test_key()).unwrap();
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
        let s = Store::open(dir.path(), &test_key()).unwrap();
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
    async fn status_writes_can_be_conditional() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let r = s
            .write(vec![svc("a", 1)], WriteMode::Create, None, false)
            .await
            .unwrap();
        let rv = r[0].1.metadata.resource_version.clone().unwrap();
        // Still at the version read: written.
        let o = s
            .update_status(Kind::Service, "a", json!({"n": 1}), Some(&rv))
            .await
            .unwrap();
        assert_eq!(o.status, json!({"n": 1}));
        let rv2 = o.metadata.resource_version.clone().unwrap();
        assert_ne!(rv2, rv);
        // Read before that write: refused, nothing written, no event.
        let events = outbox_types(&s).len();
        let err = s
            .update_status(Kind::Service, "a", json!({"n": 2}), Some(&rv))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(err.status_and_reason(), (409, "Conflict"));
        let now = s.get(Kind::Service, "a").unwrap().unwrap();
        assert_eq!(now.status, json!({"n": 1}));
        assert_eq!(now.metadata.resource_version.as_deref(), Some(rv2.as_str()));
        assert_eq!(outbox_types(&s).len(), events);
        // Without a version: unconditional.
        let o = s
            .update_status(Kind::Service, "a", json!({"n": 3}), None)
            .await
            .unwrap();
        assert_eq!(o.status, json!({"n": 3}));
        // A missing object is NotFound, conditional or not.
        let err = s
            .update_status(Kind::Service, "zz", json!({}), Some("1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn survives_reopen_with_instance_and_counter() {
        let dir = tempfile::tempdir().unwrap();
        let (instance, rv) = {
            let s = Store::open(dir.path(), &test_key()).unwrap();
            let r = s
                .write(vec![svc("a", 1)], WriteMode::Create, None, false)
                .await
                .unwrap();
            (
                s.instance().to_string(),
                r[0].1.metadata.resource_version.clone().unwrap(),
            )
        };
        let s = Store::open(dir.path(), &test_key()).unwrap();
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
