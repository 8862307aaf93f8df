//! Reading a named volume's files on any node of the swarm into the manager berth runs on, and
//! writing them back (a restore) on any node. The Backup controller's way to the data of the
//! volumes Services mount "on whichever node they live".
//!
//! - **On berth's own node** (local driver, no driver options) the engine's `Mountpoint` is read
//!   in place: [`Transfers::read`] copies nothing and returns that path for restic to read.
//!   [`Transfers::write`] unpacks straight into it (creating the volume, with berth's labels, if
//!   missing).
//! - **On another node** berth cannot reach that node's engine, so it starts a short-lived agent
//!   task there (the Swarm kit's [`agent_task`](crate::swarm::agent_task): one replica pinned to
//!   the node, its grant a Swarm secret, a one-time TLS channel back) running `berth agent
//!   volume-send|volume-receive` with the one volume mounted (read-only to read it). The data
//!   travels as tar ([`stream`](super::stream)) and is unpacked on the manager into the caller's
//!   staging directory, or by the agent into the volume.
//!
//! What a transfer agent is allowed beyond the kit's defaults, and why: root (uid 0), because
//! reading and restoring other users' files and their owners needs it; but of the capabilities
//! only `DAC_READ_SEARCH` to read (any file, any directory), and `CHOWN`, `DAC_OVERRIDE`,
//! `FOWNER`, `FSETID` to write (give files their owners, write into others' directories, set
//! modes and times, keep setuid); one mount, the volume.
//!
//! Everything the agent path creates (the service, the secret) carries berth's owner labels (kind
//! `backup`, the volume's name, `io.berth.role` `transfer-agent` / `transfer-grant`) and is removed
//! when the transfer ends, however it ends; [`Transfers::collect_leftovers`] removes what a
//! crashed berth left.

use super::agent;
use super::stream::{self, Counts};
use crate::swarm::agent_task::{AgentChannel, AgentError, Job, Launcher};
use crate::swarm::channel::{ChannelError, Op};
use crate::swarm::engine::{found, message};
use crate::swarm::Owner;
use berth_api_types::names::labels;
use berth_api_types::Kind;
use bollard::models::{
    Mount, MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig, VolumeCreateRequest,
};
use bollard::Docker;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Where the agent finds the volume.
pub const AGENT_DIR: &str = "/volume";
/// The image the tests build from the berth binary (scripts/test); production passes berth's own
/// published image (`--backup-agent-image`).
pub const TEST_AGENT_IMAGE: &str = "berth-test/agent:1";
/// The whole of one transfer, agent start to finish, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
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

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Engine(m) => Error::Engine(m),
            AgentError::Channel(c) => Error::Channel(c),
            AgentError::Refused(m) | AgentError::Failed(m) => Error::Refused(m),
        }
    }
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
    agents: Launcher,
    timeout: Duration,
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
        let agents = Launcher::new(docker.clone(), agent_image).await?;
        Ok(Transfers {
            docker,
            owner: Owner::new(instance, Kind::Backup),
            agents,
            timeout: DEFAULT_TIMEOUT,
            always_agent: false,
        })
    }

    /// Listen for agents on this address instead of the node's swarm address.
    pub fn listen_ip(mut self, ip: IpAddr) -> Self {
        self.agents = self.agents.listen_ip(ip);
        self
    }

    /// Listen on this port (0, the default: any free port; set one to open it in a firewall).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.agents = self.agents.listen_port(port);
        self
    }

    /// The longest one transfer may take, agent start included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Run agents on the node's host network (for engines without a bridge network).
    pub fn host_network(mut self, yes: bool) -> Self {
        self.agents = self.agents.host_network(yes);
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
        self.agents.local_node_id()
    }

    /// Whether the volume exists on its node: `Some` on berth's own node; `None` elsewhere, where
    /// only that node's engine knows, and asking through a task would create it (the engine
    /// creates a missing volume on mount). Read only what a backup plan found there (`build::plan_volumes`).
    pub async fn exists(&self, v: &VolumeOnNode) -> Result<Option<bool>, Error> {
        if v.node_id != self.local_node_id() {
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
        if v.node_id == self.local_node_id() && !self.always_agent {
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
        if node_id == self.local_node_id() && !self.always_agent {
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

    /// Runs one agent transfer: `talk` gets the authenticated channel. The agent and its grant
    /// are removed afterwards, on success, error, timeout, and if this future is dropped.
    async fn with_agent<F, Fut>(
        &self,
        v: &VolumeOnNode,
        op: Op,
        new_volume_labels: Option<HashMap<String, String>>,
        talk: F,
    ) -> Result<Counts, Error>
    where
        F: FnOnce(AgentChannel) -> Fut,
        Fut: std::future::Future<Output = Result<Counts, Error>>,
    {
        let node = if v.node_name.is_empty() {
            v.node_id.clone()
        } else {
            format!("{} ({})", v.node_name, v.node_id)
        };
        let failed = |message: String| Error::Agent {
            volume: v.volume.clone(),
            node: node.clone(),
            message,
        };
        let agent = self
            .agents
            .task(berth_api_types::names::swarm::TRANSFER_AGENT_PREFIX);
        let job = self.job(v, &node, op, new_volume_labels);
        let run = async {
            let tls = agent.start(&job).await.map_err(|e| match e {
                AgentError::Failed(m) => failed(m),
                e => Error::from(e),
            })?;
            tracing::info!(volume = %v.volume, %node, op = op.word(), "transfer agent connected");
            let counts = talk(tls).await?;
            // The agent's own verdict: it exits 0 only after a complete transfer.
            agent.outcome().await.map_err(failed)?;
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
            // The agent's words say more than "connection reset".
            Err(Error::Io { what, source }) => {
                Err(failed(format!("{what}: {source}{}", agent.logs().await)))
            }
            r => r,
        };
        agent.remove().await;
        result
    }

    fn job(
        &self,
        v: &VolumeOnNode,
        node: &str,
        op: Op,
        new_volume_labels: Option<HashMap<String, String>>,
    ) -> Job {
        let caps: &[&str] = match op {
            Op::Send => &["CAP_DAC_READ_SEARCH"],
            _ => &["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID"],
        };
        Job {
            op,
            node_id: v.node_id.clone(),
            node: node.to_string(),
            args: vec![
                format!("volume-{}", op.word()),
                "--dir".into(),
                AGENT_DIR.into(),
            ],
            labels: self
                .owner
                .labels_with(&v.volume, &[(labels::ROLE, ROLE_AGENT)]),
            grant_labels: self
                .owner
                .labels_with(&v.volume, &[(labels::ROLE, ROLE_GRANT)]),
            user: "0:0".into(),
            caps: caps.iter().map(|c| c.to_string()).collect(),
            mounts: vec![Mount {
                target: Some(AGENT_DIR.into()),
                source: Some(v.volume.clone()),
                typ: Some(MountType::VOLUME),
                read_only: Some(op == Op::Send),
                // Only used by the engine when it creates the volume (a restore under a new
                // name): the labels a Service's mount would give it.
                volume_options: new_volume_labels.map(|l| MountVolumeOptions {
                    labels: Some(l),
                    driver_config: Some(MountVolumeOptionsDriverConfig {
                        name: Some("local".into()),
                        options: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            deadline: SystemTime::now() + self.timeout,
        }
    }

    /// Removes the agent services and grant secrets of this installation that are older than the
    /// timeout (what a berth that died mid-transfer left). Returns how many services went.
    pub async fn collect_leftovers(&self) -> Result<usize, Error> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.timeout).unwrap_or(chrono::Duration::hours(1));
        Ok(self
            .agents
            .collect_leftovers(
                self.owner.filters(None, &[(labels::ROLE, ROLE_AGENT)]),
                self.owner.filters(None, &[(labels::ROLE, ROLE_GRANT)]),
                cutoff,
            )
            .await?)
    }
}
