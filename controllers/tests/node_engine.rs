//! The Node controller against the real (single-node) Swarm engine: each test converges over the
//! runtime's fake API store and checks the engine with bollard. Every test labels the shared node
//! only under its own `nodetest-<id>` key prefix, and a guard removes those labels when the test
//! ends, also when it fails. Multi-node behaviour (drains that move tasks, promotion, a node going
//! down) is tested in the 3-node lab (`tests/tests/lab/node.rs`).

mod common;

use berth_api_types::Kind;
use berth_controllers::node::status::NodeStatus;
use berth_controllers::node::NodeController;
use berth_controllers::runtime::converge_once;
use berth_controllers::runtime::testing::FakeStore;
use bollard::Docker;
use common::{swarm_engine, test_names};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

/// Removes the test's node labels (keys starting with the prefix) from the local node (by ID:
/// `docker node update` does not take `self`).
struct LabelCleanup {
    prefix: String,
    node_id: String,
}

impl Drop for LabelCleanup {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args([
                "node",
                "inspect",
                &self.node_id,
                "--format",
                "{{json .Spec.Labels}}",
            ])
            .output();
        let Ok(out) = out else { return };
        let labels: HashMap<String, String> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        for key in labels.keys().filter(|k| k.starts_with(&self.prefix)) {
            let _ = Command::new("docker")
                .args(["node", "update", "--label-rm", key, &self.node_id])
                .output();
        }
    }
}

struct Fixture {
    docker: Docker,
    store: Arc<FakeStore>,
    ctl: Arc<NodeController>,
    prefix: String,
    node_id: String,
    _guard: LabelCleanup,
}

impl Fixture {
    async fn new() -> Fixture {
        let docker = swarm_engine().await;
        let (prefix, instance) = test_names("node");
        let node_id = docker
            .info()
            .await
            .unwrap()
            .swarm
            .and_then(|s| s.node_id)
            .expect("the engine's node id");
        Fixture {
            store: Arc::new(FakeStore::new(&instance)),
            ctl: Arc::new(NodeController::new(docker.clone())),
            docker,
            _guard: LabelCleanup {
                prefix: prefix.clone(),
                node_id: node_id.clone(),
            },
            prefix,
            node_id,
        }
    }

    async fn converge(&self) {
        converge_once(&self.ctl, self.store.clone())
            .await
            .expect("converge");
    }

    /// The name of the object that stands for the local node.
    fn local_name(&self) -> String {
        let objects = self.store.objects(Kind::Node);
        objects
            .iter()
            .find(|o| o.status["nodeId"] == self.node_id.as_str())
            .map(|o| o.metadata.name.clone())
            .unwrap_or_else(|| panic!("no Node object stands for {}: {objects:?}", self.node_id))
    }

    fn status(&self, name: &str) -> NodeStatus {
        serde_json::from_value(self.store.status(Kind::Node, name)).expect("status decodes")
    }

    fn set_spec(&self, name: &str, spec: Value) {
        self.store.put(json!({
            "apiVersion": "berth/v1", "kind": "Node", "metadata": {"name": name}, "spec": spec
        }));
    }

    async fn engine_labels(&self) -> HashMap<String, String> {
        let node = self.docker.inspect_node(&self.node_id).await.unwrap();
        node.spec.and_then(|s| s.labels).unwrap_or_default()
    }

    fn ready(&self, name: &str) -> (String, String) {
        let s = self.status(name);
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("a Ready condition");
        (c.reason.clone(), c.message.clone())
    }
}

#[tokio::test]
async fn the_local_node_is_registered_with_its_state() {
    let f = Fixture::new().await;
    // First converge registers an object for every node; the second reports them.
    f.converge().await;
    f.converge().await;
    let name = f.local_name();
    let s = f.status(&name);
    assert_eq!(s.state.as_deref(), Some("ready"), "{s:?}");
    assert_eq!(s.role.map(|r| r.as_str()), Some("manager"));
    assert!(s.leader, "a single manager leads: {s:?}");
    assert_eq!(s.manager_reachability.as_deref(), Some("reachable"));
    assert!(s.address.is_some() && s.engine_version.is_some() && s.os.is_some());
    assert!(s.cpus.unwrap_or(0.0) > 0.0 && s.memory_bytes.unwrap_or(0) > 0);
    assert_eq!(f.ready(&name).0, "NodeReady");
    assert_eq!(s.observed_generation, Some(1));
}

#[tokio::test]
async fn spec_labels_are_applied_kept_and_removed() {
    let f = Fixture::new().await;
    f.converge().await;
    f.converge().await;
    let name = f.local_name();
    let zone = format!("{}.zone", f.prefix);
    let disk = format!("{}.disk", f.prefix);
    f.set_spec(
        &name,
        json!({"labels": {zone.clone(): "a", disk.clone(): "ssd"}}),
    );
    f.converge().await;
    let labels = f.engine_labels().await;
    assert_eq!(labels.get(&zone).map(String::as_str), Some("a"));
    assert_eq!(labels.get(&disk).map(String::as_str), Some("ssd"));
    assert_eq!(f.ready(&name).0, "NodeReady");

    // A change by hand to a label the spec sets is put back; one under another key is left alone.
    let by_hand = format!("{}.by-hand", f.prefix);
    for arg in [format!("{zone}=b"), format!("{by_hand}=x")] {
        let out = Command::new("docker")
            .args(["node", "update", "--label-add", &arg, &f.node_id])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    f.converge().await;
    let labels = f.engine_labels().await;
    assert_eq!(labels.get(&zone).map(String::as_str), Some("a"), "put back");
    assert_eq!(
        labels.get(&by_hand).map(String::as_str),
        Some("x"),
        "left alone"
    );

    // A key dropped from the spec is removed from the node.
    f.set_spec(&name, json!({"labels": {zone.clone(): "a"}}));
    f.converge().await;
    let labels = f.engine_labels().await;
    assert!(!labels.contains_key(&disk), "{labels:?}");
    assert_eq!(labels.get(&zone).map(String::as_str), Some("a"));
    assert_eq!(f.status(&name).managed_labels, [zone]);
}

#[tokio::test]
async fn unsafe_changes_are_refused_before_the_engine_is_touched() {
    let f = Fixture::new().await;
    let nodes = f.docker.list_nodes(None).await.unwrap();
    assert_eq!(
        nodes.len(),
        1,
        "this test demotes the only manager and must run on a single-node swarm (is the 3-node lab up?)"
    );
    f.converge().await;
    f.converge().await;
    let name = f.local_name();
    let before = f.docker.inspect_node(&f.node_id).await.unwrap();

    f.set_spec(&name, json!({"role": "worker"}));
    f.converge().await;
    let (reason, message) = f.ready(&name);
    assert_eq!(reason, "UnsafeChange");
    assert!(message.contains("without a manager"), "{message}");

    f.set_spec(&name, json!({"availability": "drain"}));
    f.converge().await;
    let (reason, message) = f.ready(&name);
    assert_eq!(reason, "UnsafeChange");
    assert!(message.contains("ingress proxy"), "{message}");

    // (Compared field by field: the other tests of this file label the node meanwhile.)
    let after = f.docker.inspect_node(&f.node_id).await.unwrap();
    let (before, after) = (before.spec.unwrap(), after.spec.unwrap());
    assert_eq!(before.role, after.role, "the engine's node was not demoted");
    assert_eq!(before.availability, after.availability, "nor drained");
    // Back to a spec that asks for nothing: Ready again.
    f.set_spec(&name, json!({}));
    f.converge().await;
    assert_eq!(f.ready(&name).0, "NodeReady");
}

#[tokio::test]
async fn an_object_for_a_node_that_is_not_there_says_so() {
    let f = Fixture::new().await;
    let name = format!("{}-absent", f.prefix);
    f.set_spec(&name, json!({"labels": {"zone": "a"}}));
    f.converge().await;
    let s = f.status(&name);
    assert_eq!(s.state.as_deref(), Some("gone"));
    assert_eq!(f.ready(&name).0, "NodeNotFound");
    // It stays: it may be declared ahead of the node joining.
    assert!(f.store.object(Kind::Node, &name).is_some());
}
