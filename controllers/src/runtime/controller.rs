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
use crate::api::ResourceStore;
use crate::bus::{BusMessage, EventBus};
use async_trait::async_trait;
use berth_api_types::{EventType, ObjectMeta};
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Reconciles running at once (for different keys; one key is never reconciled twice at once).
    pub workers: usize,
    /// Every object is reconciled at least this often, so drift the engine does not report is fixed.
    pub resync: Duration,
    pub backoff: BackoffPolicy,
    /// Durable bus consumer name, so events published while this controller was down are delivered.
    pub durable: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            workers: 8,
            resync: Duration::from_secs(60),
            backoff: BackoffPolicy::default(),
            durable: None,
        }
    }
}

/// How a key becomes a reconcile: one object per key, or one thing for the whole kind.
#[async_trait]
trait Work<R: Hooks>: Send + Sync + 'static {
    fn key_of(&self, name: &str) -> String;
    async fn run(&self, key: &str, ctx: &Context<R>) -> Result<Action, Error>;
}

struct PerObject<R>(Arc<R>);

#[async_trait]
impl<R: Reconciler> Work<R> for PerObject<R> {
    fn key_of(&self, name: &str) -> String {
        name.to_string()
    }

    async fn run(&self, name: &str, ctx: &Context<R>) -> Result<Action, Error> {
        match ctx.cache.get(name) {
            None => self.0.cleanup(name, ctx).await,
            Some(Entry::Invalid(bad)) => {
                let status = refused_status(&bad.status, bad.meta.generation, "InvalidSpec", &bad.why);
                write_status::<R>(ctx, &bad.meta, &bad.status, &status).await?;
                Ok(Action::await_change())
            }
            Some(Entry::Valid(obj)) => match self.0.reconcile(obj.clone(), ctx).await {
                Ok(done) => {
                    write_status::<R>(ctx, &obj.meta, &obj.status, &done.status).await?;
                    Ok(done.action)
                }
                Err(Error::Refused { reason, message }) => {
                    let status = refused_status(&obj.status, obj.generation(), &reason, &message);
                    write_status::<R>(ctx, &obj.meta, &obj.status, &status).await?;
                    Ok(Action::await_change())
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

    async fn run(&self, _key: &str, ctx: &Context<A>) -> Result<Action, Error> {
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
                Ok(done.action)
            }
            Err(Error::Refused { reason, message }) => {
                for obj in &valid {
                    let status = refused_status(&obj.status, obj.generation(), &reason, &message);
                    write_status::<A>(ctx, &obj.meta, &obj.status, &status).await?;
                }
                Ok(Action::await_change())
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
        let queue = WorkQueue::with_backoff(config.backoff);
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
        let parts = Arc::new(Parts {
            ctx: Context {
                store: self.store.clone(),
                cache: self.cache.clone(),
                installation,
            },
            hooks: self.hooks.clone(),
            work: self.work.clone(),
            queue: self.queue.clone(),
        });

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(bus_intake(
            parts.clone(),
            self.bus.clone(),
            self.config.durable.clone(),
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
    }
}

/// What the intake loops and workers share.
struct Parts<R: Hooks> {
    ctx: Context<R>,
    hooks: Arc<R>,
    work: Arc<dyn Work<R>>,
    queue: WorkQueue<String>,
}

async fn worker<R: Hooks>(id: usize, parts: Arc<Parts<R>>) {
    let kind = R::KIND;
    while let Some(key) = parts.queue.get().await {
        let span = tracing::info_span!("reconcile", kind = %kind, name = %key, worker = id);
        let result = parts.work.run(&key, &parts.ctx).instrument(span.clone()).await;
        let _enter = span.enter();
        match result {
            Ok(Action::Backoff) => {
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
                parts.queue.add(parts.work.key_of(&name));
            }
        }
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list objects");
            ok = false;
        }
    }
    match parts.hooks.engine_names().await {
        Ok(names) => names
            .iter()
            .for_each(|n| parts.queue.add(parts.work.key_of(n))),
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list engine objects");
            ok = false;
        }
    }
    if let Err(e) = parts.hooks.collect_garbage(&parts.ctx).await {
        warn!(%kind, error = %e, "resync: garbage collection failed; will retry");
    }
    ok
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

async fn bus_intake<R: Hooks>(parts: Arc<Parts<R>>, bus: Arc<dyn EventBus>, durable: Option<String>) {
    let kind = R::KIND;
    let mut retry = BackoffPolicy::reconnect().retry();
    let mut kinds = vec![kind];
    kinds.extend(parts.hooks.watches());
    loop {
        match bus.subscribe(&kinds, durable.as_deref()).await {
            Ok(mut events) => {
                retry.reset();
                while let Some(msg) = events.next().await {
                    match msg {
                        BusMessage::Event(e) if e.kind != kind => {
                            for name in parts.hooks.map_related(&e, &parts.ctx).await {
                                parts.queue.add(parts.work.key_of(&name));
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
                                parts.queue.add(parts.work.key_of(&e.name));
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
                        parts.queue.add(parts.work.key_of(&name));
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
