//! Drains the store's outbox onto the event bus, in commit order, at least once (NATS deduplicates
//! by event id). A bus that is down only delays events: they wait in the outbox, which is on disk.

use crate::store::Store;
use berth_controllers::bus::EventBus;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

pub async fn run(store: Store, bus: Arc<dyn EventBus>) {
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
