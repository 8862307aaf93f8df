//! Reading a named volume's files on any node of the swarm into the manager berth runs on, and
//! writing them back (a restore) on any node. The Backup controller's way to the data of the
//! volumes Services mount "on whichever node they live".
//!
//! - **On berth's own node** (local driver, no driver options) the engine's `Mountpoint` is read
//!   in place: [`Transfers::read`] copies nothing and returns that path for restic to read.
//!   [`Transfers::write`] unpacks straight into it (creating the volume, with berth's labels, if
//!   missing).
//! - **On another node** berth cannot reach that node's engine (only the manager's API: services,
//!   tasks, nodes; `docker exec` reaches local containers only). So berth starts a short-lived
//!   **agent task** there: a Swarm service of one replica that is never restarted, pinned with `node.id == X`, running the berth
//!   binary itself (`berth agent volume-send|volume-receive`) from the agent image, with the one
//!   volume mounted (read-only to read it). The agent connects back over a one-time TLS channel
//!   (see [`channel`](super::channel)); its grant (address, pinned certificate, token) is a Swarm
//!   secret made for this transfer, so nothing secret is in the service's spec. The data travels as
//!   tar ([`stream`](super::stream)) and is unpacked on the manager into the caller's staging
//!   directory, or by the agent into the volume.
//!
//! What the agent task is allowed, and why:
//! - root (uid 0), because reading and restoring other users' files and their owners needs it;
//!   but every capability is dropped except those the job needs: `DAC_READ_SEARCH` to read
//!   (read any file, traverse any directory); `CHOWN`, `DAC_OVERRIDE`, `FOWNER`, `FSETID` to write
//!   (give files their owners, write into others' directories, set modes and times, keep setuid);
//! - its root filesystem read-only; one mount, the volume (read-only for a read); one secret;
//! - no network of its own choosing: the engine's default for a task without networks (the node's
//!   bridge, with its outbound NAT), enough to reach the manager's swarm address. Host networking
//!   is an option ([`Transfers::host_network`]) for nodes whose engine has no bridge (`--bridge
//!   none`, as the 3-node lab's nodes): say so where it is used;
//! - a hard deadline: berth's timeout ends the transfer and removes the task, and the agent exits
//!   by itself at the same deadline.
//!
//! Everything the agent path creates (the service, the secret) carries berth's owner labels (kind
//! `backup`, the volume's name, `io.berth.role` `transfer-agent` / `transfer-grant`) and is removed
//! when the transfer ends, however it ends; [`Transfers::collect_leftovers`] removes what a
//! crashed berth left.

use super::agent;
use super::channel::{self, ChannelError, Op};
use super::stream::{self, Counts};
use crate::swarm::engine::{found, gone, message};
use crate::swarm::Owner;
use berth_api_types::names::labels;
use berth_api_types::Kind;
use bollard::models::{
    Limit, Mount, MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig,
    NetworkAttachmentConfig, NodeSpecAvailabilityEnum, NodeState, SecretSpec, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState, VolumeCreateRequest,
};
use bollard::query_parameters::{ListServicesOptions, ListTasksOptions, LogsOptions};
use bollard::Docker;
use futures::StreamExt;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Where the agent finds the volume.
pub const AGENT_DIR: &str = "/volume";
/// Where the agent finds its grant (the Swarm secret's file).
pub const GRANT_FILE: &str = "/run/secrets/berth-transfer-grant";
/// The image the tests build from the berth binary (scripts/test); production passes berth's own
/// published image (`--backup-agent-image`).
pub const TEST_AGENT_IMAGE: &str = "berth-test/agent:1";
/// The whole of one transfer, agent start to finish, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The agent's memory limit: it streams file by file through fixed buffers.
pub const AGENT_MEMORY: i64 = 256 << 20;
/// `io.berth.role` of the agent's service and of its grant secret.
pub const ROLE_AGENT: &str = "transfer-agent";
pub const ROLE_GRANT: &str = "transfer-grant";

/// A named volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VolumeOnNode {
    pub volume: String,
    pub node_id: String,
    /// For messages (the node's hostname).
    pub node_name: String,
}

/// What [`Transfers::read`] gives restic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadVolume {
    /// The directory holding the volume's files: its mountpoint (berth's own node) or the
    /// staging directory (another node).
    pub path: PathBuf,
    /// Whether `path` is the live volume (read in place: files may change while restic reads)
    /// rather than a copy.
    pub in_place: bool,
    /// Entries (files, directories, symlinks, hard links), the root excluded.
    pub files: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
    /// Sockets, FIFOs and devices, left out.
    pub skipped: u64,
}

/// What [`Transfers::write`] restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub node_id: String,
    pub volume: String,
    pub files: u64,
    pub bytes: u64,
    pub skipped: u64,
    /// Whether the agent path was taken (another node, or forced).
    pub via_agent: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Channel(#[from] ChannelError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the transfer agent for volume `{volume}` on node {node} failed: {message}")]
    Agent {
        volume: String,
        node: String,
        message: String,
    },
    #[error("the transfer of volume `{volume}` on node {node} did not finish within {secs} s")]
    Timeout {
        volume: String,
        node: String,
        secs: u64,
    },
    #[error("{0}")]
    Refused(String),
}

fn engine(what: &str) -> impl Fn(bollard::errors::Error) -> Error + '_ {
    move |e| Error::Engine(format!("{what}: {}", message(&e)))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Moves volumes between nodes and berth. One per installation; cheap to clone.
#[derive(Clone)]
pub struct Transfers {
    docker: Docker,
    owner: Owner,
    agent_image: String,
    listen_ip: IpAddr,
    listen_port: u16,
    local_node_id: String,
    timeout: Duration,
    host_network: bool,
    always_agent: bool,
}

impl Transfers {
    /// For installation `instance`, with agents running `agent_image`. Finds berth's node (the
    /// engine berth talks to) and listens for agents on that node's swarm address (what the
    /// other nodes reach it by).
    pub async fn new(
        docker: Docker,
        instance: &str,
        agent_image: impl Into<String>,
    ) -> Result<Self, Error> {
        let info = docker.info().await.map_err(engine("docker info"))?;
        let swarm = info.swarm.unwrap_or_default();
        let local_node_id = swarm
            .node_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Error::Refused("this engine is not part of a swarm".into()))?;
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
            Error::Refused(format!(
                "berth's node has no usable swarm address (`{addr}`) for agents to reach"
            ))
        })?;
        Ok(Transfers {
            docker,
            owner: Owner::new(instance, Kind::Backup),
            agent_image: agent_image.into(),
            listen_ip,
            listen_port: 0,
            local_node_id,
            timeout: DEFAULT_TIMEOUT,
            host_network: false,
            always_agent: false,
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

    /// The longest one transfer may take, agent start included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Run agents on the node's host network (for engines without a bridge network).
    pub fn host_network(mut self, yes: bool) -> Self {
        self.host_network = yes;
        self
    }

    /// Take the agent path for berth's own node too (tests; or volumes the engine only mounts
    /// while a container uses them).
    pub fn always_agent(mut self, yes: bool) -> Self {
        self.always_agent = yes;
        self
    }

    /// The swarm node berth runs on.
    pub fn local_node_id(&self) -> &str {
        &self.local_node_id
    }

    /// Whether the volume exists on its node: `Some` on berth's own node; `None` elsewhere, where
    /// only that node's engine knows, and asking through a task would create it (the engine
    /// creates a missing volume on mount). Read only what a backup plan found there (`build::plan_volumes`).
    pub async fn exists(&self, v: &VolumeOnNode) -> Result<Option<bool>, Error> {
        if v.node_id != self.local_node_id {
            return Ok(None);
        }
        Ok(Some(
            found(self.docker.inspect_volume(&v.volume).await)
                .map_err(engine("inspecting a volume"))?
                .is_some(),
        ))
    }

    /// Reads the volume's files. On berth's own node (local driver) returns the mountpoint, read
    /// in place; elsewhere unpacks them, owners, modes and times included, into `staging` (created
    /// if missing; it should be empty: what is there is overwritten, not removed) and returns it.
    pub async fn read(&self, v: &VolumeOnNode, staging: &Path) -> Result<ReadVolume, Error> {
        if v.node_id == self.local_node_id && !self.always_agent {
            if let Some(path) = self.local_mountpoint(&v.volume).await? {
                let p = path.clone();
                let c = tokio::task::spawn_blocking(move || stream::count(&p))
                    .await
                    .map_err(|e| Error::Refused(format!("counting files: {e}")))?
                    .map_err(io_err(format!("reading {}", path.display())))?;
                return Ok(ReadVolume {
                    path,
                    in_place: true,
                    files: c.files,
                    bytes: c.bytes,
                    skipped: c.skipped,
                });
            }
        }
        let staging = staging.to_path_buf();
        let dst = staging.clone();
        let c = self
            .with_agent(v, Op::Send, None, move |tls| async move {
                let reader = tokio_util::io::SyncIoBridge::new(tls);
                let what = format!("unpacking into {}", dst.display());
                tokio::task::spawn_blocking(move || stream::unpack(reader, &dst))
                    .await
                    .map_err(|e| Error::Refused(format!("unpacking: {e}")))?
                    .map_err(io_err(what))
            })
            .await?;
        Ok(ReadVolume {
            path: staging,
            in_place: false,
            files: c.files,
            bytes: c.bytes,
            skipped: c.skipped,
        })
    }

    /// Restores a volume on `node_id` from the tar stream `tar` (e.g. `restic dump`'s output):
    /// the volume's content is **replaced** (emptied first, then unpacked), owners, modes and
    /// times as in the stream. A volume that does not exist is created with berth's labels (kind
    /// `volume`, its name), local driver: restore under a new name to compare before switching.
    pub async fn write(
        &self,
        node_id: &str,
        volume: &str,
        tar: impl AsyncRead + Unpin + Send + 'static,
    ) -> Result<WriteSummary, Error> {
        let labels = self.owner.for_kind(Kind::Volume).labels(volume);
        if node_id == self.local_node_id && !self.always_agent {
            let path = match self.local_mountpoint(volume).await? {
                Some(p) => p,
                None => {
                    if found(self.docker.inspect_volume(volume).await)
                        .map_err(engine("inspecting a volume"))?
                        .is_some()
                    {
                        return Err(Error::Refused(format!(
                            "volume `{volume}` is not a plain local volume; restore it through an agent"
                        )));
                    }
                    let created = self
                        .docker
                        .create_volume(VolumeCreateRequest {
                            name: Some(volume.to_string()),
                            driver: Some("local".into()),
                            labels: Some(labels),
                            ..Default::default()
                        })
                        .await
                        .map_err(engine("creating the volume"))?;
                    PathBuf::from(created.mountpoint)
                }
            };
            let dst = path.clone();
            let reader = tokio_util::io::SyncIoBridge::new(tar);
            let c = tokio::task::spawn_blocking(move || {
                stream::empty_dir(&dst)?;
                stream::unpack(reader, &dst)
            })
            .await
            .map_err(|e| Error::Refused(format!("unpacking: {e}")))?
            .map_err(io_err(format!("restoring into {}", path.display())))?;
            return Ok(WriteSummary {
                node_id: node_id.to_string(),
                volume: volume.to_string(),
                files: c.files,
                bytes: c.bytes,
                skipped: c.skipped,
                via_agent: false,
            });
        }
        let v = VolumeOnNode {
            volume: volume.to_string(),
            node_id: node_id.to_string(),
            node_name: String::new(),
        };
        let (vol, node) = (volume.to_string(), node_id.to_string());
        let c = self
            .with_agent(&v, Op::Receive, Some(labels), move |tls| async move {
                let (rd, mut wr) = tokio::io::split(tls);
                let mut tar = tar;
                tokio::io::copy(&mut tar, &mut wr)
                    .await
                    .map_err(io_err("sending the tar stream to the agent"))?;
                // close_notify: the agent's unpack reads to the end and can tell a cut stream.
                wr.shutdown()
                    .await
                    .map_err(io_err("ending the tar stream"))?;
                let mut line = String::new();
                let mut rd = tokio::io::BufReader::new(rd).take(4096);
                rd.read_line(&mut line)
                    .await
                    .map_err(io_err("reading the agent's answer"))?;
                // Up to the agent's close: dropping the connection earlier could reset it under
                // the agent's own close.
                let _ = rd.read_to_end(&mut Vec::new()).await;
                agent::parse_reply(&line).map_err(|message| Error::Agent {
                    volume: vol,
                    node,
                    message,
                })
            })
            .await?;
        Ok(WriteSummary {
            node_id: node_id.to_string(),
            volume: volume.to_string(),
            files: c.files,
            bytes: c.bytes,
            skipped: c.skipped,
            via_agent: true,
        })
    }

    /// The mountpoint of a plain local volume on berth's node (`None`: absent, another driver, or
    /// driver options such as an NFS mount that the engine only mounts while a container uses it).
    async fn local_mountpoint(&self, volume: &str) -> Result<Option<PathBuf>, Error> {
        let Some(v) = found(self.docker.inspect_volume(volume).await)
            .map_err(engine("inspecting a volume"))?
        else {
            return Ok(None);
        };
        let plain = v.driver == "local" && v.options.is_empty();
        Ok((plain && !v.mountpoint.is_empty()).then(|| PathBuf::from(v.mountpoint)))
    }

    /// Runs one agent transfer: listener, grant secret, agent job; `talk` gets the authenticated
    /// channel. The job and the secret are removed afterwards, on success, error, timeout, and if
    /// this future is dropped.
    async fn with_agent<F, Fut>(
        &self,
        v: &VolumeOnNode,
        op: Op,
        new_volume_labels: Option<HashMap<String, String>>,
        talk: F,
    ) -> Result<Counts, Error>
    where
        F: FnOnce(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut,
        Fut: std::future::Future<Output = Result<Counts, Error>>,
    {
        let node = if v.node_name.is_empty() {
            v.node_id.clone()
        } else {
            format!("{} ({})", v.node_name, v.node_id)
        };
        // A task for a node that is down or drained would wait, pending, until the timeout.
        let n = found(self.docker.inspect_node(&v.node_id).await)
            .map_err(engine("inspecting the volume's node"))?
            .ok_or_else(|| Error::Refused(format!("node {node} is not in the swarm")))?;
        let state = n.status.and_then(|s| s.state);
        let availability = n.spec.and_then(|s| s.availability);
        if state != Some(NodeState::READY) || availability != Some(NodeSpecAvailabilityEnum::ACTIVE)
        {
            return Err(Error::Refused(format!(
                "node {node} cannot run a transfer agent now (state {}, availability {})",
                state.map(|s| s.to_string()).unwrap_or_default(),
                availability.map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        let name = format!(
            "{}{}",
            berth_api_types::names::swarm::TRANSFER_AGENT_PREFIX,
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let mut guard = Cleanup {
            docker: self.docker.clone(),
            name: name.clone(),
            armed: true,
        };
        let deadline = SystemTime::now() + self.timeout;
        let run = async {
            let listener = channel::Listener::bind(self.listen_ip, self.listen_port, op).await?;
            let grant = listener
                .grant(
                    deadline
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                )
                .map_err(io_err("the transfer listener"))?;
            let grant = serde_json::to_vec(&grant).expect("a grant serialises");
            let secret = self
                .docker
                .create_secret(SecretSpec {
                    name: Some(name.clone()),
                    labels: Some(
                        self.owner
                            .labels_with(&v.volume, &[(labels::ROLE, ROLE_GRANT)]),
                    ),
                    data: Some(base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        &grant,
                    )),
                    ..Default::default()
                })
                .await
                .map_err(engine("creating the transfer's grant secret"))?;
            let spec = self.agent_spec(&name, &secret.id, v, op, new_volume_labels);
            self.docker
                .create_service(spec, None)
                .await
                .map_err(engine("creating the transfer agent"))?;
            tracing::info!(service = %name, volume = %v.volume, %node, op = op.word(), "transfer agent started");
            // The agent's failure before it connects (no image, a refused mount) must end the
            // wait at once, not at the timeout.
            let tls = tokio::select! {
                biased;
                r = listener.accept() => r?,
                failed = self.task_failure(&name) => {
                    return Err(Error::Agent { volume: v.volume.clone(), node: node.clone(), message: failed });
                }
            };
            let counts = talk(tls).await?;
            // The agent's own verdict: it exits 0 only after a complete transfer.
            self.task_outcome(&name)
                .await
                .map_err(|message| Error::Agent {
                    volume: v.volume.clone(),
                    node: node.clone(),
                    message,
                })?;
            Ok(counts)
        };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                volume: v.volume.clone(),
                node: node.clone(),
                secs: self.timeout.as_secs(),
            }),
        };
        let result = match result {
            Err(Error::Io { what, source }) => {
                // The agent's words say more than "connection reset".
                let logs = self.agent_logs(&name).await;
                Err(Error::Agent {
                    volume: v.volume.clone(),
                    node: node.clone(),
                    message: format!("{what}: {source}{logs}"),
                })
            }
            r => r,
        };
        guard.armed = false;
        remove(&self.docker, &name).await;
        result
    }

    fn agent_spec(
        &self,
        name: &str,
        secret_id: &str,
        v: &VolumeOnNode,
        op: Op,
        new_volume_labels: Option<HashMap<String, String>>,
    ) -> ServiceSpec {
        let caps: &[&str] = match op {
            Op::Send => &["CAP_DAC_READ_SEARCH"],
            Op::Receive => &["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID"],
        };
        let labels = self
            .owner
            .labels_with(&v.volume, &[(labels::ROLE, ROLE_AGENT)]);
        ServiceSpec {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            // One replica that is never restarted, not a `replicated-job`: engine 20.10 leaves a
            // job's exited containers behind when the service is removed (seen here: they stay,
            // holding the volume, and berth cannot reach another node's engine to remove them),
            // while a replicated service's go with it.
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.agent_image.clone()),
                    labels: Some(labels),
                    command: Some(vec![
                        "berth".into(),
                        "agent".into(),
                        format!("volume-{}", op.word()),
                        "--grant".into(),
                        GRANT_FILE.into(),
                        "--dir".into(),
                        AGENT_DIR.into(),
                    ]),
                    user: Some("0:0".into()),
                    read_only: Some(true),
                    capability_drop: Some(vec!["ALL".into()]),
                    capability_add: Some(caps.iter().map(|c| c.to_string()).collect()),
                    mounts: Some(vec![Mount {
                        target: Some(AGENT_DIR.into()),
                        source: Some(v.volume.clone()),
                        typ: Some(MountType::VOLUME),
                        read_only: Some(op == Op::Send),
                        // Only used by the engine when it creates the volume (a restore under a
                        // new name): the labels a Service's mount would give it.
                        volume_options: new_volume_labels.map(|l| MountVolumeOptions {
                            labels: Some(l),
                            driver_config: Some(MountVolumeOptionsDriverConfig {
                                name: Some("local".into()),
                                options: None,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
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
                        secret_name: Some(name.to_string()),
                    }]),
                    ..Default::default()
                }),
                placement: Some(TaskSpecPlacement {
                    constraints: Some(vec![format!("node.id=={}", v.node_id)]),
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
                networks: self.host_network.then(|| {
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

    /// The agent task's state, once it has one that ends it.
    async fn task_state(&self, service: &str) -> Option<(TaskState, String)> {
        let tasks = self
            .docker
            .list_tasks(Some(ListTasksOptions {
                filters: Some(HashMap::from([(
                    "service".to_string(),
                    vec![service.to_string()],
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

    /// Resolves only when the agent's task has ended without success (never for one that runs or
    /// completed): its reason, with the agent's own last words.
    async fn task_failure(&self, service: &str) -> String {
        loop {
            if let Some((state, words)) = self.task_state(service).await {
                if matches!(
                    state,
                    TaskState::FAILED
                        | TaskState::REJECTED
                        | TaskState::ORPHANED
                        | TaskState::SHUTDOWN
                ) || (state == TaskState::COMPLETE)
                {
                    // A task that completed without ever connecting failed too.
                    return format!("task {state}: {words}{}", self.agent_logs(service).await);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits for the agent's task to end: `Ok` if it completed (exit 0).
    async fn task_outcome(&self, service: &str) -> Result<(), String> {
        loop {
            match self.task_state(service).await {
                Some((TaskState::COMPLETE, _)) => return Ok(()),
                Some((
                    s @ (TaskState::FAILED
                    | TaskState::REJECTED
                    | TaskState::ORPHANED
                    | TaskState::SHUTDOWN),
                    words,
                )) => {
                    return Err(format!(
                        "task {s}: {words}{}",
                        self.agent_logs(service).await
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The agent's last log lines, as `"; agent said: ..."` (empty if none). The agent never logs
    /// its grant.
    async fn agent_logs(&self, service: &str) -> String {
        let mut s = self.docker.service_logs(
            service,
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

    /// Removes the agent services and grant secrets of this installation that are older than the
    /// timeout (what a berth that died mid-transfer left). Returns how many services went.
    pub async fn collect_leftovers(&self) -> Result<usize, Error> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.timeout).unwrap_or(chrono::Duration::hours(1));
        let services = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(self.owner.filters(None, &[(labels::ROLE, ROLE_AGENT)])),
                ..Default::default()
            }))
            .await
            .map_err(engine("listing transfer agents"))?;
        let mut n = 0;
        for s in services {
            let old = s.created_at.is_some_and(|c| c < cutoff);
            if let (true, Some(name)) = (old, s.spec.and_then(|sp| sp.name)) {
                remove(&self.docker, &name).await;
                n += 1;
            }
        }
        let secrets = self
            .docker
            .list_secrets(Some(bollard::query_parameters::ListSecretsOptions {
                filters: Some(self.owner.filters(None, &[(labels::ROLE, ROLE_GRANT)])),
            }))
            .await
            .map_err(engine("listing transfer grants"))?;
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

/// Removes an agent's service, then its secret (a secret in use cannot be removed: the service
/// goes first). Errors are logged: cleanup must not hide the transfer's own result.
async fn remove(docker: &Docker, name: &str) {
    if let Err(e) = gone(docker.delete_service(name).await) {
        tracing::warn!(service = %name, error = %message(&e), "could not remove a transfer agent");
    }
    for _ in 0..50 {
        match gone(docker.delete_secret(name).await) {
            Ok(()) => return,
            // In use until the engine has forgotten the service's task.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    tracing::warn!(secret = %name, "could not remove a transfer grant; collect_leftovers will");
}

/// Removes the agent if the transfer's future is dropped before it could.
struct Cleanup {
    docker: Docker,
    name: String,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            let (docker, name) = (self.docker.clone(), std::mem::take(&mut self.name));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { remove(&docker, &name).await });
            }
        }
    }
}
