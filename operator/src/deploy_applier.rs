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
//!
//! The bus is not trusted: anything that can publish on `berth.deploy.<service>` could otherwise
//! set any image on any service. So before anything else an event is [`Refused`](Outcome::Refused)
//! (logged once at warn level with its id, service and the reason; nothing changes) when it
//! names no installation, carries no valid signature (`deploy_auth`: only this process holds the
//! key the webhook bridge signs with), has an id more than [`MAX_FUTURE_SKEW`] in the future (it
//! would outrank, and so freeze, every later deploy of the service), or names another registry
//! host or repository than the service runs (only the tag and digest change through the bus; a
//! repository change goes through the API). Events stamped for another installation sharing the
//! bus are ignored as before ([`Outcome::OtherInstance`]). Refused events are checked before they
//! are coalesced, so a forged event can never displace a genuine one of the same batch.
//!
//! A message is acked only once its deploy is durably written (the store fsyncs before a write
//! returns) or deliberately dropped; the events a write coalesced are acked after that write.
//! A crash in between means a redelivery, which the id check above makes harmless.

use crate::access::AuditSink;
use crate::deploy_auth::SignatureError;
use crate::store::{Store, StoreError, WriteMode};
use berth_api_types::access::AuditEntry;
use berth_api_types::deploy::DeployEvent;
use berth_api_types::image::ImageRef;
use berth_api_types::names::annotations;
use berth_api_types::typed::decode_object;
use berth_api_types::{DynObject, Kind};
use berth_controllers::bus::{Ack, DeployMessage, DeployQueue, DeploySubscription};
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
/// How far in the future an event id's time may be: clocks of the machines involved differ a
/// little, but an id far ahead would outrank every later deploy of its service.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(60);

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
    /// The event is not to be trusted; nothing was changed.
    Refused(Refusal),
}

/// Why an event from the bus is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MissingInstance,
    MissingSignature,
    /// Not this installation's signature over this very event.
    BadSignature,
    /// The id is not a ULID, so it says nothing about when the deploy was asked for.
    BadId,
    /// The id's time is this far ahead of the applier's clock.
    FutureId {
        ahead: Duration,
    },
    /// The image's registry host or repository is not the service's current one.
    ForeignRepository {
        current: String,
        requested: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::MissingInstance => f.write_str("the event names no installation"),
            Refusal::MissingSignature => f.write_str("the event is not signed"),
            Refusal::BadSignature => {
                f.write_str("the event's signature is not this installation's over this event")
            }
            Refusal::BadId => f.write_str("the event id is not a ULID"),
            Refusal::FutureId { ahead } => write!(
                f,
                "the event id is {:.1}s in the future (at most {}s allowed)",
                ahead.as_secs_f64(),
                MAX_FUTURE_SKEW.as_secs()
            ),
            Refusal::ForeignRepository { current, requested } => write!(
                f,
                "the image repository `{requested}` is not the service's `{current}`: only the \
                 tag or digest change through a deploy event; change the repository through the API"
            ),
        }
    }
}

/// Whether an event may be applied at all, before the service is read: it must be this
/// installation's, signed by it, with an id not from the future. `Err` is the outcome to report.
fn admit(
    store: &Store,
    ev: &DeployEvent,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Outcome> {
    // Another installation's events are expected on a shared bus and signed with its own key, so
    // they are told apart before the signature is checked.
    match ev.instance.as_deref() {
        None => return Err(Outcome::Refused(Refusal::MissingInstance)),
        Some(i) if i != store.instance() => return Err(Outcome::OtherInstance),
        Some(_) => {}
    }
    match store.deploy_key().verify(ev) {
        Ok(()) => {}
        Err(SignatureError::Missing) => return Err(Outcome::Refused(Refusal::MissingSignature)),
        Err(SignatureError::Wrong) => return Err(Outcome::Refused(Refusal::BadSignature)),
    }
    let id = ulid::Ulid::from_string(&ev.id).map_err(|_| Outcome::Refused(Refusal::BadId))?;
    let now_ms = now.timestamp_millis().max(0) as u64;
    let ahead = Duration::from_millis(id.timestamp_ms().saturating_sub(now_ms));
    if ahead > MAX_FUTURE_SKEW {
        return Err(Outcome::Refused(Refusal::FutureId { ahead }));
    }
    Ok(())
}

/// `registry/repository` of a reference, the part a deploy event may not change.
fn repository(image: &ImageRef) -> String {
    match &image.registry {
        Some(r) => format!("{r}/{}", image.repository),
        None => image.repository.clone(),
    }
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
    let running = match map
        .get("image")
        .and_then(Value::as_str)
        .map(ImageRef::parse)
    {
        Some(Ok(r)) => r,
        _ => {
            return Plan::Skip(Outcome::Invalid(
                "the service's stored image does not parse".into(),
            ))
        }
    };
    if (&running.registry, &running.repository) != (&new.registry, &new.repository) {
        return Plan::Skip(Outcome::Refused(Refusal::ForeignRepository {
            current: repository(&running),
            requested: repository(&new),
        }));
    }
    let same = map.get("image").and_then(Value::as_str) == Some(new.as_str());
    let forced = same && new.digest.is_none();
    if same && !forced {
        return Plan::Skip(Outcome::Unchanged);
    }
    if forced {
        let n = map.get("forceUpdate").and_then(Value::as_u64).unwrap_or(0);
        // Saturating: a counter at its limit then fails validation below, as a refused deploy
        // with the field named, instead of panicking or wrapping to 0.
        map.insert("forceUpdate".into(), n.saturating_add(1).into());
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
    notes[annotations::DEPLOY_GENERATION] = current
        .metadata
        .generation
        .saturating_add(1)
        .to_string()
        .into();
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

/// Applies one deploy event to the store (conditional write, retried on conflicts), unless it is
/// refused. Returns once the write is durable.
pub async fn apply(store: &Store, ev: &DeployEvent) -> Result<Outcome, StoreError> {
    if let Err(outcome) = admit(store, ev, chrono::Utc::now()) {
        return Ok(outcome);
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

/// Keeps the newest event per service (ULIDs order by time), with the acks of every event it
/// stands for: they are acked once its write is durable.
fn coalesce(events: Vec<(DeployEvent, Ack)>) -> Vec<(DeployEvent, Vec<Ack>)> {
    let mut latest: HashMap<String, (DeployEvent, Vec<Ack>)> = HashMap::new();
    for (ev, ack) in events {
        match latest.get_mut(&ev.service) {
            Some((have, acks)) => {
                acks.push(ack);
                if ev.id > have.id {
                    *have = ev;
                }
            }
            None => {
                latest.insert(ev.service.clone(), (ev, vec![ack]));
            }
        }
    }
    let mut out: Vec<(DeployEvent, Vec<Ack>)> = latest.into_values().collect();
    out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
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
    audit: Arc<dyn AuditSink>,
) -> impl std::future::Future<Output = ()> {
    let first = subscribe(&bus, durable.as_deref()).await;
    run(store, bus, durable, first, audit)
}

/// Consumes deploy events forever; re-subscribes if a subscription ends.
async fn run(
    store: Store,
    bus: Arc<dyn DeployQueue>,
    durable: Option<String>,
    first: DeploySubscription,
    audit: Arc<dyn AuditSink>,
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
                    DeployMessage::Deploy(ev, ack) => batch.push((ev, ack)),
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
            // Untrusted events go before coalescing: a forged event with a newer id must not
            // displace a genuine one. Dropping one is final, so it is acked at once.
            let now = chrono::Utc::now();
            let mut admitted = Vec::with_capacity(batch.len());
            for (ev, ack) in batch {
                match admit(&store, &ev, now) {
                    Ok(()) => admitted.push((ev, ack)),
                    Err(outcome) => {
                        log_outcome(&ev, &outcome, received);
                        ack_logged(ack, &ev).await;
                    }
                }
            }
            for (ev, acks) in coalesce(admitted) {
                apply_logged(&store, &ev, received, audit.as_ref()).await;
                for ack in acks {
                    ack_logged(ack, &ev).await;
                }
            }
        }
        warn!("deploy event subscription ended; subscribing again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies one event until the store takes it (or it is dropped), logging the outcome once.
async fn apply_logged(store: &Store, ev: &DeployEvent, batch: usize, audit: &dyn AuditSink) {
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        match apply(store, ev).await {
            Ok(outcome) => {
                if let Outcome::Applied { generation, .. } = &outcome {
                    // A deploy is a write of spec like any other: on the audit trail, under
                    // the channel it came through (a hook's refusals are recorded by the
                    // access layer when they happen).
                    audit
                        .record(AuditEntry {
                            token_id: format!("deploy:{}", ev.source.as_str()),
                            action: "deploy".into(),
                            kind: Some(Kind::Service.to_string()),
                            name: Some(ev.service.clone()),
                            generation_before: generation.checked_sub(1),
                            generation_after: Some(*generation),
                            code: 200,
                            outcome: "ok".into(),
                            ..AuditEntry::default()
                        })
                        .await;
                }
                return log_outcome(ev, &outcome, batch);
            }
            // Storage trouble or a service rewritten faster than we can read it: try again,
            // rather than lose a deploy the caller was told was accepted. Not acked meanwhile.
            Err(e) => {
                let delay = retry.next_delay();
                warn!(id = %ev.id, service = %ev.service, error = %e, retry_in = ?delay, "cannot apply deploy");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One log line per event outcome. Refusals name the event and the reason, never the signature.
fn log_outcome(ev: &DeployEvent, outcome: &Outcome, batch: usize) {
    match outcome {
        Outcome::Applied { generation, forced } => info!(
            id = %ev.id, service = %ev.service, image = %ev.image, source = %ev.source,
            generation, forced, batch, "deploy applied"
        ),
        Outcome::NoService => warn!(
            id = %ev.id, service = %ev.service, source = %ev.source,
            "deploy for a service that does not exist; dropped"
        ),
        Outcome::Invalid(why) => warn!(
            id = %ev.id, service = %ev.service, reason = %why, "invalid deploy; dropped"
        ),
        Outcome::Refused(why) => warn!(
            id = %ev.id, service = %ev.service, reason = %why, "deploy event refused; nothing changed"
        ),
        Outcome::OtherInstance => info!(
            id = %ev.id, service = %ev.service, instance = ev.instance.as_deref().unwrap_or(""),
            "deploy for another installation; ignored"
        ),
        other => {
            info!(id = %ev.id, service = %ev.service, outcome = ?other, "deploy skipped")
        }
    }
}

/// Acks one event's message. A failed ack only means the event comes again, and is then
/// recognized as applied by its id.
async fn ack_logged(ack: Ack, ev: &DeployEvent) {
    if let Err(e) = ack.ack().await {
        warn!(id = %ev.id, service = %ev.service, error = %e, "cannot ack deploy event; it will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::deploy::DeploySource;
    use serde_json::json;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([3u8; 32], "test key");
        (Store::open(dir.path(), &key).await.unwrap(), dir)
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

    /// An event as anyone on the bus could make it: no installation, no signature.
    fn raw(service: &str, image: &str) -> DeployEvent {
        DeployEvent {
            id: IDS.lock().unwrap().generate().unwrap().to_string(),
            service: service.into(),
            image: image.into(),
            tag: None,
            digest: None,
            source: DeploySource::Webhook,
            time: chrono::Utc::now(),
            instance: None,
            signature: None,
        }
    }

    /// An event as the webhook bridge of `store`'s installation makes it.
    fn ev(store: &Store, service: &str, image: &str) -> DeployEvent {
        let mut e = raw(service, image);
        e.instance = Some(store.instance().to_string());
        resign(store, &mut e);
        e
    }

    /// Signs again after a test changed a field.
    fn resign(store: &Store, e: &mut DeployEvent) {
        store.deploy_key().sign(e);
    }

    fn get(store: &Store, name: &str) -> DynObject {
        store.get(Kind::Service, name).unwrap().unwrap()
    }

    #[tokio::test]
    async fn new_tag_changes_the_image_and_annotates_the_generation() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let e = ev(&store, "web", "team/app:2");
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

    /// A `forceUpdate` at its limit (or one stored beyond it by hand) refuses the redeploy with
    /// the field named; it neither panics the applier nor wraps the counter to 0.
    #[tokio::test]
    async fn a_force_update_counter_at_its_limit_refuses_the_redeploy() {
        let (store, _d) = store().await;
        for (name, n) in [
            ("at-max", json!(berth_api_types::service::MAX_FORCE_UPDATE)),
            ("beyond", json!(u64::MAX)),
        ] {
            let mut obj = create(&store, name, "team/app:1").await;
            // Written without validation, as an older version or a hand-edited store could have.
            obj.spec["forceUpdate"] = n.clone();
            store
                .write(vec![obj], WriteMode::Replace, None, false)
                .await
                .unwrap();
            let outcome = apply(&store, &ev(&store, name, "team/app:1"))
                .await
                .unwrap();
            assert!(
                matches!(&outcome, Outcome::Invalid(why) if why.contains("spec.forceUpdate") && why.contains("out of range")),
                "{name}: {outcome:?}"
            );
            assert_eq!(get(&store, name).spec["forceUpdate"], n, "nothing written");
        }
    }

    #[tokio::test]
    async fn same_tag_forces_an_update_once_per_event() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let e = ev(&store, "web", "team/app:1");
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
        let mut e2 = ev(&store, "web", "team/app:1");
        e2.source = DeploySource::Signed;
        resign(&store, &mut e2);
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
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let older = ev(&store, "web", "team/app:2");
        let newer = ev(&store, "web", "team/app:3");
        apply(&store, &newer).await.unwrap();
        assert_eq!(
            apply(&store, &older).await.unwrap(),
            Outcome::AlreadyApplied
        );
        assert_eq!(get(&store, "web").spec["image"], "team/app:3");
    }

    #[tokio::test]
    async fn pinned_digest_already_running_is_unchanged() {
        let (store, _d) = store().await;
        let pinned = format!("team/app:2@sha256:{}", "a".repeat(64));
        create(&store, "web", &pinned).await;
        let mut e = ev(&store, "web", &pinned);
        e.source = DeploySource::Registry;
        resign(&store, &mut e);
        assert_eq!(apply(&store, &e).await.unwrap(), Outcome::Unchanged);
        assert_eq!(get(&store, "web").metadata.generation, 1);
    }

    #[tokio::test]
    async fn missing_service_other_instance_and_bad_image_change_nothing() {
        let (store, _d) = store().await;
        assert_eq!(
            apply(&store, &ev(&store, "ghost", "team/app:2"))
                .await
                .unwrap(),
            Outcome::NoService
        );
        assert!(
            store.list(Kind::Service).unwrap().is_empty(),
            "nothing created"
        );
        create(&store, "web", "team/app:1").await;
        let mut e = ev(&store, "web", "team/app:2");
        e.instance = Some("another-installation".into());
        assert_eq!(apply(&store, &e).await.unwrap(), Outcome::OtherInstance);
        e.instance = Some(store.instance().to_string());
        resign(&store, &mut e);
        assert!(matches!(
            apply(&store, &e).await.unwrap(),
            Outcome::Applied { .. }
        ));
        let bad = ev(&store, "web", "Team/App:2");
        assert!(
            matches!(apply(&store, &bad).await.unwrap(), Outcome::Invalid(why) if why.contains("path component"))
        );
        assert_eq!(get(&store, "web").metadata.generation, 2);
    }

    #[test]
    fn bursts_coalesce_to_the_newest_per_service() {
        let mut events = Vec::new();
        for i in 0..50 {
            events.push((raw("web", &format!("team/app:{i}")), Ack::none()));
        }
        events.push((raw("api", "team/api:1"), Ack::none()));
        events.swap(0, 49);
        let out = coalesce(events);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.image, "team/app:49");
        assert_eq!(out[0].1.len(), 50, "the write acks every event it covers");
        assert_eq!(out[1].0.service, "api");
        assert_eq!(out[1].1.len(), 1);
    }

    /// Applies `e` and checks it was refused for `why` without touching the service.
    async fn assert_refused(store: &Store, e: &DeployEvent, why: fn(&Refusal) -> bool) {
        let before = get(store, &e.service);
        match apply(store, e).await.unwrap() {
            Outcome::Refused(r) => assert!(why(&r), "refused for another reason: {r}"),
            other => panic!("not refused: {other:?} for {e:?}"),
        }
        let after = get(store, &e.service);
        assert_eq!(after.spec, before.spec, "a refused event changed the spec");
        assert_eq!(
            after.metadata.resource_version,
            before.metadata.resource_version
        );
    }

    #[tokio::test]
    async fn unsigned_forged_or_unbound_events_are_refused() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let mut unsigned = ev(&store, "web", "team/app:2");
        unsigned.signature = None;
        assert_refused(&store, &unsigned, |r| *r == Refusal::MissingSignature).await;

        // Signed with another installation's key but stamped with ours.
        let mut forged = ev(&store, "web", "team/app:2");
        crate::crypto::MasterKey::from_bytes([4u8; 32], "other")
            .deploy_key()
            .sign(&mut forged);
        assert_refused(&store, &forged, |r| *r == Refusal::BadSignature).await;

        // A genuine event changed on the way: every field is covered by the signature.
        let genuine = ev(&store, "web", "team/app:2");
        let tamper: Vec<fn(&mut DeployEvent)> = vec![
            |e| e.id = ulid::Ulid::new().to_string(),
            |e| e.image = "team/app:666".into(),
            |e| e.tag = Some("666".into()),
            |e| e.digest = Some(format!("sha256:{}", "6".repeat(64))),
            |e| e.source = DeploySource::Registry,
            |e| e.time += chrono::Duration::seconds(1),
        ];
        for change in tamper {
            let mut e = genuine.clone();
            change(&mut e);
            assert_refused(&store, &e, |r| *r == Refusal::BadSignature).await;
        }
        // A genuine event of this installation for another service is signed for that service.
        create(&store, "api", "team/app:1").await;
        let mut moved = genuine.clone();
        moved.service = "api".into();
        assert_refused(&store, &moved, |r| *r == Refusal::BadSignature).await;

        let mut unbound = ev(&store, "web", "team/app:2");
        unbound.instance = None;
        resign(&store, &mut unbound);
        assert_refused(&store, &unbound, |r| *r == Refusal::MissingInstance).await;

        // Another installation's event stays its own outcome, and changes nothing either.
        let mut other = ev(&store, "web", "team/app:2");
        other.instance = Some("another-installation".into());
        assert_eq!(apply(&store, &other).await.unwrap(), Outcome::OtherInstance);

        assert!(matches!(
            apply(&store, &genuine).await.unwrap(),
            Outcome::Applied { generation: 2, .. }
        ));
    }

    fn id_at(t: chrono::DateTime<chrono::Utc>) -> String {
        ulid::Ulid::from_parts(t.timestamp_millis() as u64, rand::random::<u128>()).to_string()
    }

    #[tokio::test]
    async fn ids_from_the_future_are_refused_near_now_accepted() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let now = chrono::Utc::now();
        let mut far = ev(&store, "web", "team/app:2");
        far.id = id_at(now + chrono::Duration::days(365));
        resign(&store, &mut far);
        assert_refused(
            &store,
            &far,
            |r| matches!(r, Refusal::FutureId { ahead } if ahead.as_secs() > 300 * 86400),
        )
        .await;
        let mut just_over = ev(&store, "web", "team/app:2");
        just_over.id = id_at(now + chrono::Duration::seconds(75));
        resign(&store, &mut just_over);
        assert_refused(&store, &just_over, |r| {
            matches!(r, Refusal::FutureId { .. })
        })
        .await;
        let mut not_ulid = ev(&store, "web", "team/app:2");
        not_ulid.id = "zzzz".into();
        resign(&store, &mut not_ulid);
        assert_refused(&store, &not_ulid, |r| *r == Refusal::BadId).await;
        // A little clock skew between machines is fine.
        let mut near = ev(&store, "web", "team/app:2");
        near.id = id_at(now + chrono::Duration::seconds(20));
        resign(&store, &mut near);
        assert!(matches!(
            apply(&store, &near).await.unwrap(),
            Outcome::Applied { .. }
        ));
        assert_eq!(get(&store, "web").spec["image"], "team/app:2");
    }

    #[tokio::test]
    async fn only_tag_and_digest_change_through_the_bus() {
        let (store, _d) = store().await;
        create(&store, "web", "127.0.0.1:5000/team/app:1").await;
        for (image, what) in [
            ("127.0.0.1:5000/team/other:1", "repository"),
            ("127.0.0.1:5000/evil/app:1", "namespace"),
            ("evil.example:5000/team/app:1", "registry host"),
            ("127.0.0.1:5001/team/app:1", "registry port"),
            ("team/app:1", "default registry"),
        ] {
            let e = ev(&store, "web", image);
            assert_refused(&store, &e, |r| {
                matches!(r, Refusal::ForeignRepository { .. })
            })
            .await;
            let Outcome::Refused(r) = apply(&store, &e).await.unwrap() else {
                unreachable!()
            };
            assert!(
                r.to_string().contains("127.0.0.1:5000/team/app"),
                "{what}: {r}"
            );
        }
        let digest = format!("sha256:{}", "b".repeat(64));
        for image in [
            "127.0.0.1:5000/team/app:2".to_string(),
            format!("127.0.0.1:5000/team/app@{digest}"),
            format!("127.0.0.1:5000/team/app:3@{digest}"),
        ] {
            let e = ev(&store, "web", &image);
            assert!(
                matches!(apply(&store, &e).await.unwrap(), Outcome::Applied { .. }),
                "{image}"
            );
            assert_eq!(get(&store, "web").spec["image"], image.as_str());
        }
    }

    /// A deploy queue whose acks the test sees: events are fed in by hand, and each ack records
    /// the event id.
    struct Observed {
        feed: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<DeployMessage>>>,
    }

    struct RecordAck {
        id: String,
        acked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl berth_controllers::bus::Acker for RecordAck {
        async fn ack(self: Box<Self>) -> Result<(), String> {
            self.acked.lock().unwrap().push(self.id);
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl berth_controllers::bus::EventBus for Observed {
        async fn publish(
            &self,
            _: &berth_api_types::Event,
        ) -> Result<(), berth_controllers::bus::BusError> {
            Ok(())
        }
        async fn subscribe(
            &self,
            _: &[Kind],
            _: Option<&str>,
        ) -> Result<berth_controllers::bus::Subscription, berth_controllers::bus::BusError>
        {
            Ok(futures::stream::pending().boxed())
        }
        async fn publish_audit(
            &self,
            _: &str,
            _: &str,
            _: Vec<u8>,
        ) -> Result<(), berth_controllers::bus::BusError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "observed".into()
        }
    }

    #[async_trait::async_trait]
    impl DeployQueue for Observed {
        async fn publish_deploy(
            &self,
            _: &DeployEvent,
        ) -> Result<(), berth_controllers::bus::BusError> {
            unreachable!("the test feeds events itself")
        }
        async fn subscribe_deploys(
            &self,
            _: Option<&str>,
        ) -> Result<DeploySubscription, berth_controllers::bus::BusError> {
            let rx = self.feed.lock().unwrap().take().expect("subscribed once");
            Ok(tokio_stream_from(rx))
        }
    }

    fn tokio_stream_from(
        rx: tokio::sync::mpsc::UnboundedReceiver<DeployMessage>,
    ) -> DeploySubscription {
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
            .boxed()
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn events_are_acked_only_after_the_write_is_durable() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let bus: Arc<dyn DeployQueue> = Arc::new(Observed {
            feed: std::sync::Mutex::new(Some(rx)),
        });
        let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let send = |e: &DeployEvent| {
            let ack = Ack::new(RecordAck {
                id: e.id.clone(),
                acked: acked.clone(),
            });
            tx.send(DeployMessage::Deploy(e.clone(), ack)).unwrap();
        };
        let audit = Arc::new(crate::access::MemoryAudit::default());
        let task = tokio::spawn(start(store.clone(), bus, None, audit.clone()).await);

        // The disk fails: the deploy is retried and its message stays unacked (a crash now
        // would mean a redelivery, not a lost deploy).
        store
            .fail_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let genuine = ev(&store, "web", "team/app:2");
        send(&genuine);
        // Time enough for a wrong ack to happen (the applier retries after ~100 ms).
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(
            acked.lock().unwrap().is_empty(),
            "acked before the write succeeded"
        );
        assert_eq!(get(&store, "web").spec["image"], "team/app:1");

        store
            .fail_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        wait_for("the deploy is acked once written", || {
            acked.lock().unwrap().contains(&genuine.id)
        })
        .await;
        assert_eq!(get(&store, "web").spec["image"], "team/app:2");
        // On the audit trail once, when it was written, as the deploy channel it came through.
        {
            let log = audit.0.lock().unwrap();
            assert_eq!(log.len(), 1, "{log:?}");
            assert_eq!(
                (
                    log[0].action.as_str(),
                    log[0].name.as_deref(),
                    log[0].generation_after
                ),
                ("deploy", Some("web"), Some(2))
            );
            assert!(log[0].token_id.starts_with("deploy:"), "{:?}", log[0]);
        }

        // A refused event is acked (never redelivered forever) and changes nothing.
        let mut forged = raw("web", "evil/app:1");
        forged.instance = Some(store.instance().to_string());
        send(&forged);
        wait_for("the refused event is acked", || {
            acked.lock().unwrap().contains(&forged.id)
        })
        .await;
        assert_eq!(get(&store, "web").spec["image"], "team/app:2");

        // A batch coalesced into one write: every event of it is acked after that write.
        store
            .fail_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let burst: Vec<DeployEvent> = (3..8)
            .map(|i| ev(&store, "web", &format!("team/app:{i}")))
            .collect();
        for e in &burst {
            send(e);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            burst.iter().all(|e| !acked.lock().unwrap().contains(&e.id)),
            "an event of the batch was acked before its write"
        );
        store
            .fail_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        wait_for("every event of the burst is acked", || {
            let acked = acked.lock().unwrap();
            burst.iter().all(|e| acked.contains(&e.id))
        })
        .await;
        assert_eq!(get(&store, "web").spec["image"], "team/app:7");
        task.abort();
    }

    #[tokio::test]
    async fn applier_consumes_the_bus() {
        let (store, _d) = store().await;
        create(&store, "web", "team/app:1").await;
        let bus: Arc<dyn DeployQueue> = Arc::new(berth_controllers::bus::EmbeddedBus::new());
        // Subscribed once `start` returns: the very first event is not lost.
        let audit = Arc::new(crate::access::MemoryAudit::default());
        let task = tokio::spawn(start(store.clone(), bus.clone(), None, audit).await);
        bus.publish_deploy(&ev(&store, "web", "team/app:7"))
            .await
            .unwrap();
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
        let burst: Vec<DeployEvent> = (0..50).map(|_| ev(&store, "web", "team/app:7")).collect();
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
