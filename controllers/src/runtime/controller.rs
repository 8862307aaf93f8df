//! The loop every controller runs: intake (bus events of its kind, Swarm engine events, a periodic
//! resync) feeds object names into the work queue; workers call the kind's `Reconciler` one name at a
//! time and turn its answer into a requeue, a wait for the next change, or a backoff retry. A controller
//! folder only implements `Reconciler`; nothing here knows about any kind.

use super::backoff::BackoffPolicy;
use super::queue::WorkQueue;
use crate::api::ResourceStore;
use crate::bus::{BusMessage, EventBus};
use async_trait::async_trait;
use berth_api_types::{Event, EventType, Kind};
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

/// What a reconcile asks for next (after kube-runtime's `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look again after this long even if nothing changes (e.g. while a rollout is in flight).
    Requeue(Duration),
    /// Nothing to do until an event or the periodic resync says otherwise.
    AwaitChange,
}

impl Action {
    pub fn requeue(after: Duration) -> Self {
        Action::Requeue(after)
    }

    pub fn await_change() -> Self {
        Action::AwaitChange
    }
}

/// One kind's reconcile logic. Level-based: `reconcile` gets a name, never "what happened", and must
/// converge from whatever it finds. Invalid specs are reported in status and answered with
/// `AwaitChange`; only transient failures are returned as errors (they back off per name).
#[async_trait]
pub trait Reconciler: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The kind this controller owns.
    fn kind(&self) -> Kind;

    async fn reconcile(&self, name: &str) -> Result<Action, Self::Error>;

    /// Names of the objects this controller has created in the engine. Resync reconciles them too, so
    /// an engine object whose berth object is gone (deleted while the controller was down) is removed.
    async fn engine_names(&self) -> Result<Vec<String>, Self::Error>;

    /// Removes engine objects the controller made that nothing needs any more (e.g. old contents of
    /// a rotated secret). Called on every resync; failures are logged and retried next time.
    async fn collect_garbage(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Engine event types to watch (`service`, `container`, ...); empty: no engine watch.
    fn engine_event_types(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// The object name an engine event concerns, if any.
    fn map_engine_event(&self, _event: &EventMessage) -> Option<String> {
        None
    }

    /// Other kinds this controller depends on: their events (of every type, status included) are
    /// mapped to objects of this kind with `map_related`.
    fn watches(&self) -> Vec<Kind> {
        Vec::new()
    }

    /// The objects of this kind that an event of a watched kind concerns.
    async fn map_related(&self, _event: &Event) -> Vec<String> {
        Vec::new()
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Reconciles running at once (for different names; one name is never reconciled twice at once).
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

pub struct Controller<R: Reconciler> {
    reconciler: Arc<R>,
    store: Arc<dyn ResourceStore>,
    bus: Arc<dyn EventBus>,
    docker: Option<Docker>,
    config: ControllerConfig,
    queue: WorkQueue<String>,
}

impl<R: Reconciler> Controller<R> {
    pub fn new(
        reconciler: Arc<R>,
        store: Arc<dyn ResourceStore>,
        bus: Arc<dyn EventBus>,
        config: ControllerConfig,
    ) -> Self {
        let queue = WorkQueue::with_backoff(config.backoff);
        Controller {
            reconciler,
            store,
            bus,
            docker: None,
            config,
            queue,
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

    /// Runs until `shutdown` resolves, then lets in-flight reconciles finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let kind = self.reconciler.kind();
        info!(%kind, workers = self.config.workers, bus = %self.bus.describe(), "controller starting");
        let mut tasks = tokio::task::JoinSet::new();

        tasks.spawn(bus_intake(
            kind,
            self.bus.clone(),
            self.config.durable.clone(),
            self.queue.clone(),
            self.store.clone(),
            self.reconciler.clone(),
        ));
        if let Some(docker) = self.docker.clone() {
            if !self.reconciler.engine_event_types().is_empty() {
                tasks.spawn(engine_intake(
                    docker,
                    self.queue.clone(),
                    self.store.clone(),
                    self.reconciler.clone(),
                ));
            }
        }
        tasks.spawn(resync_loop(
            self.config.resync,
            self.queue.clone(),
            self.store.clone(),
            self.reconciler.clone(),
        ));

        let mut workers = tokio::task::JoinSet::new();
        for id in 0..self.config.workers.max(1) {
            workers.spawn(worker(id, self.queue.clone(), self.reconciler.clone()));
        }

        shutdown.await;
        info!(%kind, "controller stopping");
        tasks.abort_all();
        self.queue.shutdown();
        while workers.join_next().await.is_some() {}
    }
}

async fn worker<R: Reconciler>(id: usize, queue: WorkQueue<String>, reconciler: Arc<R>) {
    let kind = reconciler.kind();
    while let Some(name) = queue.get().await {
        let span = tracing::info_span!("reconcile", kind = %kind, name = %name, worker = id);
        let result = reconciler.reconcile(&name).instrument(span.clone()).await;
        let _enter = span.enter();
        match result {
            Ok(action) => {
                queue.forget(&name);
                if let Action::Requeue(after) = action {
                    debug!(?after, "requeue");
                    queue.add_after(name.clone(), after);
                }
            }
            Err(e) => {
                let delay = queue.add_rate_limited(name.clone());
                warn!(error = %e, retry_in = ?delay, failures = queue.failures(&name), "reconcile failed");
            }
        }
        queue.done(&name);
    }
}

/// Enqueues every object the API knows and every engine object this controller owns.
async fn resync_all<R: Reconciler>(
    queue: &WorkQueue<String>,
    store: &Arc<dyn ResourceStore>,
    reconciler: &Arc<R>,
) -> bool {
    let kind = reconciler.kind();
    let mut ok = true;
    match store.list(kind).await {
        Ok(objects) => objects.into_iter().for_each(|o| queue.add(o.metadata.name)),
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list objects");
            ok = false;
        }
    }
    match reconciler.engine_names().await {
        Ok(names) => names.into_iter().for_each(|n| queue.add(n)),
        Err(e) => {
            warn!(%kind, error = %e, "resync: cannot list engine objects");
            ok = false;
        }
    }
    if let Err(e) = reconciler.collect_garbage().await {
        warn!(%kind, error = %e, "resync: garbage collection failed; will retry");
    }
    ok
}

async fn resync_loop<R: Reconciler>(
    every: Duration,
    queue: WorkQueue<String>,
    store: Arc<dyn ResourceStore>,
    reconciler: Arc<R>,
) {
    // A failed resync (API or engine not up yet) is retried soon rather than after a full period.
    let mut retry = Duration::from_millis(500);
    loop {
        if resync_all(&queue, &store, &reconciler).await {
            retry = Duration::from_millis(500);
            tokio::time::sleep(every).await;
        } else {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(every);
        }
    }
}

async fn bus_intake<R: Reconciler>(
    kind: Kind,
    bus: Arc<dyn EventBus>,
    durable: Option<String>,
    queue: WorkQueue<String>,
    store: Arc<dyn ResourceStore>,
    reconciler: Arc<R>,
) {
    let mut retry = Duration::from_millis(200);
    let mut kinds = vec![kind];
    kinds.extend(reconciler.watches());
    loop {
        match bus.subscribe(&kinds, durable.as_deref()).await {
            Ok(mut events) => {
                retry = Duration::from_millis(200);
                while let Some(msg) = events.next().await {
                    match msg {
                        BusMessage::Event(e) if e.kind != kind => {
                            for name in reconciler.map_related(&e).await {
                                queue.add(name);
                            }
                        }
                        // Our own status writes are not a reason to look again.
                        BusMessage::Event(e) if e.type_ == EventType::StatusChanged => {}
                        BusMessage::Event(e) => queue.add(e.name),
                        BusMessage::Lagged => {
                            resync_all(&queue, &store, &reconciler).await;
                        }
                    }
                }
                warn!(%kind, "bus subscription ended; resubscribing");
            }
            Err(e) => warn!(%kind, error = %e, retry_in = ?retry, "cannot subscribe to the bus"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(10));
    }
}

async fn engine_intake<R: Reconciler>(
    docker: Docker,
    queue: WorkQueue<String>,
    store: Arc<dyn ResourceStore>,
    reconciler: Arc<R>,
) {
    let types: Vec<String> = reconciler
        .engine_event_types()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut retry = Duration::from_millis(200);
    let mut first = true;
    loop {
        let options = EventsOptions {
            filters: Some(HashMap::from([("type".to_string(), types.clone())])),
            ..Default::default()
        };
        let mut events = docker.events(Some(options));
        if !first {
            // Events may have been missed while the stream was down.
            resync_all(&queue, &store, &reconciler).await;
        }
        first = false;
        while let Some(item) = events.next().await {
            match item {
                Ok(ev) => {
                    retry = Duration::from_millis(200);
                    if let Some(name) = reconciler.map_engine_event(&ev) {
                        queue.add(name);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "engine event stream failed");
                    break;
                }
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ClientError;
    use crate::bus::EmbeddedBus;
    use berth_api_types::DynObject;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// A store with a fixed set of Service names.
    struct Names(Vec<String>);

    #[async_trait]
    impl ResourceStore for Names {
        async fn get(&self, _: Kind, _: &str) -> Result<Option<DynObject>, ClientError> {
            Ok(None)
        }
        async fn list(&self, _: Kind) -> Result<Vec<DynObject>, ClientError> {
            Ok(self
                .0
                .iter()
                .map(|n| {
                    serde_json::from_value(serde_json::json!({
                        "apiVersion": "berth/v1", "kind": "Service",
                        "metadata": {"name": n}, "spec": {}
                    }))
                    .unwrap()
                })
                .collect())
        }
        async fn update_status(
            &self,
            kind: Kind,
            name: &str,
            _: serde_json::Value,
            _: Option<&str>,
        ) -> Result<DynObject, ClientError> {
            Err(ClientError::Api {
                status: 404,
                reason: "NotFound".into(),
                message: format!("{kind} `{name}` not found"),
                details: vec![],
            })
        }
        async fn installation(&self) -> Result<berth_api_types::wire::Installation, ClientError> {
            Ok(berth_api_types::wire::Installation {
                instance: "test".into(),
                default_network: "berth-internal".into(),
            })
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("engine unreachable")]
    struct Transient;

    /// Answers per name: `fail` always errors, `invalid` waits for a change, `poll` requeues after 10 s.
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

    #[async_trait]
    impl Reconciler for Script {
        type Error = Transient;
        fn kind(&self) -> Kind {
            Kind::Service
        }
        async fn reconcile(&self, name: &str) -> Result<Action, Transient> {
            self.calls
                .lock()
                .unwrap()
                .push((name.to_string(), Instant::now()));
            match name {
                "fail" => Err(Transient),
                "poll" => Ok(Action::requeue(Duration::from_secs(10))),
                _ => Ok(Action::await_change()),
            }
        }
        async fn engine_names(&self) -> Result<Vec<String>, Transient> {
            Ok(vec!["orphan".into()])
        }
    }

    fn event(name: &str, type_: EventType) -> Event {
        Event {
            id: ulid::Ulid::new().to_string(),
            type_,
            kind: Kind::Service,
            name: name.into(),
            uid: String::new(),
            generation: 1,
            resource_version: "1".into(),
            time: chrono::Utc::now(),
            message: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn errors_back_off_invalid_waits_requeue_polls_and_events_trigger() {
        let script = Arc::new(Script::default());
        let bus = Arc::new(EmbeddedBus::new());
        let store = Arc::new(Names(vec!["fail".into(), "invalid".into(), "poll".into()]));
        let config = ControllerConfig {
            resync: Duration::from_secs(3600),
            ..Default::default()
        };
        let ctl = Controller::new(script.clone(), store, bus.clone(), config);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(ctl.run(async {
            let _ = stop_rx.await;
        }));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;

        // The first resync visits every object and every engine-side name (orphans are collected there).
        assert_eq!(script.times("orphan").len(), 1);
        // A spec the controller cannot apply is reported once and not retried.
        assert_eq!(script.times("invalid").len(), 1);
        // Requeue(10 s): about every 10 s.
        let polls = script.times("poll").len();
        assert!((6..=7).contains(&polls), "polls in 60 s: {polls}");
        // Transient errors back off exponentially (200 ms, 400 ms, ... with ±30 % jitter), not a hot loop.
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

        // An Applied event triggers a reconcile; the controller's own StatusChanged does not.
        bus.publish(&event("invalid", EventType::StatusChanged))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.times("invalid").len(), 1);
        bus.publish(&event("invalid", EventType::Applied))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.times("invalid").len(), 2);
        assert!(start.elapsed() >= Duration::from_secs(60));

        let _ = stop_tx.send(());
        run.await.unwrap();
    }
}
