//! The work queue that feeds a controller's reconcile workers.
//!
//! Modelled on client-go's `workqueue` and kube-runtime's scheduler: events only
//! enqueue object keys, and workers reconcile the object's *current* state, so
//! duplicate triggers can be collapsed freely. The queue guarantees:
//!
//! - a key is queued at most once, however many times it is added;
//! - a key is handed to at most one worker at a time; adding it while it is being
//!   processed makes it run once more after [`WorkQueue::done`];
//! - a key has at most one pending trigger, the earliest: an immediate add wins over
//!   any delay, and a shorter delay wins over a longer one;
//! - ready keys are handed out in the order they became ready.
//!
//! Delays use tokio's clock (so tests can use `tokio::time::pause()`) and are driven
//! by the workers waiting in [`WorkQueue::get`]; no task is spawned per delay.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::backoff::{BackoffPolicy, KeyBackoffs};

/// A shared, cheaply cloneable handle to a controller's work queue.
pub struct WorkQueue<K: Clone + Eq + Hash + Send + 'static> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    state: Mutex<State<K>>,
    /// Wakes workers parked in `get()`: `notify_one` per newly ready key,
    /// `notify_waiters` when the earliest deadline moves forward or on shutdown.
    notify: Notify,
    /// Set to the number of ready keys after every operation (see [`WorkQueue::report_depth`]).
    depth: Option<prometheus_client::metrics::gauge::Gauge>,
}

struct State<K> {
    /// Keys ready to be handed out, in readiness order.
    ready: VecDeque<K>,
    /// Keys that must run (again): either in `ready`, or currently processing and
    /// to be re-queued by `done()`. Invariant: a key is in `ready` iff it is in
    /// `dirty` and not in `processing`.
    dirty: HashSet<K>,
    processing: HashSet<K>,
    /// Delayed keys by deadline; the sequence number keeps equal deadlines in
    /// insertion order and makes entries unique. Invariant: disjoint from `dirty`,
    /// because a key that is already due to run needs no later trigger.
    timers: BTreeMap<(Instant, u64), K>,
    deadlines: HashMap<K, (Instant, u64)>,
    next_seq: u64,
    backoffs: KeyBackoffs<K>,
    shutdown: bool,
    /// Keys made ready since the last notification, consumed by `WorkQueue::with`.
    newly_ready: usize,
    /// Set when the earliest deadline moved forward, so parked workers must re-arm.
    deadline_moved: bool,
}

/// What a worker in `get()` found under the lock.
enum Next<K> {
    Key(K),
    Closed,
    /// Nothing ready: park until notified or until the earliest deadline, if any.
    Wait(Option<Instant>),
}

impl<K: Clone + Eq + Hash> State<K> {
    fn new(policy: BackoffPolicy) -> Self {
        Self {
            ready: VecDeque::new(),
            dirty: HashSet::new(),
            processing: HashSet::new(),
            timers: BTreeMap::new(),
            deadlines: HashMap::new(),
            next_seq: 0,
            backoffs: KeyBackoffs::new(policy),
            shutdown: false,
            newly_ready: 0,
            deadline_moved: false,
        }
    }

    /// Moves every delayed key whose deadline has passed into `ready`.
    ///
    /// Runs at the start of every operation, so a timer that expired before an
    /// `add()` is queued ahead of it even if no worker was waiting at that moment.
    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.deadlines.remove(&key);
            self.mark(key);
        }
    }

    /// Records that `key` must run, without ever queueing it twice or next to a
    /// worker that already holds it.
    fn mark(&mut self, key: K) {
        if self.dirty.contains(&key) {
            return;
        }
        if self.processing.contains(&key) {
            self.dirty.insert(key);
            return;
        }
        self.dirty.insert(key.clone());
        self.ready.push_back(key);
        self.newly_ready += 1;
    }

    fn cancel_timer(&mut self, key: &K) {
        if let Some(slot) = self.deadlines.remove(key) {
            self.timers.remove(&slot);
        }
    }

    fn add(&mut self, key: K) {
        if self.shutdown {
            return;
        }
        // Running now subsumes any pending delay; the reconcile asks for a new one
        // if it still needs it.
        self.cancel_timer(&key);
        self.mark(key);
    }

    fn add_at(&mut self, key: K, deadline: Instant) {
        if self.shutdown || self.dirty.contains(&key) {
            return;
        }
        if let Some(&slot) = self.deadlines.get(&key) {
            if slot.0 <= deadline {
                return;
            }
            self.timers.remove(&slot);
        }
        let earliest_before = self.next_deadline();
        let slot = (deadline, self.next_seq);
        self.next_seq += 1;
        self.timers.insert(slot, key.clone());
        self.deadlines.insert(key, slot);
        if earliest_before.is_none_or(|earliest| deadline < earliest) {
            self.deadline_moved = true;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.first_key_value().map(|((at, _), _)| *at)
    }

    fn take(&mut self) -> Option<K> {
        let key = self.ready.pop_front()?;
        self.dirty.remove(&key);
        self.processing.insert(key.clone());
        Some(key)
    }

    fn done(&mut self, key: &K) {
        if !self.processing.remove(key) {
            return;
        }
        if self.dirty.contains(key) {
            if self.shutdown {
                self.dirty.remove(key);
            } else {
                self.ready.push_back(key.clone());
                self.newly_ready += 1;
            }
        }
    }

    fn shutdown(&mut self) {
        self.shutdown = true;
        // Pending delays and re-runs are dropped rather than waited for: the operator
        // rebuilds its queue from the full desired state on the next start.
        self.timers.clear();
        self.deadlines.clear();
        let processing = &self.processing;
        self.dirty.retain(|key| !processing.contains(key));
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    /// An empty queue whose rate-limited adds follow [`BackoffPolicy::default`].
    pub fn new() -> Self {
        Self::with_backoff(BackoffPolicy::default())
    }

    /// An empty queue whose rate-limited adds follow `policy`.
    pub fn with_backoff(policy: BackoffPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(policy)),
                notify: Notify::new(),
                depth: None,
            }),
        }
    }

    /// An empty queue like [`with_backoff`](Self::with_backoff) that keeps `depth` at the number
    /// of keys waiting for a worker.
    pub fn report_depth(
        policy: BackoffPolicy,
        depth: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(policy)),
                notify: Notify::new(),
                depth: Some(depth),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // A panic under the lock can only come from `K`'s `Hash`/`Eq`; the state is
        // still structurally sound then, and wedging every controller would be worse.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on up-to-date state, then wakes as many parked workers as needed.
    fn with<R>(&self, f: impl FnOnce(&mut State<K>) -> R) -> R {
        let (result, wake, moved) = {
            let mut state = self.lock();
            state.promote_due(Instant::now());
            let result = f(&mut state);
            // A worker that just took a key from a batch of newly ready ones needs no
            // wake-up for itself, hence the bound by what is still queued.
            let wake = state.newly_ready.min(state.ready.len());
            state.newly_ready = 0;
            let moved = std::mem::take(&mut state.deadline_moved);
            if let Some(depth) = &self.inner.depth {
                depth.set(state.ready.len() as i64);
            }
            (result, wake, moved)
        };
        if moved {
            self.inner.notify.notify_waiters();
        }
        for _ in 0..wake {
            self.inner.notify.notify_one();
        }
        result
    }

    /// Queues `key` to run as soon as a worker is free.
    ///
    /// A key that is already queued stays a single entry at its current position; a
    /// key that is being processed runs once more after [`done`](Self::done). Any
    /// pending delay for the key is dropped. Ignored after [`shutdown`](Self::shutdown).
    pub fn add(&self, key: K) {
        self.with(|state| state.add(key));
    }

    /// Queues `key` to run once `delay` has elapsed (on tokio's clock).
    ///
    /// Only the earliest pending trigger is kept: this does nothing if the key is
    /// already queued or has an earlier deadline, and brings a later one forward.
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        self.with(|state| {
            let now = Instant::now();
            // Saturate rather than panic on absurd delays; ~30 years is "never" here.
            let deadline = now
                .checked_add(delay)
                .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
            state.add_at(key, deadline);
        });
    }

    /// Queues `key` after its next backoff delay and returns that delay.
    ///
    /// Each call counts as one more consecutive failure of `key`, until
    /// [`forget`](Self::forget). The key may still run sooner if it already has an
    /// earlier trigger pending. Returns zero and does nothing after shutdown.
    pub fn add_rate_limited(&self, key: K) -> Duration {
        self.with(|state| {
            if state.shutdown {
                return Duration::ZERO;
            }
            let delay = state.backoffs.next_delay(&key);
            let deadline = Instant::now() + delay;
            if delay.is_zero() {
                state.add(key);
            } else {
                state.add_at(key, deadline);
            }
            delay
        })
    }

    /// Resets `key`'s backoff; call after a successful reconcile or once the object
    /// is gone, so that the next failure starts from the initial delay again.
    pub fn forget(&self, key: &K) {
        self.lock().backoffs.reset(key);
    }

    /// Consecutive rate-limited adds of `key` since it was last forgotten.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().backoffs.failures(key)
    }

    /// Waits for the next ready key and marks it as processing; the caller must
    /// call [`done`](Self::done) with it afterwards.
    ///
    /// Returns `None` once [`shutdown`](Self::shutdown) has been called and every key
    /// that was already ready has been handed out. Cancel-safe: dropping the future
    /// neither loses a key nor a wake-up meant for another worker.
    pub async fn get(&self) -> Option<K> {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            let next = self.with(|state| {
                if let Some(key) = state.take() {
                    return Next::Key(key);
                }
                if state.shutdown {
                    return Next::Closed;
                }
                // Registered under the lock: a key queued after we looked must find
                // this worker in `notify_one`'s waiter list, not merely store a permit
                // that another parked worker might consume.
                notified.as_mut().enable();
                Next::Wait(state.next_deadline())
            });
            match next {
                Next::Key(key) => return Some(key),
                Next::Closed => return None,
                Next::Wait(None) => notified.await,
                Next::Wait(Some(at)) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }

    /// Marks `key` as no longer processing, re-queueing it if it was added in the
    /// meantime. Does nothing for a key that is not being processed.
    pub fn done(&self, key: &K) {
        self.with(|state| state.done(key));
    }

    /// Stops the queue: further adds are ignored, pending delays and re-runs are
    /// dropped, and [`get`](Self::get) returns `None` once the ready keys are drained.
    pub fn shutdown(&self) {
        self.with(State::shutdown);
        self.inner.notify.notify_waiters();
    }

    /// Whether [`shutdown`](Self::shutdown) has been called.
    pub fn is_shutdown(&self) -> bool {
        self.lock().shutdown
    }

    /// Number of keys ready to be handed out (not counting delayed or processing ones).
    pub fn len(&self) -> usize {
        self.with(|state| state.ready.len())
    }

    /// Whether no key is ready to be handed out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of keys waiting for a delay to elapse.
    pub fn delayed_len(&self) -> usize {
        self.with(|state| state.timers.len())
    }

    /// Number of keys currently held by workers.
    pub fn processing_len(&self) -> usize {
        self.lock().processing.len()
    }

    /// Whether a worker currently holds `key`.
    pub fn is_processing(&self, key: &K) -> bool {
        self.lock().processing.contains(key)
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> fmt::Debug for WorkQueue<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("WorkQueue")
            .field("ready", &state.ready.len())
            .field("delayed", &state.timers.len())
            .field("processing", &state.processing.len())
            .field("shutdown", &state.shutdown)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: Duration = Duration::from_secs(1);

    /// The key `get()` would hand out without waiting, if any.
    fn ready_now<K: Clone + Eq + Hash + Send + 'static>(q: &WorkQueue<K>) -> Option<K> {
        q.get().now_or_never().flatten()
    }

    /// `get()`, failing instead of hanging when a bug strands the key. Under a paused
    /// clock the timeout costs nothing and does not move time unless it fires.
    async fn next<K: Clone + Eq + Hash + Send + 'static>(q: &WorkQueue<K>) -> Option<K> {
        tokio::time::timeout(3600 * SEC, q.get())
            .await
            .expect("get() never returned")
    }

    /// Joins a spawned `get()`, failing instead of hanging.
    async fn join<K>(worker: tokio::task::JoinHandle<Option<K>>) -> Option<K> {
        tokio::time::timeout(3600 * SEC, worker)
            .await
            .expect("worker never got a key")
            .expect("worker panicked")
    }

    fn spawn_get<K: Clone + Eq + Hash + Send + 'static>(
        q: &WorkQueue<K>,
    ) -> tokio::task::JoinHandle<Option<K>> {
        let q = q.clone();
        tokio::spawn(async move { q.get().await })
    }

    #[tokio::test(start_paused = true)]
    async fn the_depth_gauge_counts_keys_waiting_for_a_worker() {
        let depth = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let q = WorkQueue::report_depth(BackoffPolicy::default(), depth.clone());
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(depth.get(), 2);
        // A delayed key is not waiting for a worker until its time comes.
        q.add_after("c", SEC);
        assert_eq!(depth.get(), 2);
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(depth.get(), 1);
        assert_eq!(next(&q).await, Some("b"));
        assert_eq!(next(&q).await, Some("c"));
        assert_eq!(depth.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_keys_are_deduplicated() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(next(&q).await, Some("b"));
        assert_eq!(ready_now(&q), None);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_handed_out_in_fifo_order() {
        let q = WorkQueue::new();
        for key in ["c", "a", "b", "a", "c"] {
            q.add(key);
        }
        assert_eq!(next(&q).await, Some("c"));
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(next(&q).await, Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn key_added_while_processing_waits_for_done_then_runs_once() {
        let q = WorkQueue::new();
        q.add("a");
        let a = next(&q).await.unwrap();
        assert!(q.is_processing(&"a"));
        q.add("a");
        q.add("a");
        assert_eq!(q.len(), 0, "a processing key must not be queued");

        let second = spawn_get(&q);
        tokio::time::sleep(60 * SEC).await;
        assert!(
            !second.is_finished(),
            "second worker got a key still in use"
        );

        q.done(&a);
        assert_eq!(join(second).await, Some("a"));
        assert!(q.is_processing(&"a"));
        q.done(&"a");
        assert!(!q.is_processing(&"a"));
        assert_eq!(
            ready_now(&q),
            None,
            "the repeated adds must collapse to one run"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn other_keys_flow_while_one_is_processing() {
        let q = WorkQueue::new();
        q.add("a");
        let a = next(&q).await.unwrap();
        q.add("a");
        q.add("b");
        assert_eq!(next(&q).await, Some("b"));
        assert_eq!(ready_now(&q), None);
        q.done(&a);
        assert_eq!(next(&q).await, Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn done_for_an_unknown_key_is_ignored() {
        let q = WorkQueue::new();
        q.add("a");
        q.done(&"a");
        q.done(&"b");
        assert_eq!(q.len(), 1);
        assert_eq!(next(&q).await, Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_waits_for_the_delay() {
        let q = WorkQueue::new();
        let start = Instant::now();
        q.add_after("a", 5 * SEC);
        assert_eq!(q.len(), 0);
        assert_eq!(q.delayed_len(), 1);
        assert_eq!(ready_now(&q), None);
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(start.elapsed(), 5 * SEC);
        assert_eq!(q.delayed_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn add_after_keeps_the_earliest_deadline() {
        let q = WorkQueue::new();
        let start = Instant::now();
        q.add_after("a", 5 * SEC);
        q.add_after("a", 10 * SEC);
        q.add_after("b", 10 * SEC);
        q.add_after("b", 2 * SEC);
        assert_eq!(q.delayed_len(), 2);

        assert_eq!(next(&q).await, Some("b"));
        assert_eq!(start.elapsed(), 2 * SEC);
        q.done(&"b");
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(start.elapsed(), 5 * SEC);
        q.done(&"a");

        // The superseded 10 s deadlines must not fire a second run.
        assert_eq!(q.delayed_len(), 0);
        tokio::time::sleep(20 * SEC).await;
        assert_eq!(ready_now(&q), None);
    }

    #[tokio::test(start_paused = true)]
    async fn earlier_deadline_wakes_a_parked_worker() {
        let q = WorkQueue::new();
        let start = Instant::now();
        q.add_after("a", 10 * SEC);
        let worker = spawn_get(&q);
        tokio::time::sleep(SEC).await;
        // The worker is asleep until the 10 s deadline and must re-arm for this one.
        q.add_after("b", 2 * SEC);
        assert_eq!(join(worker).await, Some("b"));
        assert_eq!(start.elapsed(), 3 * SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_add_supersedes_a_pending_delay() {
        let q = WorkQueue::new();
        q.add_after("a", 10 * SEC);
        q.add("a");
        assert_eq!(q.delayed_len(), 0);
        assert_eq!(ready_now(&q), Some("a"));
        q.done(&"a");

        // Already queued means already due: a later trigger adds nothing.
        q.add("b");
        q.add_after("b", SEC);
        assert_eq!(q.delayed_len(), 0);
        assert_eq!(ready_now(&q), Some("b"));
        q.done(&"b");

        tokio::time::sleep(20 * SEC).await;
        assert_eq!(ready_now(&q), None);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_keys_become_ready_in_deadline_order_before_later_adds() {
        let q = WorkQueue::new();
        q.add_after("a", 3 * SEC);
        q.add_after("b", SEC);
        q.add_after("c", 2 * SEC);
        q.add_after("x", 2 * SEC);
        // Nobody is in get() while the timers expire; readiness order must still hold.
        tokio::time::sleep(5 * SEC).await;
        q.add("d");
        assert_eq!(q.len(), 5);
        let mut order = Vec::new();
        while let Some(key) = ready_now(&q) {
            order.push(key);
        }
        assert_eq!(order, ["b", "c", "x", "a", "d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_expiring_during_processing_runs_after_done() {
        let q = WorkQueue::new();
        q.add("a");
        let a = next(&q).await.unwrap();
        q.add_after("a", SEC);
        tokio::time::sleep(2 * SEC).await;
        assert_eq!(ready_now(&q), None);
        assert!(q.is_processing(&"a"));
        q.done(&a);
        assert_eq!(ready_now(&q), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_delays_grow_and_forget_resets_them() {
        let policy = BackoffPolicy::new(SEC, 10 * SEC, 2.0, 0.0);
        let q = WorkQueue::with_backoff(policy);
        for (attempt, secs) in [1, 2, 4, 8, 10, 10].into_iter().enumerate() {
            let start = Instant::now();
            assert_eq!(q.add_rate_limited("a"), secs * SEC);
            assert_eq!(next(&q).await, Some("a"));
            assert_eq!(start.elapsed(), secs * SEC);
            q.done(&"a");
            assert_eq!(q.failures(&"a") as usize, attempt + 1);
        }
        assert_eq!(q.failures(&"b"), 0, "backoff is per key");

        q.forget(&"a");
        assert_eq!(q.failures(&"a"), 0);
        let start = Instant::now();
        assert_eq!(q.add_rate_limited("a"), SEC);
        assert_eq!(next(&q).await, Some("a"));
        assert_eq!(start.elapsed(), SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_default_policy_stays_within_jitter() {
        let q = WorkQueue::new();
        let first = q.add_rate_limited("a");
        let second = q.add_rate_limited("a");
        assert!((140..=260).contains(&first.as_millis()), "{first:?}");
        assert!((280..=520).contains(&second.as_millis()), "{second:?}");
        // The second call's deadline is later than the first's, so the first wins.
        let start = Instant::now();
        assert_eq!(next(&q).await, Some("a"));
        // tokio's timer rounds deadlines up to the next millisecond.
        let waited = start.elapsed();
        assert!(
            first <= waited && waited <= first + Duration::from_millis(1),
            "waited {waited:?} for a {first:?} delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_unblocks_waiting_workers() {
        let q = WorkQueue::<&str>::new();
        let start = Instant::now();
        q.add_after("later", 60 * SEC);
        let workers: Vec<_> = (0..3).map(|_| spawn_get(&q)).collect();
        tokio::time::sleep(SEC).await;
        q.shutdown();
        for worker in workers {
            assert_eq!(join(worker).await, None);
        }
        assert_eq!(start.elapsed(), SEC, "shutdown must not wait for delays");
        assert!(q.is_shutdown());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_drains_ready_keys_then_stops() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        let a = next(&q).await.unwrap();
        q.add("a");
        q.shutdown();

        q.add("c");
        q.add_after("d", SEC);
        assert_eq!(q.add_rate_limited("e"), Duration::ZERO);
        assert_eq!(q.delayed_len(), 0);

        assert_eq!(next(&q).await, Some("b"));
        assert_eq!(next(&q).await, None);
        q.done(&a);
        assert!(!q.is_processing(&"a"));
        assert_eq!(next(&q).await, None, "re-runs are dropped after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn every_parked_worker_is_woken_for_its_own_key() {
        let q = WorkQueue::new();
        let workers: Vec<_> = (0..3).map(|_| spawn_get(&q)).collect();
        tokio::time::sleep(SEC).await;
        q.add(1);
        q.add(2);
        q.add(3);
        let mut got = Vec::new();
        for worker in workers {
            let key = tokio::time::timeout(SEC, worker).await;
            got.push(key.expect("a parked worker missed its wake-up").unwrap());
        }
        got.sort();
        assert_eq!(got, [Some(1), Some(2), Some(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_get_loses_neither_keys_nor_wakeups() {
        let q = WorkQueue::new();
        assert!(tokio::time::timeout(SEC, q.get()).await.is_err());

        let mut parked = Box::pin(q.get());
        assert!((&mut parked).now_or_never().is_none());
        let other = spawn_get(&q);
        tokio::time::sleep(SEC).await;
        // `parked` registered first, so it is the one notified; dropping it unpolled
        // must pass the wake-up on rather than strand the key.
        q.add("a");
        drop(parked);
        let got = tokio::time::timeout(SEC, other).await;
        assert_eq!(got.expect("wake-up was lost").unwrap(), Some("a"));
    }

    /// xorshift64*: enough randomness for interleavings without a `rand` dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    #[derive(Default)]
    struct Record {
        in_flight: Mutex<HashSet<u64>>,
        last_add: Mutex<HashMap<u64, u64>>,
        last_start: Mutex<HashMap<u64, u64>>,
        seq: AtomicU64,
    }

    impl Record {
        fn tick(&self) -> u64 {
            self.seq.fetch_add(1, Ordering::SeqCst)
        }

        /// Recorded before the add itself, so a correct queue always starts the key
        /// again after this point (if the add races with a worker taking the key, it
        /// finds the key processing and re-queues it).
        fn before_add(&self, key: u64) {
            self.last_add.lock().unwrap().insert(key, self.tick());
        }
    }

    async fn pause(rng: &mut Rng) {
        // Mostly yields: real sleeps are needed to let delays expire mid-run, but
        // they cost at least a millisecond each on the real clock.
        match rng.below(8) {
            0..=2 => tokio::task::yield_now().await,
            3 => tokio::time::sleep(Duration::from_micros(rng.below(2000))).await,
            _ => {}
        }
    }

    /// Workers and a producer hammer one queue with random adds, delays and failures;
    /// no key may ever be held by two workers, and every add must be followed by a run.
    async fn stress(seed: u64) {
        const WORKERS: u64 = 6;
        const KEYS: u64 = 12;
        const ADDS: usize = 2000;

        let policy = BackoffPolicy::new(
            Duration::from_micros(100),
            Duration::from_millis(2),
            2.0,
            0.5,
        );
        let q = WorkQueue::with_backoff(policy);
        let record = Arc::new(Record::default());

        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (q, record) = (q.clone(), Arc::clone(&record));
                tokio::spawn(async move {
                    let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let mut runs = 0u64;
                    while let Some(key) = q.get().await {
                        runs += 1;
                        assert!(
                            record.in_flight.lock().unwrap().insert(key),
                            "key {key} handed to two workers at once"
                        );
                        record.last_start.lock().unwrap().insert(key, record.tick());
                        pause(&mut rng).await;
                        assert!(record.in_flight.lock().unwrap().remove(&key));
                        if rng.below(4) == 0 && q.failures(&key) < 3 {
                            record.before_add(key);
                            q.add_rate_limited(key);
                        } else {
                            q.forget(&key);
                        }
                        q.done(&key);
                    }
                    runs
                })
            })
            .collect();

        let mut rng = Rng(seed);
        for _ in 0..ADDS {
            let key = rng.below(KEYS);
            record.before_add(key);
            match rng.below(3) {
                0 => q.add_after(key, Duration::from_micros(rng.below(3000))),
                _ => q.add(key),
            }
            pause(&mut rng).await;
        }

        // Workers add their retries before calling done(), so once nothing is ready,
        // delayed or processing, no further run can be owed.
        while !(q.is_empty() && q.delayed_len() == 0 && q.processing_len() == 0) {
            if workers.iter().any(|w| w.is_finished()) {
                break; // a worker panicked; joining below reports why
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        q.shutdown();
        let mut runs = 0;
        for worker in workers {
            runs += worker.await.expect("worker panicked");
        }
        assert!(runs >= KEYS, "only {runs} runs");
        assert!(record.in_flight.lock().unwrap().is_empty());

        let last_add = record.last_add.lock().unwrap();
        let last_start = record.last_start.lock().unwrap();
        for (key, added) in last_add.iter() {
            let started = last_start.get(key).copied();
            assert!(
                started > Some(*added),
                "key {key} was added at {added} but last started at {started:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_workers_never_share_a_key() {
        for seed in [1, 0xdead_beef, 42] {
            tokio::time::timeout(Duration::from_secs(60), stress(seed))
                .await
                .expect("stress run stalled");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_workers_never_share_a_key_paused_clock() {
        for seed in [7, 0x1234_5678_9abc] {
            tokio::time::timeout(Duration::from_secs(60), stress(seed))
                .await
                .expect("stress run stalled");
        }
    }
}
