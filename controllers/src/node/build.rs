//! Node, step 2 (pure): which object each Swarm node goes by, what a node's engine spec becomes for
//! its object's spec, and whether a change is safe for the cluster before any engine call is made.
//!
//! Safety is judged on the whole cluster as it would be after the change:
//! - Raft: N managers keep the cluster writable while a majority (N/2 + 1) of them is reachable, so
//!   they tolerate (N-1)/2 failures; an even count adds a member without adding tolerance. A change
//!   that takes the reachable managers below the majority of the managers there would be, or leaves
//!   no manager at all, is refused. A cluster already below quorum is not made a reason to refuse
//!   (the engine itself cannot apply anything then).
//! - The ingress proxy runs on the active nodes labelled `io.berth.ingress=true`, or on the managers
//!   when no node is labelled: a change that leaves no such node is refused, since every HTTPS route
//!   would stop.

use berth_api_types::names::labels;
use berth_api_types::node::{Availability, NodeRole, NodeSpec};
use bollard::models::{NodeSpec as EngineSpec, NodeSpecAvailabilityEnum, NodeSpecRoleEnum};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What planning needs to know of one Swarm node (read by `dereference.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub hostname: String,
    pub role: NodeRole,
    pub availability: Availability,
    /// The engine reports the node `ready`.
    pub ready: bool,
    /// A manager whose Raft member is reachable (workers: false).
    pub reachable: bool,
    pub labels: BTreeMap<String, String>,
}

/// What an object is bound to, as the previous converge recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub name: String,
    /// `status.nodeId`: the node the object stood for (none before its first converge).
    pub node_id: Option<String>,
}

/// Which object stands for which node, and what to register or remove.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Naming {
    /// Engine node ID -> object name.
    pub names: BTreeMap<String, String>,
    /// Names to register: nodes with no object yet.
    pub register: Vec<String>,
    /// Objects whose node was removed from the swarm.
    pub deregister: Vec<String>,
    /// Objects that stand for no node (declared before the node joined): shown as not found.
    pub unmatched: Vec<String>,
}

/// An object name must be a DNS label: a hostname that is one (case aside) is used as it is.
fn as_name(hostname: &str) -> Option<String> {
    let h = hostname.to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    ok.then_some(h)
}

/// Names nodes: an object keeps the node it was bound to; any other node goes by its hostname when
/// no other node has that hostname and no object bound to another node has that name, else by its
/// ID (IDs are unique and already valid names). An object declared before its node joined binds
/// when the node's name matches.
pub fn name_nodes(members: &[Member], objects: &[Known]) -> Naming {
    let present: BTreeSet<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let mut names = BTreeMap::new();
    let mut bound_names = BTreeSet::new();
    for o in objects {
        if let Some(id) = o.node_id.as_deref().filter(|id| present.contains(id)) {
            if !names.contains_key(id) {
                names.insert(id.to_string(), o.name.clone());
                bound_names.insert(o.name.clone());
            }
        }
    }
    let mut hostnames: HashMap<String, usize> = HashMap::new();
    for m in members {
        *hostnames
            .entry(m.hostname.to_ascii_lowercase())
            .or_default() += 1;
    }
    for m in members {
        if names.contains_key(&m.id) {
            continue;
        }
        let by_host = as_name(&m.hostname)
            .filter(|h| hostnames.get(h).copied() == Some(1) && !bound_names.contains(h));
        let name = by_host.unwrap_or_else(|| m.id.to_ascii_lowercase());
        bound_names.insert(name.clone());
        names.insert(m.id.clone(), name);
    }
    let named: BTreeSet<&String> = names.values().collect();
    let existing: BTreeSet<&String> = objects.iter().map(|o| &o.name).collect();
    let register = names
        .values()
        .filter(|n| !existing.contains(n))
        .cloned()
        .collect();
    let mut deregister = Vec::new();
    let mut unmatched = Vec::new();
    for o in objects {
        if named.contains(&o.name) {
            continue;
        }
        match o.node_id.as_deref() {
            Some(id) if !present.contains(id) => deregister.push(o.name.clone()),
            _ => unmatched.push(o.name.clone()),
        }
    }
    Naming {
        names,
        register,
        deregister,
        unmatched,
    }
}

/// The node as the object's spec wants it: fields the spec leaves out stay as they are. Labels: the
/// spec's keys take the spec's values; keys berth set before (`managed`) and the spec no longer
/// has are removed; every other label (set by hand or another tool) is left alone.
pub fn desired(current: &Member, spec: &NodeSpec, managed: &BTreeSet<String>) -> Member {
    let mut want = current.clone();
    if let Some(role) = spec.role {
        want.role = role;
    }
    if let Some(a) = spec.availability {
        want.availability = a;
    }
    for key in managed {
        if !spec.labels.contains_key(key) {
            want.labels.remove(key);
        }
    }
    for (k, v) in &spec.labels {
        want.labels.insert(k.clone(), v.clone());
    }
    if want.role == NodeRole::Manager && current.role == NodeRole::Worker {
        // A promoted node joins Raft as soon as it is up: count it as reachable if it is ready.
        want.reachable = current.ready;
    } else if want.role == NodeRole::Worker {
        want.reachable = false;
    }
    want
}

/// Whether the engine's node must be updated to become `want`.
pub fn differs(current: &Member, want: &Member) -> bool {
    current.role != want.role
        || current.availability != want.availability
        || current.labels != want.labels
}

/// The engine's node spec for `want`, keeping what berth does not manage (the node's name).
pub fn engine_spec(current: &EngineSpec, want: &Member) -> EngineSpec {
    EngineSpec {
        name: current.name.clone(),
        labels: Some(want.labels.clone().into_iter().collect()),
        role: Some(match want.role {
            NodeRole::Manager => NodeSpecRoleEnum::MANAGER,
            NodeRole::Worker => NodeSpecRoleEnum::WORKER,
        }),
        availability: Some(match want.availability {
            Availability::Active => NodeSpecAvailabilityEnum::ACTIVE,
            Availability::Pause => NodeSpecAvailabilityEnum::PAUSE,
            Availability::Drain => NodeSpecAvailabilityEnum::DRAIN,
        }),
    }
}

/// Managers needed for a Raft majority.
pub fn quorum(managers: usize) -> usize {
    managers / 2 + 1
}

fn managers(cluster: &[Member]) -> (usize, usize) {
    let total = cluster
        .iter()
        .filter(|m| m.role == NodeRole::Manager)
        .count();
    let reachable = cluster
        .iter()
        .filter(|m| m.role == NodeRole::Manager && m.reachable)
        .count();
    (total, reachable)
}

/// Active, ready nodes that may run the ingress proxy: labelled for it, or managers when no node is.
fn proxy_nodes(cluster: &[Member]) -> usize {
    let labelled = cluster
        .iter()
        .any(|m| m.labels.get(labels::INGRESS_NODE).map(String::as_str) == Some("true"));
    cluster
        .iter()
        .filter(|m| m.availability == Availability::Active && m.ready)
        .filter(|m| {
            if labelled {
                m.labels.get(labels::INGRESS_NODE).map(String::as_str) == Some("true")
            } else {
                m.role == NodeRole::Manager
            }
        })
        .count()
}

/// Checks replacing `want.id`'s node in `cluster` by `want`. `Err` says why not, for the user.
pub fn check(cluster: &[Member], name: &str, want: &Member) -> Result<(), String> {
    let after: Vec<Member> = cluster
        .iter()
        .map(|m| {
            if m.id == want.id {
                want.clone()
            } else {
                m.clone()
            }
        })
        .collect();
    let (before_total, before_reachable) = managers(cluster);
    let (after_total, after_reachable) = managers(&after);
    if after_total == 0 {
        return Err(format!(
            "demoting `{name}` would leave the swarm without a manager; promote another node first"
        ));
    }
    let had_quorum = before_reachable >= quorum(before_total);
    if had_quorum && after_reachable < quorum(after_total) {
        return Err(format!(
            "this change leaves {after_reachable} reachable manager(s) of {after_total}; Raft needs {} \
             (a majority) to keep the swarm writable. Bring the unreachable managers back or change \
             one node at a time",
            quorum(after_total)
        ));
    }
    if proxy_nodes(cluster) > 0 && proxy_nodes(&after) == 0 {
        return Err(format!(
            "this change leaves no active node that can run the ingress proxy (nodes labelled \
             `{}=true`, or the managers when no node is labelled); `{name}` is the last one",
            labels::INGRESS_NODE
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, host: &str, role: NodeRole) -> Member {
        Member {
            id: id.into(),
            hostname: host.into(),
            role,
            availability: Availability::Active,
            ready: true,
            reachable: role == NodeRole::Manager,
            labels: BTreeMap::new(),
        }
    }

    fn known(name: &str, id: Option<&str>) -> Known {
        Known {
            name: name.into(),
            node_id: id.map(str::to_string),
        }
    }

    #[test]
    fn nodes_go_by_unique_hostnames_else_ids() {
        let m = vec![
            member("ID1", "alpha", NodeRole::Manager),
            member("ID2", "vm", NodeRole::Worker),
            member("ID3", "vm", NodeRole::Worker),
            member("ID4", "Web.Example", NodeRole::Worker),
        ];
        let n = name_nodes(&m, &[]);
        assert_eq!(n.names["ID1"], "alpha");
        assert_eq!(n.names["ID2"], "id2", "a shared hostname names no one");
        assert_eq!(n.names["ID3"], "id3");
        assert_eq!(n.names["ID4"], "id4", "not a DNS label");
        assert_eq!(n.register, ["alpha", "id2", "id3", "id4"]);
    }

    #[test]
    fn objects_keep_their_node_and_removed_nodes_are_deregistered() {
        let m = vec![
            member("ID1", "alpha", NodeRole::Manager),
            member("ID5", "beta", NodeRole::Worker),
        ];
        let objects = [
            known("alpha", Some("ID1")),
            // `beta` used to be another node, removed since; the new `beta` is named by its ID.
            known("beta", Some("ID2")),
            known("gamma", None),
        ];
        let n = name_nodes(&m, &objects);
        assert_eq!(n.names["ID1"], "alpha");
        assert_eq!(n.names["ID5"], "beta", "the old beta's node is gone");
        assert!(n.register.is_empty(), "{n:?}");
        assert!(n.deregister.is_empty(), "beta binds to the new node: {n:?}");
        assert_eq!(n.unmatched, ["gamma"]);

        let n = name_nodes(&m[..1], &objects);
        assert_eq!(n.deregister, ["beta"]);
    }

    #[test]
    fn a_declared_object_binds_when_its_node_joins() {
        let m = vec![member("ID1", "alpha", NodeRole::Manager)];
        let n = name_nodes(&m, &[known("alpha", None)]);
        assert_eq!(n.names["ID1"], "alpha");
        assert!(n.register.is_empty() && n.unmatched.is_empty());
    }

    #[test]
    fn a_hostname_taken_by_a_bound_object_is_not_reused() {
        let m = vec![
            member("ID1", "alpha", NodeRole::Manager),
            member("ID2", "id1", NodeRole::Worker),
        ];
        // ID1's object is named by its id (it once shared a hostname); ID2's hostname is that name.
        let n = name_nodes(&m, &[known("id1", Some("ID1"))]);
        assert_eq!(n.names["ID2"], "id2");
    }

    #[test]
    fn omitted_fields_stay_and_labels_merge_with_what_berth_managed() {
        let mut cur = member("ID1", "a", NodeRole::Worker);
        cur.labels = BTreeMap::from([
            ("zone".into(), "b".into()),
            ("old".into(), "1".into()),
            ("by-hand".into(), "x".into()),
        ]);
        let spec = NodeSpec {
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            ..Default::default()
        };
        let managed = BTreeSet::from(["zone".to_string(), "old".to_string()]);
        let want = desired(&cur, &spec, &managed);
        assert_eq!(want.role, NodeRole::Worker);
        assert_eq!(want.availability, Availability::Active);
        assert_eq!(
            want.labels,
            BTreeMap::from([("zone".into(), "a".into()), ("by-hand".into(), "x".into())])
        );
        assert!(differs(&cur, &want));
        assert!(!differs(&want, &desired(&want, &spec, &managed)));
    }

    #[test]
    fn demoting_the_last_manager_is_refused() {
        let cluster = vec![
            member("M", "m", NodeRole::Manager),
            member("W", "w", NodeRole::Worker),
        ];
        let spec = NodeSpec {
            role: Some(NodeRole::Worker),
            ..Default::default()
        };
        let want = desired(&cluster[0], &spec, &BTreeSet::new());
        let e = check(&cluster, "m", &want).unwrap_err();
        assert!(e.contains("without a manager"), "{e}");
    }

    #[test]
    fn quorum_counts_reachable_managers() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
        // Three managers, one unreachable: demoting a reachable one leaves 1 of 2.
        let mut cluster = vec![
            member("A", "a", NodeRole::Manager),
            member("B", "b", NodeRole::Manager),
            member("C", "c", NodeRole::Manager),
        ];
        cluster[2].reachable = false;
        cluster[2].ready = false;
        let demote = NodeSpec {
            role: Some(NodeRole::Worker),
            ..Default::default()
        };
        let want = desired(&cluster[1], &demote, &BTreeSet::new());
        let e = check(&cluster, "b", &want).unwrap_err();
        assert!(e.contains("1 reachable manager(s) of 2"), "{e}");
        // Demoting the unreachable one is fine: 2 of 2.
        let want = desired(&cluster[2], &demote, &BTreeSet::new());
        assert!(check(&cluster, "c", &want).is_ok());
        // Promoting a worker that is down: 4 managers, 2 reachable < 3.
        cluster.push(member("D", "d", NodeRole::Worker));
        cluster[3].ready = false;
        let promote = NodeSpec {
            role: Some(NodeRole::Manager),
            ..Default::default()
        };
        let want = desired(&cluster[3], &promote, &BTreeSet::new());
        assert!(check(&cluster, "d", &want).is_err());
        // ...and a ready one: 4 managers, 3 reachable.
        cluster[3].ready = true;
        let want = desired(&cluster[3], &promote, &BTreeSet::new());
        assert!(check(&cluster, "d", &want).is_ok());
    }

    #[test]
    fn draining_the_last_node_that_can_run_the_proxy_is_refused() {
        let cluster = vec![
            member("M", "m", NodeRole::Manager),
            member("W", "w", NodeRole::Worker),
        ];
        let drain = NodeSpec {
            availability: Some(Availability::Drain),
            ..Default::default()
        };
        // No node labelled: the proxy runs on managers; the one manager may not be drained...
        let e = check(
            &cluster,
            "m",
            &desired(&cluster[0], &drain, &BTreeSet::new()),
        )
        .unwrap_err();
        assert!(e.contains("ingress proxy"), "{e}");
        // ...the worker may.
        assert!(check(
            &cluster,
            "w",
            &desired(&cluster[1], &drain, &BTreeSet::new())
        )
        .is_ok());
        // With the worker labelled for ingress, the manager may be drained and the worker not.
        let mut labelled = cluster.clone();
        labelled[1]
            .labels
            .insert(labels::INGRESS_NODE.into(), "true".into());
        assert!(check(
            &labelled,
            "m",
            &desired(&labelled[0], &drain, &BTreeSet::new())
        )
        .is_ok());
        assert!(check(
            &labelled,
            "w",
            &desired(&labelled[1], &drain, &BTreeSet::new())
        )
        .is_err());
    }

    #[test]
    fn the_engine_spec_keeps_the_node_name() {
        let cur = EngineSpec {
            name: Some("custom".into()),
            ..Default::default()
        };
        let mut want = member("ID", "h", NodeRole::Manager);
        want.availability = Availability::Pause;
        let s = engine_spec(&cur, &want);
        assert_eq!(s.name.as_deref(), Some("custom"));
        assert_eq!(s.role, Some(NodeSpecRoleEnum::MANAGER));
        assert_eq!(s.availability, Some(NodeSpecAvailabilityEnum::PAUSE));
        assert_eq!(s.labels, Some(Default::default()));
    }
}
