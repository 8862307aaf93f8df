//! The 3-node lab harness: a real 3-node Docker Swarm on this one machine, for multi-node tests.
//!
//! The lab itself is built by `scripts/lab` (scripts/lib/lab.sh), the same script a person runs by
//! hand, so the tests and docs/contributing.md never describe two different labs. Node 1 (index 0)
//! is the host's own engine, the swarm's manager; nodes 2 and 3 (indexes 1 and 2) are extra
//! dockerd instances in their own network, UTS and mount namespaces, joined as workers:
//!
//! | index | node | hostname         | address   | engine                               |
//! |-------|------|------------------|-----------|--------------------------------------|
//! | 0     | 1    | the host's       | 10.99.0.1 | the default socket (`docker_host` None) |
//! | 1     | 2    | `berth-lab-2`    | 10.99.0.2 | `unix:///var/run/berth-lab/n2.sock`  |
//! | 2     | 3    | `berth-lab-3`    | 10.99.0.3 | `unix:///var/run/berth-lab/n3.sock`  |
//!
//! Scenarios run in one test binary (`tests/tests/lab.rs`, `harness = false`): the lab comes up
//! once, every [`Scenario`] runs in turn against it (they share the nodes, so never in parallel),
//! and the lab goes down at the end whatever happened. A scenario that stops a node starts it
//! again before it returns, and removes the Swarm objects it made (name them with
//! [`crate::prefix`] and guard them with [`crate::Cleanup`], as every e2e test does).
//!
//! Talking to the engines: services, nodes and tasks are the manager's business
//! (`lab.docker(0)`); containers, images and `exec` belong to the engine of the node that runs
//! them (`lab.docker(i)`): the manager's engine cannot see a task container on node 2.
//!
//! Sharing: there is one lab per machine. [`Lab::up`] takes the lab's lock
//! (`/var/run/berth-lab.lock`) for the rest of the process, so a second lab run (another
//! worktree, another person) waits instead of taking the nodes away mid-scenario. And the host's
//! swarm is shared with every other e2e test: `scripts/lab stop` refuses to stop a node a scenario
//! promoted when that would leave no Raft majority; demote it first.
//!
//! Stopping nodes: [`Lab::stop_node`] is a power cut (the node's whole cgroup gets SIGKILL);
//! [`Lab::start_on_drop`] makes sure the node comes back even if the scenario fails. The manager
//! reports a killed node down after 12-15 s (Swarm's 5 s heartbeat period, times its grace).

use anyhow::{anyhow, bail, Context, Result};
use bollard::models::{NodeState, Task, TaskState};
use bollard::query_parameters::ListTasksOptions;
use bollard::{ClientVersion, Docker};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The extra nodes' engine sockets, as scripts/lib/lab.sh makes them (`_lab_sock`).
const WORKER_SOCKETS: [&str; 2] = [
    "unix:///var/run/berth-lab/n2.sock",
    "unix:///var/run/berth-lab/n3.sock",
];

/// How long the engines take to answer a request before it counts as failed (seconds). Short
/// enough that a call to a node that was just stopped fails rather than hangs a scenario.
const ENGINE_TIMEOUT: u64 = 30;

/// One node of the lab.
#[derive(Clone, Debug)]
pub struct LabNode {
    /// Position in [`Lab::nodes`]: 0 is the manager (the host's engine); index `i` is the lab's
    /// node `i + 1`.
    pub index: usize,
    /// The node's hostname as Swarm reports it (`berth-lab-2`, `berth-lab-3`; the host's own for
    /// index 0), what `node.hostname==...` placement constraints match.
    pub hostname: String,
    /// The address the node advertises to the swarm (10.99.0.1, .2, .3).
    pub addr: String,
    /// The Swarm node ID (what tasks' `node_id` and the node API use).
    pub node_id: String,
    /// The node's engine endpoint: None for the host's engine (the default socket),
    /// `unix:///var/run/berth-lab/nN.sock` for the others. `docker -H <this>` reaches it.
    pub docker_host: Option<String>,
}

/// A piece of a multi-node test: a name (reported as `<area>::<name>`) and a function run
/// against the shared lab. Return `Err` (or panic) to fail; either way the next scenario runs.
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&Lab) -> Result<()>,
}

/// The 3-node lab, up.
pub struct Lab {
    nodes: Vec<LabNode>,
    /// The API version each engine speaks (negotiated once at `up`): engine 20.10 refuses
    /// bollard's newer default, and negotiating needs an async call `docker()` cannot make.
    versions: Vec<ClientVersion>,
}

/// The repository's root (tests/ is one of its crates), where `scripts/lab` lives.
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// Runs a future to completion on the one tokio runtime of the lab tests. Scenarios are plain
/// functions (a scenario may stop and start engines with blocking commands in between); they
/// wrap their async parts in this. Every bollard client must be used on this same runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("lab: cannot build the tokio runtime")
        })
        .block_on(fut)
}

/// The lab changes this machine (network namespaces, two more dockerd, nodes in the host's
/// swarm) and needs root: it runs only where the e2e suite is meant to run, and says so loudly
/// everywhere else instead of passing without having run.
pub fn require_e2e() -> Result<()> {
    if std::env::var("BERTH_E2E").as_deref() != Ok("1") {
        bail!(
            "lab: BERTH_E2E=1 is not set. The 3-node lab tests build a real Swarm on this machine \
             (as root, with scripts/lab); run them through scripts/test, or set BERTH_E2E=1 (and \
             BERTH_BIN) yourself. They never skip."
        );
    }
    Ok(())
}

/// Where scripts/lib/lab.sh keeps the lab's lock (`BERTH_LAB_LOCK`).
const LOCK: &str = "/var/run/berth-lab.lock";

/// Takes the lab's lock for the rest of this process (the kernel drops it when the process ends,
/// killed or not). There is one lab per machine, and people building scenarios run lab tests from
/// their own worktrees at the same time: without it one run's `down` would pull the nodes from
/// under another's scenarios. A second run waits here for the first to finish.
fn lock_lab() -> Result<()> {
    static HELD: OnceLock<std::fs::File> = OnceLock::new();
    if HELD.get().is_some() {
        return Ok(());
    }
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOCK)
        .with_context(|| format!("lab: cannot open the lab lock {LOCK}"))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("lab: another lab test run holds {LOCK}; waiting for it to finish");
        let start = Instant::now();
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "lab: cannot lock {LOCK}: {}",
                std::io::Error::last_os_error()
            );
        }
        eprintln!(
            "lab: got the lab after waiting {:.0}s",
            start.elapsed().as_secs_f64()
        );
    }
    let _ = HELD.set(file);
    Ok(())
}

/// Runs `scripts/lab ARGS`. With `show`, its output goes to our stderr as it comes (`up`/`down`
/// progress, outside any scenario); otherwise it is captured and only shown when it fails.
fn script(args: &[&str], show: bool) -> Result<()> {
    let path = repo_root().join("scripts/lab");
    let mut cmd = Command::new(&path);
    // Not `owned()`: the lab's engines outlive this process by design, and scripts/lab starts
    // them with a clean environment so the sweep never takes them for a test's strays.
    // This process holds the lab's lock (`lock_lab`); the script must not try to take it again.
    cmd.args(args)
        .env("BERTH_LAB_LOCK_HELD", "1")
        .stdin(Stdio::null());
    let what = format!("{} {}", path.display(), args.join(" "));
    if show {
        let status = cmd
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::from(std::io::stderr()))
            .status()
            .with_context(|| format!("lab: cannot run {what}"))?;
        if !status.success() {
            bail!("lab: `{what}` failed ({status}); its output is above");
        }
    } else {
        let out = cmd
            .output()
            .with_context(|| format!("lab: cannot run {what}"))?;
        if !out.status.success() {
            bail!(
                "lab: `{what}` failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn connect(docker_host: Option<&str>, version: &ClientVersion) -> Result<Docker> {
    match docker_host {
        None => Docker::connect_with_socket("/var/run/docker.sock", ENGINE_TIMEOUT, version),
        Some(host) => Docker::connect_with_unix(host, ENGINE_TIMEOUT, version),
    }
    .with_context(|| {
        format!(
            "lab: cannot connect to {}",
            docker_host.unwrap_or("the host's engine")
        )
    })
}

impl Lab {
    /// Brings the lab up (`scripts/lab up`: idempotent, so a lab left up by hand is reused and
    /// repaired) and reads its three nodes. Fails when BERTH_E2E=1 is not set.
    pub fn up() -> Result<Lab> {
        require_e2e()?;
        lock_lab()?;
        let start = Instant::now();
        script(&["up"], true)?;
        eprintln!(
            "lab: scripts/lab up took {:.1}s",
            start.elapsed().as_secs_f64()
        );
        block_on(Self::discover())
    }

    async fn discover() -> Result<Lab> {
        let mut nodes = Vec::new();
        let mut versions = Vec::new();
        let hosts = std::iter::once(None).chain(WORKER_SOCKETS.iter().map(|s| Some(s.to_string())));
        for (index, docker_host) in hosts.enumerate() {
            let d = connect(docker_host.as_deref(), bollard::API_DEFAULT_VERSION)?
                .negotiate_version()
                .await
                .with_context(|| format!("lab: node index {index}'s engine does not answer"))?;
            let info = d.info().await.context("lab: docker info")?;
            let swarm = info.swarm.unwrap_or_default();
            let node_id = swarm
                .node_id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| anyhow!("lab: node index {index}'s engine is in no swarm"))?;
            nodes.push(LabNode {
                index,
                hostname: info.name.unwrap_or_default(),
                addr: swarm.node_addr.unwrap_or_default(),
                node_id,
                docker_host,
            });
            versions.push(d.client_version());
        }
        let lab = Lab { nodes, versions };
        // The manager's view must agree with what each engine says of itself: one swarm.
        let manager = lab.docker(0);
        for n in &lab.nodes {
            let seen = manager.inspect_node(&n.node_id).await.with_context(|| {
                format!(
                    "lab: the manager does not know {} ({})",
                    n.hostname, n.node_id
                )
            })?;
            let hostname = seen
                .description
                .and_then(|d| d.hostname)
                .unwrap_or_default();
            if hostname != n.hostname {
                bail!(
                    "lab: node {} calls itself {} but the manager knows it as {hostname}",
                    n.node_id,
                    n.hostname
                );
            }
        }
        Ok(lab)
    }

    /// The three nodes; index 0 is the manager (the host's engine).
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// Node `i` (panics when there is none: a scenario asking for node 7 is a bug).
    pub fn node(&self, i: usize) -> &LabNode {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("lab: there is no node index {i} (0..{})", self.nodes.len()))
    }

    /// A client for node `i`'s engine (0: the manager, for services, nodes, tasks). Panics while
    /// the node is stopped (its socket is gone); [`Lab::engine_answers`] asks without panicking.
    pub fn docker(&self, i: usize) -> Docker {
        let n = self.node(i);
        connect(n.docker_host.as_deref(), &self.versions[i]).unwrap_or_else(|e| {
            panic!("{e:#} (is node index {i} stopped? start_node brings it back)")
        })
    }

    /// Whether node `i`'s engine answers a ping now.
    pub async fn engine_answers(&self, i: usize) -> bool {
        let n = self.node(i);
        match connect(n.docker_host.as_deref(), &self.versions[i]) {
            Ok(d) => d.ping().await.is_ok(),
            Err(_) => false,
        }
    }

    /// The index of the node with this Swarm node ID.
    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node_id == node_id)
    }

    fn worker_number(&self, i: usize, what: &str) -> Result<String> {
        if i == 0 {
            bail!("lab: {what}: node index 0 is the host's engine, the manager every test shares; only workers (1, 2) can be stopped and started");
        }
        self.node(i);
        Ok((i + 1).to_string())
    }

    /// Kills node `i` whole, like a machine losing power: its dockerd, containerd and task
    /// containers get SIGKILL at once (`scripts/lab stop N`). Its data root stays, so
    /// [`Lab::start_node`] brings back the same node. Workers only: index 0 is an error.
    pub fn stop_node(&self, i: usize) -> Result<()> {
        let n = self.worker_number(i, "stop_node")?;
        script(&["stop", &n], false)
    }

    /// Starts node `i`'s engine again on the same data root and returns once it answers
    /// (`scripts/lab start N`). The manager sees it Ready a moment later: wait with
    /// [`Lab::wait_node_ready`].
    pub fn start_node(&self, i: usize) -> Result<()> {
        let n = self.worker_number(i, "start_node")?;
        script(&["start", &n], false)
    }

    /// Takes the lab down (`scripts/lab down`): nodes 2 and 3 leave the swarm's node list and
    /// everything of theirs is removed; the host's engine and swarm stay.
    pub fn down(&self) -> Result<()> {
        Self::down_anyway()
    }

    /// `scripts/lab down` without a lab in hand: after an `up` that failed half-way.
    pub fn down_anyway() -> Result<()> {
        lock_lab()?;
        let start = Instant::now();
        script(&["down"], true)?;
        eprintln!(
            "lab: scripts/lab down took {:.1}s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Node `i`'s state as the manager sees it (ready, down, unknown, disconnected), with the
    /// engine's message.
    pub async fn node_state(&self, i: usize) -> Result<(NodeState, String)> {
        let node = self
            .docker(0)
            .inspect_node(&self.node(i).node_id)
            .await
            .context("lab: inspect node")?;
        let status = node.status.unwrap_or_default();
        Ok((
            status.state.unwrap_or(NodeState::UNKNOWN),
            status.message.unwrap_or_default(),
        ))
    }

    /// Waits until the manager reports node `i` in `state`; returns how long that took.
    pub async fn wait_node_state(
        &self,
        i: usize,
        state: NodeState,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        let what = format!("node {} to be {state}", self.node(i).hostname);
        eventually(timeout, &what, || async {
            match self.node_state(i).await {
                Ok((s, _)) if s == state => Ok(()),
                Ok((s, msg)) => Err(format!("{s} ({msg})")),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await?;
        Ok(start.elapsed())
    }

    /// Waits until the manager reports node `i` Ready (after [`Lab::start_node`]).
    pub async fn wait_node_ready(&self, i: usize, timeout: Duration) -> Result<Duration> {
        self.wait_node_state(i, NodeState::READY, timeout).await
    }

    /// Waits until the manager reports node `i` Down (after [`Lab::stop_node`]).
    pub async fn wait_node_down(&self, i: usize, timeout: Duration) -> Result<Duration> {
        self.wait_node_state(i, NodeState::DOWN, timeout).await
    }

    /// A service's tasks that are running now, each with the index of its node (tasks on nodes
    /// outside the lab are left out). Asks the manager.
    pub async fn running_tasks(&self, service: &str) -> Result<Vec<(usize, Task)>> {
        let tasks = self
            .docker(0)
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([
                    ("service".to_string(), vec![service.to_string()]),
                    ("desired-state".to_string(), vec!["running".to_string()]),
                ])),
            }))
            .await
            .with_context(|| format!("lab: tasks of {service}"))?;
        Ok(tasks
            .into_iter()
            .filter(|t| {
                t.status.as_ref().and_then(|s| s.state.as_ref()) == Some(&TaskState::RUNNING)
            })
            .filter_map(|t| Some((self.index_of(t.node_id.as_deref()?)?, t)))
            .collect())
    }

    /// Waits until `service` has exactly `count` running tasks and returns them (with the index
    /// of their node), or fails with what it saw last.
    pub async fn wait_running_tasks(
        &self,
        service: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<(usize, Task)>> {
        let what = format!("{count} running task(s) of {service}");
        eventually(timeout, &what, || async {
            match self.running_tasks(service).await {
                Ok(t) if t.len() == count => Ok(t),
                Ok(t) => Err(format!(
                    "{} running, on nodes {:?}",
                    t.len(),
                    t.iter().map(|(i, _)| *i).collect::<Vec<_>>()
                )),
                Err(e) => Err(format!("{e:#}")),
            }
        })
        .await
    }
}

impl Lab {
    /// The container of a running task, as (node index, container ID): where to `exec`.
    pub fn task_container(&self, task: &(usize, Task)) -> Result<(usize, String)> {
        let id = task
            .1
            .status
            .as_ref()
            .and_then(|s| s.container_status.as_ref())
            .and_then(|c| c.container_id.clone())
            .ok_or_else(|| anyhow!("lab: task {:?} has no container yet", task.1.id))?;
        Ok((task.0, id))
    }

    /// Runs `cmd` in a container on node `i` (its own engine: the manager cannot exec into a
    /// container on another node) and returns (exit code, stdout and stderr together).
    pub async fn exec(&self, i: usize, container: &str, cmd: &[&str]) -> Result<(i64, String)> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        use futures::StreamExt;
        let d = self.docker(i);
        let exec = d
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("lab: exec {cmd:?} in {container} on node index {i}"))?;
        let mut text = String::new();
        if let StartExecResults::Attached { mut output, .. } = d.start_exec(&exec.id, None).await? {
            while let Some(chunk) = output.next().await {
                text.push_str(&chunk?.to_string());
            }
        }
        let code = d.inspect_exec(&exec.id).await?.exit_code.unwrap_or(-1);
        Ok((code, text))
    }
}

/// Polls `f` every 100 ms until it returns `Ok`; after `timeout` fails with `what` and the last
/// `Err` it returned (what was seen instead), so a timeout explains itself.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(last) if start.elapsed() > timeout => {
                bail!("lab: timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Starts a stopped node again when dropped, so a scenario that fails (or panics) between
/// [`Lab::stop_node`] and [`Lab::start_node`] does not leave the next scenarios a node short.
/// Create it right after stopping; its drop is a no-op for a node that runs. It waits (up to 60 s)
/// until the manager sees the node Ready, with the docker CLI: a drop may happen inside
/// [`block_on`], where another `block_on` would panic.
pub struct StartOnDrop<'a> {
    lab: &'a Lab,
    index: usize,
}

impl Lab {
    /// See [`StartOnDrop`].
    pub fn start_on_drop(&self, i: usize) -> StartOnDrop<'_> {
        StartOnDrop {
            lab: self,
            index: i,
        }
    }
}

impl Drop for StartOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lab.start_node(self.index) {
            eprintln!(
                "lab: could not start node index {} again: {e:#}",
                self.index
            );
            return;
        }
        let id = &self.lab.node(self.index).node_id;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let state = Command::new("docker")
                .args(["node", "inspect", id, "--format", "{{.Status.State}}"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if state == "ready" {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "lab: node index {} was started again but is not Ready after 60 s",
            self.index
        );
    }
}
