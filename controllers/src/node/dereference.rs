//! Node, step 1: what the engine has: every Swarm node (as planning sees it, and as status shows
//! it) and the tasks running on each.

use super::build::Member;
use berth_api_types::node::{Availability, NodeRole};
use bollard::models::{
    Node as EngineNode, NodeSpecAvailabilityEnum, NodeSpecRoleEnum, NodeState, Reachability,
    TaskState,
};
use bollard::query_parameters::{ListNodesOptions, ListTasksOptions};
use bollard::Docker;
use std::collections::{BTreeMap, HashMap};

/// One Swarm node as read from the engine.
#[derive(Debug, Clone)]
pub struct Observed {
    pub member: Member,
    pub node: EngineNode,
}

/// The swarm as the engine sees it now.
#[derive(Debug, Clone, Default)]
pub struct Swarm {
    pub nodes: Vec<Observed>,
    /// Node ID -> tasks running on it.
    pub running: HashMap<String, u64>,
    /// Node ID -> tasks the scheduler still wants on it (desired state `running`, not yet moved).
    pub assigned: HashMap<String, u64>,
}

impl Swarm {
    pub fn members(&self) -> Vec<Member> {
        self.nodes.iter().map(|o| o.member.clone()).collect()
    }
}

/// Reads one engine node as planning sees it.
pub fn member(node: &EngineNode) -> Member {
    let spec = node.spec.clone().unwrap_or_default();
    let role = match spec.role {
        Some(NodeSpecRoleEnum::MANAGER) => NodeRole::Manager,
        _ => NodeRole::Worker,
    };
    let availability = match spec.availability {
        Some(NodeSpecAvailabilityEnum::PAUSE) => Availability::Pause,
        Some(NodeSpecAvailabilityEnum::DRAIN) => Availability::Drain,
        _ => Availability::Active,
    };
    let ready = node.status.as_ref().and_then(|s| s.state) == Some(NodeState::READY);
    let reachable = role == NodeRole::Manager
        && node.manager_status.as_ref().and_then(|m| m.reachability)
            == Some(Reachability::REACHABLE);
    Member {
        id: node.id.clone().unwrap_or_default(),
        hostname: node
            .description
            .as_ref()
            .and_then(|d| d.hostname.clone())
            .unwrap_or_default(),
        role,
        availability,
        ready,
        reachable,
        labels: spec
            .labels
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Lists every node and counts the tasks on each.
pub async fn observe(docker: &Docker) -> Result<Swarm, bollard::errors::Error> {
    let nodes = docker.list_nodes(None::<ListNodesOptions>).await?;
    let tasks = docker
        .list_tasks(Some(ListTasksOptions {
            filters: Some(HashMap::from([(
                "desired-state".to_string(),
                vec!["running".to_string()],
            )])),
        }))
        .await?;
    let mut running = HashMap::new();
    let mut assigned = HashMap::new();
    for t in &tasks {
        let Some(node) = t.node_id.clone() else {
            continue;
        };
        *assigned.entry(node.clone()).or_insert(0) += 1;
        if t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING) {
            *running.entry(node).or_insert(0) += 1;
        }
    }
    let mut nodes: Vec<Observed> = nodes
        .into_iter()
        .map(|node| Observed {
            member: member(&node),
            node,
        })
        .collect();
    nodes.sort_by(|a, b| a.member.id.cmp(&b.member.id));
    Ok(Swarm {
        nodes,
        running,
        assigned,
    })
}
