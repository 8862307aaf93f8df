//! How several instances of one controller share its objects: every object key falls in one of
//! [`PARTITIONS`] partitions, and an instance reconciles the keys of a partition only while it
//! holds that partition's lease. Leases live in a store with revisions and a max age (NATS
//! JetStream KV, see `bus::leases`): a lease is created only where no live entry exists, renewed
//! with the revision it was written at, and disappears when its holder stops renewing it. So two
//! instances never hold one partition at once, and a dead instance's partitions become free one
//! lease time after its last renewal.
//!
//! Safety does not depend on clocks agreeing: an instance treats a lease as gone [`SAFETY`] before
//! the store can expire it, counted from before the renewal was sent, and a reconcile still
//! running then is abandoned (reconciles are level-based, so an abandoned one is like a crash).
//! Balance: every instance aims at `ceil(PARTITIONS / instances)`; one above it drains the extra
//! partitions (no new reconciles, the running ones finish) and only then releases them, so a new
//! instance takes its share without any key being reconciled twice at the same moment.
//!
//! Without NATS (one process) an instance owns everything ([`Sharing::Sole`]) and only reports
//! itself, for `berth controllers`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use berth_api_types::controllers::ControllerInstance;
use berth_api_types::names::subjects::{lease_key, member_key, members_of};
use berth_api_types::Kind;
use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Partitions of one kind's keys. Enough that shares come out even (64 over 3 instances: 22, 22,
/// 20), few enough that renewing them all each second is cheap.
pub const PARTITIONS: u32 = 64;
/// How long a lease lives without renewal: the store's max age. The failover time after a crash
/// is at most this plus one renewal period.
pub const LEASE_TIME: Duration = Duration::from_secs(5);
/// How often leases are renewed and shares rebalanced.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How long before the store could expire a lease its holder stops using it: covers a late tick
/// and a renewal in flight.
pub const SAFETY: Duration = Duration::from_secs(2);

/// The partition of a key: FNV-1a, stable across processes, versions and platforms (std's hasher
/// promises none of that).
pub fn partition_of(key: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % PARTITIONS
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LeaseError(pub String);

/// A key-value store with revisions whose entries expire unless rewritten (NATS KV with a max age,
/// or [`MemoryLeases`]).
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug + 'static {
    /// Writes `key` if no live entry has it: the new revision, or `None` when one does.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, LeaseError>;
    /// Rewrites `key` if it is still at `revision`: the new revision, or `None` when it is not
    /// (expired, taken by someone else).
    async fn renew(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Option<u64>, LeaseError>;
    /// Deletes `key` if it is still at `revision`.
    async fn release(&self, key: &str, revision: u64) -> Result<(), LeaseError>;
    /// Writes `key` whatever it holds (an instance's own record).
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), LeaseError>;
    async fn remove(&self, key: &str) -> Result<(), LeaseError>;
    /// Every live entry whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError>;
}

/// How a controller instance shares its kind's objects.
#[derive(Debug, Clone)]
pub enum Sharing {
    /// The only instance: owns every key; the store only receives its record.
    Sole(Arc<dyn LeaseStore>),
    /// One of any number of instances holding partition leases in the store.
    Leased(Arc<dyn LeaseStore>),
}

impl Default for Sharing {
    fn default() -> Self {
        Sharing::Sole(Arc::new(MemoryLeases::default()))
    }
}

impl Sharing {
    /// Where instance records (and leases) are kept.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        match self {
            Sharing::Sole(s) | Sharing::Leased(s) => s,
        }
    }
}

/// The running instances of every kind of one installation, newest record each.
pub async fn instances(
    store: &dyn LeaseStore,
    installation: &str,
) -> Result<Vec<ControllerInstance>, LeaseError> {
    let mut found: Vec<ControllerInstance> = store
        .list(&members_of(installation))
        .await?
        .into_iter()
        .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
        .collect();
    found.sort_by(|a, b| (a.kind, &a.instance).cmp(&(b.kind, &b.instance)));
    Ok(found)
}

/// One held lease.
struct Held {
    revision: u64,
    /// When this instance stops trusting the lease (before the store can expire it).
    deadline: Instant,
    /// Being handed over: no new reconciles; released once `inflight` is 0.
    draining: bool,
    inflight: usize,
    /// Set to `true` when the lease is lost, so running reconciles stop.
    lost: watch::Sender<bool>,
}

type KeysFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

struct Inner {
    kind: Kind,
    installation: String,
    record: ControllerInstance,
    sharing: Sharing,
    held: Mutex<HashMap<u32, Held>>,
    /// Bumped whenever partitions are acquired: their keys need a resync here.
    acquired: watch::Sender<u64>,
    /// The keys of every object the controller knows (one per object), to count its share.
    keys: Mutex<Option<KeysFn>>,
    /// Where the next search for a free partition starts (spreads contention between instances).
    probe: AtomicU64,
}

/// One instance's view of its shares of one kind. Cheap to clone.
#[derive(Clone)]
pub struct Shares {
    inner: Arc<Inner>,
}

/// Permission to reconcile one key, held for the reconcile's duration.
pub struct Permit {
    inner: Option<Arc<Inner>>,
    partition: u32,
    lost: watch::Receiver<bool>,
}

impl Permit {
    /// Resolves when the lease behind this permit is lost: the reconcile must stop.
    pub async fn lost(&mut self) {
        loop {
            if *self.lost.borrow_and_update() {
                return;
            }
            if self.lost.changed().await.is_err() {
                // Sole owner, or the lease was dropped without being lost: never.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            if let Some(held) = lock(&inner.held).get_mut(&self.partition) {
                held.inflight = held.inflight.saturating_sub(1);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

impl Shares {
    pub fn new(kind: Kind, installation: &str, sharing: Sharing) -> Shares {
        let instance = ulid::Ulid::new().to_string().to_lowercase();
        let now = Utc::now();
        let record = ControllerInstance {
            kind,
            instance: instance.clone(),
            host: hostname(),
            pid: std::process::id(),
            partitions: 0,
            partitions_total: PARTITIONS,
            objects: 0,
            leader: false,
            started: now,
            last_seen: now,
        };
        let seed = ulid::Ulid::from_string(&instance.to_uppercase())
            .map(|u| u.random() as u64)
            .unwrap_or(0);
        Shares {
            inner: Arc::new(Inner {
                kind,
                installation: installation.to_string(),
                record,
                sharing,
                held: Mutex::new(HashMap::new()),
                acquired: watch::channel(0).0,
                keys: Mutex::new(None),
                probe: AtomicU64::new(seed),
            }),
        }
    }

    /// This process's instance id.
    pub fn instance(&self) -> &str {
        &self.inner.record.instance
    }

    fn sole(&self) -> bool {
        matches!(self.inner.sharing, Sharing::Sole(_))
    }

    /// Whether this instance may start reconciling `key` now.
    pub fn owns(&self, key: &str) -> bool {
        self.owns_partition(partition_of(key))
    }

    fn owns_partition(&self, partition: u32) -> bool {
        if self.sole() {
            return true;
        }
        let now = Instant::now();
        lock(&self.inner.held)
            .get(&partition)
            .is_some_and(|h| !h.draining && h.deadline > now)
    }

    /// Whether this instance runs the kind's once-per-installation work: the holder of partition 0.
    pub fn leads(&self) -> bool {
        self.owns_partition(0)
    }

    /// A permit to reconcile `key`, or `None` when another instance owns it (or will shortly).
    pub fn begin(&self, key: &str) -> Option<Permit> {
        let partition = partition_of(key);
        if self.sole() {
            return Some(Permit {
                inner: None,
                partition,
                lost: watch::channel(false).1,
            });
        }
        let now = Instant::now();
        let mut held = lock(&self.inner.held);
        let h = held.get_mut(&partition)?;
        if h.draining || h.deadline <= now {
            return None;
        }
        h.inflight += 1;
        Some(Permit {
            inner: Some(self.inner.clone()),
            partition,
            lost: h.lost.subscribe(),
        })
    }

    /// Changes whenever partitions were acquired (their keys need a resync).
    pub fn acquisitions(&self) -> watch::Receiver<u64> {
        self.inner.acquired.subscribe()
    }

    /// Where the keys of every known object come from (the controller's cache), so the record
    /// can say how many this instance owns.
    pub fn count_keys_of(&self, keys: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        *lock(&self.inner.keys) = Some(Arc::new(keys));
    }

    fn owned_objects(&self) -> u64 {
        let Some(keys) = lock(&self.inner.keys).clone() else {
            return 0;
        };
        keys().iter().filter(|k| self.owns(k)).count() as u64
    }

    /// Keeps the leases and this instance's record up to date until dropped.
    pub async fn run(&self) {
        loop {
            self.tick().await;
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    fn member_key(&self) -> String {
        member_key(
            &self.inner.installation,
            self.inner.kind,
            &self.inner.record.instance,
        )
    }

    fn lease_key(&self, partition: u32) -> String {
        lease_key(&self.inner.installation, self.inner.kind, partition)
    }

    fn record(&self) -> Vec<u8> {
        let (partitions, leader) = if self.sole() {
            (PARTITIONS, true)
        } else {
            let held = lock(&self.inner.held);
            let active = held.values().filter(|h| !h.draining).count() as u32;
            (active, held.get(&0).is_some_and(|h| !h.draining))
        };
        let record = ControllerInstance {
            partitions,
            leader,
            objects: self.owned_objects(),
            last_seen: Utc::now(),
            ..self.inner.record.clone()
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// One round: expire what can no longer be trusted, renew or release what is held, report,
    /// and rebalance.
    pub async fn tick(&self) {
        let store = self.inner.sharing.store().clone();
        if self.sole() {
            if let Err(e) = store.put(&self.member_key(), self.record()).await {
                debug!(kind = %self.inner.kind, error = %e, "cannot write the instance record");
            }
            return;
        }
        self.expire_local();
        self.renew_all(store.as_ref()).await;
        match self.members(store.as_ref()).await {
            Ok(others) => self.rebalance(store.as_ref(), &others).await,
            Err(e) => {
                warn!(kind = %self.inner.kind, error = %e, "cannot list the instances; shares are not rebalanced this round")
            }
        }
        // Last, so the record says what this round acquired or handed over.
        if let Err(e) = store.put(&self.member_key(), self.record()).await {
            warn!(kind = %self.inner.kind, error = %e, "cannot write the instance record");
        }
    }

    /// Leases whose deadline passed without a renewal (the store unreachable) are given up here
    /// before the store can hand them to someone else.
    fn expire_local(&self) {
        let now = Instant::now();
        let mut held = lock(&self.inner.held);
        held.retain(|p, h| {
            if h.deadline > now {
                return true;
            }
            warn!(kind = %self.inner.kind, partition = p, "lease not renewed in time: its objects are left to other instances");
            let _ = h.lost.send(true);
            false
        });
    }

    /// Renews (or, once drained, releases) every held lease, all at once: one slow round trip
    /// must not make the others late.
    async fn renew_all(&self, store: &dyn LeaseStore) {
        let todo: Vec<(u32, u64, bool)> = lock(&self.inner.held)
            .iter()
            .map(|(p, h)| (*p, h.revision, h.draining && h.inflight == 0))
            .collect();
        futures::future::join_all(todo.into_iter().map(|(partition, revision, release)| {
            self.renew_one(store, partition, revision, release)
        }))
        .await;
    }

    async fn renew_one(
        &self,
        store: &dyn LeaseStore,
        partition: u32,
        revision: u64,
        release: bool,
    ) {
        let value = self.inner.record.instance.clone().into_bytes();
        {
            let key = self.lease_key(partition);
            if release {
                // Removed first: a permit cannot start on a draining partition, so nothing runs.
                lock(&self.inner.held).remove(&partition);
                match store.release(&key, revision).await {
                    Ok(()) => debug!(kind = %self.inner.kind, partition, "lease handed over"),
                    // It expires on its own within the lease time.
                    Err(e) => {
                        debug!(kind = %self.inner.kind, partition, error = %e, "cannot release a lease")
                    }
                }
                return;
            }
            let sent = Instant::now();
            match store.renew(&key, value, revision).await {
                Ok(Some(new)) => {
                    if let Some(h) = lock(&self.inner.held).get_mut(&partition) {
                        h.revision = new;
                        h.deadline = sent + LEASE_TIME - SAFETY;
                    }
                }
                Ok(None) => {
                    warn!(kind = %self.inner.kind, partition, "lease lost (expired or taken): its objects are left to other instances");
                    if let Some(h) = lock(&self.inner.held).remove(&partition) {
                        let _ = h.lost.send(true);
                    }
                }
                // Kept until its deadline: a brief NATS outage must not drop every lease.
                Err(e) => {
                    debug!(kind = %self.inner.kind, partition, error = %e, "cannot renew a lease")
                }
            }
        }
    }

    /// The other live instances of this kind.
    async fn members(&self, store: &dyn LeaseStore) -> Result<Vec<ControllerInstance>, LeaseError> {
        Ok(instances(store, &self.inner.installation)
            .await?
            .into_iter()
            .filter(|m| m.kind == self.inner.kind && m.instance != self.inner.record.instance)
            .collect())
    }

    async fn rebalance(&self, store: &dyn LeaseStore, others: &[ControllerInstance]) {
        let count = others.len() as u32 + 1;
        let target = PARTITIONS.div_ceil(count);
        let (active, total): (Vec<u32>, usize) = {
            let held = lock(&self.inner.held);
            let mut active: Vec<u32> = held
                .iter()
                .filter(|(_, h)| !h.draining)
                .map(|(p, _)| *p)
                .collect();
            active.sort_unstable();
            (active, held.len())
        };
        if active.len() as u32 > target {
            // Hand over the highest partitions; partition 0 (the leader's) moves last.
            let extra = active.len() - target as usize;
            let mut held = lock(&self.inner.held);
            for p in active.iter().rev().take(extra) {
                if let Some(h) = held.get_mut(p) {
                    h.draining = true;
                }
            }
            info!(kind = %self.inner.kind, instances = count, target, handing_over = extra, "rebalancing: handing partitions over");
            return;
        }
        let others: u32 = others.iter().map(|m| m.partitions).sum();
        // Only look for free partitions when the records say some may be free: with every
        // partition held, each probe would be a failed create.
        if total as u32 >= target || others + total as u32 >= PARTITIONS {
            return;
        }
        let want = target as usize - total;
        let start = self.inner.probe.fetch_add(7, Ordering::Relaxed) as u32 % PARTITIONS;
        let value = self.inner.record.instance.clone().into_bytes();
        let mut got = 0;
        for i in 0..PARTITIONS {
            if got == want {
                break;
            }
            let partition = (start + i) % PARTITIONS;
            if lock(&self.inner.held).contains_key(&partition) {
                continue;
            }
            let sent = Instant::now();
            match store
                .create(&self.lease_key(partition), value.clone())
                .await
            {
                Ok(Some(revision)) => {
                    lock(&self.inner.held).insert(
                        partition,
                        Held {
                            revision,
                            deadline: sent + LEASE_TIME - SAFETY,
                            draining: false,
                            inflight: 0,
                            lost: watch::channel(false).0,
                        },
                    );
                    got += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(kind = %self.inner.kind, partition, error = %e, "cannot create a lease");
                    break;
                }
            }
        }
        if got > 0 {
            info!(kind = %self.inner.kind, acquired = got, holding = total + got, instances = count, "partitions acquired");
            self.inner.acquired.send_modify(|n| *n += 1);
        }
    }

    /// A clean stop: hands every lease over at once (rather than after the lease time) and removes
    /// this instance's record. Call once no reconcile runs any more.
    pub async fn stop(&self) {
        let store = self.inner.sharing.store().clone();
        let held: Vec<(u32, u64)> = lock(&self.inner.held)
            .drain()
            .map(|(p, h)| {
                let _ = h.lost.send(true);
                (p, h.revision)
            })
            .collect();
        for (partition, revision) in held {
            let _ = store.release(&self.lease_key(partition), revision).await;
        }
        let _ = store.remove(&self.member_key()).await;
        info!(kind = %self.inner.kind, instance = %self.inner.record.instance, "controller instance left");
    }

    /// Partitions held now (draining ones included), for tests.
    pub fn held(&self) -> Vec<u32> {
        let mut v: Vec<u32> = lock(&self.inner.held).keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// An in-process [`LeaseStore`] with the same semantics as the NATS bucket (revisions, expiry after
/// [`LEASE_TIME`] without a rewrite): for one process, and for tests.
#[derive(Debug, Default)]
pub struct MemoryLeases {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    entries: HashMap<String, (u64, Vec<u8>, Instant)>,
    revision: u64,
}

impl MemoryState {
    fn live(&mut self, key: &str) -> Option<&(u64, Vec<u8>, Instant)> {
        let now = Instant::now();
        if self
            .entries
            .get(key)
            .is_some_and(|(_, _, at)| now.duration_since(*at) >= LEASE_TIME)
        {
            self.entries.remove(key);
        }
        self.entries.get(key)
    }

    fn write(&mut self, key: &str, value: Vec<u8>) -> u64 {
        self.revision += 1;
        self.entries
            .insert(key.to_string(), (self.revision, value, Instant::now()));
        self.revision
    }
}

#[async_trait]
impl LeaseStore for MemoryLeases {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, LeaseError> {
        let mut s = lock(&self.state);
        if s.live(key).is_some() {
            return Ok(None);
        }
        Ok(Some(s.write(key, value)))
    }

    async fn renew(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Option<u64>, LeaseError> {
        let mut s = lock(&self.state);
        match s.live(key) {
            Some((r, _, _)) if *r == revision => Ok(Some(s.write(key, value))),
            _ => Ok(None),
        }
    }

    async fn release(&self, key: &str, revision: u64) -> Result<(), LeaseError> {
        let mut s = lock(&self.state);
        if s.live(key).is_some_and(|(r, _, _)| *r == revision) {
            s.entries.remove(key);
        }
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), LeaseError> {
        lock(&self.state).write(key, value);
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), LeaseError> {
        lock(&self.state).entries.remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError> {
        let mut s = lock(&self.state);
        let keys: Vec<String> = s
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for k in keys {
            if let Some((_, v, _)) = s.live(&k) {
                out.push((k, v.clone()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(store: &Arc<MemoryLeases>) -> Shares {
        Shares::new(Kind::Service, "inst", Sharing::Leased(store.clone()))
    }

    #[test]
    fn shares_partitions_are_stable_and_spread() {
        // Fixed values: a change here would move every object between instances on upgrade.
        assert_eq!(partition_of("web"), partition_of("web"));
        assert_eq!(partition_of(""), 0x811c_9dc5 % PARTITIONS);
        let mut counts = [0u32; PARTITIONS as usize];
        for i in 0..6400 {
            counts[partition_of(&format!("svc-{i}")) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 60 && *max < 150, "uneven: {min}..{max}");
    }

    #[tokio::test(start_paused = true)]
    async fn shares_one_instance_takes_everything() {
        let store = Arc::new(MemoryLeases::default());
        let a = leased(&store);
        a.tick().await;
        assert_eq!(a.held().len(), PARTITIONS as usize);
        assert!(a.leads());
        assert!(a.begin("anything").is_some());
    }

    /// Ticks every instance once per renewal period for `rounds` periods.
    async fn run_rounds(all: &[&Shares], rounds: usize) {
        for _ in 0..rounds {
            for s in all {
                s.tick().await;
            }
            tokio::time::advance(RENEW_EVERY).await;
        }
    }

    fn assert_disjoint(all: &[&Shares]) {
        let mut seen = std::collections::HashSet::new();
        for s in all {
            for p in s.held() {
                assert!(seen.insert(p), "partition {p} held twice");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shares_a_new_instance_gets_its_share_without_overlap() {
        let store = Arc::new(MemoryLeases::default());
        let (a, b, c) = (leased(&store), leased(&store), leased(&store));
        run_rounds(&[&a], 1).await;
        for _ in 0..6 {
            run_rounds(&[&a, &b, &c], 1).await;
            assert_disjoint(&[&a, &b, &c]);
        }
        let sizes = [a.held().len(), b.held().len(), c.held().len()];
        assert_eq!(
            sizes.iter().sum::<usize>(),
            PARTITIONS as usize,
            "{sizes:?}"
        );
        assert!(sizes.iter().all(|n| *n >= 20 && *n <= 22), "{sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn shares_a_draining_partition_waits_for_its_running_reconcile() {
        let store = Arc::new(MemoryLeases::default());
        let (a, b) = (leased(&store), leased(&store));
        run_rounds(&[&a], 1).await;
        // A key in a partition `a` will hand over (the highest ones go first).
        let key = (0..10_000)
            .map(|i| format!("k{i}"))
            .find(|k| partition_of(k) == PARTITIONS - 1)
            .unwrap();
        let permit = a.begin(&key).expect("a owns everything");
        run_rounds(&[&a, &b], 4).await;
        assert!(
            a.held().contains(&(PARTITIONS - 1)),
            "released while a reconcile ran"
        );
        assert!(!b.held().contains(&(PARTITIONS - 1)));
        assert!(
            a.begin(&key).is_none(),
            "a new reconcile started on a draining partition"
        );
        drop(permit);
        run_rounds(&[&a, &b], 3).await;
        assert!(!a.held().contains(&(PARTITIONS - 1)));
        assert!(b.held().contains(&(PARTITIONS - 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn shares_a_dead_instance_is_replaced_after_the_lease_time() {
        let store = Arc::new(MemoryLeases::default());
        let (a, b) = (leased(&store), leased(&store));
        run_rounds(&[&a, &b], 5).await;
        assert_eq!(a.held().len() + b.held().len(), PARTITIONS as usize);
        // `b` stops renewing (kill -9). Its partitions come back to `a` only after they expired.
        let b_held = b.held();
        let mut elapsed = Duration::ZERO;
        while a.held().len() < PARTITIONS as usize {
            run_rounds(&[&a], 1).await;
            elapsed += RENEW_EVERY;
            assert!(
                elapsed <= LEASE_TIME + 2 * RENEW_EVERY,
                "not taken over after {elapsed:?}"
            );
        }
        assert!(
            elapsed >= LEASE_TIME - RENEW_EVERY,
            "taken over after {elapsed:?}: too early"
        );
        // `b`, frozen meanwhile, must not trust its leases any more when it wakes up.
        let key = (0..10_000)
            .map(|i| format!("k{i}"))
            .find(|k| b_held.contains(&partition_of(k)))
            .unwrap();
        assert!(b.begin(&key).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn shares_a_lost_lease_stops_the_running_reconcile() {
        let store = Arc::new(MemoryLeases::default());
        let a = leased(&store);
        a.tick().await;
        let mut permit = a.begin("web").unwrap();
        // The store forgets everything (say a NATS restart without its data), and someone else
        // takes the partition: `a`'s next renewal finds out.
        let key = lease_key("inst", Kind::Service, partition_of("web"));
        store.remove(&key).await.unwrap();
        store.create(&key, b"other".to_vec()).await.unwrap();
        a.tick().await;
        tokio::time::timeout(Duration::from_secs(1), permit.lost())
            .await
            .expect("the permit was not told");
    }

    #[tokio::test(start_paused = true)]
    async fn shares_an_unreachable_store_stops_reconciles_before_expiry() {
        #[derive(Debug)]
        struct Down;
        #[async_trait]
        impl LeaseStore for Down {
            async fn create(&self, _: &str, _: Vec<u8>) -> Result<Option<u64>, LeaseError> {
                Err(LeaseError("down".into()))
            }
            async fn renew(&self, _: &str, _: Vec<u8>, _: u64) -> Result<Option<u64>, LeaseError> {
                Err(LeaseError("down".into()))
            }
            async fn release(&self, _: &str, _: u64) -> Result<(), LeaseError> {
                Err(LeaseError("down".into()))
            }
            async fn put(&self, _: &str, _: Vec<u8>) -> Result<(), LeaseError> {
                Err(LeaseError("down".into()))
            }
            async fn remove(&self, _: &str) -> Result<(), LeaseError> {
                Err(LeaseError("down".into()))
            }
            async fn list(&self, _: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError> {
                Err(LeaseError("down".into()))
            }
        }
        let a = leased(&Arc::new(MemoryLeases::default()));
        a.tick().await;
        assert!(a.owns("web"));
        let frozen = Shares {
            inner: Arc::new(Inner {
                sharing: Sharing::Leased(Arc::new(Down)),
                held: Mutex::new(std::mem::take(&mut *lock(&a.inner.held))),
                kind: a.inner.kind,
                installation: a.inner.installation.clone(),
                record: a.inner.record.clone(),
                acquired: watch::channel(0).0,
                keys: Mutex::new(None),
                probe: AtomicU64::new(0),
            }),
        };
        let mut permit = frozen.begin("web").unwrap();
        let start = Instant::now();
        loop {
            frozen.tick().await;
            if !frozen.owns("web") {
                break;
            }
            tokio::time::advance(RENEW_EVERY).await;
        }
        assert!(start.elapsed() <= LEASE_TIME - SAFETY + RENEW_EVERY);
        tokio::time::timeout(Duration::from_secs(1), permit.lost())
            .await
            .expect("the running reconcile was not stopped");
    }
}
