//! `berth logs`, `berth ps` and `berth exec`: looking at and into a running Service through the
//! API (`day2_api.rs`), so a team needs a berth token and no Docker access.

use crate::cli::{api_error, client, Output};
use crate::output;
use crate::Conn;
use berth_api_types::names::paths;
use berth_api_types::wire::List;
use berth_api_types::workload::{ExecRequest, Frame, LogLine, TaskInfo, EXEC_PROTOCOL};
use berth_api_types::Kind;
use clap::Args;
use futures::StreamExt;
use reqwest::Method;
use std::io::Write;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type CliResult = Result<(), String>;

#[derive(Args)]
pub struct LogsArgs {
    /// The Service, or `job SERVICE` for the logs of its pre-deploy jobs (`spec.deploy.preDeploy`).
    #[arg(value_name = "[job] SERVICE", num_args = 1..=2, required = true)]
    what: Vec<String>,
    /// With `job`: the jobs of this revision (`berth rollout history`); default the latest that
    /// had jobs.
    #[arg(long)]
    revision: Option<u64>,
    /// Keep streaming new lines (and those of tasks that start later) until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines since this time: a duration back from now (`10m`, `1h30m`) or RFC 3339.
    #[arg(long)]
    since: Option<String>,
    /// Only the last N lines of each task.
    #[arg(long)]
    tail: Option<u32>,
    /// Show the engine's timestamp of each line.
    #[arg(long)]
    timestamps: bool,
    /// Only this task: a slot number or a task id (or its start).
    #[arg(long)]
    task: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct PsArgs {
    /// The Service.
    service: String,
    #[arg(short = 'o', long, default_value = "table")]
    output: Output,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The Service.
    service: String,
    /// The task: a slot number or a task id (or its start). Default: the first running task on
    /// the API server's node.
    #[arg(long)]
    task: Option<String>,
    /// Forward standard input to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the command a terminal (with -i: an interactive shell). The local terminal is raw
    /// while attached.
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn logs(a: LogsArgs) -> CliResult {
    if let Some(s) = &a.since {
        // The server parses it the same way; checking here names the flag.
        crate::audit::parse_since(s, chrono::Utc::now())
            .map_err(|e| format!("error: --since: {e}"))?;
    }
    let (service, job) = match a.what.as_slice() {
        [service] => (service.clone(), false),
        [job, service] if job == "job" => (service.clone(), true),
        [other, _] => {
            return Err(format!(
                "error: `berth logs {other} ...`: give one SERVICE, or `job SERVICE` for its pre-deploy jobs"
            ))
        }
        _ => unreachable!("clap takes one or two values"),
    };
    if a.revision.is_some() && !job {
        return Err("error: --revision applies to `berth logs job SERVICE`".to_string());
    }
    let client = client(&a.conn)?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if job {
        query.push(("job", "true".into()));
    }
    if let Some(r) = a.revision {
        query.push(("revision", r.to_string()));
    }
    if a.follow {
        query.push(("follow", "true".into()));
    }
    if a.timestamps {
        query.push(("timestamps", "true".into()));
    }
    if let Some(s) = &a.since {
        query.push(("since", s.clone()));
    }
    if let Some(n) = a.tail {
        query.push(("tail", n.to_string()));
    }
    if let Some(t) = &a.task {
        query.push(("task", t.clone()));
    }
    let req = client
        .request(Method::GET, &paths::logs(Kind::Service, &service))
        .query(&query);
    let resp = client.open(req).await.map_err(api_error)?;
    let mut lines = Box::pin(
        client
            .decode_json_lines::<LogLine>(resp)
            .await
            .map_err(api_error)?,
    );
    let mut out = std::io::stdout().lock();
    while let Some(line) = lines.next().await {
        let line = line.map_err(api_error)?;
        if line.stream == "error" {
            eprintln!(
                "warning: cannot read the logs of {}: {}",
                line.task, line.line
            );
            continue;
        }
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{}", line.render())
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

pub async fn ps(a: PsArgs) -> CliResult {
    let client = client(&a.conn)?;
    let list: List<TaskInfo> = client
        .request_json(Method::GET, &paths::tasks(Kind::Service, &a.service), None)
        .await
        .map_err(api_error)?;
    match a.output {
        Output::Table => println!("{}", tasks_table(&list.items)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": list.items }))
                .map_err(|e| e.to_string())?
        ),
        Output::Yaml => print!(
            "{}",
            output::to_yaml(&serde_json::json!({ "items": list.items }))
        ),
    }
    Ok(())
}

fn tasks_table(tasks: &[TaskInfo]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let since = t
                .since
                .as_deref()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|s| format!("{} ago", output::age_since(s.with_timezone(&chrono::Utc))))
                .unwrap_or_else(|| "-".into());
            let error = match (&t.error, t.exit_code) {
                (Some(e), _) => output::plain(e),
                (None, Some(c)) if c != 0 => format!("exit code {c}"),
                _ => String::new(),
            };
            vec![
                t.name.clone(),
                berth_api_types::workload::short_id(&t.id).to_string(),
                output::plain(&t.node),
                t.desired_state.clone(),
                t.state.clone(),
                since,
                t.digest.clone().unwrap_or_else(|| "-".into()),
                error,
            ]
        })
        .collect();
    output::table(
        &[
            "TASK", "ID", "NODE", "DESIRED", "STATE", "SINCE", "DIGEST", "ERROR",
        ],
        &rows,
    )
}

/// The local terminal in raw mode while attached to a remote one; the settings it had are put
/// back when this is dropped, on every way out (an error, a panic's unwinding, the end).
struct RawTerminal {
    fd: libc::c_int,
    saved: libc::termios,
}

impl RawTerminal {
    fn enter(fd: libc::c_int) -> Result<RawTerminal, String> {
        // SAFETY: tcgetattr/tcsetattr only read and write the termios struct given; the fd is
        // the process's own standard input.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(format!(
                    "error: cannot read the terminal's settings: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(format!(
                    "error: cannot put the terminal in raw mode: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(RawTerminal { fd, saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

fn is_terminal(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's `[columns, rows]`, when standard output is one.
fn terminal_size() -> Option<[u16; 2]> {
    // SAFETY: TIOCGWINSZ fills the winsize struct given.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0)
            .then_some([ws.ws_col, ws.ws_row])
    }
}

/// Runs the command and ends the process with its exit code.
pub async fn exec(a: ExecArgs) -> CliResult {
    if a.tty && !is_terminal(libc::STDIN_FILENO) {
        return Err(
            "error: -t needs a terminal on standard input (this one is not a TTY); drop -t to pipe input"
                .into(),
        );
    }
    let client = client(&a.conn)?;
    let ask = ExecRequest {
        command: a.command.clone(),
        task: a.task.clone(),
        stdin: a.interactive,
        tty: a.tty,
        size: if a.tty { terminal_size() } else { None },
    };
    let req = client
        .request(Method::POST, &paths::exec(Kind::Service, &a.service))
        .header(reqwest::header::CONNECTION, "upgrade")
        .header(reqwest::header::UPGRADE, EXEC_PROTOCOL)
        .json(&ask);
    let resp = client.open(req).await.map_err(api_error)?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!(
            "error: the API server answered {} instead of starting the exec stream",
            resp.status()
        ));
    }
    let conn = resp
        .upgrade()
        .await
        .map_err(|e| format!("error: the exec stream did not open: {e}"))?;
    let raw = if a.tty {
        Some(RawTerminal::enter(libc::STDIN_FILENO)?)
    } else {
        None
    };
    let result = attach(conn, a.interactive, a.tty).await;
    // The terminal is itself again before anything more is printed.
    drop(raw);
    let code = match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("{}", message.trim_end());
            1
        }
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // The command's exit code is the CLI's. Exiting here rather than returning also keeps the
    // runtime's shutdown from waiting on the blocked read of a terminal's standard input.
    std::process::exit(code)
}

/// Pumps standard input (with `interactive`) and terminal resizes (with `tty`) to the stream,
/// and the command's output back, until its exit code arrives.
async fn attach(conn: reqwest::Upgraded, interactive: bool, tty: bool) -> Result<i32, String> {
    let (mut from_server, to_server) = tokio::io::split(conn);
    let to_server = std::sync::Arc::new(tokio::sync::Mutex::new(to_server));
    let mut pumps = tokio::task::JoinSet::new();
    if interactive {
        let w = to_server.clone();
        pumps.spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                let frame = match stdin.read(&mut chunk).await {
                    Ok(0) | Err(_) => Frame::StdinEof,
                    Ok(n) => Frame::Stdin(chunk[..n].to_vec()),
                };
                let eof = frame == Frame::StdinEof;
                let mut w = w.lock().await;
                if w.write_all(&frame.encode()).await.is_err() || w.flush().await.is_err() || eof {
                    return;
                }
            }
        });
    }
    if tty {
        let w = to_server.clone();
        pumps.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some([cols, rows]) = terminal_size() {
                    let mut w = w.lock().await;
                    if w.write_all(&Frame::Resize(cols, rows).encode())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = w.flush().await;
                }
            }
        });
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let outcome = loop {
        match Frame::take(&mut buf) {
            Ok(Some(Frame::Stdout(b))) => {
                let _ = stdout.write_all(&b).await;
                let _ = stdout.flush().await;
                continue;
            }
            Ok(Some(Frame::Stderr(b))) => {
                let _ = stderr.write_all(&b).await;
                let _ = stderr.flush().await;
                continue;
            }
            Ok(Some(Frame::Exit(code))) => break Ok(code),
            Ok(Some(Frame::Error(m))) => break Err(format!("error: exec: {m}")),
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => break Err(format!("error: {e}")),
        }
        match from_server.read(&mut chunk).await {
            Ok(0) => {
                break Err(
                    "error: the API server closed the exec stream before the command's exit code arrived"
                        .into(),
                )
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(format!("error: the exec stream broke off: {e}")),
        }
    };
    pumps.abort_all();
    outcome
}
