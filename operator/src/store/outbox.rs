//! The outbox: every commit also records its events here, in the same transaction, and the
//! publisher drains them onto the event bus in commit order, at least once (NATS deduplicates by
//! event id). A crash between commit and publish, or a bus that is down, only delays an event: it
//! waits in the outbox, which is on disk. The event history (`berth events`) is trimmed here too.

use super::{Store, StoreError};
use berth_api_types::Event;
use berth_controllers::bus::EventBus;
use berth_controllers::runtime::backoff::BackoffPolicy;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Events kept for `berth events` and `describe`; older ones are trimmed.
const EVENT_HISTORY: usize = 5000;

impl Store {
    /// The oldest unpublished events, in commit order.
    pub(super) async fn outbox_batch(
        &self,
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Event)>, StoreError> {
        // After a failed flush an entry may be of a write that is not on disk: publish nothing.
        self.healthy()?;
        let mut out = Vec::new();
        for item in self.outbox.iter().take(max) {
            let (k, v) = item?;
            match serde_json::from_slice::<Event>(&v) {
                Ok(e) => out.push((k, e)),
                Err(_) => {
                    // Unreadable entries would block the outbox forever.
                    self.outbox.remove(&k).await?;
                }
            }
        }
        Ok(out)
    }

    /// Clears published events, in one commit.
    async fn outbox_done(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.db
            .transact(&[&self.outbox], |t| {
                for k in keys {
                    t[0].remove(k)?;
                }
                Ok(())
            })
            .await
    }

    /// Keeps the event history bounded, in one commit.
    async fn trim_events(&self) -> Result<(), StoreError> {
        let excess = self.events.len().saturating_sub(EVENT_HISTORY);
        if excess == 0 {
            return Ok(());
        }
        let old: Vec<Vec<u8>> = self
            .events
            .iter()
            .take(excess)
            .map(|item| item.map(|(k, _)| k))
            .collect::<Result<_, _>>()?;
        self.db
            .transact(&[&self.events], |t| {
                for k in &old {
                    t[0].remove(k)?;
                }
                Ok(())
            })
            .await
    }
}

/// Drains the outbox onto `bus` for as long as the process runs.
pub async fn publish(store: Store, bus: Arc<dyn EventBus>) {
    // One sequence for reading the outbox and publishing: both mean "try the same batch again".
    let mut retry = BackoffPolicy::reconnect().retry();
    loop {
        let batch = match store.outbox_batch(512).await {
            Ok(b) => b,
            Err(e) => {
                let delay = retry.next_delay();
                warn!(error = %e, retry_in = ?delay, "cannot read the outbox");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if batch.is_empty() {
            if let Err(e) = store.trim_events().await {
                warn!(error = %e, "cannot trim event history");
            }
            // Woken by every commit; the timeout is a safety net, not the mechanism.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), store.outbox_ready.notified()).await;
            continue;
        }
        let mut published = Vec::with_capacity(batch.len());
        let mut failed = None;
        for (key, event) in batch {
            match bus.publish(&event).await {
                Ok(()) => {
                    retry.reset();
                    published.push(key);
                }
                Err(e) => {
                    // The rest of the batch waits: events go out in commit order.
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = store.outbox_done(&published).await {
            warn!(error = %e, "cannot clear published events from the outbox");
        }
        if let Some(e) = failed {
            let delay = retry.next_delay();
            warn!(error = %e, bus = %bus.describe(), retry_in = ?delay, "cannot publish event; will retry");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::store::WriteMode;
    use berth_api_types::Kind;
    use berth_controllers::bus::{BusError, BusMessage, EmbeddedBus, Subscription};
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The names of the next `n` events on `sub`, within a deadline.
    async fn names(sub: &mut Subscription, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("the event never arrived")
                .expect("subscription ended");
            match msg {
                BusMessage::Event(e) => out.push(e.name),
                BusMessage::Lagged => panic!("lagged"),
            }
        }
        out
    }

    #[tokio::test]
    async fn an_event_survives_a_crash_between_commit_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), &test_key()).await.unwrap();
            s.write(
                vec![svc("a", 1), svc("b", 1)],
                WriteMode::Create,
                None,
                false,
            )
            .await
            .unwrap();
            // The process dies here: committed, acknowledged, never published.
        }
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        assert_eq!(
            outbox_types(&s)
                .await
                .into_iter()
                .map(|(_, name, _)| name)
                .collect::<Vec<_>>(),
            ["a", "b"],
            "the outbox kept the events across the restart"
        );
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        let publisher = tokio::spawn(publish(s.clone(), Arc::new(bus)));
        assert_eq!(names(&mut sub, 2).await, ["a", "b"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !outbox_types(&s).await.is_empty() {
            assert!(std::time::Instant::now() < deadline, "outbox not cleared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publisher.abort();
    }

    /// A bus that refuses the first `outage` publishes, then works.
    struct Flaky {
        inner: EmbeddedBus,
        outage: usize,
        attempts: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl EventBus for Flaky {
        async fn publish(&self, event: &Event) -> Result<(), BusError> {
            if self.attempts.fetch_add(1, Ordering::SeqCst) < self.outage {
                return Err(BusError::Publish {
                    id: event.id.clone(),
                    subject: "test".into(),
                    reason: "bus down".into(),
                });
            }
            self.inner.publish(event).await
        }

        async fn subscribe(
            &self,
            kinds: &[Kind],
            durable: Option<&str>,
        ) -> Result<Subscription, BusError> {
            self.inner.subscribe(kinds, durable).await
        }

        async fn publish_audit(
            &self,
            subject: &str,
            id: &str,
            payload: Vec<u8>,
        ) -> Result<(), BusError> {
            self.inner.publish_audit(subject, id, payload).await
        }

        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[tokio::test]
    async fn a_bus_outage_only_delays_events_which_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &test_key()).await.unwrap();
        let bus = Arc::new(Flaky {
            inner: EmbeddedBus::new(),
            outage: 3,
            attempts: AtomicUsize::new(0),
        });
        let mut sub = bus.subscribe(&[], None).await.unwrap();
        let publisher = tokio::spawn(publish(s.clone(), bus.clone()));
        for name in ["first", "second", "third"] {
            s.write(vec![svc(name, 1)], WriteMode::Create, None, false)
                .await
                .unwrap();
        }
        assert_eq!(names(&mut sub, 3).await, ["first", "second", "third"]);
        assert!(
            bus.attempts.load(Ordering::SeqCst) >= 3 + 3,
            "the outage was tried through"
        );
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(extra.is_err(), "an event was delivered twice: {extra:?}");
        publisher.abort();
    }
}
