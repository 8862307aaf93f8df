//! The API server's source of truth, persisted in sled. Every write is one transaction over the
//! object, the event history and the outbox, and is flushed to disk before it is acknowledged, so a
//! `kill -9` right after a reply loses nothing. Events leave through the outbox (see `publisher.rs`):
//! a crash between commit and publish delays an event, it never loses it.
//!
//! Secrets are sealed before they reach sled: a stored Secret's `spec` is
//! `{"sealed": "<base64(nonce || ciphertext)>"}` (XChaCha20-Poly1305, see `crypto.rs`), bound to
//! `secret/<name>`. `get` and `list` open it again, so callers inside the process see plaintext; the
//! API redacts it. Events carry no spec, so neither the history nor the outbox holds a value.
//!
//! One async write lock serialises every write. That makes "is this Secret still used by a Service?"
//! and the delete that follows one step: no Service can start using it in between.

use crate::crypto::{MasterKey, Sealer};
use berth_api_types::registry::RegistrySpec;
use berth_api_types::service::ServiceSpec;
use berth_api_types::wire::{ApplyOutcome, ApplyResult};
use berth_api_types::{DynObject, Event, EventType, Kind, ObjectMeta};
use chrono::Utc;
use serde_json::{json, Value};
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
    /// The HTTP status and reason the API answers this error with; the in-process `LocalStore`
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
    /// Seals Secret specs on write and opens them on read.
    sealer: Sealer,
    /// Held by every write (see the module comment).
    write_lock: Arc<tokio::sync::Mutex<()>>,
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

/// Associated data of a sealed Secret spec: the object's key, so a blob only opens where it was written.
fn sealed_aad(name: &str) -> String {
    key(Kind::Secret, name)
}

/// The sealed blob of a stored spec, if it is in sealed form (`{"sealed": "..."}`, nothing else).
fn sealed_blob(spec: &Value) -> Option<&str> {
    let m = spec.as_object()?;
    if m.len() != 1 {
        return None;
    }
    m.get("sealed")?.as_str()
}

/// Key-check entry in `meta`: a known plaintext sealed under the master key at first open, so a
/// wrong key is refused at start rather than discovered on the first read of a Secret.
const KEY_CHECK: &str = "key-check";
const KEY_CHECK_AAD: &[u8] = b"berth/key-check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"berth master key check v1";

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values always encode")
}

impl Store {
    /// Opens (or creates) the store. A store that was used with another master key is refused with
    /// `WrongKey`; Secrets stored unsealed (by a version before encryption) are sealed here.
    pub fn open(dir: &Path, key: &MasterKey) -> Result<Self, StoreError> {
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
        let sealer = key.sealer();
        match meta.get(KEY_CHECK)? {
            Some(v) => {
                let ok = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| sealer.open(KEY_CHECK_AAD, s).ok())
                    .is_some_and(|p| p == KEY_CHECK_PLAINTEXT);
                if !ok {
                    return Err(StoreError::WrongKey {
                        dir: dir.display().to_string(),
                        source_: key.source().to_string(),
                    });
                }
            }
            None => {
                meta.insert(
                    KEY_CHECK,
                    sealer.seal(KEY_CHECK_AAD, KEY_CHECK_PLAINTEXT).as_bytes(),
                )?;
                db.flush()?;
            }
        }
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
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        store.seal_unsealed()?;
        Ok(store)
    }

    /// Seals any Secret stored in clear (written before encryption at rest existed).
    fn seal_unsealed(&self) -> Result<(), StoreError> {
        let mut sealed_any = false;
        for item in self
            .objects
            .scan_prefix(format!("{}/", Kind::Secret.lower()))
        {
            let (k, v) = item?;
            let obj = decode(&v)?;
            if sealed_blob(&obj.spec).is_none() {
                self.objects.insert(k, self.encode_obj(&obj))?;
                sealed_any = true;
            }
        }
        if sealed_any {
            self.db.flush()?;
        }
        Ok(())
    }

    /// An object as stored: a Secret's spec sealed, everything else as is.
    fn encode_obj(&self, obj: &DynObject) -> Vec<u8> {
        if obj.kind != Kind::Secret {
            return encode(obj);
        }
        let plaintext = encode(&obj.spec);
        let sealed = self
            .sealer
            .seal(sealed_aad(&obj.metadata.name).as_bytes(), &plaintext);
        encode(&DynObject {
            api_version: obj.api_version.clone(),
            kind: obj.kind,
            metadata: obj.metadata.clone(),
            spec: json!({ "sealed": sealed }),
            status: obj.status.clone(),
        })
    }

    /// A stored object as callers see it: a Secret's spec opened. Errors name the object, never a value.
    fn decode_obj(&self, bytes: &[u8]) -> Result<DynObject, StoreError> {
        let mut obj = decode(bytes)?;
        if obj.kind != Kind::Secret {
            return Ok(obj);
        }
        let name = obj.metadata.name.clone();
        let Some(blob) = sealed_blob(&obj.spec) else {
            return Err(StoreError::Storage(format!(
                "Secret `{name}` is stored without encryption; restart the API server to seal it"
            )));
        };
        let plaintext = self
            .sealer
            .open(sealed_aad(&name).as_bytes(), blob)
            .map_err(|_| {
                StoreError::Storage(format!(
                    "Secret `{name}` cannot be decrypted: it was sealed with another master key, \
                     for another object, or was altered"
                ))
            })?;
        obj.spec = serde_json::from_slice(&plaintext).map_err(|_| {
            StoreError::Storage(format!("Secret `{name}` decrypts to an unreadable spec"))
        })?;
        Ok(obj)
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

    /// Creates the default Network (`spec: {}`) unless it exists, through the normal write path (so
    /// an `Applied` event goes out). Returns whether it was created.
    pub async fn ensure_network(&self, name: &str) -> Result<bool, StoreError> {
        if self.get(Kind::Network, name)?.is_some() {
            return Ok(false);
        }
        let obj = berth_api_types::typed::decode_object(&json!({
            "apiVersion": berth_api_types::names::API_VERSION,
            "kind": "Network",
            "metadata": {"name": name},
            "spec": {},
        }))
        .map_err(|errs| {
            let why: Vec<String> = errs.iter().map(ToString::to_string).collect();
            StoreError::Storage(format!(
                "the default network `{name}` is not a valid Network: {}",
                why.join("; ")
            ))
        })?;
        match self.write(vec![obj], WriteMode::Create, None, false).await {
            Ok(_) => Ok(true),
            // Created meanwhile by someone else: just as good.
            Err(StoreError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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

    /// Deletes an object, unless a Service still uses it (a Secret, Config, Volume or Network it
    /// refers to; a Service that lists no networks uses `default_network`) or it is the default
    /// network itself. The check and the delete happen under the write lock, so no write can add a
    /// reference in between.
    pub async fn delete(
        &self,
        kind: Kind,
        name: &str,
        default_network: &str,
    ) -> Result<DynObject, StoreError> {
        let guard = self.write_lock.lock().await;
        if self.objects.contains_key(key(kind, name))? {
            self.check_unused(kind, name, default_network)?;
        }
        let result = self.modify_locked(kind, name, |_| Ok(Some(Change::Remove)));
        drop(guard);
        self.finish(result).await
    }

    /// Refuses to delete what a Service uses or what berth needs (call with the write lock held).
    fn check_unused(
        &self,
        kind: Kind,
        name: &str,
        default_network: &str,
    ) -> Result<(), StoreError> {
        if !matches!(
            kind,
            Kind::Secret | Kind::Config | Kind::Volume | Kind::Network
        ) {
            return Ok(());
        }
        if kind == Kind::Network && name == default_network {
            return Err(StoreError::Protected {
                kind,
                name: name.to_string(),
                why: "is the default network (services that list no networks join it); \
                      the default network cannot be deleted"
                    .to_string(),
            });
        }
        let mut users = Vec::new();
        for svc in self.list(Kind::Service)? {
            let spec: ServiceSpec = serde_json::from_value(svc.spec).map_err(|e| {
                StoreError::Storage(format!(
                    "cannot check whether service/{} uses {kind} `{name}`: its stored spec does \
                     not parse: {e}",
                    svc.metadata.name
                ))
            })?;
            if spec.uses(kind, name, default_network) {
                users.push(format!("service/{}", svc.metadata.name));
            }
        }
        if kind == Kind::Secret {
            // A Registry's password: deleting it would break every pull from that registry.
            for reg in self.list(Kind::Registry)? {
                let spec: Result<RegistrySpec, _> = serde_json::from_value(reg.spec);
                if spec.is_ok_and(|r| r.password_secret_ref.name == name) {
                    users.push(format!("registry/{}", reg.metadata.name));
                }
            }
        }
        if users.is_empty() {
            Ok(())
        } else {
            Err(StoreError::InUse {
                kind,
                name: name.to_string(),
                users,
            })
        }
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
    ///
    /// The fsync runs as a blocking flush on tokio's blocking pool, not through sled's
    /// `flush_async`: that one waits on sled's own small I/O thread pool, and enough concurrent
    /// callers occupy every thread of it with waiters while the I/O they wait for needs one of those
    /// threads (sled 0.34, spacejam/sled#1308). Seen here as every reconcile hanging under load.
    async fn committed(&self, events: Vec<Event>) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Storage(format!("flush task failed: {e}")))??;
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
            let mut incoming = incoming.clone();
            if matches!(mode, WriteMode::Upsert) {
                keep_deploy_state(&old, &mut incoming);
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

/// What deploys wrote and a manifest does not know about survives `apply` of that manifest: the
/// `deploy.berth.io/*` annotations and a Service's `forceUpdate` counter, unless the manifest sets
/// them. Otherwise re-applying an unchanged manifest after a same-tag redeploy would lower the
/// counter and restart every task. (The image is the manifest's to set: applying it reverts a deploy,
/// as with kubectl.)
fn keep_deploy_state(old: &DynObject, incoming: &mut DynObject) {
    for (k, v) in &old.metadata.annotations {
        if k.starts_with(berth_api_types::names::annotations::DEPLOY_PREFIX) {
            incoming
                .metadata
                .annotations
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
    }
    if old.kind == Kind::Service {
        if let (Some(n), Some(spec)) = (old.spec.get("forceUpdate"), incoming.spec.as_object_mut())
        {
            spec.entry("forceUpdate").or_insert_with(|| n.clone());
        }
    }
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

    fn test_key() -> MasterKey {
        MasterKey::from_bytes([42u8; 32], "test key")
    }

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

    fn obj(v: Value) -> DynObject {
        decode_object(&v).unwrap()
    }

    fn secret(name: &str, data: Value) -> DynObject {
        obj(
            json!({"apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": name}, "spec": data}),
        )
    }

    /// Every byte of every file under `dir`.
    fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn secrets_are_sealed_at_rest() {
        use base64::Engine;
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let text = "zebra-marmalade-4711-TEXT";
        let bin = "okapi-quince-9932-BINARY";
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).unwrap();
            s.write(
                vec![
                    secret(
                        "db",
                        json!({"stringData": {"pw": text}, "data": {"blob": b64(bin.as_bytes())}}),
                    ),
                    obj(json!({"apiVersion": "berth/v1", "kind": "Config", "metadata": {"name": "plain"},
                               "spec": {"stringData": {"conf": "visible-config-value"}}})),
                ],
                WriteMode::Upsert,
                None,
                false,
            )
            .await
            .unwrap();
            // In-process readers see plaintext.
            let got = s.get(Kind::Secret, "db").unwrap().unwrap();
            assert_eq!(got.spec["stringData"]["pw"], text);
            assert_eq!(s.list(Kind::Secret).unwrap()[0].spec, got.spec);
            // Status writes re-seal; events and the outbox get entries of their own.
            s.update_status(Kind::Secret, "db", json!({"observed": 1}), None)
                .await
                .unwrap();
            let stored = decode(&s.objects.get("secret/db").unwrap().unwrap()).unwrap();
            assert!(sealed_blob(&stored.spec).is_some(), "{}", stored.spec);
            s.db.flush().unwrap();
        }
        let files = all_files(dir.path());
        assert!(!files.is_empty());
        let mut saw_config = false;
        for (path, bytes) in &files {
            for needle in [
                text.to_string(),
                b64(text.as_bytes()),
                bin.to_string(),
                b64(bin.as_bytes()),
            ] {
                assert!(
                    !contains(bytes, needle.as_bytes()),
                    "{path} holds a secret value in clear"
                );
            }
            saw_config |= contains(bytes, b"visible-config-value");
        }
        assert!(
            saw_config,
            "Configs are stored in clear (and the scan does see values)"
        );

        let s = Store::open(dir.path(), &test_key()).unwrap();
        let got = s.get(Kind::Secret, "db").unwrap().unwrap();
        assert_eq!(got.spec["stringData"]["pw"], text);
        drop(s);

        let other = MasterKey::from_bytes([7u8; 32], "BERTH_MASTER_KEY");
        let err = Store::open(dir.path(), &other).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{msg}");
        assert!(
            msg.contains("BERTH_MASTER_KEY") && msg.contains("not the key they were sealed with"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_sealed_blob_only_opens_where_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        s.write(
            vec![
                secret("a", json!({"stringData": {"k": "value-of-a"}})),
                secret("b", json!({"stringData": {"k": "value-of-b"}})),
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        // Move a's sealed spec into b: authenticated as `secret/a`, it must not open as `secret/b`.
        let a = decode(&s.objects.get("secret/a").unwrap().unwrap()).unwrap();
        let mut b = decode(&s.objects.get("secret/b").unwrap().unwrap()).unwrap();
        b.spec = a.spec;
        s.objects.insert("secret/b", encode(&b)).unwrap();
        let err = s.get(Kind::Secret, "b").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Storage(_)));
        assert!(msg.contains("Secret `b` cannot be decrypted"), "{msg}");
        assert!(!msg.contains("value-of"), "{msg}");
        assert!(s.get(Kind::Secret, "a").is_ok());
    }

    #[tokio::test]
    async fn unsealed_secrets_are_sealed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).unwrap();
            // As an older version would have stored it.
            let old = secret("old", json!({"stringData": {"k": "legacy-clear-value"}}));
            s.objects.insert("secret/old", encode(&old)).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let stored = decode(&s.objects.get("secret/old").unwrap().unwrap()).unwrap();
        assert!(sealed_blob(&stored.spec).is_some());
        assert_eq!(
            s.get(Kind::Secret, "old").unwrap().unwrap().spec["stringData"]["k"],
            "legacy-clear-value"
        );
    }

    #[tokio::test]
    async fn secret_generation_compares_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let write = |v: &str| {
            let s = s.clone();
            let o = secret("db", json!({"stringData": {"pw": v}}));
            async move { s.write(vec![o], WriteMode::Upsert, None, false).await }
        };
        let r = write("one").await.unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Created);
        let r = write("one").await.unwrap();
        assert_eq!(
            r[0].0.outcome,
            ApplyOutcome::Unchanged,
            "fresh nonces do not make a change"
        );
        assert_eq!(r[0].1.metadata.generation, 1);
        let r = write("two").await.unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Configured);
        assert_eq!(r[0].1.metadata.generation, 2);
    }

    fn user(name: &str, spec: Value) -> DynObject {
        obj(
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}),
        )
    }

    #[tokio::test]
    async fn apply_keeps_what_deploys_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let manifest = || {
            obj(
                json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"},
                       "spec": {"image": "app:1"}}),
            )
        };
        s.write(vec![manifest()], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        // A same-tag redeploy, as the deploy applier writes it.
        let mut deployed = s.get(Kind::Service, "web").unwrap().unwrap();
        deployed.spec["forceUpdate"] = json!(1);
        deployed
            .metadata
            .annotations
            .insert("deploy.berth.io/id".into(), "01J".into());
        s.write(vec![deployed], WriteMode::Replace, None, false)
            .await
            .unwrap();
        // Re-applying the unchanged manifest changes nothing: no lower counter, no lost annotation.
        let r = s
            .write(vec![manifest()], WriteMode::Upsert, None, false)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Unchanged);
        let now = s.get(Kind::Service, "web").unwrap().unwrap();
        assert_eq!(now.spec["forceUpdate"], 1);
        assert_eq!(now.metadata.annotations["deploy.berth.io/id"], "01J");
        // A PUT is a full replacement: there the client's object is the whole truth.
        s.write(vec![manifest()], WriteMode::Replace, None, false)
            .await
            .unwrap();
        assert!(s
            .get(Kind::Service, "web")
            .unwrap()
            .unwrap()
            .spec
            .get("forceUpdate")
            .is_none());
    }

    #[tokio::test]
    async fn a_registrys_password_secret_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let registry = obj(json!({"apiVersion": "berth/v1", "kind": "Registry",
            "metadata": {"name": "team"},
            "spec": {"server": "registry.example.com", "username": "ci",
                     "passwordSecretRef": {"name": "reg-pass", "key": "password"}}}));
        s.write(
            vec![
                secret("reg-pass", json!({"stringData": {"password": "x"}})),
                registry,
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "reg-pass", "berth-internal")
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Secret `reg-pass` is used by registry/team; remove those references first"
        );
        s.delete(Kind::Registry, "team", "berth-internal")
            .await
            .unwrap();
        s.delete(Kind::Secret, "reg-pass", "berth-internal")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn objects_in_use_cannot_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        let net = |n: &str| {
            obj(
                json!({"apiVersion": "berth/v1", "kind": "Network", "metadata": {"name": n}, "spec": {}}),
            )
        };
        s.write(
            vec![
                secret("db", json!({"stringData": {"pw": "x"}})),
                secret("idle", json!({"stringData": {"pw": "x"}})),
                net("backend"),
                net("berth-internal"),
                net("custom-default"),
                user(
                    "api",
                    json!({"image": "a", "secrets": [{"name": "db"}], "networks": ["backend"]}),
                ),
                user("worker", json!({"image": "a", "secrets": [{"name": "db"}]})),
            ],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "db", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }));
        assert_eq!(
            err.to_string(),
            "Secret `db` is used by service/api, service/worker; remove those references first"
        );
        // `worker` lists no networks, so it uses the configured default, not the built-in name.
        let err = s
            .delete(Kind::Network, "backend", "custom-default")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("used by service/api;"), "{err}");
        s.delete(Kind::Network, "berth-internal", "custom-default")
            .await
            .unwrap();
        let err = s
            .delete(Kind::Network, "custom-default", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Protected { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("the default network cannot be deleted"));
        s.delete(Kind::Secret, "idle", "custom-default")
            .await
            .unwrap();
        // Missing objects are NotFound, not InUse, even when something refers to them.
        s.write(
            vec![user(
                "x",
                json!({"image": "a", "secrets": [{"name": "ghost"}]}),
            )],
            WriteMode::Create,
            None,
            false,
        )
        .await
        .unwrap();
        let err = s
            .delete(Kind::Secret, "ghost", "custom-default")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        // Once the references are gone, the delete goes through.
        s.delete(Kind::Service, "worker", "custom-default")
            .await
            .unwrap();
        s.write(
            vec![user("api", json!({"image": "a"}))],
            WriteMode::Replace,
            None,
            false,
        )
        .await
        .unwrap();
        s.delete(Kind::Secret, "db", "custom-default")
            .await
            .unwrap();
        s.delete(Kind::Network, "backend", "custom-default")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn default_network_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).unwrap();
        assert!(s.ensure_network("berth-internal").await.unwrap());
        assert!(!s.ensure_network("berth-internal").await.unwrap());
        let n = s.get(Kind::Network, "berth-internal").unwrap().unwrap();
        assert_eq!(n.spec, json!({}));
        assert_eq!(n.metadata.generation, 1);
        assert_eq!(
            outbox_types(&s),
            vec![(EventType::Applied, "berth-internal".into(), 1)]
        );
        let err = s.ensure_network("Bad_Name").await.unwrap_err();
        assert!(err.to_string().contains("not a valid Network"), "{err}");
    }
}
