//! Short-lived berth agent tasks on a chosen node, each with a one-time encrypted channel back to
//! berth. berth talks to one engine (its manager's): through it, it reaches the swarm's services,
//! tasks and nodes, but never another node's containers or volumes. When a job needs a node's
//! local resources (a volume's files for a backup, a container's terminal for `berth exec`), berth
//! starts an agent there and the agent connects back:
//!
//! - the agent is a Swarm service of one replica that is never restarted (not a `replicated-job`:
//!   engine 20.10 leaves a job's exited containers behind when the service is removed, and berth
//!   cannot reach another node's engine to remove them; a replicated service's go with it), pinned
//!   with `node.id == X`, running the berth binary itself (`berth agent ...`) from the agent image;
//! - its grant (berth's address, the pinned one-time certificate, a token: see
//!   [`channel`](super::channel)) is a Swarm secret made for this job, mounted at [`GRANT_FILE`],
//!   so nothing secret is in the service's spec, env or command line;
//! - its root filesystem is read-only, every capability is dropped except those the job names,
//!   its memory is bounded, and it has the mounts the job names and nothing else;
//! - its network is the engine's default for a task without networks (the node's bridge with its
//!   outbound NAT, enough to reach berth's swarm address), or the node's host network for engines
//!   without a bridge ([`Launcher::host_network`], a privilege, off unless asked for);
//! - it is removed, with its secret, when the job ends however it ends ([`AgentTask`] removes it
//!   when dropped), and the agent exits by itself at the grant's deadline.
//!
//! What each job mounts and why is said where the job is built: volume transfers in
//! `backup/volumes.rs`, exec in the API server's `exec_agent.rs`.

use super::channel::{self, ChannelError, Op};
use super::engine::{found, gone, message};
use super::owner::Labels;
use bollard::models::{
    Limit, Mount, NetworkAttachmentConfig, NodeSpecAvailabilityEnum, NodeState, SecretSpec,
    ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{ListServicesOptions, ListTasksOptions, LogsOptions};
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the agent finds its grant (the Swarm secret's file).
pub const GRANT_FILE: &str = "/run/secrets/berth-agent-grant";
/// The agent's memory limit: it streams through fixed buffers.
pub const AGENT_MEMORY: i64 = 256 << 20;

/// An authenticated channel to a started agent (berth's side).
pub type AgentChannel = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Channel(#[from] ChannelError),
    /// berth will not start the agent (the node cannot run it, no address to be reached at).
    #[error("{0}")]
    Refused(String),
    /// The agent's task ended without doing its job: the engine's reason and the agent's words.
    #[error("{0}")]
    Failed(String),
}

fn engine(what: &str) -> impl Fn(bollard::errors::Error) -> AgentError + '_ {
    move |e| AgentError::Engine(format!("{what}: {}", message(&e)))
}

/// Starts agents from one engine (berth's). One per process and purpose; cheap to clone.
#[derive(Clone)]
pub struct Launcher {
    docker: Docker,
    image: String,
    listen_ip: IpAddr,
    listen_port: u16,
    local_node_id: String,
    host_network: bool,
}

impl Launcher {
    /// Agents running `image`, reaching berth at its node's swarm address (what the other nodes
    /// reach it by).
    pub async fn new(docker: Docker, image: impl Into<String>) -> Result<Self, AgentError> {
        let info = docker.info().await.map_err(engine("docker info"))?;
        let swarm = info.swarm.unwrap_or_default();
        let local_node_id = swarm
            .node_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| AgentError::Refused("this engine is not part of a swarm".into()))?;
        let node = docker
            .inspect_node(&local_node_id)
            .await
            .map_err(engine("inspecting berth's node"))?;
        let addr = node
            .status
            .and_then(|s| s.addr)
            .or(swarm.node_addr)
            .unwrap_or_default();
        let listen_ip: IpAddr = addr.parse().map_err(|_| {
            AgentError::Refused(format!(
                "berth's node has no usable swarm address (`{addr}`) for agents to reach"
            ))
        })?;
        Ok(Launcher {
            docker,
            image: image.into(),
            listen_ip,
            listen_port: 0,
            local_node_id,
            host_network: false,
        })
    }

    /// Listen for agents on this address instead of the node's swarm address.
    pub fn listen_ip(mut self, ip: IpAddr) -> Self {
        self.listen_ip = ip;
        self
    }

    /// Listen on this port (0, the default: any free port; set one to open it in a firewall).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = port;
        self
    }

    /// Run agents on the node's host network (for engines without a bridge network).
    pub fn host_network(mut self, yes: bool) -> Self {
        self.host_network = yes;
        self
    }

    /// The swarm node berth runs on.
    pub fn local_node_id(&self) -> &str {
        &self.local_node_id
    }

    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// A handle for one job's agent, named `<prefix><ulid>`. Nothing exists in the engine yet;
    /// whatever [`AgentTask::start`] creates is removed when the handle is dropped.
    pub fn task(&self, prefix: &str) -> AgentTask {
        AgentTask {
            launcher: self.clone(),
            name: format!("{prefix}{}", ulid::Ulid::new().to_string().to_lowercase()),
            armed: true,
        }
    }

    /// Removes this installation's agents (and their grants) that `filters` select and that were
    /// created before `cutoff`: what a berth that died mid-job left. Returns how many services went.
    pub async fn collect_leftovers(
        &self,
        services: HashMap<String, Vec<String>>,
        grants: HashMap<String, Vec<String>>,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, AgentError> {
        let list = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(services),
                ..Default::default()
            }))
            .await
            .map_err(engine("listing agents"))?;
        let mut n = 0;
        for s in list {
            let old = s.created_at.is_some_and(|c| c < cutoff);
            if let (true, Some(name)) = (old, s.spec.and_then(|sp| sp.name)) {
                remove(&self.docker, &name).await;
                n += 1;
            }
        }
        let secrets = self
            .docker
            .list_secrets(Some(bollard::query_parameters::ListSecretsOptions {
                filters: Some(grants),
            }))
            .await
            .map_err(engine("listing agent grants"))?;
        for s in secrets {
            if s.created_at.is_some_and(|c| c < cutoff) {
                if let Some(id) = s.id {
                    let _ = self.docker.delete_secret(&id).await;
                }
            }
        }
        Ok(n)
    }
}

/// What one agent runs, where, and with which privileges.
pub struct Job {
    pub op: Op,
    /// The node (`node.id`) it must run on.
    pub node_id: String,
    /// The node for messages (`hostname (id)`).
    pub node: String,
    /// The words after `berth agent` (the grant file is added: `--grant GRANT_FILE`).
    pub args: Vec<String>,
    /// The labels of the agent's service and container.
    pub labels: Labels,
    /// The labels of its grant secret.
    pub grant_labels: Labels,
    pub user: String,
    /// Capabilities kept (every other one is dropped).
    pub caps: Vec<String>,
    pub mounts: Vec<Mount>,
    /// When the agent gives up, whatever it is doing.
    pub deadline: SystemTime,
}

/// One job's agent in the engine. Dropping it removes the agent and its grant (in the background:
/// call [`AgentTask::remove`] to wait for it).
pub struct AgentTask {
    launcher: Launcher,
    name: String,
    armed: bool,
}

impl AgentTask {
    /// The agent's service (and grant secret) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the agent for `job` and waits for it to connect. Fails at once when the node cannot
    /// run it, or when its task ends before it connects (no image, a refused mount), with the
    /// engine's reason and the agent's last words. Put a timeout around it: an agent whose task
    /// stays pending (no resources on the node) is waited for.
    pub async fn start(&self, job: &Job) -> Result<AgentChannel, AgentError> {
        let l = &self.launcher;
        // A task for a node that is down or drained would wait, pending, until the timeout.
        let n = found(l.docker.inspect_node(&job.node_id).await)
            .map_err(engine("inspecting the agent's node"))?
            .ok_or_else(|| AgentError::Refused(format!("node {} is not in the swarm", job.node)))?;
        let state = n.status.and_then(|s| s.state);
        let availability = n.spec.and_then(|s| s.availability);
        if state != Some(NodeState::READY) || availability != Some(NodeSpecAvailabilityEnum::ACTIVE)
        {
            return Err(AgentError::Refused(format!(
                "node {} cannot run an agent now (state {}, availability {})",
                job.node,
                state.map(|s| s.to_string()).unwrap_or_default(),
                availability.map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        let listener = channel::Listener::bind(l.listen_ip, l.listen_port, job.op).await?;
        let deadline = job
            .deadline
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let grant = listener.grant(deadline).map_err(ChannelError::Io)?;
        let grant = serde_json::to_vec(&grant).expect("a grant serialises");
        let secret = l
            .docker
            .create_secret(SecretSpec {
                name: Some(self.name.clone()),
                labels: Some(job.grant_labels.clone()),
                data: Some(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    &grant,
                )),
                ..Default::default()
            })
            .await
            .map_err(engine("creating the agent's grant secret"))?;
        l.docker
            .create_service(self.spec(job, &secret.id), None)
            .await
            .map_err(engine("creating the agent"))?;
        tracing::info!(service = %self.name, node = %job.node, op = job.op.word(), "agent started");
        tokio::select! {
            biased;
            r = listener.accept() => Ok(r?),
            failed = self.failure() => Err(AgentError::Failed(failed)),
        }
    }

    fn spec(&self, job: &Job, secret_id: &str) -> ServiceSpec {
        let l = &self.launcher;
        let mut command = vec!["berth".to_string(), "agent".to_string()];
        command.extend(job.args.iter().cloned());
        command.extend(["--grant".to_string(), GRANT_FILE.to_string()]);
        ServiceSpec {
            name: Some(self.name.clone()),
            labels: Some(job.labels.clone()),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(l.image.clone()),
                    labels: Some(job.labels.clone()),
                    command: Some(command),
                    user: Some(job.user.clone()),
                    read_only: Some(true),
                    capability_drop: Some(vec!["ALL".into()]),
                    capability_add: Some(job.caps.clone()),
                    mounts: Some(job.mounts.clone()),
                    secrets: Some(vec![TaskSpecContainerSpecSecrets {
                        file: Some(TaskSpecContainerSpecFile {
                            name: Some(
                                GRANT_FILE
                                    .rsplit('/')
                                    .next()
                                    .expect("a file name")
                                    .to_string(),
                            ),
                            uid: Some("0".into()),
                            gid: Some("0".into()),
                            mode: Some(0o400),
                        }),
                        secret_id: Some(secret_id.to_string()),
                        secret_name: Some(self.name.clone()),
                    }]),
                    ..Default::default()
                }),
                placement: Some(TaskSpecPlacement {
                    constraints: Some(vec![format!("node.id=={}", job.node_id)]),
                    ..Default::default()
                }),
                // Bounded: the agent streams, it holds little (a runaway must not starve the node).
                resources: Some(TaskSpecResources {
                    limits: Some(Limit {
                        memory_bytes: Some(AGENT_MEMORY),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                    max_attempts: Some(0),
                    ..Default::default()
                }),
                networks: l.host_network.then(|| {
                    vec![NetworkAttachmentConfig {
                        target: Some("host".into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The agent task's state, once it has one.
    async fn state(&self) -> Option<(TaskState, String)> {
        let tasks = self
            .launcher
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([(
                    "service".to_string(),
                    vec![self.name.clone()],
                )])),
            }))
            .await
            .ok()?;
        let t = tasks.into_iter().next()?;
        let st = t.status?;
        let state = st.state?;
        let words = st
            .err
            .filter(|e| !e.is_empty())
            .or(st.message)
            .unwrap_or_default();
        Some((state, words))
    }

    /// Resolves only when the agent's task has ended before connecting (never while it runs):
    /// its reason, with the agent's own last words.
    async fn failure(&self) -> String {
        loop {
            if let Some((state, words)) = self.state().await {
                // A task that completed without ever connecting failed too.
                if is_final(state) {
                    return format!("task {state}: {words}{}", self.logs().await);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits for the agent's task to end: `Ok` if it completed (exit 0), else the engine's
    /// reason and the agent's last words.
    pub async fn outcome(&self) -> Result<(), String> {
        loop {
            match self.state().await {
                Some((TaskState::COMPLETE, _)) => return Ok(()),
                Some((s, words)) if is_final(s) => {
                    return Err(format!("task {s}: {words}{}", self.logs().await))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The agent's last log lines, as `"; agent said: ..."` (empty if none). Agents never log
    /// their grant.
    pub async fn logs(&self) -> String {
        let mut s = self.launcher.docker.service_logs(
            &self.name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "5".into(),
                ..Default::default()
            }),
        );
        let mut lines = Vec::new();
        let read = async {
            while let Some(Ok(l)) = s.next().await {
                lines.push(l.to_string().trim_end().to_string());
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), read).await;
        if lines.is_empty() {
            String::new()
        } else {
            format!("; agent said: {}", lines.join(" | "))
        }
    }

    /// Removes the agent and its grant, and waits until they are gone.
    pub async fn remove(mut self) {
        self.armed = false;
        remove(&self.launcher.docker, &self.name).await;
    }
}

impl Drop for AgentTask {
    fn drop(&mut self) {
        if self.armed {
            let (docker, name) = (self.launcher.docker.clone(), std::mem::take(&mut self.name));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { remove(&docker, &name).await });
            }
        }
    }
}

/// Whether a task in this state will not run (again).
fn is_final(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::COMPLETE
            | TaskState::FAILED
            | TaskState::REJECTED
            | TaskState::ORPHANED
            | TaskState::SHUTDOWN
    )
}

/// Removes an agent's service, then its secret (a secret in use cannot be removed: the service
/// goes first). Errors are logged: cleanup must not hide the job's own result.
async fn remove(docker: &Docker, name: &str) {
    if let Err(e) = gone(docker.delete_service(name).await) {
        tracing::warn!(service = %name, error = %message(&e), "could not remove an agent");
    }
    for _ in 0..50 {
        match gone(docker.delete_secret(name).await) {
            Ok(()) => return,
            // In use until the engine has forgotten the service's task.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    tracing::warn!(secret = %name, "could not remove an agent's grant; the next leftover collection will");
}
