//! `berth exec` into a task on a node other than the API server's. Swarm runs a command only
//! through the engine of the node that runs the container, and berth talks to one engine (its
//! manager's). So the API server starts an **exec agent** on the task's node (the Swarm kit's
//! `agent_task`: one replica pinned to the node, its grant a Swarm secret, a one-time pinned TLS
//! channel back), hands it the command over that channel, and passes the `berth-exec/1` frames
//! between the client and the agent unchanged. The agent runs the same engine side as the API
//! server does for a local task ([`exec_engine`](crate::exec_engine)).
//!
//! The privilege, and why it is off by default: the agent mounts its node's engine socket
//! (read-only as a file, but whoever speaks to that socket is root on the node). It is started
//! only when the API server runs with `--allow-remote-exec`, only for a caller who already has
//! the exec grant, for one command, in one container; it checks the container is the task's
//! before creating the exec; it has no capability, a read-only root filesystem and bounded
//! memory; it is removed when the command ends, and exits by itself after [`SESSION_LIMIT`].
//! Without the flag, a task on another node is refused with the reason.

use crate::exec_engine;
use crate::server::ApiError;
use axum::http::StatusCode;
use berth_api_types::names::{labels, swarm as swarm_names};
use berth_api_types::workload::{ExecRequest, TaskInfo};
use berth_controllers::swarm::agent_task::{AgentChannel, AgentError, AgentTask, Job, Launcher};
use berth_controllers::swarm::channel::{self, Grant, Op};
use berth_controllers::swarm::engine;
use berth_controllers::swarm::owner::{installation_filters, installation_labels};
use bollard::models::{Mount, MountType};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest an exec through an agent lasts (an interactive shell left open included).
pub const SESSION_LIMIT: Duration = Duration::from_secs(8 * 3600);
/// How long the agent may take from being created to connecting (its image is on the node).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the agent finds its node's engine socket.
const AGENT_SOCKET: &str = "/var/run/docker.sock";
/// `io.berth.role` of exec agents and of their grants.
const ROLE_AGENT: &str = "exec-agent";
const ROLE_GRANT: &str = "exec-grant";
/// The longest line either side sends before the frames (a command line, or an answer).
const MAX_LINE: usize = 256 * 1024;

/// What berth asks of the agent, the first line on the channel.
#[derive(Serialize, Deserialize)]
struct AgentJob {
    /// The container to run the command in, and the Swarm task it must belong to.
    container: String,
    task: String,
    exec: ExecRequest,
}

/// The agent's answer once the exec exists (or could not be created); frames follow an `Ok`.
#[derive(Debug, Serialize, Deserialize)]
struct AgentAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The API server's side: starts exec agents from its engine.
pub struct RemoteExec {
    agents: Launcher,
    instance: String,
    socket: String,
}

impl RemoteExec {
    /// Agents running `image`, mounting each node's engine socket from `socket` (a path on the
    /// nodes; Swarm expands `{{.Node.Hostname}}` and `{{.Node.ID}}` in it).
    pub async fn new(
        docker: Docker,
        instance: &str,
        image: String,
        host_network: bool,
        socket: String,
    ) -> Result<Self, AgentError> {
        Ok(RemoteExec {
            agents: Launcher::new(docker, image)
                .await?
                .host_network(host_network),
            instance: instance.to_string(),
            socket,
        })
    }

    /// Starts an agent on `task`'s node and has it create the exec. On `Ok` the channel carries
    /// frames; the agent is removed when the returned handle is.
    pub async fn open(
        &self,
        service: &str,
        task: &TaskInfo,
        container: &str,
        ask: &ExecRequest,
    ) -> Result<(AgentTask, AgentChannel), ApiError> {
        self.collect_leftovers().await;
        let agent = self.agents.task(swarm_names::EXEC_AGENT_PREFIX);
        let node = format!("{} ({})", task.node, task.node_id);
        let job = Job {
            op: Op::Exec,
            node_id: task.node_id.clone(),
            node: node.clone(),
            args: vec!["exec".into()],
            labels: installation_labels(&self.instance, ROLE_AGENT, service),
            grant_labels: installation_labels(&self.instance, ROLE_GRANT, service),
            // The socket's owner: no capability is needed to speak to it.
            user: "0:0".into(),
            caps: vec![],
            mounts: vec![Mount {
                target: Some(AGENT_SOCKET.into()),
                source: Some(self.socket.clone()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            }],
            deadline: SystemTime::now() + SESSION_LIMIT,
        };
        let failed = |status: StatusCode, reason: &'static str, why: String| {
            ApiError::new(
                status,
                reason,
                format!(
                    "cannot exec in task {} on node {node}: {why}",
                    task.log_prefix()
                ),
            )
        };
        let mut channel = match tokio::time::timeout(START_TIMEOUT, agent.start(&job)).await {
            Ok(Ok(c)) => c,
            Ok(Err(AgentError::Refused(why))) => {
                return Err(failed(StatusCode::CONFLICT, "NodeUnavailable", why))
            }
            Ok(Err(e)) => {
                return Err(failed(
                    StatusCode::BAD_GATEWAY,
                    "ExecAgentFailed",
                    format!("the exec agent failed: {e}"),
                ))
            }
            Err(_) => {
                let logs = agent.logs().await;
                return Err(failed(
                    StatusCode::GATEWAY_TIMEOUT,
                    "ExecAgentFailed",
                    format!(
                        "the exec agent did not connect within {} s{logs}",
                        START_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        let line = AgentJob {
            container: container.to_string(),
            task: task.id.clone(),
            exec: ask.clone(),
        };
        let answer: Result<AgentAnswer, String> = async {
            write_line(&mut channel, &line).await?;
            read_line(&mut channel).await
        }
        .await;
        match answer {
            Ok(AgentAnswer { error: None }) => Ok((agent, channel)),
            Ok(AgentAnswer { error: Some(why) }) => {
                Err(failed(StatusCode::CONFLICT, "ExecFailed", why))
            }
            Err(why) => Err(failed(
                StatusCode::BAD_GATEWAY,
                "ExecAgentFailed",
                format!("{why}{}", agent.logs().await),
            )),
        }
    }

    /// Removes exec agents older than a session (what an API server that died mid-exec left;
    /// their commands have ended at the agents' own deadline).
    async fn collect_leftovers(&self) {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(SESSION_LIMIT + START_TIMEOUT)
                .unwrap_or(chrono::Duration::hours(9));
        if let Err(e) = self
            .agents
            .collect_leftovers(
                installation_filters(&self.instance, ROLE_AGENT),
                installation_filters(&self.instance, ROLE_GRANT),
                cutoff,
            )
            .await
        {
            tracing::warn!(error = %e, "could not look for leftover exec agents");
        }
    }
}

/// Passes frames between the client's connection and the agent's channel until the agent ends
/// the stream (after the exit code), then removes the agent.
pub async fn bridge<IO>(client: IO, agent: AgentTask, channel: AgentChannel)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut agent_in, mut agent_out) = tokio::io::split(channel);
    let upstream = async {
        // The client went away: the agent closes the command's stdin, as a local exec does.
        let _ = tokio::io::copy(&mut client_in, &mut agent_out).await;
        let _ = agent_out.shutdown().await;
        std::future::pending::<()>().await
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut agent_in, &mut client_out).await;
        let _ = client_out.shutdown().await;
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    agent.remove().await;
}

async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> Result<(), String> {
    let mut bytes = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    w.write_all(&bytes)
        .await
        .map_err(|e| format!("the exec agent's channel: {e}"))?;
    w.flush()
        .await
        .map_err(|e| format!("the exec agent's channel: {e}"))
}

/// One JSON line, read byte by byte: what follows it is frames.
async fn read_line<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<T, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            return Err("the exec agent's channel: a line too long".into());
        }
        match r.read(&mut byte).await {
            Ok(0) => return Err("the exec agent's channel closed early".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("the exec agent's channel: {e}")),
        }
    }
    serde_json::from_slice(&line).map_err(|e| format!("the exec agent's channel: {e}"))
}

/// The agent: `berth agent exec --grant FILE`, inside the task berth started on the node. The
/// error is for the task's log (it holds no secret and no command argument).
pub fn run_agent(grant_file: &Path) -> Result<(), String> {
    let grant = Grant::read(grant_file, Op::Exec)?;
    channel::exit_at_deadline(grant.deadline);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let mut tls = channel::connect_async(&grant, START_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let job: AgentJob = read_line(&mut tls).await?;
        let created = match prepare(&job).await {
            Ok(created) => created,
            Err(why) => {
                let _ = write_line(&mut tls, &AgentAnswer { error: Some(why) }).await;
                let _ = tls.shutdown().await;
                return Ok(());
            }
        };
        let (docker, id) = created;
        write_line(&mut tls, &AgentAnswer { error: None }).await?;
        exec_engine::run_exec(docker, id, job.exec.tty, job.exec.size, tls).await;
        Ok(())
    })
}

/// Creates the exec, after checking the container is the Swarm task's berth named (a mixed-up
/// job must not run a command in some other container of the node).
async fn prepare(job: &AgentJob) -> Result<(Docker, String), String> {
    let docker = engine::connect(Some(&format!("unix://{AGENT_SOCKET}")))
        .await
        .map_err(|e| format!("cannot reach the node's engine: {e}"))?;
    let c = docker
        .inspect_container(
            &job.container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .map_err(|e| format!("no container {}: {}", job.container, engine::message(&e)))?;
    let task = c
        .config
        .and_then(|c| c.labels)
        .and_then(|l| l.get(labels::SWARM_TASK_ID).cloned());
    if task.as_deref() != Some(job.task.as_str()) {
        return Err(format!(
            "container {} is not task {}'s",
            job.container, job.task
        ));
    }
    let id = exec_engine::create(&docker, &job.container, &job.exec).await?;
    Ok((docker, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_job_line_goes_through_and_frames_after_it_stay_unread() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let job = AgentJob {
            container: "c0ffee".into(),
            task: "t1".into(),
            exec: ExecRequest {
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                tty: true,
                ..ExecRequest::default()
            },
        };
        write_line(&mut a, &job).await.unwrap();
        a.write_all(b"FRAMES").await.unwrap();
        let got: AgentJob = read_line(&mut b).await.unwrap();
        assert_eq!(
            (got.container.as_str(), got.task.as_str(), got.exec),
            ("c0ffee", "t1", job.exec)
        );
        let mut rest = [0u8; 6];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"FRAMES");
    }

    #[tokio::test]
    async fn a_cut_or_endless_line_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(b"{\"error\":").await.unwrap();
        drop(a);
        let cut: Result<AgentAnswer, String> = read_line(&mut b).await;
        assert!(cut.unwrap_err().contains("closed early"));

        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            let _ = a.write_all(&vec![b'x'; MAX_LINE + 10]).await;
        });
        let long: Result<AgentAnswer, String> = read_line(&mut b).await;
        assert!(long.unwrap_err().contains("too long"));
        writer.abort();
    }
}
