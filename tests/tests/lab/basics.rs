//! Scenarios that prove the lab itself: three distinct nodes Ready, placement onto a named
//! worker, and a worker stopped and started again, as the manager sees it. These are harness
//! tests, so they talk to the engines directly (bollard) rather than through berth.

use anyhow::{bail, ensure, Context, Result};
use berth_e2e::lab::{block_on, eventually, Lab, Scenario};
use berth_e2e::{prefix, Cleanup};
use bollard::models::{
    NetworkAttachmentConfig, NetworkCreateRequest, NodeSpecRoleEnum, NodeState, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement,
};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, ListNodesOptions};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const BUSYBOX: &str = "berth-test/busybox:1";
/// Generous on a loaded 2-core machine; a task starts in ~1 s here.
const CONVERGE: Duration = Duration::from_secs(60);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "three_nodes_ready",
            run: three_nodes_ready,
        },
        Scenario {
            name: "placement_runs_task_on_named_worker",
            run: placement_runs_task_on_named_worker,
        },
        Scenario {
            name: "overlay_traffic_crosses_nodes",
            run: overlay_traffic_crosses_nodes,
        },
        Scenario {
            name: "stopped_worker_goes_down_and_comes_back",
            run: stopped_worker_goes_down_and_comes_back,
        },
    ]
}

/// The manager lists exactly the lab's three nodes, all Ready and active, with distinct
/// hostnames and addresses; node 1 leads, 2 and 3 are workers; each engine has the test images.
fn three_nodes_ready(lab: &Lab) -> Result<()> {
    let nodes = lab.nodes();
    ensure!(nodes.len() == 3, "expected 3 lab nodes, got {nodes:?}");
    let want: Vec<(String, String)> = vec![
        (nodes[0].hostname.clone(), "10.99.0.1".into()),
        ("berth-lab-2".into(), "10.99.0.2".into()),
        ("berth-lab-3".into(), "10.99.0.3".into()),
    ];
    for (n, (hostname, addr)) in nodes.iter().zip(&want) {
        ensure!(
            (&n.hostname, &n.addr) == (hostname, addr),
            "node index {}: {} at {}, expected {hostname} at {addr}",
            n.index,
            n.hostname,
            n.addr
        );
    }
    let hostnames: HashSet<_> = nodes.iter().map(|n| &n.hostname).collect();
    ensure!(
        hostnames.len() == 3,
        "hostnames are not distinct: {nodes:?}"
    );
    ensure!(
        nodes[0].docker_host.is_none(),
        "node index 0 must be the host's engine"
    );

    block_on(async {
        let listed = lab
            .docker(0)
            .list_nodes(None::<ListNodesOptions>)
            .await
            .context("list nodes")?;
        let summary: Vec<String> = listed
            .iter()
            .map(|n| {
                let host = n.description.as_ref().and_then(|d| d.hostname.clone());
                let state = n.status.as_ref().and_then(|s| s.state);
                format!("{host:?} {state:?}")
            })
            .collect();
        ensure!(
            listed.len() == 3,
            "the manager lists {} nodes, expected the lab's 3: {summary:?}",
            listed.len()
        );
        for node in &listed {
            let id = node.id.clone().unwrap_or_default();
            let Some(i) = lab.index_of(&id) else {
                bail!("the manager lists {id}, which is not a lab node: {summary:?}");
            };
            let status = node.status.clone().unwrap_or_default();
            ensure!(
                status.state == Some(NodeState::READY),
                "node index {i} is {:?} ({:?})",
                status.state,
                status.message
            );
            ensure!(
                status.addr.as_deref() == Some(nodes[i].addr.as_str()),
                "node index {i}: the manager sees address {:?}, expected {}",
                status.addr,
                nodes[i].addr
            );
            let spec = node.spec.clone().unwrap_or_default();
            let want_role = if i == 0 {
                NodeSpecRoleEnum::MANAGER
            } else {
                NodeSpecRoleEnum::WORKER
            };
            ensure!(
                spec.role == Some(want_role),
                "node index {i} has role {:?}",
                spec.role
            );
            let leader = node
                .manager_status
                .as_ref()
                .and_then(|m| m.leader)
                .unwrap_or(false);
            ensure!(leader == (i == 0), "node index {i}: leader = {leader}");
        }
        for n in nodes {
            let d = lab.docker(n.index);
            for image in [
                BUSYBOX,
                "berth-test/app:2",
                "berth-demo/web:1",
                "berth-test/caddy:1",
            ] {
                d.inspect_image(image)
                    .await
                    .with_context(|| format!("image {image} on {}", n.hostname))?;
            }
        }
        Ok(())
    })
}

/// On an (unencrypted) overlay network, a web task on node 3 answers HTTP from tasks on node 1
/// and node 2: VXLAN flows between all the lab's namespaces, node 2 to node 3 across the bridge
/// included. (Encrypted overlays do not carry traffic between the lab's nodes: ESP between
/// namespaces does not work in this VM's kernel; see docs/contributing.md.)
fn overlay_traffic_crosses_nodes(lab: &Lab) -> Result<()> {
    let prefix = prefix("lab-basics");
    let _cleanup = Cleanup::new(&prefix);
    let net = format!("{prefix}-net");
    let web = format!("{prefix}-web");
    block_on(async {
        let d = lab.docker(0);
        d.create_network(NetworkCreateRequest {
            name: net.clone(),
            driver: Some("overlay".into()),
            ..Default::default()
        })
        .await
        .context("create the overlay network")?;
        let on_net = |mut spec: ServiceSpec| {
            if let Some(t) = spec.task_template.as_mut() {
                t.networks = Some(vec![NetworkAttachmentConfig {
                    target: Some(net.clone()),
                    ..Default::default()
                }]);
            }
            spec
        };
        let mut web_spec = sleeper(
            &web,
            vec![format!("node.hostname=={}", lab.node(2).hostname)],
        );
        if let Some(c) = web_spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            // berth-demo/web:1's httpd ("hello from berth" on 8080), under a shell that exits
            // on SIGTERM: httpd as PID 1 ignores it, and the cleanup would wait 10 s.
            c.image = Some("berth-demo/web:1".into());
            c.command = Some(vec![
                "sh".into(),
                "-c".into(),
                "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait".into(),
            ]);
        }
        d.create_service(on_net(web_spec), None)
            .await
            .context("create web")?;
        let mut clients = Vec::new();
        for i in [0, 1] {
            let name = format!("{prefix}-client{i}");
            let spec = sleeper(
                &name,
                vec![format!("node.hostname=={}", lab.node(i).hostname)],
            );
            d.create_service(on_net(spec), None)
                .await
                .context("create client")?;
            clients.push((i, name));
        }

        let web_task = lab.wait_running_tasks(&web, 1, CONVERGE).await?.remove(0);
        ensure!(web_task.0 == 2, "web runs on node index {}", web_task.0);
        // Its address on the overlay, from its own engine (bollard's Task has no
        // NetworksAttachments).
        let (node, container) = lab.task_container(&web_task)?;
        let inspected = lab
            .docker(node)
            .inspect_container(&container, None::<InspectContainerOptions>)
            .await
            .context("inspect the web container on its node")?;
        let ip = inspected
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get(&net).and_then(|e| e.ip_address.clone()))
            .filter(|ip| !ip.is_empty())
            .with_context(|| format!("the web container has no address on {net}"))?;
        for (i, name) in &clients {
            let task = lab.wait_running_tasks(name, 1, CONVERGE).await?.remove(0);
            ensure!(task.0 == *i, "{name} runs on node index {}", task.0);
            let (node, container) = lab.task_container(&task)?;
            // busybox's wget segfaults here (static NSS); nc to an IP does not.
            let get = format!("printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 {ip} 8080");
            let asked = Instant::now();
            let seen = eventually(
                Duration::from_secs(30),
                "an HTTP answer across nodes",
                || {
                    let get = get.clone();
                    let container = container.clone();
                    async move {
                        match lab.exec(node, &container, &["sh", "-c", &get]).await {
                            Ok((0, out)) if out.contains("hello from berth") => Ok(out),
                            Ok((code, out)) => Err(format!("exit {code}: {out}")),
                            Err(e) => Err(format!("{e:#}")),
                        }
                    }
                },
            )
            .await
            .with_context(|| {
                format!(
                    "{} -> web on {} ({ip})",
                    lab.node(*i).hostname,
                    lab.node(2).hostname
                )
            })?;
            // Swarm spreads a new task's overlay address by gossip: the first tries may fail.
            eprint!(
                "[{} -> {}: {:.1}s] ",
                lab.node(*i).hostname,
                lab.node(2).hostname,
                asked.elapsed().as_secs_f64()
            );
            ensure!(seen.contains("200 OK"), "unexpected answer: {seen}");
        }
        Ok(())
    })
}

/// A busybox task that stops at once on SIGTERM (`sleep` as PID 1 ignores it, and every task
/// removal would then wait the 10 s grace period).
fn sleeper(name: &str, constraints: Vec<String>) -> ServiceSpec {
    ServiceSpec {
        name: Some(name.to_string()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(BUSYBOX.to_string()),
                command: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "trap 'exit 0' TERM; sleep 100000 & wait".into(),
                ]),
                ..Default::default()
            }),
            placement: Some(TaskSpecPlacement {
                constraints: Some(constraints),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A service constrained to `node.hostname==berth-lab-2` runs its task on node 2: the manager
/// says so, and the container is on node 2's engine, not on the host's.
fn placement_runs_task_on_named_worker(lab: &Lab) -> Result<()> {
    let prefix = prefix("lab-basics");
    // Removes the service by its prefix when the scenario ends, failed or not.
    let _cleanup = Cleanup::new(&prefix);
    let name = format!("{prefix}-pinned");
    let target = lab.node(1);
    block_on(async {
        let start = Instant::now();
        lab.docker(0)
            .create_service(
                sleeper(&name, vec![format!("node.hostname=={}", target.hostname)]),
                None,
            )
            .await
            .context("create service")?;
        let tasks = lab.wait_running_tasks(&name, 1, CONVERGE).await?;
        eprintln!(
            "lab: a task of a local image ran on {} {:.1}s after the service was created",
            target.hostname,
            start.elapsed().as_secs_f64()
        );
        ensure!(
            tasks[0].0 == 1,
            "the task runs on node index {}, not on {}",
            tasks[0].0,
            target.hostname
        );
        let running_on = |i: usize| {
            let d = lab.docker(i);
            let name = name.clone();
            async move {
                d.list_containers(Some(ListContainersOptions {
                    filters: Some(HashMap::from([
                        (
                            "label".to_string(),
                            vec![format!("com.docker.swarm.service.name={name}")],
                        ),
                        ("status".to_string(), vec!["running".to_string()]),
                    ])),
                    ..Default::default()
                }))
                .await
                .map(|c| c.len())
            }
        };
        let (on_target, on_host) = (running_on(1).await?, running_on(0).await?);
        ensure!(
            (on_target, on_host) == (1, 0),
            "running containers: {on_target} on {}, {on_host} on the host (expected 1 and 0)",
            target.hostname
        );
        Ok(())
    })
}

/// stop_node kills a worker: the manager reports it down; start_node brings the same node back
/// (same ID, images still there) and the manager reports it ready. Prints both times.
fn stopped_worker_goes_down_and_comes_back(lab: &Lab) -> Result<()> {
    let i = 2;
    let node = lab.node(i).clone();
    ensure!(
        lab.stop_node(0).is_err(),
        "stop_node(0) must refuse: it is the manager every test shares"
    );
    block_on(lab.wait_node_ready(i, CONVERGE))?;

    let stopped = Instant::now();
    lab.stop_node(i)?;
    let _restart = lab.start_on_drop(i);
    block_on(lab.wait_node_down(i, CONVERGE))?;
    eprintln!(
        "lab: {} was reported down {:.1}s after stop_node killed its engine",
        node.hostname,
        stopped.elapsed().as_secs_f64()
    );
    ensure!(
        !block_on(lab.engine_answers(i)),
        "{}'s engine still answers after stop_node",
        node.hostname
    );

    let started = Instant::now();
    lab.start_node(i)?;
    let engine = started.elapsed();
    block_on(lab.wait_node_ready(i, CONVERGE))?;
    eprintln!(
        "lab: {} was reported ready {:.1}s after start_node was called (its engine answered after {:.1}s)",
        node.hostname,
        started.elapsed().as_secs_f64(),
        engine.as_secs_f64()
    );
    block_on(async {
        let d = lab.docker(i);
        let info = d
            .info()
            .await
            .context("docker info on the restarted node")?;
        let id = info.swarm.and_then(|s| s.node_id).unwrap_or_default();
        ensure!(
            id == node.node_id,
            "the restarted engine is node {id}, not {}: start_node must keep the node",
            node.node_id
        );
        d.inspect_image(BUSYBOX)
            .await
            .context("the test image is gone from the restarted node")?;
        Ok(())
    })
}
