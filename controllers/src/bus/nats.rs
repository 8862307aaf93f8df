//! The NATS JetStream event bus.
//!
//! Every event is stored in the `BERTH_EVENTS` stream, so a controller that was down catches up
//! through its durable consumer, and the same events are plain NATS messages on
//! `berth.events.<kind>.<name>` for outside tools. Publishing waits for the JetStream ack and
//! sets `Nats-Msg-Id` to the event id, so a publisher that retries after a lost ack does not
//! deliver the event twice.
//!
//! Deploy events travel the same way on their own stream, `BERTH_DEPLOYS` over
//! `berth.deploy.<service>`; the machinery below (durable consumers that re-open themselves, live
//! subscriptions that report gaps) is written once, generic over what a stream carries. One
//! difference: a durable consumer acks a resource event as it hands it over, but leaves a deploy
//! event's ack to the applier, which acks once the deploy is durably applied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use berth_api_types::deploy::DeployEvent;
use berth_api_types::names::subjects::{
    kind_events, AUDIT_ALL, AUDIT_PREFIX, AUDIT_STREAM, DEPLOY_ALL, DEPLOY_STREAM, EVENTS_ALL,
    EVENTS_STREAM,
};
use berth_api_types::{Event, Kind};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::watch;

use crate::runtime::backoff::{BackoffPolicy, Retry};

use super::{
    wants, Ack, Acker, BusError, BusMessage, DeployMessage, DeployQueue, DeploySubscription,
    EventBus, NatsSettings, RecentIds, Subscription,
};

/// How long events stay in the stream: long enough for a controller to be down over a weekend and
/// still catch up without a resync.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How long deploy events stay: they are commands, and a day-old deploy that was never applied is
/// better forgotten than replayed over whatever happened since.
const DEPLOY_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// JetStream deduplicates equal `Nats-Msg-Id`s within this window, which covers any publish retry.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);
/// How long a subscribe waits for the server to confirm it.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for a durable consumer's ack before it redelivers (NATS' own default).
/// Tests shorten it, so that a missing ack shows up as a redelivery within the test.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How many recent event ids a live subscription remembers to drop re-published events.
const LIVE_DEDUP_IDS: usize = 4096;
/// How long the server keeps a controller instance's own consumer that nobody reads from: long
/// enough to ride out a NATS restart or a network blip, short enough that a killed process's
/// consumer goes soon. Its successor starts a new consumer and resyncs anyway.
pub const OWN_CONSUMER_IDLE: Duration = Duration::from_secs(5 * 60);

/// A JetStream stream berth keeps, and how consumers of it start.
#[derive(Debug, Clone, Copy)]
struct StreamSpec {
    name: &'static str,
    /// The subject filter the stream captures (`<prefix>.>`).
    all: &'static str,
    max_age: Duration,
    description: &'static str,
    /// Where a durable consumer created for the first time starts: resource events are triggers,
    /// so reading history is harmless; deploy events are commands, so a new consumer must not
    /// replay old ones.
    first_deliver: consumer::DeliverPolicy,
    /// How long the server keeps a named durable consumer nobody reads from. Past the stream's
    /// max age it could only deliver what the stream no longer has, so that is the limit: an
    /// installation that is gone leaves no consumer behind for longer.
    durable_idle: Duration,
}

const EVENTS: StreamSpec = StreamSpec {
    name: EVENTS_STREAM,
    all: EVENTS_ALL,
    max_age: MAX_AGE,
    description: "berth resource events",
    first_deliver: consumer::DeliverPolicy::All,
    durable_idle: MAX_AGE,
};

const DEPLOYS: StreamSpec = StreamSpec {
    name: DEPLOY_STREAM,
    all: DEPLOY_ALL,
    max_age: DEPLOY_MAX_AGE,
    description: "berth deploy events",
    first_deliver: consumer::DeliverPolicy::New,
    durable_idle: DEPLOY_MAX_AGE,
};

/// How long audit records stay in their stream. The stream is the chain's copy outside the
/// store and the way a SIEM collects it; the complete trail stays in the store (`berth audit`).
/// Three months rides out a collector that was down for a long time without growing without
/// bound; an operator who wants another retention edits the stream, which berth then leaves as is.
const AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// Audit records (`berth.audit.<topic>`). Nothing in berth consumes them; the consumer settings
/// only complete the spec.
const AUDIT: StreamSpec = StreamSpec {
    name: AUDIT_STREAM,
    all: AUDIT_ALL,
    max_age: AUDIT_MAX_AGE,
    description: "berth audit records",
    first_deliver: consumer::DeliverPolicy::All,
    durable_idle: AUDIT_MAX_AGE,
};

/// What a stream carries: decoded from JSON, deduplicated by id.
trait Payload: serde::de::DeserializeOwned + Send + Sync + 'static {
    fn id(&self) -> &str;
    /// Whether a durable consumer leaves the ack to the subscriber (through the [`Ack`] it hands
    /// over) instead of acking on receipt: deploy events are commands that must survive a crash
    /// before they are applied; resource events are triggers that a resync replaces.
    const ACK_WHEN_HANDLED: bool = false;
}

impl Payload for Event {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Payload for DeployEvent {
    fn id(&self) -> &str {
        &self.id
    }
    const ACK_WHEN_HANDLED: bool = true;
}

/// One item of a generic subscription, before it becomes a `BusMessage` or `DeployMessage`; the
/// ack does nothing unless the payload is `ACK_WHEN_HANDLED` and came from a durable consumer.
enum Delivery<T> {
    Item(T, Ack),
    Lagged,
}

/// Acks one JetStream message when the subscriber says so.
struct JetStreamAck {
    msg: jetstream::Message,
}

#[async_trait::async_trait]
impl Acker for JetStreamAck {
    async fn ack(self: Box<Self>) -> Result<(), String> {
        self.msg.ack().await.map_err(|err| err.to_string())
    }
}

/// Which decoded items a subscriber wants (the client-side filter, see `wants`).
type Keep<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;

/// Event bus on a NATS server with JetStream enabled.
#[derive(Debug, Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The URL with any credentials masked, for logs and errors.
    url: String,
    /// Bumped after every event that may have cost core-NATS subscribers messages (a reconnect, or
    /// the client dropping messages for a slow subscriber), so their subscriptions yield `Lagged`.
    gaps: watch::Receiver<u64>,
    /// Ack wait of the durable consumers this bus creates (see `DEFAULT_ACK_WAIT`).
    ack_wait: Duration,
    /// Set once the audit stream is known to exist (see `publish_audit`); clones share it.
    audit_stream: Arc<tokio::sync::OnceCell<()>>,
}

impl NatsBus {
    /// Connects without credentials or TLS options (beyond what the URL says) and makes sure the
    /// streams exist; see [`NatsBus::connect_with`].
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        Self::connect_with(&NatsSettings::new(url)).await
    }

    /// Connects with berth's NATS settings (credentials, TLS) and makes sure the event stream
    /// exists. Fails at once when the server cannot be reached or refuses the credentials (a
    /// mistyped URL or password should stop startup with a clear error, not hang); once
    /// connected, the client reconnects forever.
    pub async fn connect_with(settings: &NatsSettings) -> Result<Self, BusError> {
        let shown = settings.shown_url();
        let (options, url) = settings.connect_options().await?;
        let (gap_tx, gaps) = watch::channel(0u64);
        let gap_tx = Arc::new(gap_tx);
        let disconnected = Arc::new(AtomicBool::new(false));
        let log_url = shown.clone();
        let client = options
            .name("berth")
            .event_callback(move |event| {
                let gap_tx = gap_tx.clone();
                let disconnected = disconnected.clone();
                let url = log_url.clone();
                async move { on_client_event(event, &gap_tx, &disconnected, &url) }
            })
            .connect(server_list(&url)?)
            .await
            .map_err(|err| BusError::Connect {
                url: shown.clone(),
                reason: connect_failure(&err, settings),
            })?;
        let js = jetstream::new(client.clone());
        for spec in [EVENTS, DEPLOYS] {
            ensure_stream(&js, &spec)
                .await
                .map_err(|reason| BusError::Stream {
                    stream: spec.name.to_string(),
                    url: shown.clone(),
                    reason,
                })?;
        }
        tracing::info!(url = %shown, stream = EVENTS_STREAM, "connected to NATS event bus");
        Ok(Self {
            client,
            js,
            url: shown,
            gaps,
            ack_wait: DEFAULT_ACK_WAIT,
            audit_stream: Arc::default(),
        })
    }

    /// The connection, for other users of the same NATS (the API server's store).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// The controllers' lease bucket on this server (see `bus::leases`).
    pub async fn leases(&self) -> Result<super::NatsLeases, BusError> {
        super::NatsLeases::open(&self.js)
            .await
            .map_err(|e| match e {
                BusError::Stream { stream, reason, .. } => BusError::Stream {
                    stream,
                    url: self.url.clone(),
                    reason,
                },
                other => other,
            })
    }

    /// The ack wait of durable consumers created from now on. An existing consumer keeps its own:
    /// the server decides, and changing it under a running consumer would be surprising.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    async fn subscribe_durable<T: Payload>(
        &self,
        spec: StreamSpec,
        mut filters: Vec<String>,
        keep: Keep<T>,
        durable: &str,
        idle: Duration,
    ) -> Result<BoxStream<'static, Delivery<T>>, BusError> {
        let name = sanitize_durable(durable);
        if name.is_empty() {
            return Err(BusError::Subscribe {
                target: format!("durable consumer `{durable}`"),
                reason: "the name has no letters, digits, `_` or `-`".to_string(),
            });
        }
        filters.sort();
        let opening = Opening {
            spec,
            name: name.clone(),
            filters,
            ack_wait: self.ack_wait,
            idle,
        };
        let consumer = open_consumer(&self.js, &opening, spec.first_deliver)
            .await
            .map_err(|reason| BusError::Subscribe {
                target: format!("durable consumer {name} on {}", self.url),
                reason,
            })?;
        let messages = consumer
            .messages()
            .await
            .map_err(|err| BusError::Subscribe {
                target: format!("durable consumer {name} on {}", self.url),
                reason: err.to_string(),
            })?;
        let state = Durable {
            js: self.js.clone(),
            opening,
            keep,
            messages: Some(messages),
            retry: BackoffPolicy::reconnect().retry(),
            resync_owed: false,
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            let msg = state.next().await;
            Some((msg, state))
        })
        .boxed())
    }

    async fn subscribe_live<T: Payload>(
        &self,
        subjects: Vec<String>,
        keep: Keep<T>,
    ) -> Result<BoxStream<'static, Delivery<T>>, BusError> {
        // Taken before subscribing so a gap that happens while we subscribe is not lost, and marked
        // seen so gaps from before this subscription existed do not trigger a pointless resync.
        let mut gaps = self.gaps.clone();
        gaps.borrow_and_update();
        let mut subscribers = Vec::with_capacity(subjects.len());
        for subject in &subjects {
            let sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|err| BusError::Subscribe {
                    target: format!("{subject} on {}", self.url),
                    reason: err.to_string(),
                })?;
            subscribers.push(sub);
        }
        // Without the round trip, an event published (by anyone) right after `subscribe` returns
        // could reach the server before the SUB does and be missed.
        round_trip(&self.client)
            .await
            .map_err(|reason| BusError::Subscribe {
                target: format!("{} on {}", subjects.join(", "), self.url),
                reason,
            })?;
        // Core NATS forwards a re-published event even though the stream discards it as a
        // duplicate, so live subscriptions deduplicate by id themselves.
        let mut recent = RecentIds::new(LIVE_DEDUP_IDS);
        let events = futures::stream::select_all(subscribers).filter_map(move |msg| {
            let item =
                parse::<T>(&msg.subject, &msg.payload).filter(|e| keep(e) && recent.insert(e.id()));
            futures::future::ready(item.map(|item| Delivery::Item(item, Ack::none())))
        });
        let lagged = futures::stream::unfold(gaps, |mut gaps| async move {
            gaps.changed().await.ok()?;
            Some((Delivery::Lagged, gaps))
        });
        Ok(futures::stream::select(events, lagged).boxed())
    }

    /// Publishes one JSON payload with `Nats-Msg-Id` and waits for the JetStream ack; counted per
    /// `stream` (the metric's label) and outcome.
    async fn publish_json(
        &self,
        stream: &'static str,
        subject: String,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        let published = self.publish_acked(subject, id, payload).await;
        crate::metrics::global().published(stream, published.is_ok());
        published
    }

    async fn publish_acked(
        &self,
        subject: String,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        let publish_error = |reason: String| BusError::Publish {
            id: id.to_string(),
            subject: subject.clone(),
            reason,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|err| publish_error(err.to_string()))?
            .await
            .map_err(|err| publish_error(err.to_string()))?;
        if ack.duplicate {
            tracing::debug!(%id, %subject, "event already in the stream; not stored");
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(|err| BusError::Encode {
            id: event.id.clone(),
            reason: err.to_string(),
        })?;
        self.publish_json("events", event.subject(), &event.id, payload)
            .await
    }

    async fn subscribe(
        &self,
        kinds: &[Kind],
        durable: Option<&str>,
    ) -> Result<Subscription, BusError> {
        let mut kinds = kinds.to_vec();
        kinds.sort();
        kinds.dedup();
        let filters = filters_for(&kinds);
        let keep: Keep<Event> = Arc::new(move |e: &Event| wants(&kinds, e));
        let items = match durable {
            Some(name) => {
                self.subscribe_durable(EVENTS, filters, keep, name, EVENTS.durable_idle)
                    .await?
            }
            None => self.subscribe_live(filters, keep).await?,
        };
        Ok(events_of(items))
    }

    async fn subscribe_own(&self, kinds: &[Kind], name: &str) -> Result<Subscription, BusError> {
        let mut kinds = kinds.to_vec();
        kinds.sort();
        kinds.dedup();
        let filters = filters_for(&kinds);
        let keep: Keep<Event> = Arc::new(move |e: &Event| wants(&kinds, e));
        // From now on: the instance resyncs as it starts, so history would only be replayed work.
        let spec = StreamSpec {
            first_deliver: consumer::DeliverPolicy::New,
            ..EVENTS
        };
        let items = self
            .subscribe_durable(spec, filters, keep, name, OWN_CONSUMER_IDLE)
            .await?;
        Ok(events_of(items))
    }

    async fn publish_audit(
        &self,
        subject: &str,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        let failed = |reason: String| BusError::Publish {
            id: id.to_string(),
            subject: subject.to_string(),
            reason,
        };
        // Only the audit subjects: this method must not become a way around `publish`'s typing.
        if !subject.starts_with(&format!("{AUDIT_PREFIX}.")) {
            return Err(failed(format!("not an audit subject (`{AUDIT_PREFIX}.*`)")));
        }
        // Created on first use rather than at connect: controllers share `connect_with` and
        // hold no permission on this stream. A failure is not remembered, so the next publish
        // (the audit publisher retries) tries again.
        self.audit_stream
            .get_or_try_init(|| async { ensure_stream(&self.js, &AUDIT).await.map(|_| ()) })
            .await
            .map_err(|reason| BusError::Stream {
                stream: AUDIT_STREAM.to_string(),
                url: self.url.clone(),
                reason,
            })?;
        self.publish_json("audit", subject.to_string(), id, payload)
            .await
    }

    async fn remove_consumer(&self, name: &str) -> Result<(), BusError> {
        let name = sanitize_durable(name);
        let failed = |reason: String| BusError::Subscribe {
            target: format!("durable consumer {name} on {}", self.url),
            reason,
        };
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match stream.delete_consumer(&name).await {
            Ok(_) => {
                tracing::debug!(consumer = %name, "durable consumer removed");
                Ok(())
            }
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[async_trait::async_trait]
impl DeployQueue for NatsBus {
    async fn publish_deploy(&self, event: &DeployEvent) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(|err| BusError::Encode {
            id: event.id.clone(),
            reason: err.to_string(),
        })?;
        self.publish_json("deploys", event.subject(), &event.id, payload)
            .await
    }

    async fn subscribe_deploys(
        &self,
        durable: Option<&str>,
    ) -> Result<DeploySubscription, BusError> {
        let filters = vec![DEPLOY_ALL.to_string()];
        let keep: Keep<DeployEvent> = Arc::new(|_: &DeployEvent| true);
        let items = match durable {
            Some(name) => {
                self.subscribe_durable(DEPLOYS, filters, keep, name, DEPLOYS.durable_idle)
                    .await?
            }
            None => self.subscribe_live(filters, keep).await?,
        };
        Ok(items
            .map(|d| match d {
                Delivery::Item(e, ack) => DeployMessage::Deploy(e, ack),
                Delivery::Lagged => DeployMessage::Lagged,
            })
            .boxed())
    }
}

fn events_of(items: BoxStream<'static, Delivery<Event>>) -> Subscription {
    items
        .map(|d| match d {
            Delivery::Item(e, _) => BusMessage::Event(e),
            Delivery::Lagged => BusMessage::Lagged,
        })
        .boxed()
}

/// Returns once the server has processed everything this client sent before. `flush` only
/// writes the socket; a message to our own inbox coming back proves the server got that far,
/// because it handles one connection's operations in order.
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(|err| err.to_string())?;
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .map_err(|err| err.to_string())?;
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("connection closed while subscribing".to_string()),
        Err(_) => Err(format!(
            "server did not confirm the subscription within {ROUND_TRIP_TIMEOUT:?}"
        )),
    }
}

fn on_client_event(
    event: async_nats::Event,
    gaps: &watch::Sender<u64>,
    disconnected: &AtomicBool,
    url: &str,
) {
    match event {
        async_nats::Event::Disconnected => {
            disconnected.store(true, Ordering::SeqCst);
            tracing::warn!(%url, "lost connection to NATS; reconnecting");
        }
        // `Connected` also fires for the very first connection, which is no gap.
        async_nats::Event::Connected => {
            if disconnected.swap(false, Ordering::SeqCst) {
                tracing::info!(%url, "reconnected to NATS; live subscribers will resync");
                gaps.send_modify(|n| *n += 1);
            }
        }
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!(%url, sid, "NATS client dropped messages for a slow subscriber");
            gaps.send_modify(|n| *n += 1);
        }
        // The server refused a publish or subscribe this user has no permission for. The
        // operation itself fails later (a JetStream request times out), so say why here.
        async_nats::Event::ServerError(async_nats::ServerError::Other(message))
            if message.to_lowercase().contains("permissions violation") =>
        {
            tracing::error!(
                %url,
                server_error = %message,
                "NATS refused an operation: this process's NATS user lacks a permission \
                 (see the permissions table in docs/security.md)"
            )
        }
        event @ (async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_)) => {
            tracing::warn!(%url, %event, "NATS connection error")
        }
        other => tracing::info!(%url, event = %other, "NATS connection event"),
    }
}

fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_string(),
        subjects: vec![spec.all.to_string()],
        storage: stream::StorageType::File,
        max_age: spec.max_age,
        duplicate_window: DUPLICATE_WINDOW,
        discard: stream::DiscardPolicy::Old,
        description: Some(spec.description.to_string()),
        ..Default::default()
    }
}

/// Creates the stream if missing. An existing stream is left as it is: an operator may have
/// tuned it (replicas, retention), and overwriting that on every start would be hostile.
async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<stream::Stream, String> {
    let wanted = stream_config(spec);
    let (stream_name, all) = (spec.name, spec.all);
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|err| err.to_string())?;
    let have = &stream.cached_info().config;
    if !have.subjects.iter().any(|s| s == all) {
        tracing::warn!(
            stream = stream_name,
            subjects = ?have.subjects,
            "existing stream does not capture {all}; publishing may fail"
        );
    } else if have.storage != wanted.storage
        || have.max_age != wanted.max_age
        || have.duplicate_window != wanted.duplicate_window
        || have.discard != wanted.discard
    {
        tracing::info!(
            stream = stream_name,
            storage = ?have.storage,
            max_age = ?have.max_age,
            duplicate_window = ?have.duplicate_window,
            discard = ?have.discard,
            "existing stream differs from berth's defaults; leaving it unchanged"
        );
    }
    Ok(stream)
}

/// NATS consumer names may not contain `.`, `*`, `>` or whitespace; anything outside
/// `[A-Za-z0-9_-]` becomes `_` so distinct names stay (mostly) distinct.
fn sanitize_durable(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.chars().all(|c| c == '_') {
        String::new()
    } else {
        cleaned
    }
}

fn filters_for(kinds: &[Kind]) -> Vec<String> {
    if kinds.is_empty() {
        vec![EVENTS_ALL.to_string()]
    } else {
        kinds.iter().map(|k| kind_events(*k)).collect()
    }
}

fn set_filters(config: &mut consumer::pull::Config, filters: &[String]) {
    if let [only] = filters {
        config.filter_subject = only.clone();
        config.filter_subjects = Vec::new();
    } else {
        config.filter_subject = String::new();
        config.filter_subjects = filters.to_vec();
    }
}

/// The subjects a consumer really filters on, as the server reports them.
fn server_filters(config: &consumer::Config) -> Vec<String> {
    let mut filters = config.filter_subjects.clone();
    if !config.filter_subject.is_empty() {
        filters.push(config.filter_subject.clone());
    }
    filters.sort();
    filters
}

/// What a durable consumer is opened (and re-opened) with.
struct Opening {
    spec: StreamSpec,
    /// The consumer's (sanitized) durable name.
    name: String,
    /// Sorted subject filters.
    filters: Vec<String>,
    ack_wait: Duration,
    /// The server removes the consumer after this long without a reader.
    idle: Duration,
}

/// Gets the durable consumer, creating it with `deliver` if missing. An existing consumer whose
/// filter no longer matches the requested filters is updated where the server allows it;
/// otherwise the client-side filter still keeps other kinds out, and a warning says which may be
/// missed.
async fn open_consumer(
    js: &jetstream::Context,
    opening: &Opening,
    deliver: consumer::DeliverPolicy,
) -> Result<consumer::PullConsumer, String> {
    let (spec, name) = (&opening.spec, opening.name.as_str());
    let stream = ensure_stream(js, spec).await?;
    let wanted_filters = opening.filters.clone();
    let mut config = consumer::pull::Config {
        durable_name: Some(name.to_string()),
        description: Some("berth event subscriber".to_string()),
        deliver_policy: deliver,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: opening.ack_wait,
        inactive_threshold: opening.idle,
        ..Default::default()
    };
    set_filters(&mut config, &wanted_filters);
    let mut consumer = stream
        .get_or_create_consumer(name, config)
        .await
        .map_err(|err| err.to_string())?;

    if server_filters(&consumer.cached_info().config) != wanted_filters {
        use consumer::FromConsumer as _;
        // Start from the server's config: the deliver policy of an existing consumer cannot change.
        let mut update =
            consumer::pull::Config::try_from_consumer_config(consumer.cached_info().config.clone())
                .map_err(|err| err.to_string())?;
        set_filters(&mut update, &wanted_filters);
        match stream.create_consumer(update).await {
            Ok(updated) => consumer = updated,
            Err(err) => {
                tracing::debug!(consumer = name, error = %err, "cannot update consumer filter")
            }
        }
    }

    let have = server_filters(&consumer.cached_info().config);
    if have != wanted_filters {
        let covered =
            |wanted: &String| have.is_empty() || have.iter().any(|f| f == wanted || f == spec.all);
        if wanted_filters.iter().all(covered) {
            // NATS before 2.10 ignores multiple filter subjects: correct, just more traffic.
            tracing::info!(
                consumer = name,
                server_filter = ?have,
                wanted = ?wanted_filters,
                "durable consumer filters more loosely than requested; filtering kinds here"
            );
        } else {
            tracing::warn!(
                consumer = name,
                server_filter = ?have,
                wanted = ?wanted_filters,
                "durable consumer has a narrower filter and could not be updated; events of the \
                 missing kinds will not arrive until the consumer is deleted"
            );
        }
    }
    Ok(consumer)
}

/// A durable subscription that survives consumer and connection trouble by re-opening itself.
struct Durable<T> {
    js: jetstream::Context,
    opening: Opening,
    keep: Keep<T>,
    messages: Option<consumer::pull::Stream>,
    /// Delays between attempts to re-open a broken subscription.
    retry: Retry,
    /// Set when the message stream broke. `Lagged` is only yielded once the consumer is open
    /// again: a resync done earlier could miss events published before the consumer was back.
    resync_owed: bool,
}

impl<T: Payload> Durable<T> {
    async fn next(&mut self) -> Delivery<T> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                self.retry.wait().await;
                // A consumer that vanished is re-created delivering only new events: the
                // `Lagged` that follows makes the subscriber resync, so replaying a week of
                // history would be waste.
                let reopened = match open_consumer(
                    &self.js,
                    &self.opening,
                    consumer::DeliverPolicy::New,
                )
                .await
                {
                    Ok(consumer) => consumer.messages().await.map_err(|err| err.to_string()),
                    Err(err) => Err(err),
                };
                match reopened {
                    Ok(messages) => {
                        tracing::info!(consumer = %self.opening.name, "durable subscription re-opened");
                        self.messages = Some(messages);
                        if std::mem::take(&mut self.resync_owed) {
                            return Delivery::Lagged;
                        }
                    }
                    Err(err) => tracing::warn!(
                        consumer = %self.opening.name,
                        error = %err,
                        attempts = self.retry.failures(),
                        "cannot re-open durable event subscription; retrying"
                    ),
                }
                continue;
            };
            match messages.next().await {
                Some(Ok(msg)) => {
                    self.retry.reset();
                    if let Some((item, ack)) = self.take(msg).await {
                        return Delivery::Item(item, ack);
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(consumer = %self.opening.name, error = %err, "durable subscription broke");
                    self.messages = None;
                    self.resync_owed = true;
                }
                None => {
                    tracing::warn!(consumer = %self.opening.name, "durable event subscription ended");
                    self.messages = None;
                    self.resync_owed = true;
                }
            }
        }
    }

    /// The item if the subscriber wants it, with its ack: a payload that is `ACK_WHEN_HANDLED`
    /// is acked by the subscriber; anything else is acked here. Messages that do not decode or
    /// that the subscriber does not want are acked too: redelivering them could never succeed.
    async fn take(&self, msg: jetstream::Message) -> Option<(T, Ack)> {
        let item = parse::<T>(&msg.subject, &msg.payload).filter(|e| (self.keep)(e));
        if T::ACK_WHEN_HANDLED && item.is_some() {
            return item.map(|item| (item, Ack::new(JetStreamAck { msg })));
        }
        if let Err(err) = msg.ack().await {
            // Only costs a redelivery after the ack wait; consumers are idempotent by event id.
            tracing::warn!(consumer = %self.opening.name, error = %err, "cannot ack event");
        }
        item.map(|item| (item, Ack::none()))
    }
}

/// Decodes a message, logging (without the payload, which could be anything) when it does not.
fn parse<T: Payload>(subject: &str, payload: &[u8]) -> Option<T> {
    match serde_json::from_slice::<T>(payload) {
        Ok(item) => Some(item),
        Err(err) => {
            tracing::warn!(
                %subject,
                bytes = payload.len(),
                error_kind = ?err.classify(),
                line = err.line(),
                column = err.column(),
                "skipping message that is not a berth event"
            );
            None
        }
    }
}

/// A connect failure in words an operator can act on. async-nats says "authorization
/// violation" or "TLS error" and little more; which option to check depends on what was given.
/// `nats://a:4222,nats://b:4222`: the servers of one cluster; the client connects to one and
/// moves to another when it is lost.
fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::Connect {
                    url: super::nats_options::redact_url(u),
                    reason: format!("not a NATS URL: {e}"),
                })
        })
        .collect()
}

fn connect_failure(err: &async_nats::ConnectError, settings: &NatsSettings) -> String {
    use async_nats::ConnectErrorKind as K;
    // A certificate the client rejects comes back as an IO error, not a TLS one.
    let tls = err.kind() == K::Tls || err.to_string().contains("certificate");
    let hint = match err.kind() {
        K::AuthorizationViolation | K::Authentication => {
            "; the server refused berth's credentials (check the user, password, token, \
             --nats-nkey or --nats-creds)"
        }
        _ if tls && settings.ca.is_none() => {
            "; a server whose certificate comes from a private CA needs --nats-ca"
        }
        _ if tls => {
            "; check --nats-ca (and --nats-tls-cert/--nats-tls-key if the server verifies \
             clients)"
        }
        _ => "",
    };
    format!("{err}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_durable_names_are_sanitized() {
        assert_eq!(
            sanitize_durable("service-controller_1"),
            "service-controller_1"
        );
        assert_eq!(sanitize_durable("berth.service>ctl"), "berth_service_ctl");
        assert_eq!(sanitize_durable("..."), "");
        assert_eq!(sanitize_durable(""), "");
    }

    #[test]
    fn bus_filters_one_subject_per_kind() {
        assert_eq!(filters_for(&[]), vec![EVENTS_ALL.to_string()]);
        assert_eq!(
            filters_for(&[Kind::Service, Kind::Node]),
            vec![kind_events(Kind::Service), kind_events(Kind::Node)]
        );
        let mut config = consumer::pull::Config::default();
        set_filters(&mut config, &filters_for(&[Kind::Service]));
        assert_eq!(config.filter_subject, kind_events(Kind::Service));
        assert!(config.filter_subjects.is_empty());
    }
}
