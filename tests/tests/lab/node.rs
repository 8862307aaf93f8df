//! The Node controller in the 3-node lab, end to end: a `berth up` on the manager registers the
//! three nodes, and teams label, drain, promote and demote them through berth (manifests and the
//! API), as they would with no Docker access. Each scenario has its own berth installation and
//! name prefix, and puts back what it changed on the nodes even when it fails (guards).
//!
//! Services here join an unencrypted network of their own: in this lab, encrypted overlays do not
//! carry traffic between the namespaces (LAB-NOTES), and these scenarios are about placement, not
//! about the data path.

use anyhow::{bail, ensure, Context, Result};
use berth_api_types::Kind;
use berth_e2e::lab::{block_on, eventually as lab_eventually, Lab, Scenario};
use berth_e2e::{condition, eventually, prefix, Berth, Cleanup};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

const BUSYBOX: &str = "berth-test/busybox:1";
/// Generous on a loaded 2-core machine; tasks of local images on the extra nodes start late.
const CONVERGE: Duration = Duration::from_secs(90);
/// See `promote_demote_and_the_last_manager`: past this, Swarm is stuck rather than slow.
const DEMOTION: Duration = Duration::from_secs(60);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "nodes_are_registered_with_their_state",
            run: nodes_are_registered_with_their_state,
        },
        Scenario {
            name: "labels_steer_placement_and_drift_is_put_back",
            run: labels_steer_placement_and_drift_is_put_back,
        },
        Scenario {
            name: "drain_moves_tasks_and_reports_drained",
            run: drain_moves_tasks_and_reports_drained,
        },
        Scenario {
            name: "a_stopped_node_shows_down_and_comes_back",
            run: a_stopped_node_shows_down_and_comes_back,
        },
        // Last of the whole binary (the `node` area runs last): when Swarm does not complete the
        // demotion, the host's swarm may be left without a working leader until `scripts/lab
        // down` recovers it, and no other scenario must run on it meanwhile.
        Scenario {
            name: "promote_demote_and_the_last_manager",
            run: promote_demote_and_the_last_manager,
        },
    ]
}

/// Puts every lab node back as the lab made it (active, its role, none of the scenario's labels)
/// when dropped, with the docker CLI on the manager, so a failed scenario does not leave the next
/// one a drained or promoted node.
struct NodesBack<'a> {
    lab: &'a Lab,
    label_prefix: String,
}

impl Drop for NodesBack<'_> {
    fn drop(&mut self) {
        for (i, node) in self.lab.nodes().iter().enumerate() {
            let role = if i == 0 { "manager" } else { "worker" };
            let mut args = vec![
                "node".to_string(),
                "update".into(),
                "--availability".into(),
                "active".into(),
                "--role".into(),
                role.into(),
            ];
            let labels = Command::new("docker")
                .args(["node", "inspect", &node.node_id, "--format"])
                .arg("{{range $k, $v := .Spec.Labels}}{{$k}}\n{{end}}")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for key in labels.lines().filter(|k| k.starts_with(&self.label_prefix)) {
                args.push("--label-rm".into());
                args.push(key.to_string());
            }
            args.push(node.node_id.clone());
            let _ = Command::new("docker").args(&args).output();
        }
    }
}

/// A berth on the manager, a prefix, and the guards of one scenario (declared so that they drop
/// in this order: berth stops first, then the nodes and the Swarm objects are put back).
struct Setup<'a> {
    berth: Berth,
    prefix: String,
    _nodes: NodesBack<'a>,
    _cleanup: Cleanup,
}

impl<'a> Setup<'a> {
    fn new(lab: &'a Lab, test: &str) -> Setup<'a> {
        let prefix = prefix(test);
        let cleanup = Cleanup::new(&prefix);
        let nodes = NodesBack {
            lab,
            label_prefix: prefix.clone(),
        };
        Setup {
            berth: Berth::start(None),
            prefix,
            _nodes: nodes,
            _cleanup: cleanup,
        }
    }

    /// The Node object's name for lab node `i`: its hostname (unique in the lab).
    fn name(&self, lab: &Lab, i: usize) -> String {
        lab.node(i).hostname.to_ascii_lowercase()
    }

    fn apply_node(&self, name: &str, spec: &str) {
        self.berth.apply(&format!(
            "apiVersion: berth/v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {spec}\n"
        ));
    }

    /// An unencrypted network and a busybox Service on it with `replicas` and `constraints`.
    fn apply_service(&self, name: &str, replicas: u32, constraints: &[&str]) {
        let constraints: Vec<String> = constraints.iter().map(|c| format!("\"{c}\"")).collect();
        self.berth.apply(&format!(
            "apiVersion: berth/v1\nkind: Network\nmetadata:\n  name: {p}-plain\nspec:\n  encrypted: false\n---\n\
             apiVersion: berth/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  image: {BUSYBOX}\n  \
             command: [sleep, \"3600\"]\n  replicas: {replicas}\n  networks: [{p}-plain]\n  \
             placement:\n    constraints: [{c}]\n",
            p = self.prefix,
            c = constraints.join(", ")
        ));
    }

    /// Waits until Node `name`'s status (for its current generation) satisfies `ok`.
    async fn wait_node(&self, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let ok = &ok;
        eventually(
            &self.berth,
            CONVERGE,
            &format!("node/{name}: {what}"),
            || async move {
                let o = self
                    .berth
                    .object(Kind::Node, name)
                    .await
                    .ok_or("no object")?;
                let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
                if current && ok(&o) {
                    Ok(o)
                } else {
                    Err(format!("status {}", o["status"]))
                }
            },
        )
        .await
    }
}

fn ready_reason(o: &Value) -> String {
    condition(o, "Ready")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The engine's labels of lab node `i`, as the manager has them.
async fn engine_labels(lab: &Lab, i: usize) -> Result<std::collections::HashMap<String, String>> {
    let node = lab.docker(0).inspect_node(&lab.node(i).node_id).await?;
    Ok(node.spec.and_then(|s| s.labels).unwrap_or_default())
}

/// All three nodes appear with their role, ready state, address and resources, and `berth get
/// nodes` shows them.
fn nodes_are_registered_with_their_state(lab: &Lab) -> Result<()> {
    let s = Setup::new(lab, "nodereg");
    block_on(async {
        for i in 0..3 {
            let name = s.name(lab, i);
            let o = s
                .wait_node(&name, "ready", |o| ready_reason(o) == "NodeReady")
                .await;
            let st = &o["status"];
            let role = if i == 0 { "manager" } else { "worker" };
            ensure!(st["role"] == role, "{name}: {st}");
            ensure!(st["state"] == "ready", "{name}: {st}");
            ensure!(st["address"] == lab.node(i).addr.as_str(), "{name}: {st}");
            ensure!(st["nodeId"] == lab.node(i).node_id.as_str(), "{name}: {st}");
            ensure!(st["cpus"].as_f64().unwrap_or(0.0) > 0.0, "{name}: {st}");
            ensure!(st["memoryBytes"].as_i64().unwrap_or(0) > 0, "{name}: {st}");
            ensure!(st["engineVersion"].is_string(), "{name}: {st}");
            ensure!(
                st["leader"].as_bool().unwrap_or(false) == (i == 0),
                "{name}: {st}"
            );
        }
        Ok(())
    })?;
    let table = s.berth.cli_ok(&["get", "nodes"]);
    let header = table.lines().next().unwrap_or("");
    let columns: Vec<&str> = header.split_whitespace().collect();
    ensure!(
        columns
            == [
                "NAME",
                "ROLE",
                "STATE",
                "AVAILABILITY",
                "LEADER",
                "TASKS",
                "ENGINE",
                "AGE"
            ],
        "{table}"
    );
    for i in 0..3 {
        let name = s.name(lab, i);
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| format!("no row for {name} in\n{table}"))?;
        ensure!(row.contains("ready") && row.contains("active"), "{row}");
    }
    let join = s.berth.cli_ok(&["node", "join-command"]);
    ensure!(
        join.starts_with("docker swarm join --token SWMTKN-") && join.trim_end().ends_with(":2377"),
        "join command: {}",
        join.split("SWMTKN").next().unwrap_or("")
    );
    Ok(())
}

/// A label set through berth steers a Service's tasks onto that node; a label changed by hand is
/// put back; a label dropped from the spec is removed from the node.
fn labels_steer_placement_and_drift_is_put_back(lab: &Lab) -> Result<()> {
    let s = Setup::new(lab, "nodelabel");
    let key = format!("{}.zone", s.prefix);
    let node2 = s.name(lab, 1);
    let svc = format!("{}-pinned", s.prefix);
    block_on(async {
        s.wait_node(&node2, "registered", |o| ready_reason(o) == "NodeReady")
            .await;
        s.apply_node(&node2, &format!("{{labels: {{\"{key}\": blue}}}}"));
        s.wait_node(&node2, "labelled", |o| {
            o["status"]["labels"][key.as_str()] == "blue"
        })
        .await;
        s.apply_service(&svc, 2, &[&format!("node.labels.{key} == blue")]);
        let tasks = lab.wait_running_tasks(&svc, 2, CONVERGE).await?;
        ensure!(
            tasks.iter().all(|(i, _)| *i == 1),
            "tasks not all on {node2}: {:?}",
            tasks.iter().map(|(i, _)| i).collect::<Vec<_>>()
        );

        // By hand, to a key the spec sets: put back.
        let out = Command::new("docker")
            .args(["node", "update", "--label-add", &format!("{key}=red")])
            .arg(&lab.node(1).node_id)
            .output()?;
        ensure!(out.status.success(), "{out:?}");
        eventually(&s.berth, CONVERGE, "the label put back", || async {
            let labels = engine_labels(lab, 1).await.map_err(|e| e.to_string())?;
            match labels.get(&key).map(String::as_str) {
                Some("blue") => Ok(()),
                other => Err(format!("{key}={other:?}")),
            }
        })
        .await;

        // Dropped from the spec: removed from the node.
        s.apply_node(&node2, "{}");
        eventually(&s.berth, CONVERGE, "the label removed", || async {
            let labels = engine_labels(lab, 1).await.map_err(|e| e.to_string())?;
            if labels.contains_key(&key) {
                Err(format!("still {labels:?}"))
            } else {
                Ok(())
            }
        })
        .await;
        Ok(())
    })
}

/// Draining a worker moves its tasks to the other worker and reports `Drained` with the count;
/// active again, the condition goes.
fn drain_moves_tasks_and_reports_drained(lab: &Lab) -> Result<()> {
    let s = Setup::new(lab, "nodedrain");
    let node3 = s.name(lab, 2);
    let svc = format!("{}-spread", s.prefix);
    block_on(async {
        s.apply_service(&svc, 2, &["node.role == worker"]);
        let tasks = lab.wait_running_tasks(&svc, 2, CONVERGE).await?;
        let on3 = tasks.iter().filter(|(i, _)| *i == 2).count();
        let start = Instant::now();
        s.apply_node(&node3, "{availability: drain}");
        let o = s
            .wait_node(&node3, "drained", |o| {
                condition(o, "Drained").is_some_and(|c| c["status"] == "True")
            })
            .await;
        let drained = start.elapsed();
        // The count is of every task the node had (other services' too), at least this one's.
        let message = condition(&o, "Drained").unwrap()["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let moved: usize = message
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no count in `{message}`"))?;
        ensure!(
            moved >= on3 && message.ends_with("none left on the node"),
            "{on3} task(s) of the service were on {node3}: {message}"
        );
        let tasks = lab.wait_running_tasks(&svc, 2, CONVERGE).await?;
        ensure!(
            tasks.iter().all(|(i, _)| *i == 1),
            "tasks still on the drained node: {:?}",
            tasks.iter().map(|(i, _)| i).collect::<Vec<_>>()
        );
        eprintln!(
            "node: drain of {node3} with {on3} task(s) reported Drained after {:.1}s",
            drained.as_secs_f64()
        );

        s.apply_node(&node3, "{availability: active}");
        s.wait_node(&node3, "active again", |o| {
            o["status"]["availability"] == "active" && condition(o, "Drained").is_none()
        })
        .await;
        Ok(())
    })
}

/// Demoting the only manager is refused with a message and the engine is unchanged; a worker is
/// promoted (reachable manager) and demoted back.
fn promote_demote_and_the_last_manager(lab: &Lab) -> Result<()> {
    let s = Setup::new(lab, "noderole");
    let manager = s.name(lab, 0);
    let node2 = s.name(lab, 1);
    block_on(async {
        s.wait_node(&manager, "registered", |o| ready_reason(o) == "NodeReady")
            .await;
        s.apply_node(&manager, "{role: worker}");
        let o = s
            .wait_node(&manager, "refused", |o| ready_reason(o) == "UnsafeChange")
            .await;
        let message = condition(&o, "Ready").unwrap()["message"].to_string();
        ensure!(message.contains("without a manager"), "{message}");
        let node = lab.docker(0).inspect_node(&lab.node(0).node_id).await?;
        ensure!(
            node.spec
                .and_then(|s| s.role)
                .map(|r| r.to_string())
                .as_deref()
                == Some("manager"),
            "the engine's only manager was demoted"
        );
        s.apply_node(&manager, "{}");
        s.wait_node(&manager, "ready again", |o| ready_reason(o) == "NodeReady")
            .await;

        s.apply_node(&node2, "{role: manager}");
        s.wait_node(&node2, "a reachable manager", |o| {
            o["status"]["role"] == "manager" && o["status"]["managerReachability"] == "reachable"
        })
        .await;
        // Demoting one of two managers removes it from Raft, a membership change both must
        // commit (the leader's store waits on it). Ask only once the host is the leader and node
        // 2 a reachable follower: demoting the leader would first have to hand leadership over.
        s.wait_node(&manager, "the Raft leader", |o| {
            o["status"]["leader"] == true
        })
        .await;
        let start = Instant::now();
        s.apply_node(&node2, "{role: worker}");
        // Under a second once the lab's swarm snapshots often (`scripts/lab up` sets a snapshot
        // interval of 200; docs/nodes.md): with Docker's default of 10,000 the new manager
        // first replayed the whole log and every write waited on it for minutes. A stall here
        // is Swarm stuck, not berth: the scenario fails saying so, and `scripts/lab down` finds
        // a lab node still in Raft and recovers the host's swarm, so the tests after it run.
        let demoted = lab_eventually(
            DEMOTION,
            &format!("node/{node2}: a worker again"),
            || async {
                let o = s
                    .berth
                    .object(Kind::Node, &node2)
                    .await
                    .ok_or("no object")?;
                let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
                // Also out of Raft: only then is the swarm back to one manager (and writable at
                // once, whatever the engine did meanwhile).
                let left_raft = o["status"]["managerReachability"].is_null();
                if current
                    && o["status"]["role"] == "worker"
                    && left_raft
                    && ready_reason(&o) == "NodeReady"
                {
                    Ok(())
                } else {
                    Err(format!("status {}", o["status"]))
                }
            },
        )
        .await;
        if let Err(e) = demoted {
            bail!(
                "Swarm did not complete the demotion of {node2} within {DEMOTION:?} (berth asked for \
                 it: the Node's spec role is worker). The host's swarm may be stuck in the Raft \
                 membership change; `scripts/lab down` at the end of this run recovers it with \
                 `docker swarm init --force-new-cluster`. {e:#}"
            );
        }
        eprintln!(
            "node: {node2} promoted, then demoted in {:.1}s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

/// A worker's dockerd stopped: its Node shows `down` (the time is printed), its task runs on the
/// other worker; started again: `ready`.
fn a_stopped_node_shows_down_and_comes_back(lab: &Lab) -> Result<()> {
    let s = Setup::new(lab, "nodedown");
    let svc = format!("{}-moves", s.prefix);
    block_on(async {
        s.apply_service(&svc, 1, &["node.role == worker"]);
        let tasks = lab.wait_running_tasks(&svc, 1, CONVERGE).await?;
        // Stop the worker that runs the task: it must then move to the other one.
        let (victim, other) = if tasks[0].0 == 1 { (1, 2) } else { (2, 1) };
        let name = s.name(lab, victim);
        s.wait_node(&name, "ready", |o| ready_reason(o) == "NodeReady")
            .await;

        lab.stop_node(victim)?;
        let start = Instant::now();
        let _restart = lab.start_on_drop(victim);
        // The engine's own verdict and berth's, timed side by side: Swarm marks a node down when
        // its heartbeats stop (5 s period, 3 missed: 10-15 s after the last one); what berth adds
        // is the time from there to the Node's status.
        let engine_down = async {
            lab.wait_node_state(victim, bollard::models::NodeState::DOWN, CONVERGE)
                .await
        };
        let berth_down = async {
            let o = s
                .wait_node(&name, "down", |o| o["status"]["state"] == "down")
                .await;
            (o, start.elapsed())
        };
        let (engine_after, (o, down_after)) = tokio::join!(engine_down, berth_down);
        let engine_after = engine_after?;
        ensure!(ready_reason(&o) == "NodeDown", "{}", o["status"]);
        eprintln!(
            "node: {name}'s dockerd stopped -> engine says down after {:.1}s, Node status down after {:.1}s",
            engine_after.as_secs_f64(),
            down_after.as_secs_f64()
        );
        ensure!(
            down_after < engine_after + Duration::from_secs(3),
            "berth reported down {:?} after the engine did",
            down_after.saturating_sub(engine_after)
        );
        ensure!(
            down_after < Duration::from_secs(20),
            "down only after {down_after:?} (Swarm's default heartbeat gives 10-15 s)"
        );
        let tasks = lab.wait_running_tasks(&svc, 1, CONVERGE).await?;
        ensure!(
            tasks[0].0 == other,
            "the task did not move off the stopped node"
        );

        lab.start_node(victim)?;
        let start = Instant::now();
        s.wait_node(&name, "ready again", |o| o["status"]["state"] == "ready")
            .await;
        eprintln!(
            "node: {name}'s dockerd started -> Node state ready after {:.1}s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
