//! The engine's side of `berth-exec/1` (framing in `api_types::workload`): runs an exec the
//! engine has created and carries its output, input, resizes and exit code over one stream. The
//! API server runs it against its own engine for a task on its node (the stream is the client's
//! upgraded connection); an exec agent runs it against its node's engine for a task elsewhere
//! (the stream is the agent's channel to the API server, which passes the frames on unchanged).

use berth_api_types::workload::{ExecRequest, Frame};
use berth_controllers::swarm::engine;
use bollard::container::LogOutput;
use bollard::Docker;
use futures::StreamExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Creates (does not start) the exec of `ask` in `container`; the error is the engine's words.
pub async fn create(docker: &Docker, container: &str, ask: &ExecRequest) -> Result<String, String> {
    docker
        .create_exec(
            container,
            bollard::models::ExecConfig {
                attach_stdin: Some(ask.stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(ask.tty),
                cmd: Some(ask.command.clone()),
                ..Default::default()
            },
        )
        .await
        .map(|created| created.id)
        .map_err(|e| engine::message(&e))
}

/// Carries a created exec over `io` (the client's connection, or an agent's channel) until the
/// command ends, then sends its exit code as the last frame.
pub async fn run_exec<IO>(docker: Docker, id: String, tty: bool, size: Option<[u16; 2]>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let started = docker
        .start_exec(
            &id,
            Some(bollard::exec::StartExecOptions {
                detach: false,
                tty,
                output_capacity: None,
            }),
        )
        .await;
    let (mut output, mut input) = match started {
        Ok(bollard::exec::StartExecResults::Attached { output, input }) => (output, input),
        Ok(bollard::exec::StartExecResults::Detached) => {
            let _ = send_frame(&mut to_client, &Frame::Error("the exec detached".into())).await;
            return;
        }
        Err(e) => {
            let _ = send_frame(
                &mut to_client,
                &Frame::Error(format!("cannot start the command: {}", engine::message(&e))),
            )
            .await;
            return;
        }
    };
    let resize = |cols: u16, rows: u16| {
        let docker = docker.clone();
        let id = id.clone();
        async move {
            if cols > 0 && rows > 0 {
                let _ = docker
                    .resize_exec(
                        &id,
                        bollard::query_parameters::ResizeExecOptions {
                            w: i32::from(cols),
                            h: i32::from(rows),
                        },
                    )
                    .await;
            }
        }
    };
    if let (true, Some([cols, rows])) = (tty, size) {
        resize(cols, rows).await;
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut client_open = true;
    let failure: Option<String> = loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(LogOutput::StdErr { message })) => {
                    if send_frame(&mut to_client, &Frame::Stderr(message.to_vec())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(LogOutput::StdOut { message })) | Some(Ok(LogOutput::Console { message })) => {
                    if send_frame(&mut to_client, &Frame::Stdout(message.to_vec())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => break Some(format!("the command's output broke off: {e}")),
                None => break None,
            },
            n = from_client.read(&mut chunk), if client_open => match n {
                Ok(0) | Err(_) => {
                    // The client is gone: closing the command's stdin ends an interactive shell.
                    client_open = false;
                    let _ = input.shutdown().await;
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        match Frame::take(&mut buf) {
                            Ok(Some(Frame::Stdin(data))) => {
                                let _ = input.write_all(&data).await;
                                let _ = input.flush().await;
                            }
                            Ok(Some(Frame::StdinEof)) => {
                                let _ = input.shutdown().await;
                            }
                            Ok(Some(Frame::Resize(cols, rows))) => resize(cols, rows).await,
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                let _ = send_frame(&mut to_client, &Frame::Error(e)).await;
                                return;
                            }
                        }
                    }
                }
            },
        }
    };
    if let Some(message) = failure {
        let _ = send_frame(&mut to_client, &Frame::Error(message)).await;
        return;
    }
    // The output ends a moment before the engine records the exit code.
    let mut code = None;
    for _ in 0..50 {
        match docker.inspect_exec(&id).await {
            Ok(i) if i.running != Some(true) => {
                code = i.exit_code;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => break,
        }
    }
    let last = match code {
        Some(c) => Frame::Exit(i32::try_from(c).unwrap_or(1)),
        None => Frame::Error("the command's exit code is unknown".into()),
    };
    let _ = send_frame(&mut to_client, &last).await;
    let _ = to_client.shutdown().await;
}

pub async fn send_frame(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    frame: &Frame,
) -> std::io::Result<()> {
    w.write_all(&frame.encode()).await?;
    w.flush().await
}
