//! The Network controller: keeps one Swarm-scoped overlay network per Network object, named like the
//! object, labelled as berth's and encrypted unless the spec opts out, and reports it as status.
//! Steps: `dereference.rs` (what the engine has under the name) -> `build.rs` (pure) -> `apply.rs`
//! -> `status.rs` (pure).
//!
//! Swarm networks cannot be updated. A changed spec means remove and re-create, which berth does only
//! while no service or container uses the network; otherwise it says so in status (Degraded, `InUse`)
//! and waits for the next engine event or resync. A network of that name berth does not own is never
//! touched (Degraded, `Refused`).

pub mod apply;
pub mod build;
pub mod dereference;
pub mod status;

use crate::runtime::{Action, Cached, Context, Error, Hooks, Reconciled, Reconciler, Resource};
use crate::swarm::Owner;
use apply::Outcome;
use async_trait::async_trait;
use berth_api_types::network::{validate_network, Network};
use berth_api_types::validate::FieldError;
use berth_api_types::Kind;
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::ListNetworksOptions;
use bollard::Docker;
use status::NetworkStatus;
use std::sync::Arc;
use std::time::Duration;

/// How soon a network still being allocated is looked at again.
const ALLOCATION_POLL: Duration = Duration::from_secs(1);

pub struct NetworkController {
    docker: Docker,
    owner: Owner,
}

impl NetworkController {
    /// `instance`: the installation id stamped on every network.
    pub fn new(docker: Docker, instance: &str) -> Self {
        NetworkController {
            docker,
            owner: Owner::new(instance, Kind::Network),
        }
    }
}

impl Resource for NetworkController {
    type Object = Network;
    type Status = NetworkStatus;
    const KIND: Kind = Kind::Network;

    fn validate(object: &Network) -> Result<(), Vec<FieldError>> {
        validate_network(object)
    }
}

#[async_trait]
impl Reconciler for NetworkController {
    async fn reconcile(
        &self,
        obj: Arc<Cached<Self>>,
        _ctx: &Context<Self>,
    ) -> Result<Reconciled<NetworkStatus>, Error> {
        let name = obj.name();
        let observed = dereference::observe(&self.docker, &self.owner, name).await?;
        let built = build::build(&obj.object, &self.owner);
        let outcome = apply::apply(&self.docker, &self.owner, name, &built, observed).await?;
        let status = status::observed(
            &obj.status,
            obj.generation(),
            &outcome,
            name,
            chrono::Utc::now(),
        );
        let action = match &outcome {
            Outcome::InPlace(n) if !build::allocated(n) => Action::requeue(ALLOCATION_POLL),
            _ => Action::await_change(),
        };
        Ok(Reconciled { status, action })
    }

    async fn cleanup(&self, name: &str, _ctx: &Context<Self>) -> Result<Action, Error> {
        let observed = dereference::observe(&self.docker, &self.owner, name).await?;
        apply::remove_owned(&self.docker, name, &observed.owned).await?;
        Ok(Action::await_change())
    }
}

#[async_trait]
impl Hooks for NetworkController {
    async fn engine_names(&self) -> Result<Vec<String>, Error> {
        let mut names: Vec<String> = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(self.owner.filters(None, &[])),
            }))
            .await?
            .into_iter()
            .filter_map(|n| self.owner.object_of(n.labels.as_ref()))
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
    use std::collections::HashMap;

    #[tokio::test]
    async fn network_events_map_to_the_network_name() {
        // Connecting does not talk to the engine; only requests do.
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let ctl = NetworkController::new(docker, "i");
        assert_eq!(<NetworkController as Resource>::KIND, Kind::Network);
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
