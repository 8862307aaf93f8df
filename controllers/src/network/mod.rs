//! The Network controller: keeps one Swarm-scoped overlay network per Network object, named like the
//! object, labelled as berth's and encrypted unless the spec opts out, and reports it as status. The
//! reconcile is a pipeline of small steps — dereference, validate, build (pure, `build.rs`), apply,
//! update status (pure, `status.rs`).
//!
//! Swarm networks cannot be updated. A changed spec means remove and re-create, which berth does only
//! while no service or container uses the network; otherwise it says so in status (Degraded, `InUse`)
//! and waits for the next engine event or resync. A network of that name berth does not own is never
//! touched (Degraded, `Refused`).

pub mod build;
pub mod status;

use crate::api::{ClientError, ResourceStore};
use crate::engine::status_code;
use crate::runtime::{Action, Reconciler};
use async_trait::async_trait;
use berth_api_types::network::{validate_network, Network};
use berth_api_types::typed::recheck;
use berth_api_types::Kind;
use bollard::errors::Error as DockerError;
use bollard::models::{EventMessage, EventMessageTypeEnum, Network as SwarmNetwork};
use bollard::query_parameters::{InspectNetworkOptions, ListNetworksOptions, ListServicesOptions};
use bollard::Docker;
use build::Owner;
use status::{reasons, NetworkStatus};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a create waits for Swarm's allocator before answering (it normally takes milliseconds).
const ALLOCATION_WAIT: Duration = Duration::from_secs(5);
/// How soon a network still being allocated is looked at again.
const ALLOCATION_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("berth API: {0}")]
    Api(#[from] ClientError),
    #[error("Swarm engine: {0}")]
    Engine(#[from] DockerError),
    /// The object is gone but its network cannot be removed yet; retried with backoff.
    #[error("network `{name}` is still in use by {}; removing it once nothing uses it", users.join(", "))]
    InUse { name: String, users: Vec<String> },
    #[error("network `{0}` vanished right after it was created")]
    Vanished(String),
}

pub struct NetworkController {
    docker: Docker,
    store: Arc<dyn ResourceStore>,
    instance: String,
}

impl NetworkController {
    /// `instance`: the installation id (`ResourceStore::instance`) stamped on every network.
    pub fn new(docker: Docker, store: Arc<dyn ResourceStore>, instance: String) -> Self {
        NetworkController {
            docker,
            store,
            instance,
        }
    }

    /// Every network named exactly `name`, whoever owns it and whatever its scope. The engine's `name`
    /// filter matches substrings, hence the exact comparison.
    async fn named(&self, name: &str) -> Result<Vec<SwarmNetwork>, DockerError> {
        Ok(self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(HashMap::from([(
                    "name".to_string(),
                    vec![name.to_string()],
                )])),
            }))
            .await?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .collect())
    }

    /// What still uses the network: services whose tasks join it, and containers attached to it on
    /// this node (other than those services' own tasks and the per-node load balancer endpoint).
    async fn users(&self, net: &SwarmNetwork) -> Result<Vec<String>, DockerError> {
        let id = net.id.as_deref().unwrap_or_default();
        let name = net.name.as_deref().unwrap_or_default();
        let services = self
            .docker
            .list_services(None::<ListServicesOptions>)
            .await?;
        let services = build::services_using(id, name, &services);
        let containers = match self
            .docker
            .inspect_network(id, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) => n.containers.unwrap_or_default(),
            Err(e) if status_code(&e) == Some(404) => HashMap::new(),
            Err(e) => return Err(e),
        };
        let mut containers: Vec<String> = containers
            .into_iter()
            .filter(|(key, _)| !key.starts_with("lb-"))
            .map(|(key, ep)| ep.name.unwrap_or(key))
            .filter(|c| !services.iter().any(|s| c.starts_with(&format!("{s}."))))
            .collect();
        containers.sort();
        Ok(services
            .into_iter()
            .map(|s| format!("service {s}"))
            .chain(containers.into_iter().map(|c| format!("container {c}")))
            .collect())
    }

    async fn exists(&self, id: &str) -> Result<bool, DockerError> {
        match self
            .docker
            .inspect_network(id, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status_code(&e) == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the network; gone already is success. (Engine 20.10 answers 500, not 404, for a Swarm
    /// network removed meanwhile, so a failure is checked against whether the network still exists.)
    async fn remove(&self, net: &SwarmNetwork) -> Result<(), DockerError> {
        let id = net.id.as_deref().unwrap_or_default();
        match self.docker.remove_network(id).await {
            Ok(()) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => {
                if self.exists(id).await? {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Creates the network. `Ok(Err(message))`: the engine refused the request for good.
    async fn create(
        &self,
        name: &str,
        built: &build::Built,
    ) -> Result<Result<SwarmNetwork, String>, NetworkError> {
        let id = match self.docker.create_network(built.request.clone()).await {
            Ok(created) => created.id,
            Err(e) if status_code(&e) == Some(400) => {
                return Ok(Err(crate::engine::refusal("network", &e)))
            }
            // 409 included: someone created the name meanwhile; the next attempt sees who.
            Err(e) => return Err(e.into()),
        };
        info!(%id, hash = %built.hash, "created Swarm network");
        // The engine reports driver and options only once Swarm has allocated the network.
        let deadline = tokio::time::Instant::now() + ALLOCATION_WAIT;
        loop {
            let now = self
                .named(name)
                .await?
                .into_iter()
                .find(|n| n.id.as_deref() == Some(id.as_str()))
                .ok_or_else(|| NetworkError::Vanished(name.to_string()))?;
            if build::allocated(&now) || tokio::time::Instant::now() >= deadline {
                return Ok(Ok(now));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn write_status(
        &self,
        name: &str,
        current: &NetworkStatus,
        new: NetworkStatus,
    ) -> Result<(), NetworkError> {
        // The runtime will write status; until then, written here unless unchanged. An object
        // deleted meanwhile is not an error: its delete event brings the controller back.
        if new == *current {
            return Ok(());
        }
        let value = serde_json::to_value(&new).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self
            .store
            .update_status(Kind::Network, name, value, None)
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Reconciler for NetworkController {
    type Error = NetworkError;

    fn kind(&self) -> Kind {
        Kind::Network
    }

    async fn reconcile(&self, name: &str) -> Result<Action, NetworkError> {
        // Dereference.
        let object = self.store.get(Kind::Network, name).await?;
        let (owned, foreign): (Vec<SwarmNetwork>, Vec<SwarmNetwork>) = self
            .named(name)
            .await?
            .into_iter()
            .partition(|n| build::owner(n, &self.instance, name) == Owner::Us);

        let Some(object) = object else {
            for net in &owned {
                let users = self.users(net).await?;
                if !users.is_empty() {
                    return Err(NetworkError::InUse {
                        name: name.to_string(),
                        users,
                    });
                }
                info!(id = ?net.id, "object gone: removing its Swarm network");
                self.remove(net).await?;
            }
            return Ok(Action::await_change());
        };
        let generation = object.metadata.generation;
        let current: NetworkStatus =
            serde_json::from_value(object.status.clone()).unwrap_or_default();
        let now = chrono::Utc::now();

        // Validate. The API validated on write; this guards against objects stored by another version.
        let net = match recheck::<Network>(&object, validate_network) {
            Ok(n) => n,
            Err(message) => {
                let st = status::refused(
                    &current,
                    generation,
                    reasons::INVALID_SPEC,
                    &message,
                    owned.first(),
                    now,
                );
                self.write_status(name, &current, st).await?;
                return Ok(Action::await_change());
            }
        };

        // Build.
        let built = build::build(&net, &self.instance);

        // Apply. Swarm keeps network names unique, so there is at most one owned network; should there
        // be more (local-scope ones carrying our labels), the one made from this spec wins.
        let existing = owned
            .iter()
            .find(|n| !build::needs_recreate(n, &built))
            .or(owned.first())
            .cloned();
        let swarm = match existing {
            Some(ex) if !build::needs_recreate(&ex, &built) => {
                if !build::allocated(&ex) {
                    debug!("network not allocated yet");
                    let st = status::allocating(&current, generation, &ex, now);
                    self.write_status(name, &current, st).await?;
                    return Ok(Action::requeue(ALLOCATION_POLL));
                }
                let diffs = build::differences(&ex, &built);
                if !diffs.is_empty() {
                    warn!(
                        ?diffs,
                        "Swarm network differs from the spec it was created from"
                    );
                    let msg = format!(
                        "network `{name}` carries this spec's hash but differs from it ({}); it was \
                         changed outside berth: remove it and berth re-creates it",
                        diffs.join("; ")
                    );
                    let st = status::refused(
                        &current,
                        generation,
                        reasons::MISMATCH,
                        &msg,
                        Some(&ex),
                        now,
                    );
                    self.write_status(name, &current, st).await?;
                    return Ok(Action::await_change());
                }
                ex
            }
            existing => {
                if let Some(ex) = existing {
                    let users = self.users(&ex).await?;
                    if !users.is_empty() {
                        info!(?users, "spec changed but the network is in use: waiting");
                        let st = status::in_use(&current, generation, &ex, &users, now);
                        self.write_status(name, &current, st).await?;
                        return Ok(Action::await_change());
                    }
                    info!(id = ?ex.id, old = ?build::hash_of(&ex), new = %built.hash,
                        "spec changed: re-creating the Swarm network");
                    self.remove(&ex).await?;
                } else if let Some(f) = foreign.first() {
                    // Never adopt or replace a network berth does not own.
                    let msg = build::refusal(name, f, &self.instance);
                    let st =
                        status::refused(&current, generation, reasons::REFUSED, &msg, None, now);
                    self.write_status(name, &current, st).await?;
                    return Ok(Action::await_change());
                }
                match self.create(name, &built).await? {
                    Ok(n) => n,
                    Err(refusal) => {
                        let st = status::refused(
                            &current,
                            generation,
                            reasons::REFUSED,
                            &refusal,
                            None,
                            now,
                        );
                        self.write_status(name, &current, st).await?;
                        return Ok(Action::await_change());
                    }
                }
            }
        };

        // Update status.
        if !build::allocated(&swarm) {
            let st = status::allocating(&current, generation, &swarm, now);
            self.write_status(name, &current, st).await?;
            return Ok(Action::requeue(ALLOCATION_POLL));
        }
        let st = status::ready(&current, generation, &swarm, now);
        self.write_status(name, &current, st).await?;
        Ok(Action::await_change())
    }

    async fn engine_names(&self) -> Result<Vec<String>, NetworkError> {
        let mut names: Vec<String> = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(build::owned_filters(&self.instance, None)),
            }))
            .await?
            .into_iter()
            .filter_map(|n| n.labels?.get(berth_api_types::names::labels::NAME).cloned())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn engine_event_types(&self) -> Vec<&'static str> {
        vec!["network"]
    }

    /// Network events (create, update, remove, and local connect/disconnect) carry the network's name;
    /// a name that is not ours reconciles to a no-op.
    fn map_engine_event(&self, ev: &EventMessage) -> Option<String> {
        match ev.typ? {
            EventMessageTypeEnum::NETWORK => {
                ev.actor.as_ref()?.attributes.as_ref()?.get("name").cloned()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    struct NoStore;

    #[async_trait]
    impl ResourceStore for NoStore {
        async fn get(
            &self,
            _: Kind,
            _: &str,
        ) -> Result<Option<berth_api_types::DynObject>, ClientError> {
            Ok(None)
        }
        async fn list(&self, _: Kind) -> Result<Vec<berth_api_types::DynObject>, ClientError> {
            Ok(vec![])
        }
        async fn update_status(
            &self,
            kind: Kind,
            name: &str,
            _: serde_json::Value,
            _: Option<&str>,
        ) -> Result<berth_api_types::DynObject, ClientError> {
            Err(ClientError::Api {
                status: 404,
                reason: "NotFound".into(),
                message: format!("{kind} `{name}` not found"),
                details: vec![],
            })
        }
        async fn installation(&self) -> Result<berth_api_types::wire::Installation, ClientError> {
            Ok(berth_api_types::wire::Installation {
                instance: "i".into(),
                default_network: "x".into(),
            })
        }
    }

    #[tokio::test]
    async fn network_events_map_to_the_network_name() {
        // Connecting does not talk to the engine; only requests do.
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let ctl = NetworkController::new(docker, Arc::new(NoStore), "i".into());
        assert_eq!(ctl.kind(), Kind::Network);
        assert_eq!(ctl.engine_event_types(), vec!["network"]);
        let ev = |typ, name: &str| EventMessage {
            typ: Some(typ),
            action: Some("create".into()),
            actor: Some(EventActor {
                id: Some("n1".into()),
                attributes: Some(HashMap::from([("name".to_string(), name.to_string())])),
            }),
            ..Default::default()
        };
        assert_eq!(
            ctl.map_engine_event(&ev(EventMessageTypeEnum::NETWORK, "backend")),
            Some("backend".into())
        );
        assert_eq!(
            ctl.map_engine_event(&ev(EventMessageTypeEnum::SERVICE, "backend")),
            None
        );
        assert_eq!(ctl.map_engine_event(&EventMessage::default()), None);
    }
}
