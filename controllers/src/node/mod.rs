//! The Node controller: one Node object per Swarm node, registered by this controller as it finds
//! nodes (list at start, engine `node` events, resync) and removed when the node is removed from
//! the swarm; each object's optional spec (role, availability, labels) applied to its node, and the
//! node's state reported as status.
//!
//! It is an `Aggregator`: whether a change is safe depends on every node (Raft quorum among the
//! managers, somewhere left to run the ingress proxy), so every Node event and every engine node
//! event is one converge of the whole swarm, and changes are checked one after another against the
//! cluster as the earlier ones leave it. Steps: `dereference.rs` (the engine's nodes and tasks) ->
//! `build.rs` (pure: naming, the node each spec wants, safety) -> `apply.rs` (versioned node
//! updates) -> `status.rs` (pure).
//!
//! Privilege: the controller lists nodes and tasks and updates nodes; it never removes a node from
//! the swarm, and a change it refuses is never sent to the engine. Registering and deregistering
//! Node objects goes through the API like every other write.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod status;

use crate::runtime::{Action, Aggregator, Cached, Context, Converged, Error, Hooks, Resource};
use async_trait::async_trait;
use berth_api_types::node::{validate_node, Node, NodeRole};
use berth_api_types::validate::FieldError;
use berth_api_types::Kind;
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::Docker;
use build::Known;
use status::{NodeStatus, Outcome};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often the swarm is looked at even without events: task counts change without a node event.
const POLL: Duration = Duration::from_secs(10);
/// How often while a drain is moving tasks or a change was just made.
const PROGRESS_POLL: Duration = Duration::from_secs(2);

pub struct NodeController {
    docker: Docker,
}

impl NodeController {
    pub fn new(docker: Docker) -> Self {
        NodeController { docker }
    }
}

impl Resource for NodeController {
    type Object = Node;
    type Status = NodeStatus;
    const KIND: Kind = Kind::Node;

    fn validate(object: &Node) -> Result<(), Vec<FieldError>> {
        validate_node(object)
    }
}

#[async_trait]
impl Aggregator for NodeController {
    fn key(&self) -> String {
        "swarm-nodes".to_string()
    }

    async fn converge(
        &self,
        mut objects: Vec<Arc<Cached<Self>>>,
        ctx: &Context<Self>,
    ) -> Result<Converged<NodeStatus>, Error> {
        let swarm = dereference::observe(&self.docker).await?;
        let known: Vec<Known> = objects
            .iter()
            .map(|o| Known {
                name: o.name().to_string(),
                node_id: o.status.node_id.clone(),
            })
            .collect();
        let naming = build::name_nodes(&swarm.members(), &known);
        // Names the cache has but reconcile was not handed (invalid objects) are taken too.
        let existing: BTreeSet<String> = ctx.cache.names().into_iter().collect();
        for name in naming.register.iter().filter(|n| !existing.contains(*n)) {
            info!(node = %name, "registering a node found in the swarm");
            ctx.store.register(Kind::Node, name).await?;
        }
        for name in &naming.deregister {
            info!(node = %name, "the node was removed from the swarm; removing its object");
            ctx.store.deregister(Kind::Node, name).await?;
        }
        let ids: BTreeMap<&String, &String> = naming.names.iter().map(|(id, n)| (n, id)).collect();

        let now = chrono::Utc::now();
        let mut cluster = swarm.members();
        let mut statuses = BTreeMap::new();
        let mut busy = false;
        objects.sort_by(|a, b| a.name().cmp(b.name()));
        for obj in &objects {
            let name = obj.name();
            let Some(id) = ids.get(&name.to_string()).map(|id| id.as_str()) else {
                if !naming.deregister.iter().any(|n| n == name) {
                    statuses.insert(
                        name.to_string(),
                        status::not_found(&obj.status, obj.generation(), now),
                    );
                }
                continue;
            };
            let Some(observed) = swarm.nodes.iter().find(|o| o.member.id == id) else {
                continue;
            };
            let Some(at) = cluster.iter().position(|m| m.id == id) else {
                continue;
            };
            let spec = &obj.object.spec;
            let managed: BTreeSet<String> = obj.status.managed_labels.iter().cloned().collect();
            let spec_keys: Vec<String> = spec.labels.keys().cloned().collect();
            let current = cluster[at].clone();
            let want = build::desired(&current, spec, &managed);
            let (member, outcome, managed_next) = if !build::differs(&current, &want) {
                (want, Outcome::InSync, spec_keys)
            } else {
                match build::check(&cluster, name, &want) {
                    Err(why) => (
                        current,
                        Outcome::Unsafe(why),
                        obj.status.managed_labels.clone(),
                    ),
                    Ok(()) => {
                        let applied = apply::update(&self.docker, name, id, spec, &managed).await?;
                        busy = true;
                        (applied, Outcome::InSync, spec_keys)
                    }
                }
            };
            cluster[at] = member.clone();
            let s = status::observed(
                &obj.status,
                obj.generation(),
                &observed.node,
                &member,
                managed_next,
                swarm.running.get(id).copied().unwrap_or(0),
                swarm.assigned.get(id).copied().unwrap_or(0),
                &outcome,
                now,
            );
            // A demoted node leaves Raft a while after its role changed: look again soon.
            busy |= status::draining(&s)
                || (member.role == NodeRole::Worker && observed.node.manager_status.is_some());
            statuses.insert(name.to_string(), s);
        }
        let action = if busy || !naming.register.is_empty() {
            Action::requeue(PROGRESS_POLL)
        } else {
            Action::requeue(POLL)
        };
        Ok(Converged { statuses, action })
    }
}

#[async_trait]
impl Hooks for NodeController {
    /// The swarm's nodes are what this controller registers objects from, so every resync
    /// converges, also when there is no Node object yet (a fresh installation).
    async fn engine_names(&self) -> Result<Vec<String>, Error> {
        Ok(vec![self.key()])
    }

    fn engine_event_types(&self) -> Vec<&'static str> {
        vec!["node"]
    }

    /// Every node event (join, state change, update, removal) is one converge of the swarm.
    fn map_engine_event(&self, ev: &EventMessage) -> Option<String> {
        (ev.typ? == EventMessageTypeEnum::NODE).then(|| self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn node_events_are_one_key() {
        // Connecting does not talk to the engine; only requests do.
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let ctl = NodeController::new(docker);
        let ev = |typ| EventMessage {
            typ: Some(typ),
            ..Default::default()
        };
        assert_eq!(
            ctl.map_engine_event(&ev(EventMessageTypeEnum::NODE)),
            Some(ctl.key())
        );
        assert_eq!(
            ctl.map_engine_event(&ev(EventMessageTypeEnum::SERVICE)),
            None
        );
    }
}
