//! The deploy applier: runs inside the API server (the only writer of `spec`) and turns each deploy
//! event from the bus into a Service spec change, which the service controller then rolls out.
//!
//! - `spec.image` becomes the event's image. When that is the image already running (a redeploy
//!   of the same tag), `spec.forceUpdate` is bumped instead, so the tasks restart and pull again.
//!   A reference pinned by digest that is already running is left alone: it cannot have changed.
//! - The write also sets the `deploy.berth.io/{id,source,generation}` annotations, so the
//!   controller can tell which generation came from which trigger.
//! - Events are applied at least once (bus redelivery), so an event whose id (a ULID, i.e. time
//!   ordered) is not newer than the last one applied is skipped: no double bump, and a late
//!   redelivery never rolls a service back to an older deploy.
//! - Events that arrive together for one service are coalesced, the newest winning.
//! - A deploy for a service that does not exist is logged and dropped; nothing is created.

use crate::store::{Store, StoreError, WriteMode};
use berth_api_types::deploy::DeployEvent;
use berth_api_types::image::ImageRef;
use berth_api_types::names::annotations;
use berth_api_types::typed::decode_object;
use berth_api_types::{DynObject, Kind};
use berth_controllers::bus::{DeployMessage, DeployQueue, DeploySubscription};
use berth_controllers::runtime::backoff::BackoffPolicy;
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Most events taken off the bus before applying what has been coalesced.
const BATCH: usize = 256;
/// Attempts of one deploy when API writes keep changing the service in between.
const CONFLICT_RETRIES: usize = 5;

/// What applying one deploy event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The spec was written; the generation it produced.
    Applied {
        generation: u64,
        forced: bool,
    },
    /// This event, or a newer one, was applied before.
    AlreadyApplied,
    /// The service already runs exactly this digest-pinned reference.
    Unchanged,
    NoService,
    /// Stamped for another berth installation sharing the bus.
    OtherInstance,
    /// The event's image or the resulting spec is not valid; the reason.
    Invalid(String),
}

enum Plan {
    Skip(Outcome),
    Write { obj: Box<DynObject>, forced: bool },
}

/// The new Service object for a deploy, or why nothing is written. Pure.
fn plan(current: &DynObject, ev: &DeployEvent) -> Plan {
    let last = current.metadata.annotations.get(annotations::DEPLOY_ID);
    if last.is_some_and(|last| ev.id.as_str() <= last.as_str()) {
        return Plan::Skip(Outcome::AlreadyApplied);
    }
    let new = match ImageRef::parse(&ev.image) {
        Ok(r) => r,
        Err(e) => return Plan::Skip(Outcome::Invalid(e)),
    };
    let mut spec = current.spec.clone();
    let Some(map) = spec.as_object_mut() else {
        return Plan::Skip(Outcome::Invalid("the stored spec is not an object".into()));
    };
    let same = map.get("image").and_then(Value::as_str) == Some(new.as_str());
    let forced = same && new.digest.is_none();
    if same && !forced {
        return Plan::Skip(Outcome::Unchanged);
    }
    if forced {
        let n = map.get("forceUpdate").and_then(Value::as_u64).unwrap_or(0);
        map.insert("forceUpdate".into(), (n + 1).into());
    } else {
        map.insert("image".into(), new.as_str().into());
    }
    let mut doc = match serde_json::to_value(current) {
        Ok(d) => d,
        Err(e) => return Plan::Skip(Outcome::Invalid(e.to_string())),
    };
    doc["spec"] = spec;
    doc["status"] = Value::Null;
    let notes = &mut doc["metadata"]["annotations"];
    if !notes.is_object() {
        *notes = Value::Object(Default::default());
    }
    notes[annotations::DEPLOY_ID] = ev.id.clone().into();
    notes[annotations::DEPLOY_SOURCE] = ev.source.as_str().into();
    // The spec changes, so the store bumps the generation by exactly one.
    notes[annotations::DEPLOY_GENERATION] = (current.metadata.generation + 1).to_string().into();
    match decode_object(&doc) {
        Ok(obj) => Plan::Write {
            obj: Box::new(obj),
            forced,
        },
        Err(errs) => Plan::Skip(Outcome::Invalid(
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// Applies one deploy event to the store (conditional write, retried on conflicts).
pub async fn apply(store: &Store, ev: &DeployEvent) -> Result<Outcome, StoreError> {
    if ev
        .instance
        .as_deref()
        .is_some_and(|i| i != store.instance())
    {
        return Ok(Outcome::OtherInstance);
    }
    let mut last_conflict = None;
    for _ in 0..CONFLICT_RETRIES {
        let Some(current) = store.get(Kind::Service, &ev.service)? else {
            return Ok(Outcome::NoService);
        };
        let (obj, forced) = match plan(&current, ev) {
            Plan::Skip(outcome) => return Ok(outcome),
            Plan::Write { obj, forced } => (*obj, forced),
        };
        let rv = current.metadata.resource_version.clone();
        match store.write(vec![obj], WriteMode::Replace, rv, false).await {
            Ok(mut out) => {
                let (_, obj) = out.remove(0);
                return Ok(Outcome::Applied {
                    generation: obj.metadata.generation,
                    forced,
                });
            }
            Err(e @ StoreError::Conflict { .. }) => last_conflict = Some(e),
            Err(StoreError::NotFound { .. }) => return Ok(Outcome::NoService),
            Err(e) => return Err(e),
        }
    }
    Err(last_conflict.expect("the loop ran"))
}

/// Keeps the newest event per service (ULIDs order by time).
fn coalesce(events: Vec<DeployEvent>) -> Vec<DeployEvent> {
    let mut latest: HashMap<String, DeployEvent> = HashMap::new();
    for ev in events {
        match latest.get(&ev.service) {
            Some(have) if have.id >= ev.id => {}
            _ => {
                latest.insert(ev.service.clone(), ev);
            }
        }
    }
    let mut out: Vec<DeployEvent> = latest.into_values().collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Subscribes to deploy events, retrying until the bus takes the subscription.
async fn subscribe(bus: &Arc<dyn DeployQueue>, durable: Option<&str>) -> DeploySubscription {
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        match bus.subscribe_deploys(durable).await {
            Ok(s) => return s,
            Err(e) => {
                let delay = retry.next_delay();
                warn!(error = %e, retry_in = ?delay, "cannot subscribe to deploy events");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Subscribes, then returns the applier loop. Subscribing before the HTTP server answers its first
/// webhook call matters: the embedded bus drops events nobody is subscribed to, and a new durable
/// NATS consumer starts with the events published after it exists.
pub async fn start(
    store: Store,
    bus: Arc<dyn DeployQueue>,
    durable: Option<String>,
) -> impl std::future::Future<Output = ()> {
    let first = subscribe(&bus, durable.as_deref()).await;
    run(store, bus, durable, first)
}

/// Consumes deploy events forever; re-subscribes if a subscription ends.
async fn run(
    store: Store,
    bus: Arc<dyn DeployQueue>,
    durable: Option<String>,
    first: DeploySubscription,
) {
    let mut next_sub = Some(first);
    loop {
        let mut sub = match next_sub.take() {
            Some(s) => s,
            None => subscribe(&bus, durable.as_deref()).await,
        };
        info!(bus = %bus.describe(), consumer = ?durable, "deploy applier listening");
        while let Some(first) = sub.next().await {
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    DeployMessage::Deploy(ev) => batch.push(ev),
                    DeployMessage::Lagged => {
                        warn!("deploy events may have been missed; callers must ask again")
                    }
                }
                // Whatever else is already waiting is coalesced with it.
                if batch.len() < BATCH {
                    next = sub.next().now_or_never().flatten();
                }
            }
            let received = batch.len();
            for ev in coalesce(batch) {
                apply_logged(&store, &ev, received).await;
            }
        }
        warn!("deploy event subscription ended; subscribing again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply_logged(store: &Store, ev: &DeployEvent, batch: usize) {
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        match apply(store, ev).await {
            Ok(Outcome::Applied { generation, forced }) => info!(
                id = %ev.id, service = %ev.service, image = %ev.image, source = %ev.source,
                generation, forced, batch, "deploy applied"
            ),
            Ok(Outcome::NoService) => warn!(
                id = %ev.id, service = %ev.service, source = %ev.source,
                "deploy for a service that does not exist; dropped"
            ),
            Ok(Outcome::Invalid(why)) => warn!(
                id = %ev.id, service = %ev.service, reason = %why, "invalid deploy; dropped"
            ),
            Ok(other) => {
                info!(id = %ev.id, service = %ev.service, outcome = ?other, "deploy skipped")
            }
            // Storage trouble or a service rewritten faster than we can read it: try again,
            // rather than lose a deploy the caller was told was accepted.
            Err(e) => {
                let delay = retry.next_delay();
                warn!(id = %ev.id, service = %ev.service, error = %e, retry_in = ?delay, "cannot apply deploy");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::deploy::DeploySource;
    use serde_json::json;

    fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([3u8; 32], "test key");
        (Store::open(dir.path(), &key).unwrap(), dir)
    }

    async fn create(store: &Store, name: &str, image: &str) -> DynObject {
        let obj = decode_object(&json!({
            "apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"image": image, "replicas": 2}
        }))
        .unwrap();
        store
            .write(vec![obj], WriteMode::Create, None, false)
            .await
            .unwrap()
            .remove(0)
            .1
    }

    /// Ids in creation order, as the webhook handler makes them.
    static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());

    fn ev(service: &str, image: &str) -> DeployEvent {
        DeployEvent {
            id: IDS.lock().unwrap().generate().unwrap().to_string(),
            service: service.into(),
            image: image.into(),
            tag: None,
            digest: None,
            source: DeploySource::Webhook,
            time: chrono::Utc::now(),
            instance: None,
        }
    }

    fn get(store: &Store, name: &str) -> DynObject {
        store.get(Kind::Service, name).unwrap().unwrap()
    }

    #[tokio::test]
    async fn new_tag_changes_the_image_and_annotates_the_generation() {
        let (store, _d) = store();
        create(&store, "web", "team/app:1").await;
        let e = ev("web", "team/app:2");
        assert_eq!(
            apply(&store, &e).await.unwrap(),
            Outcome::Applied {
                generation: 2,
                forced: false
            }
        );
        let obj = get(&store, "web");
        assert_eq!(obj.spec["image"], "team/app:2");
        assert_eq!(obj.spec["replicas"], 2, "the rest of the spec is kept");
        assert!(obj.spec.get("forceUpdate").is_none());
        let notes = &obj.metadata.annotations;
        assert_eq!(notes[annotations::DEPLOY_ID], e.id);
        assert_eq!(notes[annotations::DEPLOY_SOURCE], "webhook");
        assert_eq!(notes[annotations::DEPLOY_GENERATION], "2");
        assert_eq!(obj.metadata.generation, 2);
    }

    #[tokio::test]
    async fn same_tag_forces_an_update_once_per_event() {
        let (store, _d) = store();
        create(&store, "web", "team/app:1").await;
        let e = ev("web", "team/app:1");
        assert_eq!(
            apply(&store, &e).await.unwrap(),
            Outcome::Applied {
                generation: 2,
                forced: true
            }
        );
        assert_eq!(get(&store, "web").spec["forceUpdate"], 1);
        // Redelivered: no second bump.
        assert_eq!(apply(&store, &e).await.unwrap(), Outcome::AlreadyApplied);
        assert_eq!(get(&store, "web").spec["forceUpdate"], 1);
        assert_eq!(get(&store, "web").metadata.generation, 2);
        // A new redeploy bumps again.
        let mut e2 = ev("web", "team/app:1");
        e2.source = DeploySource::Signed;
        assert!(matches!(
            apply(&store, &e2).await.unwrap(),
            Outcome::Applied { generation: 3, .. }
        ));
        let obj = get(&store, "web");
        assert_eq!(obj.spec["forceUpdate"], 2);
        assert_eq!(
            obj.metadata.annotations[annotations::DEPLOY_SOURCE],
            "signed"
        );
        assert_eq!(
            obj.metadata.annotations[annotations::DEPLOY_GENERATION],
            "3"
        );
    }

    #[tokio::test]
    async fn late_redelivery_of_an_older_deploy_does_not_roll_back() {
        let (store, _d) = store();
        create(&store, "web", "team/app:1").await;
        let older = ev("web", "team/app:2");
        let newer = ev("web", "team/app:3");
        apply(&store, &newer).await.unwrap();
        assert_eq!(
            apply(&store, &older).await.unwrap(),
            Outcome::AlreadyApplied
        );
        assert_eq!(get(&store, "web").spec["image"], "team/app:3");
    }

    #[tokio::test]
    async fn pinned_digest_already_running_is_unchanged() {
        let (store, _d) = store();
        let pinned = format!("team/app:2@sha256:{}", "a".repeat(64));
        create(&store, "web", &pinned).await;
        let mut e = ev("web", &pinned);
        e.source = DeploySource::Registry;
        assert_eq!(apply(&store, &e).await.unwrap(), Outcome::Unchanged);
        assert_eq!(get(&store, "web").metadata.generation, 1);
    }

    #[tokio::test]
    async fn missing_service_other_instance_and_bad_image_change_nothing() {
        let (store, _d) = store();
        assert_eq!(
            apply(&store, &ev("ghost", "team/app:2")).await.unwrap(),
            Outcome::NoService
        );
        assert!(
            store.list(Kind::Service).unwrap().is_empty(),
            "nothing created"
        );
        create(&store, "web", "team/app:1").await;
        let mut e = ev("web", "team/app:2");
        e.instance = Some("another-installation".into());
        assert_eq!(apply(&store, &e).await.unwrap(), Outcome::OtherInstance);
        e.instance = Some(store.instance().to_string());
        assert!(matches!(
            apply(&store, &e).await.unwrap(),
            Outcome::Applied { .. }
        ));
        let bad = ev("web", "Team/App:2");
        assert!(
            matches!(apply(&store, &bad).await.unwrap(), Outcome::Invalid(why) if why.contains("path component"))
        );
        assert_eq!(get(&store, "web").metadata.generation, 2);
    }

    #[test]
    fn bursts_coalesce_to_the_newest_per_service() {
        let mut events = Vec::new();
        for i in 0..50 {
            events.push(ev("web", &format!("team/app:{i}")));
        }
        events.push(ev("api", "team/api:1"));
        events.swap(0, 49);
        let out = coalesce(events);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].image, "team/app:49");
        assert_eq!(out[1].service, "api");
    }

    #[tokio::test]
    async fn applier_consumes_the_bus() {
        let (store, _d) = store();
        create(&store, "web", "team/app:1").await;
        let bus: Arc<dyn DeployQueue> = Arc::new(berth_controllers::bus::EmbeddedBus::new());
        // Subscribed once `start` returns: the very first event is not lost.
        let task = tokio::spawn(start(store.clone(), bus.clone(), None).await);
        bus.publish_deploy(&ev("web", "team/app:7")).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while get(&store, "web").spec["image"] != "team/app:7" {
            assert!(
                std::time::Instant::now() < deadline,
                "applier never applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A burst of redeploys published at once is coalesced into fewer writes. Waiting for
        // the last one to land (not a fixed time) means an applier that does not coalesce gets
        // the time to make all 50 writes, and is caught.
        let before = get(&store, "web").metadata.generation;
        let burst: Vec<DeployEvent> = (0..50).map(|_| ev("web", "team/app:7")).collect();
        for e in &burst {
            bus.publish_deploy(e).await.unwrap();
        }
        let last = &burst[49].id;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while get(&store, "web").metadata.annotations[annotations::DEPLOY_ID] != *last {
            assert!(
                std::time::Instant::now() < deadline,
                "the newest deploy of the burst was never applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Let any write still queued behind it happen before counting.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let after = get(&store, "web");
        let writes = after.metadata.generation - before;
        assert!(
            writes <= 2,
            "50 queued redeploys were not coalesced: {writes} writes"
        );
        assert_eq!(
            after.spec["forceUpdate"].as_u64().unwrap(),
            writes,
            "each write of the burst is one forced restart"
        );
        task.abort();
    }
}
