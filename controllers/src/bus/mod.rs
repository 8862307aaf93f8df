//! The event bus: how a change to an object reaches the controllers and outside tools.
//!
//! Two implementations sit behind one trait so the controllers never care which is in use:
//! [`EmbeddedBus`], an in-process broadcast channel for a single berth process with no extra
//! infrastructure, and [`NatsBus`], NATS JetStream, which keeps events for subscribers that were
//! down and lets outside tools follow `berth.events.<kind>.<name>`.
//!
//! Events are triggers, not state: they carry no spec or status, and controllers reconcile the
//! object's current state. So a subscriber that may have missed events is told so with
//! [`BusMessage::Lagged`] and simply resyncs, instead of the bus trying to guarantee delivery of
//! every single event.
//!
//! The bus also carries deploy events (`berth.deploy.<service>`, see `api_types::deploy`): the
//! webhook bridge publishes them and the API server's deploy applier consumes them. Unlike resource
//! events they are commands, so their consumers deduplicate by id and a new durable consumer starts
//! at the newest event rather than replaying old deploys.

mod embedded;
mod leases;
mod nats;
mod nats_options;

use std::sync::Arc;

use berth_api_types::deploy::DeployEvent;
use berth_api_types::{Event, Kind};

use crate::runtime::shares::Sharing;

pub use embedded::EmbeddedBus;
pub use leases::NatsLeases;
pub use nats::{NatsBus, DEFAULT_ACK_WAIT};
pub use nats_options::NatsSettings;

/// Where events are published and how controllers receive them.
#[async_trait::async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one event; returns once it is accepted durably (NATS: after the JetStream ack).
    /// Publishing the same event id twice must not deliver it twice (JetStream `Nats-Msg-Id`
    /// dedup).
    async fn publish(&self, event: &Event) -> Result<(), BusError>;

    /// Events of the given kinds (empty slice = all kinds).
    ///
    /// `durable`: a consumer name that survives restarts and resumes where it left off (NATS: a
    /// durable pull consumer, created if missing with deliver policy All, each message acked once
    /// it has been parsed, as it is handed to the subscriber). `None`: only events from now on.
    /// The embedded bus keeps nothing across subscriptions and ignores `durable`.
    async fn subscribe(
        &self,
        kinds: &[Kind],
        durable: Option<&str>,
    ) -> Result<Subscription, BusError>;

    /// Events of the given kinds for one process (a controller instance): every instance of a
    /// controller sees every event of its kind and keeps those of the partitions it owns.
    ///
    /// NATS: a durable consumer named `name`, created delivering only events from now on (the
    /// instance resyncs when it starts), kept across NATS restarts and reconnects, and removed by
    /// the server once nobody has read from it for a while, so a killed process leaves nothing
    /// behind. The embedded bus: a live subscription.
    async fn subscribe_own(&self, kinds: &[Kind], name: &str) -> Result<Subscription, BusError> {
        let _ = name;
        self.subscribe(kinds, None).await
    }

    /// Removes the durable consumer `name` if it exists (a clean stop; a consumer left by an
    /// earlier version). Nothing to do on the embedded bus.
    async fn remove_consumer(&self, name: &str) -> Result<(), BusError> {
        let _ = name;
        Ok(())
    }

    /// Publishes one audit record (`api_types::access::AuditRecord`, as the JSON the store keeps)
    /// on `subject` (under `berth.audit.`); like `publish`, returns once it is accepted durably,
    /// and the same `id` published twice is stored once. NATS: into the `BERTH_AUDIT` stream,
    /// created at the first call, so processes that never publish one (controllers) need no
    /// permission on it. The embedded bus has no reader outside the process: nothing to do.
    async fn publish_audit(
        &self,
        subject: &str,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError>;

    /// Human-readable description for logs (`embedded`, `nats://127.0.0.1:4222`); never contains
    /// credentials.
    fn describe(&self) -> String;
}

/// Deploy events (`berth.deploy.<service>`): the webhook bridge publishes them and the deploy
/// applier consumes them. Only those two take this trait; everything else sees only resource
/// events. A supertrait of `EventBus` because both ride the same connection and share its
/// description.
#[async_trait::async_trait]
pub trait DeployQueue: EventBus {
    /// Publishes one deploy event on `berth.deploy.<service>`; like `publish`, returns once it is
    /// accepted durably, and the same id published twice is delivered once.
    async fn publish_deploy(&self, event: &DeployEvent) -> Result<(), BusError>;

    /// Deploy events of every service. `durable` as for `subscribe`, except that a durable
    /// consumer created for the first time starts with new events (old deploys are not replayed),
    /// and that a message is acked only when the subscriber acks its [`Ack`]: not acked within
    /// the consumer's ack wait, it is delivered again.
    async fn subscribe_deploys(
        &self,
        durable: Option<&str>,
    ) -> Result<DeploySubscription, BusError>;
}

/// What a subscriber reads. The NATS subscriptions never end on their own; drop it to unsubscribe.
pub type Subscription = futures::stream::BoxStream<'static, BusMessage>;

#[derive(Debug, Clone)]
pub enum BusMessage {
    Event(Event),
    /// Some events were missed (embedded bus lagged, NATS consumer reset or reconnect gap): the
    /// subscriber must fall back to a full resync. Level-based controllers handle this cheaply.
    Lagged,
}

/// What a deploy subscriber reads.
pub type DeploySubscription = futures::stream::BoxStream<'static, DeployMessage>;

#[derive(Debug)]
pub enum DeployMessage {
    /// A deploy event and the handle that acknowledges it. The subscriber acks once the deploy is
    /// durably applied or deliberately dropped: an event whose handle is dropped unacked is
    /// delivered again (NATS, after the consumer's ack wait), so a crash between receiving a
    /// deploy and writing it does not lose it.
    Deploy(DeployEvent, Ack),
    /// Deploy events may have been missed (lagging, reconnect gap, consumer re-created). There is
    /// no state to resync from: a missed deploy has to be asked for again, so this is logged.
    Lagged,
}

/// Acknowledges one delivered deploy event. On NATS it acks the JetStream message; on the embedded
/// bus (which keeps nothing to redeliver) and for live subscriptions it does nothing.
pub struct Ack(Option<Box<dyn Acker>>);

/// What an [`Ack`] does; a trait so that tests can observe acknowledgements.
#[async_trait::async_trait]
pub trait Acker: Send + Sync + 'static {
    async fn ack(self: Box<Self>) -> Result<(), String>;
}

impl Ack {
    /// An acknowledgement with nothing to tell.
    pub fn none() -> Self {
        Ack(None)
    }

    pub fn new(acker: impl Acker) -> Self {
        Ack(Some(Box::new(acker)))
    }

    /// Acknowledges the event. A failure only costs a redelivery, which the applier recognizes by
    /// id; the error says why, for the log.
    pub async fn ack(self) -> Result<(), String> {
        match self.0 {
            Some(acker) => acker.ack().await,
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Ack" } else { "Ack(none)" })
    }
}

/// Bus failures. The messages name URLs, subjects and event ids but never carry an event payload,
/// so they are safe to log and to return from the API.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("JetStream stream {stream} on {url} is unavailable: {reason}")]
    Stream {
        stream: String,
        url: String,
        reason: String,
    },
    #[error("cannot encode event {id}: {reason}")]
    Encode { id: String, reason: String },
    #[error("publishing event {id} on {subject} failed: {reason}")]
    Publish {
        id: String,
        subject: String,
        reason: String,
    },
    #[error("subscribing to {target} failed: {reason}")]
    Subscribe { target: String, reason: String },
    /// A NATS option that cannot work (a missing or malformed file, conflicting credentials);
    /// found before connecting. `path` is empty when no file is involved.
    #[error("{option}{}: {reason}", if path.is_empty() { String::new() } else { format!(" {path}") })]
    Settings {
        option: &'static str,
        path: String,
        reason: String,
    },
}

/// One bus, seen through each of its traits: resource events for everyone, deploys for the few
/// that publish or apply them.
#[derive(Clone)]
pub struct Bus {
    pub events: Arc<dyn EventBus>,
    pub deploys: Arc<dyn DeployQueue>,
    /// How controller instances on this bus share their kinds' objects: leases in a JetStream KV
    /// bucket on NATS; one process owning everything on the embedded bus.
    pub sharing: Sharing,
    /// The NATS connection under the bus, when there is one: the API server's store on NATS
    /// (`--store nats`) shares it.
    pub nats: Option<async_nats::Client>,
}

impl Bus {
    fn of<B: DeployQueue>(bus: B, sharing: Sharing) -> Self {
        let bus = Arc::new(bus);
        Bus {
            events: bus.clone(),
            deploys: bus,
            sharing,
            nats: None,
        }
    }
}

/// The bus for this process: NATS when it is configured, otherwise the embedded one.
pub async fn connect(nats: Option<&NatsSettings>) -> Result<Bus, BusError> {
    match nats {
        None => Ok(Bus::of(EmbeddedBus::new(), Sharing::default())),
        Some(settings) => {
            let bus = NatsBus::connect_with(settings).await?;
            let leases = bus.leases().await?;
            let client = bus.client();
            Ok(Bus {
                nats: Some(client),
                ..Bus::of(bus, Sharing::Leased(Arc::new(leases)))
            })
        }
    }
}

/// Kind filtering on the event itself, applied by both buses even where the subject already
/// filters: a NATS server older than 2.10 ignores multiple filter subjects, and a durable
/// consumer created earlier may still carry a wider filter.
fn wants(kinds: &[Kind], event: &Event) -> bool {
    kinds.is_empty() || kinds.contains(&event.kind)
}

/// The ids of the most recent events, to drop a re-published event where JetStream's
/// `Nats-Msg-Id` dedup does not reach: the embedded bus, and core NATS subscribers (the server
/// forwards a duplicate to them even though the stream discards it). Bounded by count rather than
/// JetStream's time window; a retried publish follows the original closely.
#[derive(Debug)]
struct RecentIds {
    order: std::collections::VecDeque<String>,
    seen: std::collections::HashSet<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            order: std::collections::VecDeque::with_capacity(capacity),
            seen: std::collections::HashSet::with_capacity(capacity),
            capacity,
        }
    }

    /// Records the id; false if it was already among the recent ones.
    fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.order.push_back(id.to_string());
        self.seen.insert(id.to_string());
        true
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use berth_api_types::{Event, EventType, Kind};

    pub fn event(kind: Kind, name: &str, id: &str) -> Event {
        Event {
            id: id.to_string(),
            type_: EventType::Applied,
            kind,
            name: name.to_string(),
            uid: format!("uid-{name}"),
            generation: 1,
            resource_version: "1".to_string(),
            time: chrono::Utc::now(),
            message: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::event;
    use super::*;
    use futures::StreamExt;

    #[test]
    fn wants_filters_on_kind() {
        let svc = event(Kind::Service, "web", "1");
        assert!(wants(&[], &svc));
        assert!(wants(&[Kind::Node, Kind::Service], &svc));
        assert!(!wants(&[Kind::Node], &svc));
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut ids = RecentIds::new(2);
        assert!(ids.insert("a"));
        assert!(!ids.insert("a"));
        assert!(ids.insert("b"));
        assert!(ids.insert("c"));
        assert!(ids.insert("a"), "a was evicted by c");
        assert!(!ids.insert("c"));
    }

    #[tokio::test]
    async fn connect_without_url_is_embedded() {
        let bus = connect(None).await.unwrap().events;
        assert_eq!(bus.describe(), "embedded");
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        bus.publish(&event(Kind::Service, "web", "1"))
            .await
            .unwrap();
        assert!(matches!(sub.next().await, Some(BusMessage::Event(e)) if e.name == "web"));
    }

    #[tokio::test]
    async fn connect_to_unreachable_nats_fails_naming_the_url() {
        // Port 1 on loopback is never a NATS server; the connect must fail fast, not retry forever.
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connect(Some(&NatsSettings::new("nats://user:secret@127.0.0.1:1"))),
        )
        .await
        .expect("connect must not hang")
        .err()
        .expect("connect must fail");
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.1:1"), "{msg}");
        assert!(!msg.contains("secret"), "credentials leaked: {msg}");
    }
}
