//! The store on NATS JetStream (`--store nats`): one replicated stream is the log of every
//! commit, and each API server applies it, in order, to an in-memory copy it serves reads from.
//! This is the design of etcd and of JetStream's own KV (a log replicated by Raft, a state
//! machine per server), on a NATS cluster berth already runs, instead of a consensus of our own.
//!
//! - **Atomic.** A commit is ONE message holding every record it writes (object, event, outbox
//!   entry, counters), so a crash can never leave half of it.
//! - **Serializable.** A commit is published with `Nats-Expected-Last-Sequence` = the last
//!   sequence the writer's copy had applied when it read. If any server committed in between,
//!   NATS refuses it; the writer catches up and runs the transaction again on the new state. So
//!   every commit was decided on the state right before it, as under sled's single write lock:
//!   "is this Secret still used?" and the delete that follows stay one step across servers.
//! - **Durable.** NATS acknowledges a publish to an R3 stream once a quorum has stored it. An
//!   acknowledged commit survives the loss of any one of three NATS servers.
//! - **Reads.** From the local copy, which trails the log by the time a message takes to arrive;
//!   [`Log::catch_up`] waits until it has everything acknowledged before the call, which the API
//!   does before answering a read, so a client sees its writes through any server.
//!
//! - **Bounded.** Every `compact_every` commits, the server that made the commit crossing the
//!   mark writes a snapshot of its copy into the log (in parts, marked as such; the state at
//!   sequence S) and then purges the log below S+1. Commits that arrive meanwhile stay: they are
//!   above S. A server that starts on a purged log, or finds the log purged beyond where its
//!   copy was, loads the snapshot and applies the commits after S; one in step ignores it.
//!
//! Values are already what the store keeps (Secrets sealed with the master key), so nothing in
//! the log is plaintext a NATS operator could read.

use super::{Entry, TxError, TxView};
use crate::store::StoreError;
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use berth_controllers::runtime::backoff::BackoffPolicy;
use futures::StreamExt;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// How often a transaction is run again after other servers committed first, before giving up.
const MAX_ATTEMPTS: usize = 64;
/// How long a read waits for this server's copy to catch up before it fails (NATS unreachable).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a starting server asks for the log's stream before it gives up: a cluster that is still
/// forming (every manager booting at once) elects its JetStream leaders first, which on a loaded
/// machine takes longer than a read may wait.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// One JetStream request's wait for its answer. Short, because a request whose server went away
/// is sent again (a commit under the same message id, see `publish`); a leader election takes
/// several of them.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a commit is sent again while NATS does not acknowledge it (a server lost, a leader
/// being elected), before the write fails as unavailable.
const COMMIT_BUDGET: Duration = Duration::from_secs(9);

/// One write of a commit: a record set (`v` present) or removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Op {
    #[serde(rename = "t")]
    pub tree: String,
    #[serde(rename = "k", with = "b64")]
    pub key: Vec<u8>,
    #[serde(rename = "v", default, with = "b64_opt")]
    pub value: Option<Vec<u8>>,
}

/// One message of the log: a commit, or a part of a snapshot (whose `ops` are records of the
/// state at `snapshot.at`, not changes).
#[derive(Debug, Serialize, Deserialize)]
struct Commit {
    /// Format version, so a later berth can read an older log.
    #[serde(rename = "v")]
    version: u32,
    /// The process that wrote it: it applied the commit already and announced its events.
    origin: String,
    ops: Vec<Op>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotPart {
    id: String,
    /// The log sequence whose state the snapshot holds.
    at: u64,
    part: u32,
    parts: u32,
}

/// A copy that lost its place in the log (it starts on a purged log, or the log was purged
/// beyond it): snapshot parts and the commits around them, until one snapshot is whole.
#[derive(Default)]
struct Recovery {
    /// The parts of each snapshot seen, by snapshot id.
    staged: HashMap<String, Staged>,
    /// Commits seen meanwhile: those above the snapshot's sequence are applied after it.
    commits: Vec<(u64, Vec<Op>)>,
}

/// One snapshot's parts as they arrive.
struct Staged {
    at: u64,
    parts: u32,
    seen: BTreeMap<u32, Vec<Op>>,
}

/// The records of one snapshot message: well under NATS' default 1 MB message limit.
const SNAPSHOT_PART_BYTES: usize = 512 * 1024;

/// The state every server derives from the log.
#[derive(Default)]
struct View {
    /// The last log sequence applied.
    seq: u64,
    trees: HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl View {
    fn apply(&mut self, seq: u64, ops: &[Op]) {
        for op in ops {
            let tree = self.trees.entry(op.tree.clone()).or_default();
            match &op.value {
                Some(v) => {
                    tree.insert(op.key.clone(), v.clone());
                }
                None => {
                    tree.remove(&op.key);
                }
            }
        }
        self.seq = seq;
    }
}

/// Called with the ops of every commit another process made, after it is applied here (the
/// store announces their events to this server's watchers and wakes its outbox publisher).
pub type Observer = Box<dyn Fn(&[Op]) + Send + Sync>;

/// Where the log is and how it is kept.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The stream (`BERTH_STORE`); one per installation.
    pub stream: String,
    /// Replicas of the stream: 3 on a three-server cluster (survives the loss of one), 1 on a
    /// single server.
    pub replicas: usize,
    /// Commits between snapshots (module comment): what a starting server replays at most.
    pub compact_every: u64,
}

pub struct Log {
    client: async_nats::Client,
    js: jetstream::Context,
    config: LogConfig,
    subject: String,
    /// This process, as written into its commits.
    origin: String,
    view: RwLock<View>,
    /// The sequence applied so far, for whoever waits on it.
    applied: watch::Sender<u64>,
    /// One local commit at a time: local writers then never conflict with each other, only with
    /// other servers.
    commit: tokio::sync::Mutex<()>,
    observer: OnceLock<Observer>,
    url: String,
    /// This log itself, for the compaction task it spawns.
    this: OnceLock<std::sync::Weak<Log>>,
    /// Set while this copy has lost its place in the log (see [`Recovery`]).
    recovery: parking_lot::Mutex<Option<Recovery>>,
    /// The sequence of the last whole snapshot seen (0: none).
    snapshot_at: std::sync::atomic::AtomicU64,
    /// A compaction of this server is running.
    compacting: std::sync::atomic::AtomicBool,
    /// A message that does not decode stops this copy there (see `apply_message`).
    halted: std::sync::atomic::AtomicBool,
    /// Asks the tail to make its consumer again (a read found it behind).
    tail_restart: tokio::sync::Notify,
}

impl Log {
    /// Opens (creating if missing) the log stream and loads it: returns once this server's copy
    /// holds every commit made before the call.
    pub async fn open(
        client: async_nats::Client,
        url: String,
        config: LogConfig,
    ) -> Result<Arc<Log>, StoreError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        let subject = berth_api_types::names::subjects::store_log(&config.stream);
        let wanted = stream::Config {
            name: config.stream.clone(),
            subjects: vec![subject.clone()],
            description: Some("berth's store: the log of every commit (--store nats)".into()),
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            retention: stream::RetentionPolicy::Limits,
            // Nothing may be removed from the middle of the log: every server applies all of it.
            deny_delete: true,
            ..Default::default()
        };
        // A cluster that just formed, or is electing a leader, times requests out for a few
        // seconds: asked again within the opening budget before giving up.
        let started = std::time::Instant::now();
        let mut retry = BackoffPolicy::reconnect().retry();
        let stream = loop {
            match js.get_or_create_stream(wanted.clone()).await {
                Ok(s) => break Ok(s),
                Err(e) if started.elapsed() + REQUEST_TIMEOUT < OPEN_TIMEOUT => {
                    tracing::info!(error = %e, "the store's stream does not answer yet; asking again");
                    tokio::time::sleep(retry.next_delay()).await;
                }
                Err(e) => break Err(e),
            }
        };
        let stream = stream.map_err(|e| {
            StoreError::Storage(format!(
                "cannot open the store's stream {} on NATS {url} with {} replica(s): {e}{}",
                config.stream,
                config.replicas,
                if config.replicas > 1 {
                    " (a single NATS server holds 1 replica: --store-replicas 1)"
                } else {
                    ""
                }
            ))
        })?;
        let have = stream.cached_info().config.num_replicas;
        if have != config.replicas {
            tracing::warn!(
                stream = %config.stream,
                replicas = have,
                wanted = config.replicas,
                "the store's stream exists with another replica count; leaving it as it is"
            );
        }
        let (applied, _) = watch::channel(0);
        let log = Arc::new(Log {
            client,
            js,
            subject,
            origin: ulid::Ulid::new().to_string(),
            view: RwLock::new(View::default()),
            applied,
            commit: tokio::sync::Mutex::new(()),
            observer: OnceLock::new(),
            url,
            config,
            this: OnceLock::new(),
            recovery: parking_lot::Mutex::new(None),
            snapshot_at: Default::default(),
            compacting: Default::default(),
            halted: Default::default(),
            tail_restart: tokio::sync::Notify::new(),
        });
        let _ = log.this.set(Arc::downgrade(&log));
        tokio::spawn(tail(Arc::downgrade(&log)));
        log.catch_up().await?;
        Ok(log)
    }

    /// Registers the observer of other processes' commits (once, by the store).
    pub fn observe(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    pub fn describe(&self) -> String {
        format!(
            "nats stream {} (R{}) at {}",
            self.config.stream, self.config.replicas, self.url
        )
    }

    /// The sequence this server's copy has applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn get(&self, tree: &str, key: &[u8]) -> Option<Vec<u8>> {
        self.view
            .read_recursive()
            .trees
            .get(tree)
            .and_then(|t| t.get(key).cloned())
    }

    pub fn scan(&self, tree: &str, prefix: &[u8]) -> Vec<Entry> {
        let view = self.view.read_recursive();
        let Some(t) = view.trees.get(tree) else {
            return Vec::new();
        };
        t.range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn range(&self, tree: &str, start: Vec<u8>, end: Vec<u8>) -> Vec<Entry> {
        let view = self.view.read_recursive();
        match view.trees.get(tree) {
            Some(t) if start <= end => t
                .range(start..=end)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn tree_names(&self) -> Vec<String> {
        self.view.read_recursive().trees.keys().cloned().collect()
    }

    pub fn len(&self, tree: &str) -> usize {
        self.view
            .read_recursive()
            .trees
            .get(tree)
            .map_or(0, BTreeMap::len)
    }

    /// Waits until this copy has applied the log's last sequence as NATS reports it now.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut retry = BackoffPolicy::reconnect().retry();
        // Asked again while a server is lost or a leader elected, within the budget.
        let (stream, last) = loop {
            match self.js.get_stream(&self.config.stream).await {
                Ok(stream) => {
                    let last = stream.cached_info().state.last_sequence;
                    break (stream, last);
                }
                Err(e) if started.elapsed() + REQUEST_TIMEOUT < CATCH_UP_TIMEOUT => {
                    tracing::debug!(error = %e, "asking the store's log for its last sequence again");
                    tokio::time::sleep(retry.next_delay()).await;
                }
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "the store's log on NATS ({}) cannot be read: {e}",
                        self.url
                    )))
                }
            }
        };
        // The tail delivers within milliseconds; when it does not (its consumer was on a
        // NATS server that went away and is being made again), the missing commits are read
        // from the stream directly, so no read waits for the tail to recover.
        while self.applied() < last {
            let mut rx = self.applied.subscribe();
            let caught = matches!(
                tokio::time::timeout(Duration::from_millis(300), rx.wait_for(|a| *a >= last)).await,
                Ok(Ok(_))
            );
            if caught || self.applied() >= last {
                break;
            }
            if started.elapsed() > CATCH_UP_TIMEOUT {
                return self.wait_applied(last).await;
            }
            self.tail_restart.notify_one();
            let next = self.applied() + 1;
            for seq in next..=last {
                match stream.get_raw_message(seq).await {
                    Ok(msg) => {
                        if let Some(ops) = self.apply_message(seq, &msg.payload) {
                            if let Some(observer) = self.observer.get() {
                                observer(&ops);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(seq, error = %e, "cannot read a commit of the store's log directly");
                        tokio::time::sleep(retry.next_delay()).await;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn wait_applied(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|a| *a >= seq))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "this server's copy of the store did not reach commit {seq} within 10 s \
                     (NATS at {} unreachable?)",
                    self.url
                ))
            })?
            .map_err(|_| StoreError::Storage("the store's log reader stopped".into()))?;
        Ok(())
    }

    /// Runs `f` on the current state and commits what it wrote as one message, expecting the
    /// log to be where this copy was when `f` read it; runs `f` again after catching up when
    /// another server committed first (module comment).
    pub async fn transact<R>(
        &self,
        trees: &[&str],
        f: impl Fn(&[TxView<'_>]) -> Result<R, TxError>,
    ) -> Result<R, StoreError> {
        let _one = self.commit.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (result, ops, read_at) = {
                let view = self.view.read_recursive();
                let txs: Vec<TxView<'_>> = trees
                    .iter()
                    .map(|name| {
                        TxView::Log(TxTree {
                            name,
                            base: view.trees.get(*name),
                            writes: RefCell::default(),
                        })
                    })
                    .collect();
                let result = match f(&txs) {
                    Ok(r) => r,
                    Err(TxError::Abort(e)) => return Err(e),
                    Err(TxError::Sled(e)) => return Err(StoreError::Storage(e.to_string())),
                };
                let ops: Vec<Op> = txs
                    .into_iter()
                    .flat_map(|t| match t {
                        TxView::Log(t) => t.into_ops(),
                        TxView::Sled(_) => unreachable!(),
                    })
                    .collect();
                (result, ops, view.seq)
            };
            if ops.is_empty() {
                return Ok(result);
            }
            match self.publish(&ops, read_at).await {
                Ok(seq) => {
                    let mut view = self.view.write();
                    // The tail may have applied it already (it arrives there too).
                    if view.seq == read_at {
                        view.apply(seq, &ops);
                        drop(view);
                        self.applied.send_replace(seq);
                    } else {
                        drop(view);
                    }
                    self.maybe_compact(seq);
                    return Ok(result);
                }
                Err(Publish::Behind) => {
                    self.catch_up().await?;
                }
                Err(Publish::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Storage(format!(
            "the commit lost to other servers' commits {MAX_ATTEMPTS} times in a row; retry"
        )))
    }

    async fn publish(&self, ops: &[Op], read_at: u64) -> Result<u64, Publish> {
        let commit = Commit {
            version: 1,
            origin: self.origin.clone(),
            ops: ops.to_vec(),
            snapshot: None,
        };
        let payload = serde_json::to_vec(&commit).expect("a commit always encodes");
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() > max {
            // Certain not to be stored: say so, rather than "may or may not".
            return Err(Publish::Failed(StoreError::Storage(format!(
                "this change is {} bytes as one commit, more than the NATS servers accept in one \
                 message (max_payload {max}); nothing was written: apply fewer objects at once, \
                 or raise max_payload in the NATS servers' configuration",
                payload.len()
            ))));
        }
        // Sent again under the same id while unacknowledged: if an earlier send was stored,
        // JetStream answers with that one's sequence (a duplicate) instead of storing it twice,
        // so a lost acknowledgement never turns into a second commit or a false failure.
        let id = ulid::Ulid::new().to_string();
        let payload = bytes::Bytes::from(payload);
        let started = std::time::Instant::now();
        let mut retry = BackoffPolicy::reconnect().retry();
        loop {
            let msg = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id)
                .expected_last_sequence(read_at);
            let ack = match self.js.send_publish(self.subject.clone(), msg).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let e = match ack {
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(Publish::Behind)
                }
                Err(e) => e,
            };
            if started.elapsed() + REQUEST_TIMEOUT >= COMMIT_BUDGET {
                return Err(Publish::Failed(StoreError::Unavailable(format!(
                    "NATS ({}) did not acknowledge the commit within {COMMIT_BUDGET:?}: {e}; \
                     it may or may not be stored (apply is idempotent: apply again)",
                    self.url
                ))));
            }
            tracing::debug!(error = %e, "the commit was not acknowledged; sending it again");
            tokio::time::sleep(retry.next_delay()).await;
        }
    }

    /// Applies a message of the log, in order. Returns the ops of another process's commit (for
    /// the observer).
    fn apply_message(&self, seq: u64, payload: &[u8]) -> Option<Vec<Op>> {
        use std::sync::atomic::Ordering;
        if self.halted.load(Ordering::Acquire) {
            return None;
        }
        let commit: Commit = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                // Skipping it would let servers disagree: this copy stops at the last commit it
                // understood (reads wait, and fail after 10 s, naming the cause).
                self.halted.store(true, Ordering::Release);
                tracing::error!(seq, error = %e, "a message of the store's log does not decode; this server's copy stops before it (is a newer berth writing to it?)");
                return None;
            }
        };
        let mut view = self.view.write();
        if seq <= view.seq {
            return None;
        }
        let mut recovery = self.recovery.lock();
        if seq != view.seq + 1 && recovery.is_none() {
            tracing::warn!(
                had = view.seq,
                next = seq,
                "the store's log was compacted beyond this server's copy; loading its snapshot"
            );
            *recovery = Some(Recovery::default());
        }
        if let Some(r) = recovery.as_mut() {
            let Some(part) = commit.snapshot else {
                r.commits.push((seq, commit.ops));
                return None;
            };
            let whole = {
                let staged = r.staged.entry(part.id.clone()).or_insert_with(|| Staged {
                    at: part.at,
                    parts: part.parts,
                    seen: BTreeMap::new(),
                });
                staged.seen.insert(part.part, commit.ops);
                staged.seen.len() == staged.parts as usize
            };
            if !whole {
                return None;
            }
            let Staged { at, seen, .. } = r.staged.remove(&part.id).expect("staged above");
            let mut fresh = View::default();
            for ops in seen.values() {
                fresh.apply(at, ops);
            }
            fresh.seq = at;
            for (s, ops) in r.commits.iter().filter(|(s, _)| *s > at) {
                fresh.apply(*s, ops);
            }
            fresh.seq = seq;
            *view = fresh;
            *recovery = None;
            drop(view);
            self.snapshot_at.fetch_max(at, Ordering::AcqRel);
            self.applied.send_replace(seq);
            tracing::info!(snapshot_at = at, seq, "loaded the store's snapshot");
            return None;
        }
        drop(recovery);
        if let Some(part) = commit.snapshot {
            // In step already: a snapshot holds nothing this copy lacks.
            view.seq = seq;
            drop(view);
            if part.part + 1 == part.parts {
                self.snapshot_at.fetch_max(part.at, Ordering::AcqRel);
            }
            self.applied.send_replace(seq);
            return None;
        }
        view.apply(seq, &commit.ops);
        drop(view);
        self.applied.send_replace(seq);
        (commit.origin != self.origin).then_some(commit.ops)
    }

    /// After a local commit at `seq`: starts a compaction when the log has grown by
    /// `compact_every` commits since the last snapshot (only the server whose commit crossed the
    /// mark, so servers do not all snapshot at once).
    fn maybe_compact(self: &Log, seq: u64) {
        use std::sync::atomic::Ordering;
        let since = seq.saturating_sub(self.snapshot_at.load(Ordering::Acquire));
        if since < self.config.compact_every || self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(log) = self.me() else {
            self.compacting.store(false, Ordering::Release);
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = log.compact().await {
                tracing::warn!(error = %e, "cannot compact the store's log; trying again later");
            }
            log.compacting.store(false, Ordering::Release);
        });
    }

    /// Writes a snapshot of this copy into the log and purges everything it replaces.
    pub async fn compact(&self) -> Result<u64, StoreError> {
        let failed = |what: &str, e: String| {
            StoreError::Storage(format!("compacting the store's log: {what}: {e}"))
        };
        let (at, parts) = {
            let view = self.view.read_recursive();
            if self.recovery.lock().is_some() {
                return Err(StoreError::Storage(
                    "this copy is loading a snapshot".into(),
                ));
            }
            (view.seq, snapshot_parts(&view))
        };
        let id = ulid::Ulid::new().to_string();
        let total = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        for (i, ops) in parts.into_iter().enumerate() {
            let message = Commit {
                version: 1,
                origin: self.origin.clone(),
                ops,
                snapshot: Some(SnapshotPart {
                    id: id.clone(),
                    at,
                    part: i as u32,
                    parts: total,
                }),
            };
            let payload = serde_json::to_vec(&message).expect("a snapshot always encodes");
            self.js
                .publish(self.subject.clone(), payload.into())
                .await
                .map_err(|e| failed("publishing", e.to_string()))?
                .await
                .map_err(|e| failed("publishing", e.to_string()))?;
        }
        // Everything up to `at` is in the snapshot; what came after it stays.
        let stream = self
            .js
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| failed("the stream", e.to_string()))?;
        let purged = stream
            .purge()
            .sequence(at + 1)
            .await
            .map_err(|e| failed("purging", e.to_string()))?;
        self.snapshot_at
            .fetch_max(at, std::sync::atomic::Ordering::AcqRel);
        tracing::info!(
            at,
            parts = total,
            purged = purged.purged,
            "compacted the store's log into a snapshot"
        );
        Ok(at)
    }

    fn me(&self) -> Option<Arc<Log>> {
        self.this.get().and_then(std::sync::Weak::upgrade)
    }
}

/// A copy's records as snapshot parts of at most [`SNAPSHOT_PART_BYTES`] each (at least one
/// part, so an empty store has a snapshot too).
fn snapshot_parts(view: &View) -> Vec<Vec<Op>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    let mut names: Vec<&String> = view.trees.keys().collect();
    names.sort();
    for name in names {
        for (k, v) in &view.trees[name] {
            if bytes > SNAPSHOT_PART_BYTES {
                parts.push(Vec::new());
                bytes = 0;
            }
            bytes += k.len() + v.len();
            parts.last_mut().expect("one part at least").push(Op {
                tree: name.clone(),
                key: k.clone(),
                value: Some(v.clone()),
            });
        }
    }
    parts
}

enum Publish {
    /// Another commit came first: catch up and run the transaction again.
    Behind,
    Failed(StoreError),
}

/// Reads the log from where this copy is, for as long as the log exists; a broken consumer is
/// made again from the next sequence.
async fn tail(log: std::sync::Weak<Log>) {
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        let Some(strong) = log.upgrade() else { return };
        let (js, name, from) = (
            strong.js.clone(),
            strong.config.stream.clone(),
            strong.applied() + 1,
        );
        drop(strong);
        let messages = async {
            let stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        }
        .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                let delay = retry.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot read the store's log");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        loop {
            let restart = async {
                match log.upgrade() {
                    Some(l) => l.tail_restart.notified().await,
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                item = messages.next() => item,
                () = restart => {
                    tracing::debug!("making the store's log reader again");
                    break;
                }
            };
            let Some(item) = item else { break };
            let msg = match item {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "the store's log reader broke; reading on");
                    break;
                }
            };
            let Ok(seq) = msg.info().map(|i| i.stream_sequence) else {
                continue;
            };
            let Some(strong) = log.upgrade() else { return };
            retry.reset();
            if let Some(ops) = strong.apply_message(seq, &msg.payload) {
                if let Some(observer) = strong.observer.get() {
                    observer(&ops);
                }
            }
        }
        tokio::time::sleep(retry.next_delay()).await;
    }
}

/// One tree inside a log transaction: the copy's records under the transaction's own writes.
pub struct TxTree<'a> {
    name: &'a str,
    base: Option<&'a BTreeMap<Vec<u8>, Vec<u8>>>,
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl TxTree<'_> {
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(w) = self.writes.borrow().get(key) {
            return w.clone();
        }
        self.base.and_then(|b| b.get(key).cloned())
    }

    pub fn insert(&self, key: &[u8], value: &[u8]) {
        self.writes
            .borrow_mut()
            .insert(key.to_vec(), Some(value.to_vec()));
    }

    pub fn remove(&self, key: &[u8]) {
        self.writes.borrow_mut().insert(key.to_vec(), None);
    }

    /// What the transaction changed; writing what is there already is no change.
    fn into_ops(self) -> Vec<Op> {
        let base = self.base;
        self.writes
            .into_inner()
            .into_iter()
            .filter(|(k, v)| base.and_then(|b| b.get(k)) != v.as_ref())
            .map(|(key, value)| Op {
                tree: self.name.to_string(),
                key,
                value,
            })
            .collect()
    }
}

mod b64 {
    use base64::Engine;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use base64::Engine;
    pub fn serialize<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(v)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_round_trips_binary_keys_and_removals() {
        let c = Commit {
            version: 1,
            origin: "o".into(),
            snapshot: None,
            ops: vec![
                Op {
                    tree: "meta".into(),
                    key: b"rv".to_vec(),
                    value: Some(7u64.to_be_bytes().to_vec()),
                },
                Op {
                    tree: "objects".into(),
                    key: b"service/web".to_vec(),
                    value: None,
                },
            ],
        };
        let back: Commit = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back.ops, c.ops);
    }

    #[test]
    fn a_transaction_sees_its_own_writes_and_records_only_changes() {
        let mut base = BTreeMap::new();
        base.insert(b"a".to_vec(), b"1".to_vec());
        base.insert(b"b".to_vec(), b"2".to_vec());
        let t = TxTree {
            name: "t",
            base: Some(&base),
            writes: RefCell::default(),
        };
        t.insert(b"a", b"1"); // the same value: no change
        t.insert(b"c", b"3");
        t.remove(b"b");
        t.remove(b"zz"); // absent: no change
        assert_eq!(t.get(b"c"), Some(b"3".to_vec()));
        assert_eq!(t.get(b"b"), None);
        let ops = t.into_ops();
        let keys: Vec<_> = ops
            .iter()
            .map(|o| (o.key.clone(), o.value.clone()))
            .collect();
        assert_eq!(
            keys,
            vec![(b"b".to_vec(), None), (b"c".to_vec(), Some(b"3".to_vec()))]
        );
    }
}
