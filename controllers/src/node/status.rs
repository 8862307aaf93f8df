//! Node, step 4 (pure): the status of a Node object from what the engine reports of its node and
//! what this converge did: state, role, reachability, resources, tasks, labels, and the `Ready` and
//! `Drained` conditions.

use super::build::Member;
use crate::runtime::ObjectStatus;
use berth_api_types::meta::set_condition;
use berth_api_types::node::{Availability, NodeRole};
use berth_api_types::Condition;
use berth_api_types::ConditionStatus::{False, True};
use bollard::models::{Node as EngineNode, NodeState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Condition types of a Node.
pub mod conditions {
    /// The node is up and its spec applied.
    pub const READY: &str = "Ready";
    /// Present while the node is drained: True once no task is left on it.
    pub const DRAINED: &str = "Drained";
}

/// Condition reasons this controller sets.
pub mod reasons {
    pub const READY: &str = "NodeReady";
    /// The engine reports the node down (its dockerd stopped, the machine is off, or it left).
    pub const DOWN: &str = "NodeDown";
    /// The engine has not heard from the node yet, or lost it.
    pub const UNREACHABLE: &str = "NodeUnreachable";
    /// No node of the swarm goes by this object's name.
    pub const NOT_FOUND: &str = "NodeNotFound";
    /// The spec asks for something that would put the cluster at risk; nothing was changed.
    pub const UNSAFE: &str = "UnsafeChange";
    pub const DRAINING: &str = "Draining";
    pub const DRAINED: &str = "Drained";
}

/// Progress of a drain, counted from when berth first saw the node drained.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Drain {
    pub started_at: DateTime<Utc>,
    /// Tasks on the node when the drain started.
    pub tasks_at_start: u64,
    /// Tasks the scheduler has not moved off yet.
    pub remaining: u64,
}

/// What the Node controller reports. Written only by the controller, through the status endpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The Swarm node this object stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `ready`, `down`, `unknown` or `disconnected` as the engine says; `gone` when no node of the
    /// swarm goes by this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The engine's message about the state (e.g. `heartbeat failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<Availability>,
    /// The node's Raft member: `reachable`, `unreachable` or `unknown`; none for a node that is not
    /// (or no longer) a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager_reachability: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leader: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    /// Tasks running on the node.
    #[serde(default)]
    pub tasks: u64,
    /// The node's labels as the engine has them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Label keys berth set from the spec: a key dropped from the spec is removed from the node,
    /// labels set by hand under other keys are not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub managed_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
}

/// What the converge did with the object's spec.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The node already was as the spec says, or was just updated to it.
    InSync,
    /// Refused before any engine call: why.
    Unsafe(String),
}

fn not_ready(s: &mut NodeStatus, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) {
    s.observed_generation = Some(generation);
    set_condition(
        &mut s.conditions,
        conditions::READY,
        False,
        reason,
        message,
        now,
    );
}

impl ObjectStatus for NodeStatus {
    /// Refused with the node's fields as they were: the node itself is untouched.
    fn refused(&self, generation: u64, reason: &str, message: &str, now: DateTime<Utc>) -> Self {
        let mut s = self.clone();
        not_ready(&mut s, generation, reason, message, now);
        s
    }
}

fn state_name(state: Option<NodeState>) -> &'static str {
    match state {
        Some(NodeState::READY) => "ready",
        Some(NodeState::DOWN) => "down",
        Some(NodeState::DISCONNECTED) => "disconnected",
        _ => "unknown",
    }
}

/// The status of an object bound to `node`. `member` is the node as it is after this converge
/// (the spec applied), `assigned`/`running` the tasks on it as observed before.
#[allow(clippy::too_many_arguments)]
pub fn observed(
    current: &NodeStatus,
    generation: u64,
    node: &EngineNode,
    member: &Member,
    managed_labels: Vec<String>,
    running: u64,
    assigned: u64,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> NodeStatus {
    let mut s = current.clone();
    s.observed_generation = Some(generation);
    let engine_state = node.status.as_ref().and_then(|st| st.state);
    let engine_message = node
        .status
        .as_ref()
        .and_then(|st| st.message.clone())
        .filter(|m| !m.is_empty());
    let description = node.description.clone().unwrap_or_default();
    let manager = node.manager_status.as_ref();
    s.node_id = Some(member.id.clone());
    s.hostname = Some(member.hostname.clone());
    s.state = Some(state_name(engine_state).to_string());
    s.message = engine_message.clone();
    s.role = Some(member.role);
    s.availability = Some(member.availability);
    // Shown while the engine still has a Raft member for the node, also after a demotion: the
    // member leaves Raft some time after the role changes, and until then it counts for quorum.
    s.manager_reachability = manager
        .and_then(|m| m.reachability)
        .map(|r| r.to_string())
        .or_else(|| (member.role == NodeRole::Manager).then(|| "unknown".to_string()));
    s.leader = manager.and_then(|m| m.leader).unwrap_or(false);
    s.address = node.status.as_ref().and_then(|st| st.addr.clone());
    s.engine_version = description.engine.and_then(|e| e.engine_version);
    let platform = description.platform.unwrap_or_default();
    s.os = platform.os;
    s.architecture = platform.architecture;
    let resources = description.resources.unwrap_or_default();
    s.cpus = resources.nano_cpus.map(|n| n as f64 / 1e9);
    s.memory_bytes = resources.memory_bytes;
    s.tasks = running;
    s.labels = member.labels.clone();
    s.managed_labels = managed_labels;

    let (status, reason, message) = match (outcome, engine_state) {
        (Outcome::Unsafe(why), _) => (False, reasons::UNSAFE, why.clone()),
        (_, Some(NodeState::READY)) => (True, reasons::READY, summary(member, s.leader)),
        (_, Some(NodeState::DOWN)) => (
            False,
            reasons::DOWN,
            engine_message.unwrap_or_else(|| "the node is down".into()),
        ),
        _ => (
            False,
            reasons::UNREACHABLE,
            engine_message.unwrap_or_else(|| format!("the node is {}", state_name(engine_state))),
        ),
    };
    set_condition(
        &mut s.conditions,
        conditions::READY,
        status,
        reason,
        &message,
        now,
    );

    if member.availability == Availability::Drain {
        let drain = s.drain.get_or_insert(Drain {
            started_at: now,
            tasks_at_start: assigned,
            remaining: assigned,
        });
        drain.remaining = assigned;
        let drain = drain.clone();
        let moved = drain.tasks_at_start.saturating_sub(drain.remaining);
        let (status, reason, message) = if drain.remaining == 0 {
            (
                True,
                reasons::DRAINED,
                format!("{moved} task(s) moved to other nodes; none left on the node"),
            )
        } else {
            (
                False,
                reasons::DRAINING,
                format!(
                    "{moved} of {} task(s) moved; {} still on the node",
                    drain.tasks_at_start, drain.remaining
                ),
            )
        };
        set_condition(
            &mut s.conditions,
            conditions::DRAINED,
            status,
            reason,
            &message,
            now,
        );
    } else {
        s.drain = None;
        s.conditions.retain(|c| c.type_ != conditions::DRAINED);
    }
    s
}

fn summary(member: &Member, leader: bool) -> String {
    let role = match (member.role, leader) {
        (NodeRole::Manager, true) => "manager (leader)",
        (NodeRole::Manager, false) => "manager",
        (NodeRole::Worker, _) => "worker",
    };
    format!("{role}, {}", member.availability.as_str())
}

/// The status of an object no node goes by: declared before its node joined.
pub fn not_found(current: &NodeStatus, generation: u64, now: DateTime<Utc>) -> NodeStatus {
    let mut s = NodeStatus {
        conditions: current.conditions.clone(),
        managed_labels: current.managed_labels.clone(),
        ..Default::default()
    };
    s.state = Some("gone".into());
    s.conditions.retain(|c| c.type_ != conditions::DRAINED);
    not_ready(
        &mut s,
        generation,
        reasons::NOT_FOUND,
        "no node of the swarm goes by this name; `berth node join-command` prints how to join one",
        now,
    );
    s
}

/// Whether a drain is still moving tasks off the node.
pub fn draining(s: &NodeStatus) -> bool {
    s.drain.as_ref().is_some_and(|d| d.remaining > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::meta::condition;
    use bollard::models::{
        ManagerStatus, NodeDescription, NodeStatus as EngineStatus, Reachability,
    };

    fn engine(state: NodeState, message: &str) -> EngineNode {
        EngineNode {
            id: Some("ID1".into()),
            description: Some(NodeDescription {
                hostname: Some("alpha".into()),
                ..Default::default()
            }),
            status: Some(EngineStatus {
                state: Some(state),
                message: Some(message.into()),
                addr: Some("10.99.0.2".into()),
            }),
            manager_status: Some(ManagerStatus {
                leader: Some(true),
                reachability: Some(Reachability::REACHABLE),
                addr: None,
            }),
            ..Default::default()
        }
    }

    fn member(role: NodeRole, availability: Availability) -> Member {
        Member {
            id: "ID1".into(),
            hostname: "alpha".into(),
            role,
            availability,
            ready: true,
            reachable: true,
            labels: BTreeMap::new(),
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn a_ready_manager_and_then_down() {
        let m = member(NodeRole::Manager, Availability::Active);
        let s = observed(
            &NodeStatus::default(),
            1,
            &engine(NodeState::READY, ""),
            &m,
            vec![],
            3,
            3,
            &Outcome::InSync,
            t(10),
        );
        assert_eq!(s.state.as_deref(), Some("ready"));
        assert!(s.leader);
        assert_eq!(s.manager_reachability.as_deref(), Some("reachable"));
        assert_eq!(s.tasks, 3);
        assert_eq!(s.address.as_deref(), Some("10.99.0.2"));
        let ready = condition(&s.conditions, conditions::READY).unwrap();
        assert_eq!(ready.status, True);
        assert_eq!(ready.message, "manager (leader), active");

        let down = observed(
            &s,
            1,
            &engine(NodeState::DOWN, "heartbeat failure"),
            &m,
            vec![],
            0,
            0,
            &Outcome::InSync,
            t(20),
        );
        let ready = condition(&down.conditions, conditions::READY).unwrap();
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (False, reasons::DOWN)
        );
        assert_eq!(ready.message, "heartbeat failure");
        assert_eq!(ready.last_transition_time, t(20));
        assert_eq!(down.state.as_deref(), Some("down"));
    }

    #[test]
    fn a_drain_counts_tasks_until_none_is_left() {
        let m = member(NodeRole::Worker, Availability::Drain);
        let e = engine(NodeState::READY, "");
        let s = observed(
            &NodeStatus::default(),
            2,
            &e,
            &m,
            vec![],
            4,
            4,
            &Outcome::InSync,
            t(1),
        );
        let c = condition(&s.conditions, conditions::DRAINED).unwrap();
        assert_eq!((c.status, c.reason.as_str()), (False, reasons::DRAINING));
        assert_eq!(c.message, "0 of 4 task(s) moved; 4 still on the node");
        assert!(draining(&s));
        let s = observed(&s, 2, &e, &m, vec![], 0, 0, &Outcome::InSync, t(5));
        let c = condition(&s.conditions, conditions::DRAINED).unwrap();
        assert_eq!((c.status, c.reason.as_str()), (True, reasons::DRAINED));
        assert_eq!(
            c.message,
            "4 task(s) moved to other nodes; none left on the node"
        );
        assert!(!draining(&s));
        // Active again: the drain and its condition go.
        let active = member(NodeRole::Worker, Availability::Active);
        let s = observed(&s, 3, &e, &active, vec![], 0, 0, &Outcome::InSync, t(9));
        assert!(s.drain.is_none());
        assert!(condition(&s.conditions, conditions::DRAINED).is_none());
    }

    #[test]
    fn an_unsafe_change_is_not_ready_with_the_reason() {
        let m = member(NodeRole::Manager, Availability::Active);
        let s = observed(
            &NodeStatus::default(),
            4,
            &engine(NodeState::READY, ""),
            &m,
            vec![],
            0,
            0,
            &Outcome::Unsafe("last manager".into()),
            t(1),
        );
        let c = condition(&s.conditions, conditions::READY).unwrap();
        assert_eq!((c.status, c.reason.as_str()), (False, reasons::UNSAFE));
        assert_eq!(c.message, "last manager");
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.role, Some(NodeRole::Manager), "the node as it still is");
    }
}
