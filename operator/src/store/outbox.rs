//! The outbox: every commit also records its events here, in the same transaction, and the
//! publisher drains them onto the event bus in commit order, at least once (NATS deduplicates by
//! event id). A crash between commit and publish, or a bus that is down, only delays an event: it
//! waits in the outbox, which is on disk. The event history (`berth events`) is trimmed here too.

use super::{Store, StoreError};
use berth_api_types::Event;
use berth_controllers::bus::EventBus;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Events kept for `berth events` and `describe`; older ones are trimmed.
const EVENT_HISTORY: usize = 5000;

impl Store {
    /// The oldest unpublished events, in commit order.
    pub(super) fn outbox_batch(&self, max: usize) -> Result<Vec<(sled::IVec, Event)>, StoreError> {
        let mut out = Vec::new();
        for item in self.outbox.iter().take(max) {
            let (k, v) = item?;
            match serde_json::from_slice::<Event>(&v) {
                Ok(e) => out.push((k, e)),
                Err(_) => {
                    // Unreadable entries would block the outbox forever.
                    self.outbox.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    fn outbox_done(&self, key: &sled::IVec) -> Result<(), StoreError> {
        self.outbox.remove(key)?;
        Ok(())
    }

    /// Keeps the event history bounded.
    fn trim_events(&self) -> Result<(), StoreError> {
        let excess = self.events.len().saturating_sub(EVENT_HISTORY);
        for k in self.events.iter().keys().take(excess) {
            self.events.remove(k?)?;
        }
        Ok(())
    }
}

/// Drains the outbox onto `bus` for as long as the process runs.
pub async fn publish(store: Store, bus: Arc<dyn EventBus>) {
    let mut retry = Duration::from_millis(100);
    loop {
        let batch = match store.outbox_batch(512) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if batch.is_empty() {
            if let Err(e) = store.trim_events() {
                warn!(error = %e, "cannot trim event history");
            }
            // Woken by every commit; the timeout is a safety net, not the mechanism.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), store.outbox_ready.notified()).await;
            continue;
        }
        let mut failed = false;
        for (key, event) in batch {
            match bus.publish(&event).await {
                Ok(()) => {
                    retry = Duration::from_millis(100);
                    if let Err(e) = store.outbox_done(&key) {
                        warn!(error = %e, "cannot clear a published event from the outbox");
                    }
                }
                Err(e) => {
                    warn!(error = %e, bus = %bus.describe(), retry_in = ?retry, "cannot publish event; will retry");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(Duration::from_secs(10));
        }
    }
}
