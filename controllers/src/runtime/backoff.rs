//! berth's one retry policy: exponential delays with jitter, per key for the controller work queue
//! ([`KeyBackoffs`]) and as a single sequence for a loop that keeps one thing alive (a bus
//! subscription, an engine event stream, a publish) ([`Retry`]).
//!
//! This is the only module that touches the `backoff` crate: it is unmaintained
//! upstream, so everything else talks to [`BackoffPolicy`], [`Retry`] and [`KeyBackoffs`] and a
//! replacement only has to change this file.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

/// How retry delays grow for a key that keeps failing.
///
/// The n-th consecutive failure (counting from 0) waits roughly
/// `min(initial * multiplier^n, max)`, spread by `±jitter` so that many keys that
/// failed together (e.g. the Docker daemon was briefly unreachable) do not all
/// retry in the same instant. `max` is a hard upper bound, jitter included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl BackoffPolicy {
    /// Builds a policy.
    ///
    /// # Panics
    ///
    /// If `initial > max`, `multiplier` is not a finite number `>= 1.0`, or `jitter` is
    /// not within `0.0..=1.0`: these are programming errors, and silently clamping
    /// them would hide a retry storm or a queue that never retries.
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: f64) -> Self {
        assert!(
            initial <= max,
            "backoff initial delay {initial:?} exceeds max {max:?}"
        );
        assert!(
            multiplier.is_finite() && multiplier >= 1.0,
            "backoff multiplier must be finite and >= 1.0, got {multiplier}"
        );
        assert!(
            (0.0..=1.0).contains(&jitter),
            "backoff jitter must be within 0.0..=1.0, got {jitter}"
        );
        Self {
            initial,
            max,
            multiplier,
            jitter,
        }
    }

    /// Delay before the first retry (before jitter).
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// Upper bound on any delay, jitter included.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Growth factor between consecutive failures.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// Relative spread applied to each delay (0.3 means ±30 %).
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// A fresh retry sequence that follows this policy.
    pub fn retry(&self) -> Retry {
        Retry::new(*self)
    }

    /// For loops that keep a connection or subscription alive (bus, engine events, publishing):
    /// 100 ms doubling up to 10 s. A lost connection is usually back within a second, and a loop
    /// that waits minutes would leave a controller deaf for that long.
    pub fn reconnect() -> Self {
        Self::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            2.0,
            0.3,
        )
    }

    fn build(&self) -> ExponentialBackoff {
        ExponentialBackoff {
            current_interval: self.initial,
            initial_interval: self.initial,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max,
            // `ExponentialBackoff` measures elapsed time with its own wall clock
            // (`SystemClock`), which `tokio::time::pause()` cannot control. Without an
            // elapsed-time limit that clock is never consulted for a decision, so the
            // delays depend only on the failure count and jitter. A controller must
            // also never give up on a key, which is the other reason this is `None`.
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        }
    }
}

impl Default for BackoffPolicy {
    /// 200 ms doubling up to 5 min with ±30 % jitter: fast enough to ride out a
    /// conflict on the next attempt, slow enough that a persistently broken object
    /// costs about one reconcile every few minutes.
    fn default() -> Self {
        Self::new(
            Duration::from_millis(200),
            Duration::from_secs(300),
            2.0,
            0.3,
        )
    }
}

/// One sequence of growing delays for one thing that keeps failing; a success resets it.
pub struct Retry {
    policy: BackoffPolicy,
    backoff: ExponentialBackoff,
    failures: u32,
}

impl Retry {
    pub fn new(policy: BackoffPolicy) -> Self {
        Retry {
            policy,
            backoff: policy.build(),
            failures: 0,
        }
    }

    /// Records one more failure and returns how long to wait before trying again.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        // The crate applies jitter around an interval that is itself capped at `max`,
        // so it can overshoot by up to `jitter * max`; callers are promised `max`.
        self.backoff
            .next_backoff()
            .unwrap_or(self.policy.max)
            .min(self.policy.max)
    }

    /// Records a failure and sleeps (tokio time) for the delay it earned; returns that delay.
    pub async fn wait(&mut self) -> Duration {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
        delay
    }

    /// Forgets the failures: the next one waits about `initial` again.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            self.backoff = self.policy.build();
            self.failures = 0;
        }
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("policy", &self.policy)
            .field("failures", &self.failures)
            .finish()
    }
}

/// Independent exponential backoffs, one per key, created lazily on first failure.
///
/// Keys are dropped again by [`reset`](Self::reset), so the map only holds keys that
/// are currently failing; callers should also reset keys whose object was deleted.
pub struct KeyBackoffs<K> {
    policy: BackoffPolicy,
    keys: HashMap<K, Retry>,
}

impl<K: Clone + Eq + Hash> KeyBackoffs<K> {
    /// An empty set of backoffs that all follow `policy`.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            keys: HashMap::new(),
        }
    }

    /// The policy every key follows.
    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Records one more failure of `key` and returns how long to wait before retrying.
    pub fn next_delay(&mut self, key: &K) -> Duration {
        let policy = self.policy;
        match self.keys.get_mut(key) {
            Some(retry) => retry.next_delay(),
            None => self
                .keys
                .entry(key.clone())
                .or_insert_with(|| Retry::new(policy))
                .next_delay(),
        }
    }

    /// Forgets `key`'s failures, so its next failure waits about `initial` again.
    pub fn reset(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// Consecutive failures of `key` since it was last reset.
    pub fn failures(&self, key: &K) -> u32 {
        self.keys.get(key).map_or(0, Retry::failures)
    }

    /// Number of keys currently backing off.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is currently backing off.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<K: Clone + Eq + Hash> Default for KeyBackoffs<K> {
    fn default() -> Self {
        Self::new(BackoffPolicy::default())
    }
}

impl<K> fmt::Debug for KeyBackoffs<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBackoffs")
            .field("policy", &self.policy)
            .field("keys", &self.keys.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small slack for the crate's float-to-nanosecond rounding.
    const SLACK: Duration = Duration::from_micros(1);

    fn bounds(policy: &BackoffPolicy, attempt: i32) -> (Duration, Duration) {
        let base = policy
            .initial()
            .mul_f64(policy.multiplier().powi(attempt))
            .min(policy.max());
        let low = base.mul_f64(1.0 - policy.jitter());
        let high = base.mul_f64(1.0 + policy.jitter()).min(policy.max());
        (low.saturating_sub(SLACK), high + SLACK)
    }

    #[test]
    fn default_policy_values() {
        let p = BackoffPolicy::default();
        assert_eq!(p.initial(), Duration::from_millis(200));
        assert_eq!(p.max(), Duration::from_secs(300));
        assert_eq!(p.multiplier(), 2.0);
        assert_eq!(p.jitter(), 0.3);
    }

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds() {
        let policy = BackoffPolicy::default();
        // Many keys, so a broken jitter range has many chances to show itself.
        let mut b = KeyBackoffs::new(policy);
        for key in 0..50 {
            for attempt in 0..8 {
                let d = b.next_delay(&key);
                let (low, high) = bounds(&policy, attempt);
                assert!(
                    low <= d && d <= high,
                    "key {key} attempt {attempt}: {d:?} not in [{low:?}, {high:?}]"
                );
            }
            assert_eq!(b.failures(&key), 8);
        }
    }

    #[test]
    fn jitter_actually_spreads_delays() {
        let mut b = KeyBackoffs::new(BackoffPolicy::default());
        let firsts: std::collections::HashSet<Duration> =
            (0..20).map(|key| b.next_delay(&key)).collect();
        assert!(
            firsts.len() > 1,
            "20 first delays were identical: {firsts:?}"
        );
    }

    #[test]
    fn without_jitter_delays_are_exact() {
        let policy = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(10), 2.0, 0.0);
        let mut b = KeyBackoffs::new(policy);
        let got: Vec<Duration> = (0..6).map(|_| b.next_delay(&"k")).collect();
        let want: Vec<Duration> = [1, 2, 4, 8, 10, 10]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn delays_cap_at_max_including_jitter() {
        let policy = BackoffPolicy::default();
        let mut b = KeyBackoffs::new(policy);
        for key in 0..20 {
            for _ in 0..15 {
                b.next_delay(&key);
            }
            for _ in 0..10 {
                let d = b.next_delay(&key);
                assert!(d <= policy.max(), "{d:?} exceeds max");
                assert!(
                    d >= policy.max().mul_f64(1.0 - policy.jitter()) - SLACK,
                    "{d:?} fell back below the capped range"
                );
            }
        }
    }

    #[test]
    fn reset_returns_to_initial() {
        let policy = BackoffPolicy::default();
        let mut b = KeyBackoffs::new(policy);
        for _ in 0..10 {
            b.next_delay(&"k");
        }
        assert_eq!(b.failures(&"k"), 10);
        b.reset(&"k");
        assert_eq!(b.failures(&"k"), 0);
        assert!(b.is_empty(), "reset must drop the key's state");
        let (low, high) = bounds(&policy, 0);
        let d = b.next_delay(&"k");
        assert!(low <= d && d <= high, "{d:?} not back to ~initial");
        assert_eq!(b.failures(&"k"), 1);
    }

    #[test]
    fn keys_are_independent() {
        let policy = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(60), 2.0, 0.0);
        let mut b = KeyBackoffs::new(policy);
        for _ in 0..4 {
            b.next_delay(&"a");
        }
        assert_eq!(b.next_delay(&"b"), Duration::from_secs(1));
        assert_eq!(b.next_delay(&"a"), Duration::from_secs(16));
        b.reset(&"b");
        assert_eq!(b.failures(&"a"), 5);
        assert_eq!(b.failures(&"b"), 0);
        assert_eq!(b.next_delay(&"a"), Duration::from_secs(32));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_sequence_never_gives_up() {
        // The crate stops a sequence (returns `None`) once its own wall clock passes
        // `max_elapsed_time`; a controller must retry forever, so that limit must be unset,
        // and the delays then depend only on the failure count.
        let policy = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(8), 2.0, 0.0);
        assert_eq!(policy.build().max_elapsed_time, None);
        let mut crate_sequence = policy.build();
        for _ in 0..1000 {
            assert!(crate_sequence.next_backoff().is_some());
        }
    }

    #[test]
    fn a_retry_grows_and_resets() {
        let policy = BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(5), 2.0, 0.0);
        let mut r = policy.retry();
        let got: Vec<u64> = (0..5).map(|_| r.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        assert_eq!(r.failures(), 5);
        r.reset();
        assert_eq!(r.failures(), 0);
        assert_eq!(r.next_delay(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_in_tokio_time() {
        let policy = BackoffPolicy::new(Duration::from_secs(2), Duration::from_secs(5), 2.0, 0.0);
        let mut r = policy.retry();
        let start = tokio::time::Instant::now();
        assert_eq!(r.wait().await, Duration::from_secs(2));
        assert_eq!(r.wait().await, Duration::from_secs(4));
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }

    #[test]
    #[should_panic(expected = "multiplier")]
    fn rejects_shrinking_multiplier() {
        BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(2), 0.5, 0.1);
    }

    #[test]
    #[should_panic(expected = "jitter")]
    fn rejects_jitter_above_one() {
        BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(2), 2.0, 1.5);
    }

    #[test]
    #[should_panic(expected = "exceeds max")]
    fn rejects_initial_above_max() {
        BackoffPolicy::new(Duration::from_secs(3), Duration::from_secs(2), 2.0, 0.1);
    }
}
