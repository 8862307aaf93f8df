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
//!
//! Durability (see `Durability`): every answer that acknowledges a write — including "unchanged",
//! which acknowledges the state it compared against — waits until everything committed before it is
//! on disk. A commit is numbered under the write lock, so a writer that finds its change already
//! there ("unchanged", an identical status) waits for the commit that put it there, not only for its
//! own. A failed flush poisons the store: the write may be in memory but not on disk, and sled cannot
//! take it back, so from then on every read and write answers `StorageError` (nothing not durable is
//! shown) and the daemon exits; the restart recovers exactly what is on disk. A client that got the
//! 500 cannot know whether its write survived (as after a timeout) and re-applies; apply is idempotent.

mod admission;
pub mod backend;
pub mod migrate;
pub mod outbox;
mod quarantine;
pub(crate) mod rekey;
mod seal;

/// The admission policy's verdict, for callers that check objects before they are sent
/// (`berth import compose`).
pub(crate) use admission::check_write;
pub use admission::{ensure_backup_plan, ensure_network, Policy};

use crate::crypto::{MasterKey, Sealer};
use crate::deploy_auth::DeployKey;
use backend::{abort, Db, Tree, TxError, TxView};
use berth_api_types::secret_config::ContentKey;
use berth_api_types::wire::{ApplyOutcome, ApplyResult};
use berth_api_types::{DynObject, Event, EventType, Kind, ObjectMeta};
use chrono::Utc;
use serde_json::Value;
use sled::transaction::TransactionError;
use std::path::{Path, PathBuf};
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
    /// An object this server's policy refuses (admission's `Policy`): a field error each.
    #[error("{kind}/{name}: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused {
        kind: Kind,
        name: String,
        errors: Vec<berth_api_types::validate::FieldError>,
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
    /// The store cannot be reached now (NATS servers lost, a leader being elected); another API
    /// server, or the same one a little later, may answer.
    #[error("store unavailable: {0}")]
    Unavailable(String),
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
            StoreError::Refused { .. } => (422, "Invalid"),
            StoreError::Storage(_) | StoreError::WrongKey { .. } => (500, "StorageError"),
            StoreError::Unavailable(_) => (503, "Unavailable"),
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
    db: Db,
    objects: Tree,
    events: Tree,
    outbox: Tree,
    meta: Tree,
    /// Records that cannot be read, moved aside with their bytes (`quarantine.rs`).
    quarantine: Tree,
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
    /// What this server allows beyond each object's own validation (see `admission::Policy`).
    policy: Arc<admission::Policy>,
    /// Keys the digests of Secret and Config values (redacted views, the data endpoint).
    content_key: ContentKey,
    /// Held by every write (see the module comment).
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Group commit: writers that commit while a flush runs share the next one.
    durability: Arc<Durability>,
    /// Tests set it to make every write fail as a broken disk would.
    #[cfg(test)]
    pub(crate) fail_writes: Arc<std::sync::atomic::AtomicBool>,
}

/// What a flush does before (or instead of) `sled::Db::flush`: the fault-injection seam of the
/// durability tests (block a flush, or fail it as a broken disk would).
#[cfg(test)]
pub(crate) type FlushHook = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Counts commits and what the last fsync covered, so that concurrent writers share one fsync
/// (group commit) instead of queueing one each: a 100-service apply made ~660 fsyncs, up to
/// 0.4 s each on a busy disk. Every write is still on disk before it is acknowledged.
///
/// Invariant: a commit takes its number only after its data is in sled (object writes under the
/// write lock, so numbers follow commit order), and a flush covers every number taken before it
/// started. So "flushed >= n" means commit n and everything an object writer could see before
/// taking or reading number n is on disk.
#[derive(Default)]
struct Durability {
    /// Commits so far; a writer takes its number after its transaction committed.
    commits: std::sync::atomic::AtomicU64,
    /// The highest commit number a finished fsync covers.
    flushed: std::sync::atomic::AtomicU64,
    /// One fsync at a time; who waits here usually finds their commit covered when it is its turn.
    flushing: tokio::sync::Mutex<()>,
    /// A flush failed: what is in memory may not be on disk, so nothing is served any more.
    failed: std::sync::atomic::AtomicBool,
    /// Wakes whoever waits in [`Store::failed`] (the daemon, which then exits).
    failed_notify: Notify,
    #[cfg(test)]
    flush_hook: Mutex<Option<FlushHook>>,
}

impl Durability {
    /// Numbers a commit whose data is in sled now; the caller holds the write lock (object
    /// writes), or numbers after its own transaction (other records).
    fn number(&self) -> u64 {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1
    }

    /// The durable point of what a writer holding the write lock has seen: every commit so far.
    fn seen(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The sled database in `dir`, as the store opens it.
pub(crate) fn open_sled(dir: &Path) -> Result<Db, StoreError> {
    // sled's page cache defaults to 1 GiB and fills with every object read or written, so RSS
    // grew with the number of objects (253 MB after 10,000 Configs). The working set is far
    // smaller: reads are by key or one kind's prefix, and every write is flushed at once.
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput);
    // sled releases its file lock from its background threads after the last handle is dropped,
    // not at the drop: a store reopened at once in the same process (tests; a restore; an
    // in-process restart) may find it still held, for seconds under load (seen in CI). A store
    // this process opened before is waited for patiently; one it never opened is another
    // process's, reported after a short wait.
    let ours = OPENED_SLED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&lock_key(dir));
    let wait = if ours {
        SLED_OWN_LOCK_WAIT
    } else {
        SLED_LOCK_WAIT
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        match config.open() {
            // sled reports a held lock as an `Other` I/O error with the OS error in its text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(db) => {
                OPENED_SLED
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(lock_key(dir));
                return Ok(Db::Sled(db));
            }
            Err(e) => return Err(StoreError::Storage(format!("{}: {e}", dir.display()))),
        }
    }
}

/// The sled directories this process has opened: their lock may still be ours, being released.
static OPENED_SLED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
    std::sync::LazyLock::new(Default::default);

fn lock_key(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

/// How long opening the sled store waits for a lock held elsewhere (another process: reported).
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long it waits for a lock this process is still releasing.
const SLED_OWN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) fn key(kind: Kind, name: &str) -> String {
    format!("{}/{}", kind.lower(), name)
}

fn decode(bytes: &[u8]) -> Result<DynObject, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Storage(format!("corrupt object: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values always encode")
}

impl Store {
    /// Opens (or creates) the store in `dir` (sled). A store that was used with another master
    /// key is refused with `WrongKey`; Secrets stored unsealed (by a version before encryption)
    /// are sealed here.
    pub async fn open(dir: &Path, key: &MasterKey) -> Result<Self, StoreError> {
        Self::open_db(open_sled(dir)?, &dir.display().to_string(), key).await
    }

    /// Opens the store on the replicated log on NATS (`--store nats`): the same checks as
    /// [`Store::open`]; every API server on the same log serves the same state.
    pub async fn open_log(
        log: Arc<backend::jetstream::Log>,
        key: &MasterKey,
    ) -> Result<Self, StoreError> {
        let shown = log.describe();
        Self::open_db(Db::Log(log), &shown, key).await
    }

    /// `place`: where the store is, for errors (a directory, or the NATS stream).
    pub(crate) async fn open_db(db: Db, place: &str, key: &MasterKey) -> Result<Self, StoreError> {
        let meta = db.tree("meta")?;
        let fresh = ulid::Ulid::new().to_string().to_lowercase();
        // First writer wins: servers starting together on one log agree on one id.
        let instance = db
            .transact(&[&meta], |t| match t[0].get("instance")? {
                Some(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
                None => {
                    t[0].insert("instance", fresh.as_bytes())?;
                    Ok(fresh.clone())
                }
            })
            .await?;
        db.flush_blocking()?;
        let sealer = key.sealer();
        seal::check_key(&db, &meta, &sealer, place, key).await?;
        let (watchers, _) = broadcast::channel(1024);
        let store = Store {
            objects: db.tree("objects")?,
            events: db.tree("events")?,
            outbox: db.tree("outbox")?,
            quarantine: db.tree(quarantine::TREE)?,
            meta,
            db,
            ids: Arc::new(Mutex::new(ulid::Generator::new())),
            outbox_ready: Arc::new(Notify::new()),
            watchers,
            instance,
            sealer,
            deploy_key: key.deploy_key(),
            policy: Arc::default(),
            content_key: key.content_key(),
            write_lock: Arc::new(tokio::sync::Mutex::new(())),
            durability: Arc::default(),
            #[cfg(test)]
            fail_writes: Arc::default(),
        };
        if let Db::Log(log) = &store.db {
            // Another server's commits: their events reach this server's watchers. Their outbox
            // entries are that server's to publish; this one's publisher takes them at its next
            // round (at most 5 s later) only if they are still there, as after that server died
            // (the bus drops a copy published twice by its event id).
            let watchers = store.watchers.clone();
            log.observe(Box::new(move |ops| {
                for op in ops {
                    if let ("events", Some(v)) = (op.tree.as_str(), &op.value) {
                        if let Ok(e) = serde_json::from_slice::<Event>(v) {
                            let _ = watchers.send(e);
                        }
                    }
                }
            }));
        }
        store.seal_unsealed().await?;
        let moved = store.quarantine_unreadable().await?;
        let held = store.quarantined_count();
        if held > 0 {
            tracing::warn!(
                quarantined = held,
                moved_now = moved,
                "the store holds unreadable records in quarantine; run `berth admin fsck` (with berth stopped)"
            );
        }
        Ok(store)
    }

    /// What the store runs on (`sled`, or the NATS stream), for the start log.
    pub fn describe(&self) -> String {
        self.db.describe()
    }

    /// Waits until this server has every write acknowledged anywhere before the call (several
    /// API servers on one NATS log); immediate on sled. The API does it before every read.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        self.db.catch_up().await
    }

    /// The same store, admitting writes under `policy` (the server's flags) instead of the
    /// default, which allows no host mounts and reserves the default proxy name.
    pub fn with_policy(mut self, policy: admission::Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// The policy writes are admitted under.
    pub(crate) fn policy(&self) -> &admission::Policy {
        &self.policy
    }

    /// Makes a store that holds no objects yet take the installation id `id` (an environment
    /// restore into a fresh data directory: the restored installation then owns, and adopts, the
    /// Swarm objects the snapshot's installation made). Returns whether it did; a store that
    /// holds objects keeps its own id. Runs on the database [`Store::open_db`] then opens, so
    /// the store is opened once (a sled store reopened at once in the same process may still
    /// find its lock held by the first handle's flusher).
    pub fn adopt_installation(db: &Db, id: &str) -> Result<bool, StoreError> {
        let Db::Sled(db) = db else {
            return Err(StoreError::Storage(
                "an environment restore writes a new sled store (--data-dir); move it to NATS \
                 afterwards with `berth admin migrate-store`"
                    .into(),
            ));
        };
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
        self.meta.insert(format!("flag/{name}"), b"1").await?;
        self.flush().await
    }

    /// Every stored object as it is at rest (Secrets sealed), without status: the environment
    /// snapshot's content.
    pub fn export_objects(&self) -> Result<Vec<DynObject>, StoreError> {
        self.objects
            .iter()
            .map(|item| {
                let mut obj = decode(&item?.1)?;
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
    pub(crate) fn aux_tree(&self, name: &str) -> Result<Tree, StoreError> {
        self.db.tree(name)
    }

    /// The database under this store, for modules that commit across its trees (webhooks, the
    /// audit chain).
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// The master key's sealer, for other secrets kept in the store (webhook signing secrets).
    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// The key of content digests (see `secret_config::ContentKey`).
    pub(crate) fn content_key(&self) -> &ContentKey {
        &self.content_key
    }

    /// The key deploy events on the bus are signed with (see `deploy_auth`).
    pub(crate) fn deploy_key(&self) -> &DeployKey {
        &self.deploy_key
    }

    /// Makes everything written so far durable: for records written outside the object path
    /// (webhooks, meta flags), after their transaction. Same group commit and failure rule as
    /// object writes.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.healthy()?;
        let upto = self.durability.number();
        self.durable(upto).await
    }

    /// Resolves once a flush has failed (never, on a healthy disk): the daemon exits then, and
    /// its restart recovers what is on disk.
    pub async fn failed(&self) {
        loop {
            let notified = self.durability.failed_notify.notified();
            if self.is_failed() {
                return;
            }
            notified.await;
        }
    }

    fn is_failed(&self) -> bool {
        self.durability
            .failed
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Refuses service after a failed flush (see the module comment).
    fn healthy(&self) -> Result<(), StoreError> {
        if self.is_failed() {
            return Err(StoreError::Storage(
                "the store could not make a write durable and serves nothing until berth restarts"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Fault injection for the durability tests: runs before every flush; an error fails it.
    #[cfg(test)]
    pub(crate) fn set_flush_hook(&self, hook: Option<FlushHook>) {
        *self
            .durability
            .flush_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
    }

    fn next_id(&self) -> String {
        let mut g = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        // The generator only fails when 2^80 ids are made in one millisecond.
        g.generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }

    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<DynObject>, StoreError> {
        self.healthy()?;
        self.objects
            .get(key(kind, name))?
            .map(|b| self.decode_obj(&b))
            .transpose()
    }

    /// Every object of a kind. A record that cannot be read is moved into quarantine and left
    /// out, so one bad record does not hide the rest (`quarantine.rs`).
    pub fn list(&self, kind: Kind) -> Result<Vec<DynObject>, StoreError> {
        self.healthy()?;
        let mut out = Vec::new();
        for item in self.objects.scan_prefix(format!("{}/", kind.lower())) {
            let (k, v) = item?;
            match self.decode_obj(&v) {
                Ok(obj) => out.push(obj),
                Err(_) => {
                    // Left out now, moved aside in the background (a read does not wait for
                    // a commit).
                    let reason = quarantine::object_problem(self, &k, &v)
                        .unwrap_or_else(|| "unreadable".into());
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        let store = self.clone();
                        rt.spawn(async move {
                            if let Err(e) = store.quarantine_object(&k, &v, &reason).await {
                                tracing::warn!(error = %e, "cannot quarantine an unreadable record");
                            }
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Atomically writes a set of validated objects (apply, create, replace). Either every object is
    /// written or none is. `expected_rv`: conditional write (only for a single object). Timed for
    /// the apply latency metric (dry runs write nothing and are not).
    pub async fn write(
        &self,
        objects: Vec<DynObject>,
        mode: WriteMode,
        expected_rv: Option<String>,
        dry_run: bool,
    ) -> Result<Vec<(ApplyResult, DynObject)>, StoreError> {
        let started = std::time::Instant::now();
        let written = self
            .write_objects(objects, mode, expected_rv, dry_run)
            .await;
        if !dry_run {
            let status = match &written {
                Ok(_) => 200,
                Err(e) => e.status_and_reason().0,
            };
            berth_controllers::metrics::global().applied(status, started.elapsed());
        }
        written
    }

    async fn write_objects(
        &self,
        objects: Vec<DynObject>,
        mode: WriteMode,
        expected_rv: Option<String>,
        dry_run: bool,
    ) -> Result<Vec<(ApplyResult, DynObject)>, StoreError> {
        for obj in &objects {
            admission::check_write(&self.policy, obj).map_err(|errors| StoreError::Refused {
                kind: obj.kind,
                name: obj.metadata.name.clone(),
                errors,
            })?;
        }
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
        self.healthy()?;
        let trees = [&self.objects, &self.events, &self.outbox, &self.meta];
        let (out, emitted) = self
            .db
            .transact(&trees, |t| {
                let (objs, events, outbox, meta) = (&t[0], &t[1], &t[2], &t[3]);
                let start_rv = current_rv(meta)?;
                let mut rv = start_rv;
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
                if rv != start_rv {
                    meta.insert("rv", rv.to_be_bytes())?;
                }
                Ok((out, emitted))
            })
            .await?;
        // Nothing written ("unchanged" throughout) still acknowledges what it compared against.
        let upto = if emitted.is_empty() {
            self.durability.seen()
        } else {
            self.durability.number()
        };
        drop(guard);
        self.durable(upto).await?;
        self.announce(emitted);
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
        self.healthy()?;
        let check = || {
            admission::admit(
                self,
                admission::Op::Delete {
                    kind,
                    name,
                    default_network,
                },
            )
        };
        let result = if self.db.checks_inside_transactions() {
            // On the NATS log another server may add a reference until the commit, which is
            // then refused, and the check runs again on the new state.
            self.modify_locked(kind, name, |_| {
                check()?;
                Ok(Some(Change::Remove))
            })
            .await
        } else {
            // On sled the write lock keeps every other writer out until the commit.
            if self.objects.contains_key(key(kind, name))? {
                check()?;
            }
            self.modify_locked(kind, name, |_| Ok(Some(Change::Remove)))
                .await
        };
        let upto = self.commit_point(&result);
        drop(guard);
        self.finish(result, upto).await
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
        self.healthy()?;
        let result = self.modify_locked(kind, name, change).await;
        let upto = self.commit_point(&result);
        drop(guard);
        self.finish(result, upto).await
    }

    /// The commit number a `modify_locked` result must wait for (under the write lock): its own
    /// if it wrote, else everything it may have seen (an identical status acknowledges the state
    /// it compared against, which another writer may have committed but not yet flushed).
    fn commit_point(&self, result: &Result<(DynObject, Option<Event>), StoreError>) -> u64 {
        match result {
            Ok((_, Some(_))) => self.durability.number(),
            _ => self.durability.seen(),
        }
    }

    /// Makes the result of `modify_locked` durable and announces its event (after the lock is released).
    async fn finish(
        &self,
        result: Result<(DynObject, Option<Event>), StoreError>,
        upto: u64,
    ) -> Result<DynObject, StoreError> {
        let (obj, emitted) = result?;
        self.durable(upto).await?;
        self.announce(emitted.into_iter().collect());
        Ok(obj)
    }

    /// The transaction of `modify`; the caller holds the write lock.
    async fn modify_locked(
        &self,
        kind: Kind,
        name: &str,
        change: impl Fn(&DynObject) -> Result<Option<Change>, StoreError>,
    ) -> Result<(DynObject, Option<Event>), StoreError> {
        let now = Utc::now();
        let id = self.next_id();
        let k = key(kind, name);
        let trees = [&self.objects, &self.events, &self.outbox, &self.meta];
        let result = self
            .db
            .transact(&trees, |t| {
                let (objs, events, outbox, meta) = (&t[0], &t[1], &t[2], &t[3]);
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
                meta.insert("rv", rv.to_be_bytes())?;
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
            })
            .await?;
        Ok(result)
    }

    /// Returns once commit `upto` (and every one before it) is on disk.
    ///
    /// The fsync runs as a blocking flush on tokio's blocking pool, not through sled's
    /// `flush_async`: that one waits on sled's own small I/O thread pool, and enough concurrent
    /// callers occupy every thread of it with waiters while the I/O they wait for needs one of those
    /// threads (sled 0.34, spacejam/sled#1308). Seen here as every reconcile hanging under load.
    ///
    /// A failed flush poisons the store (module comment): this caller and every later one get
    /// `StorageError`, also those that wait for a flush after it — their own flush might succeed
    /// and make them acknowledge a state the failed caller was told did not happen.
    async fn durable(&self, upto: u64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let d = &self.durability;
        // A commit to the NATS log is on a quorum of servers when it is acknowledged.
        if !self.db.needs_flush() || d.flushed.load(Ordering::Acquire) >= upto {
            return self.healthy();
        }
        let _turn = d.flushing.lock().await;
        self.healthy()?;
        if d.flushed.load(Ordering::Acquire) >= upto {
            return Ok(());
        }
        // Every commit numbered up to here is in sled's log already: this fsync covers it.
        let covers = d.commits.load(Ordering::Acquire);
        let db = self.db.clone();
        #[cfg(test)]
        let hook = d
            .flush_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let flushed = tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            if let Some(hook) = hook {
                hook()?;
            }
            db.flush_blocking().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("flush task failed: {e}"))
        .and_then(|r| r);
        match flushed {
            Ok(()) => {
                d.flushed.fetch_max(covers, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                d.failed.store(true, Ordering::Release);
                d.failed_notify.notify_waiters();
                tracing::error!(error = %e, "cannot flush the store to disk; refusing service until restart");
                Err(StoreError::Storage(format!(
                    "cannot make the write durable ({e}); whether it survives is known after \
                     berth restarts (re-apply then); the store serves nothing until then"
                )))
            }
        }
    }

    /// After a durable commit: lets the publisher and watchers know.
    fn announce(&self, events: Vec<Event>) {
        self.outbox_ready.notify_one();
        for e in events {
            let _ = self.watchers.send(e);
        }
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

fn current_rv(meta: &TxView<'_>) -> Result<u64, TxError> {
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
fn record_event(events: &TxView<'_>, outbox: &TxView<'_>, ev: &Event) -> Result<(), TxError> {
    let k = ev.id.as_bytes();
    let v = encode(ev);
    events.insert(k, &v)?;
    outbox.insert(k, &v)?;
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

    pub async fn outbox_types(s: &Store) -> Vec<(EventType, String, u64)> {
        s.outbox_batch(100)
            .await
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

    /// A store this process still holds is waited for (as a reopen right after a drop, whose lock
    /// sled releases later); a directory it never opened is not, and sled's lock error is
    /// recognised as such.
    #[test]
    fn a_lock_this_process_holds_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_sled(dir.path()).unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(700));
            drop(first);
        });
        let started = std::time::Instant::now();
        let second = open_sled(dir.path());
        assert!(second.is_ok(), "{:?}", second.err());
        assert!(started.elapsed() >= std::time::Duration::from_millis(500));
        holder.join().unwrap();
    }

    #[tokio::test]
    async fn generation_moves_only_with_spec() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
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
            outbox_types(&s).await,
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
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
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
        assert_eq!(outbox_types(&s).await.len(), 1);
    }

    #[tokio::test]
    async fn dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let r = s
            .write(vec![svc("a", 1)], WriteMode::Upsert, None, true)
            .await
            .unwrap();
        assert_eq!(r[0].0.outcome, ApplyOutcome::Created);
        assert!(s.get(Kind::Service, "a").unwrap().is_none());
        assert!(outbox_types(&s).await.is_empty());
    }

    #[tokio::test]
    async fn conditional_writes_detect_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
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
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
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
        let events = outbox_types(&s).await.len();
        let err = s
            .update_status(Kind::Service, "a", json!({"n": 2}), Some(&rv))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(err.status_and_reason(), (409, "Conflict"));
        let now = s.get(Kind::Service, "a").unwrap().unwrap();
        assert_eq!(now.status, json!({"n": 1}));
        assert_eq!(now.metadata.resource_version.as_deref(), Some(rv2.as_str()));
        assert_eq!(outbox_types(&s).await.len(), events);
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
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            let r = s
                .write(vec![svc("a", 1)], WriteMode::Create, None, false)
                .await
                .unwrap();
            (
                s.instance().to_string(),
                r[0].1.metadata.resource_version.clone().unwrap(),
            )
        };
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
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

    /// A flush that blocks until the test releases it (with the result the "disk" gives), and a
    /// way to wait until a flush has started.
    struct HeldFlush {
        entered: std::sync::mpsc::Receiver<()>,
        release: std::sync::mpsc::Sender<Result<(), String>>,
    }

    fn hold_flushes(s: &Store) -> HeldFlush {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let release_rx = Mutex::new(release_rx);
        s.set_flush_hook(Some(Arc::new(move || {
            let _ = entered_tx.send(());
            release_rx
                .lock()
                .unwrap()
                .recv()
                .unwrap_or_else(|_| Err("test ended".into()))
        })));
        HeldFlush { entered, release }
    }

    impl HeldFlush {
        async fn wait_entered(self) -> Self {
            tokio::task::spawn_blocking(move || {
                self.entered
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("a flush starts");
                self
            })
            .await
            .unwrap()
        }
    }

    async fn still_running<T>(h: &tokio::task::JoinHandle<T>) -> bool {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        !h.is_finished()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_write_is_acknowledged_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        s.write(vec![svc("web", 1)], WriteMode::Upsert, None, false)
            .await
            .unwrap();

        // An apply whose flush has not finished, and the identical apply behind it.
        let held = hold_flushes(&s);
        let s1 = s.clone();
        let first = tokio::spawn(async move {
            s1.write(vec![svc("web", 2)], WriteMode::Upsert, None, false)
                .await
        });
        let held = held.wait_entered().await;
        let s2 = s.clone();
        let same = tokio::spawn(async move {
            s2.write(vec![svc("web", 2)], WriteMode::Upsert, None, false)
                .await
        });
        assert!(
            still_running(&same).await,
            "the identical apply answered before the write it found was on disk"
        );
        held.release.send(Ok(())).unwrap();
        assert_eq!(
            first.await.unwrap().unwrap()[0].0.outcome,
            ApplyOutcome::Configured
        );
        assert_eq!(
            same.await.unwrap().unwrap()[0].0.outcome,
            ApplyOutcome::Unchanged
        );

        // The same for status: an identical status is no write, but it confirms one.
        let held = hold_flushes(&s);
        let s1 = s.clone();
        let first = tokio::spawn(async move {
            s1.update_status(Kind::Service, "web", json!({"a": 1}), None)
                .await
        });
        let held = held.wait_entered().await;
        let s2 = s.clone();
        let same = tokio::spawn(async move {
            s2.update_status(Kind::Service, "web", json!({"a": 1}), None)
                .await
        });
        assert!(
            still_running(&same).await,
            "the identical status answered before the status it found was on disk"
        );
        held.release.send(Ok(())).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(same.await.unwrap().unwrap().status, json!({"a": 1}));
        s.set_flush_hook(None);
        // Nothing was poisoned: the next write goes through.
        s.write(vec![svc("web", 3)], WriteMode::Upsert, None, false)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_shows_nothing_and_refuses_service() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            s.write(vec![svc("kept", 1)], WriteMode::Upsert, None, false)
                .await
                .unwrap();
            let held = hold_flushes(&s);
            let s1 = s.clone();
            let first = tokio::spawn(async move {
                s1.write(vec![svc("lost", 1)], WriteMode::Upsert, None, false)
                    .await
            });
            let held = held.wait_entered().await;
            // Behind it: the identical apply, which must not say "unchanged" about a write that
            // failed, even if its own flush would work.
            let s2 = s.clone();
            let same = tokio::spawn(async move {
                s2.write(vec![svc("lost", 1)], WriteMode::Upsert, None, false)
                    .await
            });
            assert!(still_running(&same).await);
            let watcher = tokio::spawn({
                let s = s.clone();
                async move { s.failed().await }
            });
            held.release
                .send(Err("injected: I/O error".into()))
                .unwrap();
            let err = first.await.unwrap().unwrap_err();
            assert_eq!(err.status_and_reason(), (500, "StorageError"));
            assert!(
                err.to_string().contains("cannot make the write durable"),
                "{err}"
            );
            let err = same.await.unwrap().unwrap_err();
            assert_eq!(err.status_and_reason(), (500, "StorageError"), "{err}");
            tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
                .await
                .expect("the daemon learns of the failure")
                .unwrap();

            // The write that failed is not shown, nor anything else: every call refuses.
            s.set_flush_hook(None);
            for r in [
                s.get(Kind::Service, "lost").map(drop),
                s.get(Kind::Service, "kept").map(drop),
                s.list(Kind::Service).map(drop),
                s.write(vec![svc("kept", 1)], WriteMode::Upsert, None, false)
                    .await
                    .map(drop),
                s.update_status(Kind::Service, "kept", json!({}), None)
                    .await
                    .map(drop),
                s.delete(Kind::Service, "kept", "berth-internal")
                    .await
                    .map(drop),
                s.flush().await,
                s.outbox_batch(10).await.map(drop),
            ] {
                let err = r.unwrap_err();
                assert!(err.to_string().contains("until berth restarts"), "{err}");
            }
        }
        // The restart serves what is on disk.
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        assert!(s.get(Kind::Service, "kept").unwrap().is_some());
    }
}
