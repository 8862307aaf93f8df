//! `berth exec` into a task on another node than the API server's: the API server (on the
//! manager, node 1) starts an exec agent on node 2 that mounts node 2's engine socket, and the
//! command's output, input, terminal and exit code travel through it. berth runs with
//! `--allow-remote-exec` (off by default), its agents on the node's host network (the lab's
//! engines have no bridge) and the lab's per-node sockets (`/var/run/berth-lab/<hostname>.sock`,
//! where a real node has /var/run/docker.sock).

use anyhow::{ensure, Context, Result};
use berth_e2e::lab::{block_on, Lab, Scenario};
use berth_e2e::{prefix, sleeping_service, Berth, Cleanup};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "exec_reaches_a_task_on_node_2_through_an_agent",
        run: exec_reaches_a_task_on_node_2_through_an_agent,
    }]
}

fn exec_reaches_a_task_on_node_2_through_an_agent(lab: &Lab) -> Result<()> {
    let p = prefix("labexec");
    let _cleanup = Cleanup::new(&p);
    let b = Berth::start_env(
        &[],
        &[
            ("BERTH_ALLOW_REMOTE_EXEC", "1"),
            ("BERTH_AGENT_HOST_NETWORK", "1"),
            (
                "BERTH_AGENT_ENGINE_SOCKET",
                "/var/run/berth-lab/{{.Node.Hostname}}.sock",
            ),
        ],
    );
    // An unencrypted network: encrypted overlays carry nothing between the lab's namespaces.
    b.apply(&format!(
        r#"apiVersion: berth/v1
kind: Network
metadata:
  name: {p}-plain
spec:
  encrypted: false
---
{service}"#,
        service = sleeping_service(
            &p,
            &format!(
                "  networks: [{p}-plain]\n  placement:\n    constraints: [\"node.hostname == {}\"]\n",
                lab.node(1).hostname
            )
        ),
    ));
    let task = block_on(lab.wait_running_tasks(&p, 1, Duration::from_secs(90)))?
        .into_iter()
        .next()
        .context("no task")?;
    ensure!(task.0 == 1, "the task runs on node index {}, not 2", task.0);
    let (_, container) = lab.task_container(&task)?;

    // Output, error output and exit code are the command's; what it wrote stays in the task's
    // container on node 2 (read back through node 2's own engine).
    let started = Instant::now();
    let out = b.cli(&[
        "exec",
        &p,
        "--",
        "sh",
        "-c",
        "echo remote > /marker; echo hi; echo oops >&2; exit 3",
    ]);
    eprintln!(
        "exec through an agent on node 2: {:.1}s (agent start included)",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        out.code == Some(3) && out.stdout == "hi\n" && out.stderr == "oops\n",
        "{}",
        out.show()
    );
    let (code, marker) = block_on(lab.exec(1, &container, &["cat", "/marker"]))?;
    ensure!(
        code == 0 && marker.trim() == "remote",
        "the command did not run in the task's container on node 2: {marker}"
    );

    // Standard input with -i.
    let piped = b.cli_in(
        &["exec", &p, "-i", "--", "sh", "-c", "tr a-z A-Z"],
        Some("shout\n"),
    );
    ensure!(
        piped.code == Some(0) && piped.stdout == "SHOUT\n",
        "{}",
        piped.show()
    );

    // An interactive shell through a pty (`script` gives the CLI one). The agent takes a moment
    // to start before the shell reads anything.
    let (code, text) = b.interactive_shell(
        &p,
        &[
            ("echo $((6*7)) $(cat /marker)\n", Duration::from_secs(8)),
            ("exit 5\n", Duration::from_secs(2)),
        ],
        Duration::from_secs(60),
    );
    ensure!(
        text.lines().any(|l| l.trim() == "42 remote") && code == Some(5),
        "exit {code:?}, output: {text}"
    );

    // Every agent and grant is gone once its command ended (three execs made three).
    block_on(berth_e2e::wait_for(
        Duration::from_secs(30),
        "the exec agents to be removed",
        || async {
            (agents("service", &p).is_empty() && agents("secret", &p).is_empty()).then_some(())
        },
    ));
    Ok(())
}

/// Names of the exec agents' services or grant secrets made for Service `service`.
fn agents(what: &str, service: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([what, "ls", "--format", "{{.Name}}"])
        .args(["--filter", &format!("label=io.berth.name={service}")])
        .output()
        .expect("docker");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with("berth-exec-"))
        .map(str::to_string)
        .collect()
}
