//! The in-process event bus: a bounded broadcast channel for a single berth process that runs
//! without NATS. Nothing is persisted; a subscriber that falls too far behind is told it lagged
//! rather than slowing the publishers down.

use std::sync::{Arc, Mutex, PoisonError};

use berth_api_types::deploy::DeployEvent;
use berth_api_types::{Event, Kind};
use futures::StreamExt;
use tokio::sync::broadcast;

use super::{
    wants, Ack, BusError, BusMessage, DeployMessage, DeployQueue, DeploySubscription, EventBus,
    RecentIds, Subscription,
};

/// Events a subscriber may fall behind by before it lags. An apply of 10,000 objects publishes
/// 10,000 events at once, faster than a controller's intake takes them (at 4096 it lagged by
/// 3480 and had to resync); this holds three such bursts. Events carry no spec (about 300 bytes
/// each with their strings), so even a full channel is about 10 MB; an empty one about 1 MB.
const CAPACITY: usize = 32 * 1024;
/// Deploys are few (one per webhook call); a burst of them is coalesced by the applier anyway.
const DEPLOY_CAPACITY: usize = 4096;
/// Recent ids remembered to drop a re-published event: a retried publish follows the original
/// closely, so this need not cover the whole channel.
const DEDUP_IDS: usize = 4096;

/// In-process bus; clones share the same channel.
#[derive(Debug, Clone)]
pub struct EmbeddedBus {
    /// `Arc`ed so that the channel's preallocated slots are a pointer each, not a whole event:
    /// the channel is large (see `CAPACITY`) and should cost little while it is empty.
    tx: broadcast::Sender<Arc<Event>>,
    /// Ids already published, so a re-published event is dropped as JetStream would.
    published: Arc<Mutex<RecentIds>>,
    deploys: broadcast::Sender<DeployEvent>,
    deploys_published: Arc<Mutex<RecentIds>>,
}

impl EmbeddedBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        let (deploys, _) = broadcast::channel(DEPLOY_CAPACITY);
        Self {
            tx,
            published: Arc::new(Mutex::new(RecentIds::new(DEDUP_IDS))),
            deploys,
            deploys_published: Arc::new(Mutex::new(RecentIds::new(DEDUP_IDS))),
        }
    }
}

impl Default for EmbeddedBus {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl EventBus for EmbeddedBus {
    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        // Checked and sent under one lock so two racing publishes of one id cannot both pass.
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !published.insert(&event.id) {
            tracing::debug!(id = %event.id, "event already published; not sent twice");
            return Ok(());
        }
        // Sending fails only when nobody is subscribed, and then nobody can miss the event.
        let _ = self.tx.send(Arc::new(event.clone()));
        Ok(())
    }

    async fn subscribe(
        &self,
        kinds: &[Kind],
        _durable: Option<&str>,
    ) -> Result<Subscription, BusError> {
        let kinds = kinds.to_vec();
        let rx = self.tx.subscribe();
        let stream = futures::stream::unfold(rx, move |mut rx| {
            let kinds = kinds.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(event) if wants(&kinds, &event) => {
                            return Some((BusMessage::Event(Event::clone(&event)), rx))
                        }
                        Ok(_) => continue,
                        // The receiver has already skipped to the oldest retained event, so the
                        // stream can go on after telling the subscriber to resync.
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "embedded event bus subscriber lagged");
                            return Some((BusMessage::Lagged, rx));
                        }
                        // Every bus handle is gone: no event can ever arrive again.
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn publish_audit(&self, _: &str, _: &str, _: Vec<u8>) -> Result<(), BusError> {
        // Nobody outside this process can subscribe, and inside it the store holds the records.
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded".to_string()
    }
}

#[async_trait::async_trait]
impl DeployQueue for EmbeddedBus {
    async fn publish_deploy(&self, event: &DeployEvent) -> Result<(), BusError> {
        let mut published = self
            .deploys_published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if published.insert(&event.id) {
            let _ = self.deploys.send(event.clone());
        }
        Ok(())
    }

    async fn subscribe_deploys(
        &self,
        _durable: Option<&str>,
    ) -> Result<DeploySubscription, BusError> {
        let rx = self.deploys.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((DeployMessage::Deploy(event, Ack::none()), rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "embedded deploy subscriber lagged");
                    Some((DeployMessage::Lagged, rx))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(stream.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::event;
    use super::*;
    use std::time::Duration;

    async fn next(sub: &mut Subscription) -> BusMessage {
        tokio::time::timeout(Duration::from_secs(1), sub.next())
            .await
            .expect("no message within 1s")
            .expect("subscription ended")
    }

    async fn assert_idle(sub: &mut Subscription) {
        let got = tokio::time::timeout(Duration::from_millis(50), sub.next()).await;
        assert!(got.is_err(), "unexpected message: {got:?}");
    }

    fn name_of(msg: BusMessage) -> String {
        match msg {
            BusMessage::Event(e) => e.name,
            BusMessage::Lagged => panic!("unexpected Lagged"),
        }
    }

    #[tokio::test]
    async fn bus_filters_by_kind() {
        let bus = EmbeddedBus::new();
        let mut services = bus.subscribe(&[Kind::Service], None).await.unwrap();
        let mut nodes_and_ingresses = bus
            .subscribe(&[Kind::Node, Kind::Ingress], None)
            .await
            .unwrap();
        let mut all = bus.subscribe(&[], None).await.unwrap();

        bus.publish(&event(Kind::Node, "n1", "1")).await.unwrap();
        bus.publish(&event(Kind::Service, "web", "2"))
            .await
            .unwrap();
        bus.publish(&event(Kind::Ingress, "i1", "3")).await.unwrap();

        assert_eq!(name_of(next(&mut services).await), "web");
        assert_idle(&mut services).await;
        assert_eq!(name_of(next(&mut nodes_and_ingresses).await), "n1");
        assert_eq!(name_of(next(&mut nodes_and_ingresses).await), "i1");
        assert_idle(&mut nodes_and_ingresses).await;
        for expected in ["n1", "web", "i1"] {
            assert_eq!(name_of(next(&mut all).await), expected);
        }
    }

    #[tokio::test]
    async fn bus_subscribers_each_get_every_event_and_only_new_ones() {
        let bus = EmbeddedBus::new();
        bus.publish(&event(Kind::Service, "before", "0"))
            .await
            .unwrap();
        let mut a = bus.subscribe(&[], None).await.unwrap();
        // A clone is the same bus, so publishing through it reaches existing subscribers.
        let other = bus.clone();
        let mut b = other.subscribe(&[], Some("ignored")).await.unwrap();
        for i in 1..=3 {
            other
                .publish(&event(Kind::Service, &format!("s{i}"), &i.to_string()))
                .await
                .unwrap();
        }
        for sub in [&mut a, &mut b] {
            for i in 1..=3 {
                assert_eq!(name_of(next(sub).await), format!("s{i}"));
            }
            assert_idle(sub).await;
        }
    }

    #[tokio::test]
    async fn bus_lagging_subscriber_gets_lagged_then_continues() {
        let bus = EmbeddedBus::new();
        let mut slow = bus.subscribe(&[Kind::Service], None).await.unwrap();
        let total = CAPACITY + 10;
        for i in 0..total {
            bus.publish(&event(Kind::Service, &format!("s{i}"), &i.to_string()))
                .await
                .unwrap();
        }
        assert!(matches!(next(&mut slow).await, BusMessage::Lagged));
        // The oldest events were overwritten; the newest CAPACITY are still delivered in order.
        for i in (total - CAPACITY)..total {
            assert_eq!(name_of(next(&mut slow).await), format!("s{i}"));
        }
        assert_idle(&mut slow).await;
        bus.publish(&event(Kind::Service, "after", "x"))
            .await
            .unwrap();
        assert_eq!(name_of(next(&mut slow).await), "after");
    }

    #[tokio::test]
    async fn bus_holds_a_ten_thousand_object_apply_without_lagging() {
        let bus = EmbeddedBus::new();
        // Subscribed, but reading nothing until the whole burst is published: the worst case of
        // a controller busy while `berth apply` commits 10,000 objects.
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        for i in 0..10_000 {
            bus.publish(&event(Kind::Config, &format!("c{i}"), &i.to_string()))
                .await
                .unwrap();
        }
        for i in 0..10_000 {
            match next(&mut sub).await {
                BusMessage::Event(e) => assert_eq!(e.name, format!("c{i}")),
                BusMessage::Lagged => panic!("lagged after {i} of 10,000 events"),
            }
        }
        assert_idle(&mut sub).await;
    }

    #[tokio::test]
    async fn bus_drops_a_republished_event() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        let e = event(Kind::Service, "web", "same-id");
        bus.publish(&e).await.unwrap();
        bus.clone().publish(&e).await.unwrap();
        bus.publish(&event(Kind::Service, "next", "other-id"))
            .await
            .unwrap();
        assert_eq!(name_of(next(&mut sub).await), "web");
        assert_eq!(name_of(next(&mut sub).await), "next");
        assert_idle(&mut sub).await;
    }

    fn deploy(service: &str, id: &str) -> DeployEvent {
        DeployEvent {
            id: id.to_string(),
            service: service.to_string(),
            image: "team/app:2".to_string(),
            tag: Some("2".to_string()),
            digest: None,
            source: berth_api_types::deploy::DeploySource::Webhook,
            time: chrono::Utc::now(),
            instance: None,
            signature: None,
        }
    }

    #[tokio::test]
    async fn bus_deploys_travel_apart_from_resource_events_once_per_id() {
        let bus = EmbeddedBus::new();
        let mut events = bus.subscribe(&[], None).await.unwrap();
        let mut deploys = bus.subscribe_deploys(Some("ignored")).await.unwrap();
        bus.publish_deploy(&deploy("web", "d1")).await.unwrap();
        bus.clone()
            .publish_deploy(&deploy("web", "d1"))
            .await
            .unwrap();
        bus.publish_deploy(&deploy("api", "d2")).await.unwrap();
        let got = |m: Option<DeployMessage>| match m {
            Some(DeployMessage::Deploy(d, _)) => (d.service, d.id),
            other => panic!("unexpected {other:?}"),
        };
        let next_deploy = async |s: &mut DeploySubscription| {
            tokio::time::timeout(Duration::from_secs(1), s.next())
                .await
                .expect("no deploy within 1s")
        };
        assert_eq!(
            got(next_deploy(&mut deploys).await),
            ("web".into(), "d1".into())
        );
        assert_eq!(
            got(next_deploy(&mut deploys).await),
            ("api".into(), "d2".into())
        );
        let idle = tokio::time::timeout(Duration::from_millis(50), deploys.next()).await;
        assert!(idle.is_err(), "a re-published deploy was delivered twice");
        assert_idle(&mut events).await;
    }

    #[tokio::test]
    async fn bus_subscription_ends_when_every_handle_is_dropped() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        drop(bus);
        let end = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
        assert!(matches!(end, Ok(None)));
    }
}
