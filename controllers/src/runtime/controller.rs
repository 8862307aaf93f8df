//! The loop every controller runs: intake (bus events of its kind and of the kinds it watches,
//! Swarm engine events, a periodic resync) keeps the kind's cache current and feeds keys into the
//! work queue; workers hand the reconciler its cached object and write the status it returns,
//! conditional on the resourceVersion it was computed from. Nothing here knows about any kind.
//!
//! Error policy, written once: an object that does not validate, or a reconcile that answers
//! [`Error::Refused`], gets `Ready=False` with the reason and waits for a change; any other error
//! backs off per key with the one [`BackoffPolicy`].

use super::backoff::BackoffPolicy;
use super::cache::{refused_status, Cache, Cached, Entry};
use super::queue::WorkQueue;
use super::reconciler::{Action, Aggregator, Context, Error, Hooks, Reconciler, Resource};
use super::shares::{Shares, Sharing};
use crate::api::ResourceStore;
use crate::bus::{BusMessage, EventBus};
use crate::metrics::{self, ReconcileOutcome};
use async_trait::async_trait;
use berth_api_types::{EventType, ObjectMeta};
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Reconciles running at once (for different keys; one key is never reconciled twice at once).
    pub workers: usize,
    /// Every object is reconciled at least this often, so drift the engine does not report is fixed.
    pub resync: Duration,
    pub backoff: BackoffPolicy,
    /// Prefix of this instance's own durable bus consumer (`<durable>-<instance id>`), so events
    /// are not lost while NATS restarts or the connection drops. `None`: a live subscription.
    pub durable: Option<String>,
    /// How this instance shares the kind's objects with other instances of the controller.
    pub sharing: Sharing,
    /// Appends one JSON line per reconcile (kind, name, instance, start and end in microseconds
    /// since the epoch), for checking that instances never overlap. `BERTH_RECONCILE_LOG`.
    pub reconcile_log: Option<PathBuf>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            workers: 8,
            resync: Duration::from_secs(60),
            backoff: BackoffPolicy::default(),
            durable: None,
            sharing: Sharing::default(),
            reconcile_log: None,
        }
    }
}

/// How a key becomes a reconcile: one object per key, or one thing for the whole kind.
#[async_trait]
trait Work<R: Hooks>: Send + Sync + 'static {
    fn key_of(&self, name: &str) -> String;
    /// Whether an engine event about `name` is worth a reconcile.
    fn follows(&self, name: &str, cache: &Cache<R>) -> bool;
    async fn run(&self, key: &str, ctx: &Context<R>) -> Result<Ran, Error>;
}

/// What a reconcile asked for, and whether it found the object(s) impossible to act on (for the
/// `invalid` outcome of the reconcile metric; the action is then to wait for a change).
#[derive(Debug)]
struct Ran {
    action: Action,
    invalid: bool,
}

impl Ran {
    fn next(action: Action) -> Ran {
        Ran {
            action,
            invalid: false,
        }
    }

    fn invalid() -> Ran {
        Ran {
            action: Action::await_change(),
            invalid: true,
        }
    }
}

/// The reconcile metric's outcome of one run.
fn outcome_of(result: &Result<Ran, Error>) -> ReconcileOutcome {
    match result {
        Ok(Ran { invalid: true, .. }) => ReconcileOutcome::Invalid,
        Ok(Ran {
            action: Action::AwaitChange,
            ..
        }) => ReconcileOutcome::Ok,
        Ok(_) => ReconcileOutcome::Requeue,
        Err(_) => ReconcileOutcome::Error,
    }
}

struct PerObject<R>(Arc<R>);

#[async_trait]
impl<R: Reconciler> Work<R> for PerObject<R> {
    fn key_of(&self, name: &str) -> String {
        name.to_string()
    }

    /// Only names of objects this controller has. Every installation on an engine sees every
    /// service event; reconciling names it has no object for cost each of them an engine call per
    /// event, and made every install on a shared engine slower the more there were. An engine
    /// object whose berth object is gone is still found: by the delete event, and by the resync.
    fn follows(&self, name: &str, cache: &Cache<R>) -> bool {
        cache.get(name).is_some()
    }

    async fn run(&self, name: &str, ctx: &Context<R>) -> Result<Ran, Error> {
        match ctx.cache.get(name) {
            None => self.0.cleanup(name, ctx).await.map(Ran::next),
            Some(Entry::Invalid(bad)) => {
                let status =
                    refused_status(&bad.status, bad.meta.generation, "InvalidSpec", &bad.why);
                write_status::<R>(ctx, &bad.meta, &bad.status, &status).await?;
                Ok(Ran::invalid())
            }
            Some(Entry::Valid(obj)) => match self.0.reconcile(obj.clone(), ctx).await {
                Ok(done) => {
                    write_status::<R>(ctx, &obj.meta, &obj.status, &done.status).await?;
                    Ok(Ran::next(done.action))
                }
                Err(Error::Refused { reason, message }) => {
                    let status = refused_status(&obj.status, obj.generation(), &reason, &message);
                    write_status::<R>(ctx, &obj.meta, &obj.status, &status).await?;
                    Ok(Ran::invalid())
                }
                Err(e) => Err(e),
            },
        }
    }
}

struct Whole<A>(Arc<A>);

#[async_trait]
impl<A: Aggregator> Work<A> for Whole<A> {
    fn key_of(&self, _name: &str) -> String {
        self.0.key()
    }

    /// The one thing is converged even with no object left (to remove it).
    fn follows(&self, _name: &str, _cache: &Cache<A>) -> bool {
        true
    }

    async fn run(&self, _key: &str, ctx: &Context<A>) -> Result<Ran, Error> {
        let entries = ctx.cache.entries();
        let mut valid: Vec<Arc<Cached<A>>> = Vec::new();
        for e in entries {
            match e {
                Entry::Valid(c) => valid.push(c),
                Entry::Invalid(bad) => {
                    let status =
                        refused_status(&bad.status, bad.meta.generation, "InvalidSpec", &bad.why);
                    write_status::<A>(ctx, &bad.meta, &bad.status, &status).await?;
                }
            }
        }
        match self.0.converge(valid.clone(), ctx).await {
            Ok(done) => {
                for obj in &valid {
                    if let Some(status) = done.statuses.get(obj.name()) {
                        write_status::<A>(ctx, &obj.meta, &obj.status, status).await?;
                    }
                }
                Ok(Ran::next(done.action))
            }
            Err(Error::Refused { reason, message }) => {
                for obj in &valid {
                    let status = refused_status(&obj.status, obj.generation(), &reason, &message);
                    write_status::<A>(ctx, &obj.meta, &obj.status, &status).await?;
                }
                Ok(Ran::invalid())
            }
            Err(e) => Err(e),
        }
    }
}

/// Writes `new` unless it equals `current`, only if the object is still at the version it was
/// computed from: a status computed from an older object must not overwrite what another writer
/// recorded meanwhile (a revision, a newer observation). On a conflict the cache is refreshed and
/// the error backs the key off, so the next reconcile starts from the current object.
async fn write_status<R: Resource>(
    ctx: &Context<R>,
    meta: &ObjectMeta,
    current: &R::Status,
    new: &R::Status,
) -> Result<(), Error> {
    if new == current {
        return Ok(());
    }
    let value = serde_json::to_value(new).map_err(|e| Error::Transient(e.to_string()))?;
    let name = meta.name.as_str();
    match ctx
        .store
        .update_status(R::KIND, name, value, meta.resource_version.as_deref())
        .await
    {
        Ok(stored) => {
            ctx.cache.apply(name, Some(stored));
            Ok(())
        }
        // Deleted meanwhile: its delete event brings the controller back to clean up.
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) if e.is_conflict() => {
            debug!(%name, "status conflict: re-reading the object");
            ctx.cache.apply(name, ctx.store.get(R::KIND, name).await?);
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// One key's reconcile exactly as a worker runs it, against a cache filled from `store`: for tests
/// that drive a controller step by step (the engine tests, the controllers' unit tests).
pub async fn reconcile_once<R: Reconciler>(
    reconciler: &Arc<R>,
    store: Arc<dyn ResourceStore>,
    name: &str,
) -> Result<Action, Error> {
    let ctx = context_from(store).await?;
    PerObject(reconciler.clone())
        .run(name, &ctx)
        .await
        .map(|ran| ran.action)
}

/// [`reconcile_once`] for an [`Aggregator`]: one converge of the whole kind.
pub async fn converge_once<A: Aggregator>(
    aggregator: &Arc<A>,
    store: Arc<dyn ResourceStore>,
) -> Result<Action, Error> {
    let ctx = context_from(store).await?;
    Whole(aggregator.clone())
        .run(&aggregator.key(), &ctx)
        .await
        .map(|ran| ran.action)
}

async fn context_from<R: Resource>(store: Arc<dyn ResourceStore>) -> Result<Context<R>, Error> {
    let cache = Cache::default();
    cache.replace(store.list(R::KIND).await?);
    Ok(Context {
        installation: store.installation().await?,
        store,
        cache,
    })
}

/// A controller of kind `R`: the reconciler, the intake that triggers it, and its workers.
pub struct Controller<R: Hooks> {
    hooks: Arc<R>,
    work: Arc<dyn Work<R>>,
    store: Arc<dyn ResourceStore>,
    bus: Arc<dyn EventBus>,
    docker: Option<Docker>,
    config: ControllerConfig,
    queue: WorkQueue<String>,
    cache: Cache<R>,
}

impl<R: Reconciler> Controller<R> {
    /// A controller that reconciles each object on its own.
    pub fn new(
        reconciler: Arc<R>,
        store: Arc<dyn ResourceStore>,
        bus: Arc<dyn EventBus>,
        config: ControllerConfig,
    ) -> Self {
        let work = Arc::new(PerObject(reconciler.clone()));
        Self::with_work(reconciler, work, store, bus, config)
    }
}

impl<A: Aggregator> Controller<A> {
    /// A controller that converges one thing from every object of its kind.
    pub fn aggregate(
        aggregator: Arc<A>,
        store: Arc<dyn ResourceStore>,
        bus: Arc<dyn EventBus>,
        config: ControllerConfig,
    ) -> Self {
        let work = Arc::new(Whole(aggregator.clone()));
        Self::with_work(aggregator, work, store, bus, config)
    }
}

impl<R: Hooks> Controller<R> {
    fn with_work(
        hooks: Arc<R>,
        work: Arc<dyn Work<R>>,
        store: Arc<dyn ResourceStore>,
        bus: Arc<dyn EventBus>,
        config: ControllerConfig,
    ) -> Self {
        // Every controller's queue reports its depth: instrumented here once, for every kind.
        let queue =
            WorkQueue::report_depth(config.backoff, metrics::global().queue_depth_of(R::KIND));
        Controller {
            hooks,
            work,
            store,
            bus,
            docker: None,
            config,
            queue,
            cache: Cache::default(),
        }
    }

    /// Also trigger on engine events (the reconciler says which).
    pub fn with_engine_events(mut self, docker: Docker) -> Self {
        self.docker = Some(docker);
        self
    }

    /// The queue, for tests and metrics.
    pub fn queue(&self) -> WorkQueue<String> {
        self.queue.clone()
    }

    /// The cache of the kind's objects, for tests.
    pub fn cache(&self) -> Cache<R> {
        self.cache.clone()
    }

    /// Runs until `shutdown` resolves, then lets in-flight reconciles finish. The installation is
    /// read first (retrying until the API answers).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let kind = R::KIND;
        info!(%kind, workers = self.config.workers, bus = %self.bus.describe(), "controller starting");
        let installation = {
            let mut retry = BackoffPolicy::reconnect().retry();
            loop {
                match self.store.installation().await {
                    Ok(i) => break i,
                    Err(e) => {
                        let delay = retry.next_delay();
                        warn!(%kind, error = %e, retry_in = ?delay, "cannot read the installation");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        };
        let shares = Shares::new(kind, &installation.instance, self.config.sharing.clone());
        let reconcile_log = self.config.reconcile_log.as_ref().and_then(|path| {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(file) => Some(Mutex::new(file)),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot open the reconcile log");
                    None
                }
            }
        });
        let parts = Arc::new(Parts {
            ctx: Context {
                store: self.store.clone(),
                cache: self.cache.clone(),
                installation,
            },
            hooks: self.hooks.clone(),
            work: self.work.clone(),
            queue: self.queue.clone(),
            shares: shares.clone(),
            reconcile_log,
        });
        {
            let (cache, work) = (self.cache.clone(), self.work.clone());
            shares.count_keys_of(move || cache.names().iter().map(|n| work.key_of(n)).collect());
        }
        info!(%kind, instance = %shares.instance(), "controller instance joined");

        // This instance's own consumer; the one consumer per installation that earlier versions
        // shared (and that split events between instances) is removed.
        let own = self
            .config
            .durable
            .as_ref()
            .map(|prefix| (prefix.clone(), format!("{prefix}-{}", shares.instance())));
        if let Some((shared, _)) = &own {
            if let Err(e) = self.bus.remove_consumer(shared).await {
                debug!(%kind, error = %e, "cannot remove the consumer of an earlier version");
            }
        }

        let mut tasks = tokio::task::JoinSet::new();
        {
            let shares = shares.clone();
            tasks.spawn(async move { shares.run().await });
        }
        tasks.spawn(acquisitions(parts.clone()));
        tasks.spawn(bus_intake(
            parts.clone(),
            self.bus.clone(),
            own.as_ref().map(|(_, name)| name.clone()),
        ));
        if let Some(docker) = self.docker.clone() {
            if !self.hooks.engine_event_types().is_empty() {
                tasks.spawn(engine_intake(parts.clone(), docker));
            }
        }
        tasks.spawn(resync_loop(parts.clone(), self.config.resync));

        let mut workers = tokio::task::JoinSet::new();
        for id in 0..self.config.workers.max(1) {
            workers.spawn(worker(id, parts.clone()));
        }

        shutdown.await;
        info!(%kind, "controller stopping");
        tasks.abort_all();
        self.queue.shutdown();
        while workers.join_next().await.is_some() {}
        // Nothing runs any more: hand the leases over now rather than after the lease time.
        shares.stop().await;
        if let Some((_, name)) = &own {
            if let Err(e) = self.bus.remove_consumer(name).await {
                debug!(%kind, error = %e, "cannot remove this instance's consumer; the server drops it when idle");
            }
        }
    }
}

/// What the intake loops and workers share.
struct Parts<R: Hooks> {
    ctx: Context<R>,
    hooks: Arc<R>,
    work: Arc<dyn Work<R>>,
    queue: WorkQueue<String>,
    shares: Shares,
    reconcile_log: Option<Mutex<std::fs::File>>,
}

impl<R: Hooks> Parts<R> {
    /// Queues `name`'s key if this instance owns it; another instance reconciles the others.
    fn enqueue(&self, name: &str) {
        let key = self.work.key_of(name);
        if self.shares.owns(&key) {
            self.queue.add(key);
        }
    }

    fn log_reconcile(&self, key: &str, start: std::time::SystemTime) {
        let Some(log) = &self.reconcile_log else {
            return;
        };
        let micros = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0)
        };
        let line = serde_json::json!({
            "kind": R::KIND,
            "name": key,
            "instance": self.shares.instance(),
            "start": micros(start),
            "end": micros(std::time::SystemTime::now()),
        });
        let mut file = log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // One write per line: appends from several processes do not interleave.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

async fn worker<R: Hooks>(id: usize, parts: Arc<Parts<R>>) {
    let kind = R::KIND;
    while let Some(key) = parts.queue.get().await {
        // `object`, not `name`: a JSON log lists a span's fields next to the span's own `name`.
        let span = tracing::info_span!("reconcile", kind = %kind, object = %key, worker = id);
        // Another instance owns the key now (handed over since it was queued): it is theirs.
        let Some(mut permit) = parts.shares.begin(&key) else {
            parts.queue.forget(&key);
            parts.queue.done(&key);
            continue;
        };
        let start = std::time::SystemTime::now();
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = parts.work.run(&key, &parts.ctx).instrument(span.clone()) => Some(r),
            _ = permit.lost() => None,
        };
        parts.log_reconcile(&key, start);
        drop(permit);
        let _enter = span.enter();
        let Some(result) = result else {
            warn!(
                "lease lost during the reconcile: stopped it; the new owner reconciles the object"
            );
            parts.queue.forget(&key);
            parts.queue.done(&key);
            continue;
        };
        let metrics = metrics::global();
        metrics.reconciled(kind, outcome_of(&result), started.elapsed());
        match result.map(|ran| ran.action) {
            Ok(Action::Backoff) => {
                metrics.backed_off(kind);
                let delay = parts.queue.add_rate_limited(key.clone());
                debug!(retry_in = ?delay, "status written; retrying with backoff");
            }
            Ok(action) => {
                parts.queue.forget(&key);
                if let Action::Requeue(after) = action {
                    debug!(?after, "requeue");
                    parts.queue.add_after(key.clone(), after);
                }
            }
            Err(e) => {
                if matches!(e, Error::Engine(_)) {
                    metrics.engine_error(kind);
                }
                metrics.backed_off(kind);
                let delay = parts.queue.add_rate_limited(key.clone());
                warn!(error = %e, retry_in = ?delay, failures = parts.queue.failures(&key), "reconcile failed");
            }
        }
        parts.queue.done(&key);
    }
}

/// Re-lists the kind into the cache and enqueues every object and every engine object this
/// controller owns; then collects garbage. `false` if the API or the engine could not be read.
async fn resync_all<R: Hooks>(parts: &Parts<R>) -> bool {
    let kind = R::KIND;
    let mut ok = true;
    match parts.ctx.store.list(kind).await {
        Ok(objects) => {
            parts.ctx.cache.replace(objects);
            for name in parts.ctx.cache.names() {
                parts.enqueue(&name);
            }
        }
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list objects");
            ok = false;
        }
    }
    match parts.hooks.engine_names().await {
        Ok(names) => names.iter().for_each(|n| parts.enqueue(n)),
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list engine objects");
            ok = false;
        }
    }
    // Once per installation: the instance holding partition 0 collects.
    if parts.shares.leads() {
        if let Err(e) = parts.hooks.collect_garbage(&parts.ctx).await {
            warn!(%kind, error = %e, "resync: garbage collection failed; will retry");
        }
    }
    ok
}

/// Partitions this instance just acquired may have keys nobody reconciled while they were free.
async fn acquisitions<R: Hooks>(parts: Arc<Parts<R>>) {
    let mut acquired = parts.shares.acquisitions();
    while acquired.changed().await.is_ok() {
        debug!(kind = %R::KIND, "partitions acquired: resyncing");
        resync_all(&parts).await;
    }
}

async fn resync_loop<R: Hooks>(parts: Arc<Parts<R>>, every: Duration) {
    // A failed resync (API or engine not up yet) is retried soon rather than after a full period.
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        if resync_all(&parts).await {
            retry.reset();
            tokio::time::sleep(every).await;
        } else {
            tokio::time::sleep(retry.next_delay().min(every)).await;
        }
    }
}

async fn bus_intake<R: Hooks>(
    parts: Arc<Parts<R>>,
    bus: Arc<dyn EventBus>,
    durable: Option<String>,
) {
    let kind = R::KIND;
    let mut retry = BackoffPolicy::reconnect().retry();
    let mut kinds = vec![kind];
    kinds.extend(parts.hooks.watches());
    loop {
        let subscribed = match durable.as_deref() {
            Some(name) => bus.subscribe_own(&kinds, name).await,
            None => bus.subscribe(&kinds, None).await,
        };
        match subscribed {
            Ok(mut events) => {
                retry.reset();
                while let Some(msg) = events.next().await {
                    match msg {
                        BusMessage::Event(e) if e.kind != kind => {
                            for name in parts.hooks.map_related(&e, &parts.ctx).await {
                                parts.enqueue(&name);
                            }
                        }
                        BusMessage::Event(e) => {
                            // The cache first, so the reconcile this event triggers sees it.
                            if !parts.ctx.cache.has_version(&e.name, &e.resource_version) {
                                match parts.ctx.store.get(kind, &e.name).await {
                                    Ok(obj) => parts.ctx.cache.apply(&e.name, obj),
                                    Err(err) => {
                                        warn!(%kind, name = %e.name, error = %err, "cannot read a changed object; it is reconciled from the next resync");
                                    }
                                }
                            }
                            // Status writes (ours, mostly) are not a reason to look again.
                            if e.type_ != EventType::StatusChanged {
                                parts.enqueue(&e.name);
                            }
                        }
                        BusMessage::Lagged => {
                            info!(%kind, "missed bus events: resyncing");
                            resync_all(&parts).await;
                        }
                    }
                }
                warn!(%kind, "bus subscription ended; resubscribing");
            }
            Err(e) => warn!(%kind, error = %e, "cannot subscribe to the bus"),
        }
        retry.wait().await;
    }
}

async fn engine_intake<R: Hooks>(parts: Arc<Parts<R>>, docker: Docker) {
    let types: Vec<String> = parts
        .hooks
        .engine_event_types()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut retry = BackoffPolicy::reconnect().retry();
    let mut first = true;
    loop {
        let options = EventsOptions {
            filters: Some(HashMap::from([("type".to_string(), types.clone())])),
            ..Default::default()
        };
        let mut events = docker.events(Some(options));
        if !first {
            // Events may have been missed while the stream was down.
            resync_all(&parts).await;
        }
        first = false;
        while let Some(item) = events.next().await {
            match item {
                Ok(ev) => {
                    retry.reset();
                    if let Some(name) = parts.hooks.map_engine_event(&ev) {
                        if parts.work.follows(&name, &parts.ctx.cache) {
                            parts.enqueue(&name);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "engine event stream failed");
                    break;
                }
            }
        }
        retry.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::runtime::reconciler::{ObjectStatus, Reconciled};
    use crate::runtime::testing::FakeStore;
    use berth_api_types::validate::FieldError;
    use berth_api_types::{Event, Kind, Object};
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};
    use std::sync::Mutex;
    use tokio::time::Instant;

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    struct Seen {
        #[serde(default)]
        note: String,
    }

    impl ObjectStatus for Seen {
        fn refused(&self, _: u64, reason: &str, message: &str, _: DateTime<Utc>) -> Self {
            Seen {
                note: format!("refused {reason}: {message}"),
            }
        }
    }

    /// Answers per name: `fail` always errors, `refuse` is refused, `poll` requeues after 10 s,
    /// anything else is done.
    #[derive(Default)]
    struct Script {
        calls: Mutex<Vec<(String, Instant)>>,
    }

    impl Script {
        fn times(&self, name: &str) -> Vec<Instant> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .collect()
        }
    }

    impl Resource for Script {
        type Object = Object<serde_json::Value, serde_json::Value>;
        type Status = Seen;
        const KIND: Kind = Kind::Service;

        /// `spec.bad` makes an object invalid.
        fn validate(o: &Self::Object) -> Result<(), Vec<FieldError>> {
            match o.spec.get("bad") {
                Some(_) => Err(vec![FieldError::new("spec.bad", "not allowed")]),
                None => Ok(()),
            }
        }
    }

    #[async_trait]
    impl Hooks for Script {
        async fn engine_names(&self) -> Result<Vec<String>, Error> {
            Ok(vec!["orphan".into()])
        }
    }

    #[async_trait]
    impl Reconciler for Script {
        async fn reconcile(
            &self,
            obj: Arc<Cached<Self>>,
            _: &Context<Self>,
        ) -> Result<Reconciled<Seen>, Error> {
            let name = obj.name().to_string();
            self.calls
                .lock()
                .unwrap()
                .push((name.clone(), Instant::now()));
            let done = |action| {
                Ok(Reconciled {
                    status: Seen {
                        note: format!("seen generation {}", obj.generation()),
                    },
                    action,
                })
            };
            match name.as_str() {
                "fail" => Err(Error::Transient("engine unreachable".into())),
                "refuse" => Err(Error::refused("Taken", "someone else's")),
                "poll" => done(Action::requeue(Duration::from_secs(10))),
                _ => done(Action::await_change()),
            }
        }

        async fn cleanup(&self, name: &str, _: &Context<Self>) -> Result<Action, Error> {
            self.calls
                .lock()
                .unwrap()
                .push((name.to_string(), Instant::now()));
            Ok(Action::await_change())
        }
    }

    fn object(name: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": name}, "spec": spec
        })
    }

    fn event(name: &str, type_: EventType, rv: &str) -> Event {
        Event {
            id: ulid::Ulid::new().to_string(),
            type_,
            kind: Kind::Service,
            name: name.into(),
            uid: String::new(),
            generation: 1,
            resource_version: rv.into(),
            time: chrono::Utc::now(),
            message: String::new(),
        }
    }

    fn note(store: &FakeStore, name: &str) -> String {
        store.status(Kind::Service, name)["note"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn errors_back_off_refusals_wait_requeue_polls_and_events_trigger() {
        let script = Arc::new(Script::default());
        let bus = Arc::new(EmbeddedBus::new());
        let store = Arc::new(FakeStore::default());
        for name in ["fail", "refuse", "poll", "done"] {
            store.put(object(name, serde_json::json!({})));
        }
        store.put(object("invalid", serde_json::json!({"bad": 1})));
        let config = ControllerConfig {
            resync: Duration::from_secs(3600),
            ..Default::default()
        };
        let ctl = Controller::new(script.clone(), store.clone(), bus.clone(), config);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(ctl.run(async {
            let _ = stop_rx.await;
        }));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;

        // The first resync visits every object and every engine-side name (an orphan: cleanup).
        assert_eq!(script.times("orphan").len(), 1);
        // The runtime writes what reconcile returned...
        assert_eq!(note(&store, "done"), "seen generation 1");
        // ...reports an invalid object once, without calling reconcile...
        assert_eq!(script.times("invalid").len(), 0);
        assert_eq!(
            note(&store, "invalid"),
            "refused InvalidSpec: spec.bad: not allowed"
        );
        // ...and a refusal once, not retried.
        assert_eq!(script.times("refuse").len(), 1);
        assert_eq!(note(&store, "refuse"), "refused Taken: someone else's");
        // Requeue(10 s): about every 10 s.
        let polls = script.times("poll").len();
        assert!((6..=7).contains(&polls), "polls in 60 s: {polls}");
        // Transient errors back off exponentially (200 ms, 400 ms, ... with ±30 % jitter), not a hot
        // loop, and write no status.
        let fails = script.times("fail");
        assert!(
            (7..=11).contains(&fails.len()),
            "retries in 60 s: {}",
            fails.len()
        );
        let gaps: Vec<Duration> = fails.windows(2).map(|w| w[1] - w[0]).collect();
        for w in gaps.windows(2) {
            assert!(w[1] > w[0], "retry gaps must grow: {gaps:?}");
        }
        assert_eq!(note(&store, "fail"), "");

        // A status-only event does not trigger; a change does, and reconcile sees the new object.
        let rv = store
            .object(Kind::Service, "done")
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        bus.publish(&event("done", EventType::StatusChanged, &rv))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.times("done").len(), 1);
        let changed = store.put(object("done", serde_json::json!({"image": "b"})));
        bus.publish(&event(
            "done",
            EventType::Applied,
            changed.metadata.resource_version.as_deref().unwrap(),
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.times("done").len(), 2);
        assert_eq!(note(&store, "done"), "seen generation 2");
        assert!(start.elapsed() >= Duration::from_secs(60));

        let _ = stop_tx.send(());
        run.await.unwrap();
    }

    #[tokio::test]
    async fn a_status_computed_from_an_old_object_is_not_written() {
        let script = Arc::new(Script::default());
        let store = Arc::new(FakeStore::default());
        store.put(object("done", serde_json::json!({})));
        let ctx: Context<Script> = context_from(store.clone()).await.unwrap();
        // Someone else writes meanwhile (a newer object than the cache holds).
        store.put(object("done", serde_json::json!({"image": "b"})));
        let result = PerObject(script.clone()).run("done", &ctx).await;
        assert!(
            matches!(&result, Err(Error::Api(e)) if e.is_conflict()),
            "{result:?}"
        );
        assert_eq!(
            note(&store, "done"),
            "",
            "nothing written over the newer object"
        );
        // The cache was refreshed, so the retry starts from the current object and succeeds.
        PerObject(script).run("done", &ctx).await.unwrap();
        assert_eq!(note(&store, "done"), "seen generation 2");
    }

    /// A bus whose subscribers get exactly what the test sends.
    struct ScriptedBus(tokio::sync::broadcast::Sender<BusMessage>);

    #[async_trait]
    impl EventBus for ScriptedBus {
        async fn publish(&self, _: &Event) -> Result<(), crate::bus::BusError> {
            Ok(())
        }
        async fn subscribe(
            &self,
            _: &[Kind],
            _: Option<&str>,
        ) -> Result<crate::bus::Subscription, crate::bus::BusError> {
            let rx = self.0.subscribe();
            Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.ok().map(|m| (m, rx))
            })))
        }
        async fn publish_audit(
            &self,
            _: &str,
            _: &str,
            _: Vec<u8>,
        ) -> Result<(), crate::bus::BusError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagged_bus_makes_the_controller_resync() {
        let script = Arc::new(Script::default());
        let (tx, _) = tokio::sync::broadcast::channel(16);
        let bus = Arc::new(ScriptedBus(tx.clone()));
        let store = Arc::new(FakeStore::default());
        store.put(object("first", serde_json::json!({})));
        let config = ControllerConfig {
            resync: Duration::from_secs(3600),
            ..Default::default()
        };
        let ctl = Controller::new(script.clone(), store.clone(), bus, config);
        let run = tokio::spawn(ctl.run(std::future::pending()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(script.times("first").len(), 1);

        // An object whose event was missed: nothing happens until the bus says events were lost.
        store.put(object("missed", serde_json::json!({})));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(script.times("missed").is_empty());
        tx.send(BusMessage::Lagged).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(script.times("missed").len(), 1, "resynced after Lagged");
        assert_eq!(note(&store, "missed"), "seen generation 1");
        run.abort();
    }
}
