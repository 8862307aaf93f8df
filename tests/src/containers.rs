//! What runs inside a Swarm service's containers, read through the engine (never through berth):
//! the container spec the engine holds for a service, its running containers, a command in one, and
//! a file's content.

use crate::Docker;
use bollard::container::LogOutput;
use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use bollard::models::TaskSpecContainerSpec;
use bollard::query_parameters::{InspectServiceOptions, ListContainersOptions};
use futures::StreamExt;
use std::collections::HashMap;

/// The container spec the engine holds for a Swarm service (image, env, command...).
pub async fn container_spec(d: &Docker, service: &str) -> TaskSpecContainerSpec {
    d.inspect_service(service, None::<InspectServiceOptions>)
        .await
        .unwrap_or_else(|e| panic!("e2e: inspecting service {service}: {e}"))
        .spec
        .and_then(|s| s.task_template)
        .and_then(|t| t.container_spec)
        .unwrap_or_default()
}

/// IDs of the running containers of one Swarm service.
pub async fn running_containers(d: &Docker, service: &str) -> Vec<String> {
    let list = d
        .list_containers(Some(ListContainersOptions {
            all: false,
            filters: Some(HashMap::from([
                (
                    "label".to_string(),
                    vec![format!("com.docker.swarm.service.name={service}")],
                ),
                ("status".to_string(), vec!["running".to_string()]),
            ])),
            ..Default::default()
        }))
        .await
        .expect("e2e: listing containers");
    list.into_iter().filter_map(|c| c.id).collect()
}

/// Runs `cmd` in a running container; returns (exit code, stdout) or why it could not.
pub async fn exec(d: &Docker, container: &str, cmd: &[&str]) -> Result<(i64, String), String> {
    let short = &container[..12.min(container.len())];
    let created = d
        .create_exec(
            container,
            ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec in {short}: {e}"))?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    match d
        .start_exec(&created.id, None)
        .await
        .map_err(|e| format!("starting exec in {short}: {e}"))?
    {
        StartExecResults::Attached { mut output, .. } => {
            while let Some(chunk) = output.next().await {
                match chunk.map_err(|e| format!("exec output from {short}: {e}"))? {
                    LogOutput::StdOut { message } => {
                        stdout.push_str(&String::from_utf8_lossy(&message))
                    }
                    LogOutput::StdErr { message } => {
                        stderr.push_str(&String::from_utf8_lossy(&message))
                    }
                    _ => {}
                }
            }
        }
        StartExecResults::Detached => return Err("exec detached".into()),
    }
    let code = d
        .inspect_exec(&created.id)
        .await
        .map_err(|e| format!("inspecting exec in {short}: {e}"))?
        .exit_code
        .unwrap_or(-1);
    if code != 0 && !stderr.is_empty() {
        return Err(format!("{cmd:?} in {short} exited {code}: {stderr}"));
    }
    Ok((code, stdout))
}

/// The one running container of `service` and the content of `path` in it.
pub async fn read_file(d: &Docker, service: &str, path: &str) -> Result<(String, String), String> {
    let running = running_containers(d, service).await;
    let [container] = running.as_slice() else {
        return Err(format!("{} running containers", running.len()));
    };
    match exec(d, container, &["cat", path]).await? {
        (0, text) => Ok((container.clone(), text)),
        (code, _) => Err(format!("cat {path} exited {code}")),
    }
}
