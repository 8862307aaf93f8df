//! The controllers' leases on NATS: the JetStream KV bucket `BERTH_CONTROLLERS`, whose max age is
//! the lease time (NATS 2.9 has no per-key TTL). A lease is created with "expected last subject
//! sequence 0" and renewed with the revision it was written at, so the server, not berth, decides
//! who holds it; an entry nobody rewrites is removed by the server, so dead instances and
//! installations leave nothing behind. One bucket for every installation on the server: keys
//! carry the installation (`api_types::names::subjects::lease_key`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use berth_api_types::names::subjects::CONTROLLERS_BUCKET;
use futures::StreamExt;

use crate::runtime::shares::{LeaseError, LeaseStore, LEASE_TIME};

use super::BusError;

/// How long listing the bucket may take before it counts as failed.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsLeases {
    kv: kv::Store,
    client: async_nats::Client,
}

impl std::fmt::Debug for NatsLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLeases")
            .field("bucket", &self.kv.name)
            .finish()
    }
}

impl NatsLeases {
    /// Opens the bucket, creating it when missing. An existing bucket with another max age is
    /// used as it is, with a warning: every installation on the server shares it, and leases then
    /// live as long as that bucket says.
    pub async fn open(js: &jetstream::Context) -> Result<NatsLeases, BusError> {
        let failed = |reason: String| BusError::Stream {
            stream: format!("KV_{CONTROLLERS_BUCKET}"),
            url: String::new(),
            reason,
        };
        let kv = match js.get_key_value(CONTROLLERS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's stream, made as `create_key_value` would make it: that call first
                // asks for the account's info, which this client cannot parse from NATS 2.9.
                let config = stream::Config {
                    name: format!("KV_{CONTROLLERS_BUCKET}"),
                    description: Some("berth controller leases and instances".to_string()),
                    subjects: vec![format!("$KV.{CONTROLLERS_BUCKET}.>")],
                    max_messages_per_subject: 1,
                    max_age: LEASE_TIME,
                    // Within the max age, or the server refuses the stream.
                    duplicate_window: LEASE_TIME,
                    storage: stream::StorageType::File,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                };
                if let Err(create) = js.get_or_create_stream(config).await {
                    return Err(failed(create.to_string()));
                }
                js.get_key_value(CONTROLLERS_BUCKET)
                    .await
                    .map_err(|e| failed(e.to_string()))?
            }
        };
        let mut stream = kv.stream.clone();
        if let Ok(info) = stream.info().await {
            if info.config.max_age != LEASE_TIME {
                tracing::warn!(
                    bucket = CONTROLLERS_BUCKET,
                    max_age = ?info.config.max_age,
                    wanted = ?LEASE_TIME,
                    "the lease bucket has another max age; failover takes as long as it says"
                );
            }
        }
        Ok(NatsLeases {
            kv,
            client: js.client(),
        })
    }
}

fn err(e: impl std::fmt::Display) -> LeaseError {
    LeaseError(e.to_string())
}

#[async_trait]
impl LeaseStore for NatsLeases {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, LeaseError> {
        match self.kv.create(key, value.into()).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    async fn renew(
        &self,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Option<u64>, LeaseError> {
        match self.kv.update(key, value.into(), revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    async fn release(&self, key: &str, revision: u64) -> Result<(), LeaseError> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(err)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), LeaseError> {
        self.kv
            .put(key, value.into())
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn remove(&self, key: &str) -> Result<(), LeaseError> {
        self.kv.delete(key).await.map_err(err)
    }

    /// The newest entry of every key under `prefix`, delete markers left out: an ordered consumer
    /// over just those subjects (the bucket holds every installation's keys, so listing all of
    /// them would grow with the number of installations on the server).
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError> {
        let consumer = self
            .kv
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{}{prefix}>", self.kv.prefix),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(err)?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(err)?;
        let read = async {
            while let Some(msg) = messages.next().await {
                let msg = msg.map_err(err)?;
                let info = msg.info().map_err(err)?;
                let pending = info.pending;
                let deleted = msg.headers.as_ref().is_some_and(|h| {
                    h.get("KV-Operation")
                        .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE")
                });
                if !deleted {
                    if let Some(key) = msg.subject.strip_prefix(self.kv.prefix.as_str()) {
                        out.push((key.to_string(), msg.payload.to_vec()));
                    }
                }
                if pending == 0 {
                    break;
                }
            }
            Ok::<_, LeaseError>(())
        };
        tokio::time::timeout(LIST_TIMEOUT, read)
            .await
            .map_err(|_| LeaseError(format!("listing {prefix}* took over {LIST_TIMEOUT:?}")))??;
        Ok(out)
    }
}
