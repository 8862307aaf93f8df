//! The day-2 routes of a Service (paths in `api_types::names::paths`): its Swarm tasks
//! (`berth ps`), its logs from every task on every node (`berth logs`), and a command run in one
//! of its running tasks (`berth exec`, over an HTTP upgrade). Teams have no Docker access: these
//! go through the engine the API server has (`--docker-host`), and only ever reach the Swarm
//! service that carries this installation's labels for that Service.
//!
//! Swarm runs a command only through the engine of the node that runs the container: a task on
//! the API server's node is exec'd through its own engine ([`exec_engine`]); a task elsewhere
//! through an exec agent on that node ([`exec_agent`]) when the server allows it
//! (`--allow-remote-exec`), and is refused with the reason otherwise.

use crate::access::{Audited, Change};
use crate::extract::{Path, Query};
use crate::server::{ApiError, AppState};
use crate::{exec_agent, exec_engine};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use berth_api_types::names::{labels, paths};
use berth_api_types::wire::List;
use berth_api_types::workload::{
    finish_log_lines, image_digest, program_name, select_task, split_log_lines, ExecRequest, Frame,
    LogLine, TaskInfo, EXEC_PROTOCOL, MAX_FRAME,
};
use berth_api_types::Kind;
use berth_controllers::swarm::engine;
use berth_controllers::swarm::owner::Owner;
use bollard::container::LogOutput;
use bollard::Docker;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

type ApiResult<T> = Result<T, ApiError>;

/// Largest exec request body (a command line).
const MAX_EXEC_BODY: usize = 64 * 1024;
/// How often a followed log looks for new tasks (a restarted or scaled-up replica).
const FOLLOW_RELIST: Duration = Duration::from_secs(2);

pub fn routes() -> Router<AppState> {
    let route = |suffix: &str| format!("{}/{{plural}}/{{name}}/{suffix}", paths::API_ROOT);
    Router::new()
        .route(&route("tasks"), get(tasks))
        .route(&route("logs"), get(logs))
        .route(&route("exec"), post(exec))
        .route(&route("exec/ws"), get(exec_ws))
}

fn engine_unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "EngineUnavailable",
        e.to_string(),
    )
}

/// A berth Service and the Swarm service this installation made for it.
struct Target {
    name: String,
    docker: Docker,
    service_id: String,
}

/// The Swarm services this installation made for Service `name` (narrowed by `extra` labels),
/// through a connection to the engine it returns too.
async fn owned_services(
    state: &AppState,
    name: &str,
    extra: &[(&str, &str)],
) -> ApiResult<(Docker, Owner, Vec<bollard::models::Service>)> {
    let docker = engine::connect(state.docker_host.as_deref().map(|h| h.as_str()))
        .await
        .map_err(engine_unavailable)?;
    let owner = Owner::new(state.store.instance(), Kind::Service);
    let services = docker
        .list_services(Some(bollard::query_parameters::ListServicesOptions {
            filters: Some(owner.filters(Some(name), extra)),
            ..Default::default()
        }))
        .await
        .map_err(|e| {
            engine_unavailable(format!(
                "cannot list Swarm services: {}",
                engine::message(&e)
            ))
        })?;
    Ok((docker, owner, services))
}

/// Finds the Service's Swarm service by berth's labels (never by name alone: a service of the
/// same name that berth does not own is not shown or touched).
async fn target(state: &AppState, plural: &str, name: &str) -> ApiResult<Target> {
    if plural != Kind::Service.plural() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("tasks, logs and exec are served for services only, not `{plural}`"),
        ));
    }
    if state.store.get(Kind::Service, name)?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no Service `{name}` (list them with `berth get services`)"),
        ));
    }
    let (docker, owner, services) = owned_services(state, name, &[]).await?;
    let service_id = services
        .into_iter()
        .filter(|s| !is_pre_deploy_job(s))
        .find(|s| owner.owns(s.spec.as_ref().and_then(|sp| sp.labels.as_ref()), name))
        .and_then(|s| s.id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "Service `{name}` has no Swarm service yet (berth creates it when it reconciles \
                     the Service; see `berth describe service {name}`)"
                ),
            )
        })?;
    Ok(Target {
        name: name.to_string(),
        docker,
        service_id,
    })
}

/// Whether a Swarm service is one of a Service's pre-deploy jobs (they carry the Service's
/// ownership labels too, plus their role).
fn is_pre_deploy_job(s: &bollard::models::Service) -> bool {
    s.spec
        .as_ref()
        .and_then(|sp| sp.labels.as_ref())
        .and_then(|l| l.get(labels::ROLE))
        .is_some_and(|r| r == labels::ROLE_PRE_DEPLOY)
}

/// The pre-deploy jobs of a Service's rollout `revision` (the latest rollout that had jobs when
/// `None`), one target per step, in step order.
async fn job_targets(
    state: &AppState,
    plural: &str,
    name: &str,
    revision: Option<u64>,
) -> ApiResult<Vec<Target>> {
    // The Service must exist and be one (same answers as for its tasks).
    if plural != Kind::Service.plural() || state.store.get(Kind::Service, name)?.is_none() {
        return target(state, plural, name).await.map(|_| Vec::new());
    }
    let (docker, _, jobs) =
        owned_services(state, name, &[(labels::ROLE, labels::ROLE_PRE_DEPLOY)]).await?;
    let jobs: Vec<bollard::models::Service> = jobs.into_iter().filter(is_pre_deploy_job).collect();
    let label = |s: &bollard::models::Service, key: &str| -> Option<u64> {
        s.spec.as_ref()?.labels.as_ref()?.get(key)?.parse().ok()
    };
    let Some(revision) =
        revision.or_else(|| jobs.iter().filter_map(|j| label(j, labels::REVISION)).max())
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("Service `{name}` has no pre-deploy jobs (see `spec.deploy.preDeploy`)"),
        ));
    };
    let mut of_revision: Vec<_> = jobs
        .into_iter()
        .filter(|j| label(j, labels::REVISION) == Some(revision))
        .collect();
    if of_revision.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "Service `{name}` has no pre-deploy jobs of revision {revision} (older ones are \
                 removed after `spec.deploy.jobHistory` rollouts)"
            ),
        ));
    }
    of_revision.sort_by_key(|j| label(j, labels::STEP));
    Ok(of_revision
        .into_iter()
        .map(|j| Target {
            name: j.spec.and_then(|s| s.name).unwrap_or_default(),
            docker: docker.clone(),
            service_id: j.id.unwrap_or_default(),
        })
        .collect())
}

/// The tasks of several targets (a rollout's jobs), in order.
async fn task_lists(targets: &[Target]) -> ApiResult<Vec<(usize, TaskInfo)>> {
    let mut out = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        out.extend(task_list(t).await?.into_iter().map(|task| (i, task)));
    }
    Ok(out)
}

/// The Swarm tasks of a target, newest first within each slot, with their nodes' hostnames.
async fn task_list(t: &Target) -> ApiResult<Vec<TaskInfo>> {
    let tasks = t
        .docker
        .list_tasks(Some(bollard::query_parameters::ListTasksOptions {
            filters: Some(HashMap::from([(
                "service".to_string(),
                vec![t.service_id.clone()],
            )])),
        }))
        .await
        .map_err(|e| engine_unavailable(format!("cannot list tasks: {}", engine::message(&e))))?;
    let nodes: HashMap<String, String> = t
        .docker
        .list_nodes(None)
        .await
        .map_err(|e| engine_unavailable(format!("cannot list nodes: {}", engine::message(&e))))?
        .into_iter()
        .filter_map(|n| {
            let host = n.description.and_then(|d| d.hostname)?;
            Some((n.id?, host))
        })
        .collect();
    let mut out: Vec<(TaskInfo, Option<chrono::DateTime<chrono::Utc>>)> = tasks
        .into_iter()
        // Only tasks of the service asked for (the filter is the engine's; this is ours).
        .filter(|task| task.service_id.as_deref() == Some(t.service_id.as_str()))
        .map(|task| {
            let status = task.status.clone().unwrap_or_default();
            let node_id = task.node_id.clone().unwrap_or_default();
            let name = match task.slot {
                Some(slot) => format!("{}.{slot}", t.name),
                None => format!("{}.{node_id}", t.name),
            };
            let image = task
                .spec
                .as_ref()
                .and_then(|s| s.container_spec.as_ref())
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let container = status.container_status.clone().unwrap_or_default();
            let info = TaskInfo {
                id: task.id.clone().unwrap_or_default(),
                name,
                slot: task.slot,
                node: nodes
                    .get(&node_id)
                    .cloned()
                    .unwrap_or_else(|| node_id.clone()),
                node_id,
                desired_state: task
                    .desired_state
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                state: status.state.map(|s| s.to_string()).unwrap_or_default(),
                since: status
                    .timestamp
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                digest: image_digest(&image),
                image,
                error: status.err.filter(|e| !e.is_empty()),
                message: status.message.unwrap_or_default(),
                exit_code: container.exit_code.filter(|_| {
                    // The engine reports 0 for containers that have not exited.
                    !matches!(
                        status.state.map(|s| s.to_string()).as_deref(),
                        Some("running")
                    )
                }),
                container_id: container.container_id.filter(|c| !c.is_empty()),
            };
            (info, task.created_at)
        })
        .collect();
    out.sort_by(|(a, ta), (b, tb)| {
        (a.slot, &a.node_id)
            .cmp(&(b.slot, &b.node_id))
            .then(tb.cmp(ta))
    });
    Ok(out.into_iter().map(|(t, _)| t).collect())
}

async fn tasks(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<axum::Json<List<TaskInfo>>> {
    let t = target(&state, &plural, &name).await?;
    Ok(axum::Json(List {
        items: task_list(&t).await?,
    }))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// RFC 3339, or a duration back from now (`10m`).
    since: Option<String>,
    /// A number of lines per task, or `all`.
    tail: Option<String>,
    #[serde(default)]
    timestamps: bool,
    /// A slot number or a task id (prefix).
    task: Option<String>,
    /// The Service's pre-deploy jobs instead of its tasks (`berth logs job SERVICE`).
    #[serde(default)]
    job: bool,
    /// With `job`: the rollout whose jobs (default: the latest that had jobs).
    revision: Option<u64>,
}

/// Whether a task is one `selector` (a slot or the start of a task id) names.
fn task_matches(t: &TaskInfo, selector: Option<&str>) -> bool {
    match selector {
        None => true,
        Some(s) if s.bytes().all(|b| b.is_ascii_digit()) => s.parse::<i64>().ok() == t.slot,
        Some(s) => t.id.starts_with(s),
    }
}

async fn logs(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let since = q
        .since
        .as_deref()
        .map(|s| crate::audit::parse_since(s, chrono::Utc::now()))
        .transpose()
        .map_err(|e| {
            ApiError::field("since", e).with_status(StatusCode::BAD_REQUEST, "BadRequest")
        })?
        .map(|t| i32::try_from(t.timestamp()).unwrap_or(0).max(0))
        .unwrap_or(0);
    let tail = match q.tail.as_deref() {
        None | Some("all") => "all".to_string(),
        Some(n) if n.parse::<u32>().is_ok() => n.to_string(),
        Some(other) => {
            return Err(ApiError::field(
                "tail",
                format!("`{other}` is not a number of lines (or `all`)"),
            )
            .with_status(StatusCode::BAD_REQUEST, "BadRequest"))
        }
    };
    let selector = q.task.clone().filter(|s| !s.is_empty());
    let targets = if q.job {
        job_targets(&state, &plural, &name, q.revision).await?
    } else {
        if q.revision.is_some() {
            return Err(
                ApiError::field("revision", "applies to job logs only (`job=true`)")
                    .with_status(StatusCode::BAD_REQUEST, "BadRequest"),
            );
        }
        vec![target(&state, &plural, &name).await?]
    };
    let first = task_lists(&targets).await?;
    if let Some(s) = &selector {
        if !first.iter().any(|(_, task)| task_matches(task, Some(s))) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("Service `{name}` has no task `{s}` (see `berth ps {name}`)"),
            ));
        }
    }
    let options = bollard::query_parameters::LogsOptions {
        follow: q.follow,
        stdout: true,
        stderr: true,
        since,
        until: 0,
        timestamps: q.timestamps,
        tail,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    let follow = q.follow;
    tokio::spawn(async move {
        let mut streaming = tokio::task::JoinSet::new();
        let mut seen = HashSet::new();
        let mut current = first;
        loop {
            for (i, task) in current
                .into_iter()
                .filter(|(_, task)| task_matches(task, selector.as_deref()))
                // A task that never got a container (a missing image) has no logs.
                .filter(|(_, task)| task.container_id.is_some())
            {
                if seen.insert(task.id.clone()) {
                    streaming.spawn(task_stream(
                        targets[i].docker.clone(),
                        task,
                        options.clone(),
                        tx.clone(),
                    ));
                }
            }
            if !follow {
                break;
            }
            tokio::select! {
                _ = tx.closed() => break,
                _ = tokio::time::sleep(FOLLOW_RELIST) => {}
            }
            // An engine hiccup skips one look for new tasks; the streams already open go on.
            current = task_lists(&targets).await.unwrap_or_default();
        }
        drop(tx);
        if follow {
            // The client went away: stop reading from the engine.
            streaming.abort_all();
        }
        while streaming.join_next().await.is_some() {}
    });
    let body = Body::from_stream(tokio_stream_of(rx).map(Ok::<_, std::convert::Infallible>));
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    // Logs are the workload's own output and may carry user (health) data: who read them is
    // recorded, like a read of secret values, once per request (not per line).
    resp.extensions_mut().insert(Audited {
        action: Some("read-logs"),
        changes: vec![Change {
            kind: Some(Kind::Service.to_string()),
            name: Some(name),
            task: q.task,
            ..Change::default()
        }],
    });
    Ok(resp)
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> impl futures::Stream<Item = bytes::Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One task's log stream, sent on as JSON lines prefixed with the task.
async fn task_stream(
    docker: Docker,
    task: TaskInfo,
    options: bollard::query_parameters::LogsOptions,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
) {
    let prefix = task.log_prefix();
    let timestamps = options.timestamps;
    let mut stream = docker.task_logs(&task.id, Some(options));
    let mut pending: HashMap<&'static str, Vec<u8>> = HashMap::new();
    let send = |stream: &str, time: Option<String>, line: String| {
        let mut json = serde_json::to_vec(&LogLine {
            task: prefix.clone(),
            stream: stream.to_string(),
            time,
            line,
        })
        .expect("log lines always encode");
        json.push(b'\n');
        tx.send(bytes::Bytes::from(json))
    };
    while let Some(item) = stream.next().await {
        let (name, message) = match item {
            Ok(LogOutput::StdErr { message }) => ("stderr", message),
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                ("stdout", message)
            }
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                // A finished task whose container is gone has nothing to show; a running one
                // that cannot be read is worth saying.
                if task.is_running() {
                    let _ = send("error", None, engine::message(&e)).await;
                }
                break;
            }
        };
        let buf = pending.entry(name).or_default();
        for (time, line) in split_log_lines(buf, &message, timestamps) {
            if send(name, time, line).await.is_err() {
                return;
            }
        }
    }
    for (name, mut buf) in pending {
        if let Some((time, line)) = finish_log_lines(&mut buf, timestamps) {
            let _ = send(name, time, line).await;
        }
    }
}

/// `POST .../services/<name>/exec` with `Upgrade: berth-exec/1`: checks everything (the
/// command, the task, that it runs on this node) and creates the exec before answering `101`, so
/// every refusal is an ordinary JSON error; the command starts only once the connection is
/// upgraded, after the access layer has written the audit record.
async fn exec(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    mut req: Request,
) -> ApiResult<Response> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(EXEC_PROTOCOL));
    let on_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let body = axum::body::to_bytes(req.into_body(), MAX_EXEC_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                format!("an exec request is at most {MAX_EXEC_BODY} bytes"),
            )
        })?;
    let ask = exec_request(&body)?;
    let Some(on_upgrade) = on_upgrade else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "UpgradeRequired",
            format!("exec streams over an HTTP upgrade to `{EXEC_PROTOCOL}` (use `berth exec`)"),
        ));
    };
    let prepared = prepare_exec(&state, &plural, &name, &ask).await?;
    let audited = prepared.audited();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => prepared.run(hyper_util::rt::TokioIo::new(upgraded)).await,
            // A remote session's agent is removed with it (dropped here).
            Err(e) => tracing::warn!(error = %e, "exec: the connection was not upgraded"),
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static(EXEC_PROTOCOL))
        .body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    resp.extensions_mut().insert(audited);
    Ok(resp)
}

fn exec_request(body: &[u8]) -> ApiResult<ExecRequest> {
    let ask: ExecRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "expected {{\"command\": [...], \"task\"?, \"stdin\"?, \"tty\"?, \"size\"?}}: {e}"
            ),
        )
    })?;
    check_command(&ask.command)?;
    Ok(ask)
}

#[derive(Deserialize)]
struct ExecWsQuery {
    /// The [`ExecRequest`] as JSON (a browser's WebSocket has no request body).
    request: String,
    /// The page's CSRF token; the access middleware checks it.
    #[serde(rename = "csrf")]
    _csrf: Option<String>,
}

/// `GET .../exec/ws`: `berth exec` for the dashboard's terminal. A browser opens WebSockets only,
/// so the same exec runs behind one: each binary message is one [`Frame`] either way, exactly
/// the frames of the `berth-exec/1` upgrade. The request must come from a page of this server
/// (its `Origin`): a WebSocket is not bound by the same-origin policy, and this is the one check
/// that tells a page of another site apart.
async fn exec_ws(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<ExecWsQuery>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> ApiResult<Response> {
    if !crate::dashboard::same_origin(&headers, &uri) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "an exec WebSocket is accepted from this server's own pages only (Origin)",
        ));
    }
    let ask = exec_request(q.request.as_bytes())?;
    let prepared = prepare_exec(&state, &plural, &name, &ask).await?;
    let audited = prepared.audited();
    let mut resp = ws
        .protocols(["berth-exec.v1"])
        .on_upgrade(move |socket| ws_bridge(socket, prepared));
    resp.extensions_mut().insert(audited);
    Ok(resp)
}

/// Carries an exec's frames between a WebSocket and the exec stream (run over an in-memory pipe,
/// so both transports run the one implementation of the stream).
async fn ws_bridge(socket: axum::extract::ws::WebSocket, prepared: Prepared) {
    use axum::extract::ws::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = tokio::io::duplex(MAX_FRAME + 16);
    let session = tokio::spawn(prepared.run(theirs));
    let (mut from_exec, mut to_exec) = tokio::io::split(ours);
    let (mut ws_out, mut ws_in) = socket.split();
    let upstream = async {
        while let Some(Ok(msg)) = ws_in.next().await {
            match msg {
                Message::Binary(b) if to_exec.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        // The page went away: end the command's stdin, as a closed terminal does.
        let _ = to_exec.write_all(&Frame::StdinEof.encode()).await;
    };
    let downstream = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match from_exec.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(frame)) = Frame::take(&mut buf) {
                let last = matches!(frame, Frame::Exit(_) | Frame::Error(_));
                if ws_out
                    .send(Message::Binary(frame.encode().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                if last {
                    let _ = ws_out.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    };
    // The exec ends when its last frame is sent; a page that goes away ends it too, once the
    // command has had a moment to read the end of its input (a shell then exits by itself).
    let page_left = tokio::select! {
        _ = downstream => false,
        _ = upstream => true,
    };
    let mut session = session;
    if page_left {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
    }
    session.abort();
}

/// An exec ready to start: created in its container (or by an agent on the task's node), with
/// what the audit records of it.
struct Prepared {
    session: Session,
    tty: bool,
    size: Option<[u16; 2]>,
    service: String,
    task: String,
    program: String,
}

impl Prepared {
    fn audited(&self) -> Audited {
        Audited {
            action: Some("exec"),
            changes: vec![Change {
                kind: Some(Kind::Service.to_string()),
                name: Some(self.service.clone()),
                task: Some(self.task.clone()),
                program: Some(self.program.clone()),
                ..Change::default()
            }],
        }
    }

    /// Runs the exec stream over `io` until the command exits or the client goes away.
    async fn run<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        match self.session {
            Session::Local(docker, id) => {
                exec_engine::run_exec(docker, id, self.tty, self.size, io).await
            }
            Session::Remote(agent, channel) => exec_agent::bridge(io, agent, *channel).await,
        }
    }
}

/// Everything that can fail is done here, before the client is told to switch protocols, so a
/// refusal is an ordinary JSON error: the exec exists (here, or through an agent on the task's
/// node) before the `101`; it starts only after the upgrade.
async fn prepare_exec(
    state: &AppState,
    plural: &str,
    name: &str,
    ask: &ExecRequest,
) -> ApiResult<Prepared> {
    let t = target(state, plural, name).await?;
    let tasks = task_list(&t).await?;
    let info = t.docker.info().await.map_err(|e| {
        engine_unavailable(format!("cannot read the engine: {}", engine::message(&e)))
    })?;
    let local = info
        .swarm
        .as_ref()
        .and_then(|s| s.node_id.clone())
        .unwrap_or_default();
    let local_host = info.name.clone().unwrap_or_else(|| local.clone());
    let task = select_task(&tasks, ask.task.as_deref(), &local).map_err(|why| {
        ApiError::new(
            StatusCode::CONFLICT,
            "NoRunningTask",
            format!("cannot exec in Service `{name}`: {why} (see `berth ps {name}`)"),
        )
    })?;
    let container = task.container_id.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "NoRunningTask",
            format!("task {} has no container yet", task.log_prefix()),
        )
    })?;
    let program = program_name(&ask.command);
    let session = if task.node_id == local {
        let id = exec_engine::create(&t.docker, &container, ask)
            .await
            .map_err(|why| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "ExecFailed",
                    format!("cannot exec in task {}: {why}", task.log_prefix()),
                )
            })?;
        Session::Local(t.docker.clone(), id)
    } else {
        let Some(remote) = &state.remote_exec else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "TaskOnAnotherNode",
                on_another_node(task, &local, &local_host),
            ));
        };
        let (agent, channel) = remote.open(name, task, &container, ask).await?;
        Session::Remote(agent, Box::new(channel))
    };
    tracing::info!(service = %name, task = %task.log_prefix(), %program, remote = task.node_id != local, "exec");
    Ok(Prepared {
        session,
        tty: ask.tty,
        size: ask.size,
        service: name.to_string(),
        task: task.log_prefix(),
        program,
    })
}

/// An exec created and waiting for the client's upgraded connection.
enum Session {
    /// In a container on this node, through this server's engine: the engine and the exec's id.
    Local(Docker, String),
    /// Through an exec agent on the task's node, which has created the exec.
    Remote(
        berth_controllers::swarm::agent_task::AgentTask,
        Box<berth_controllers::swarm::agent_task::AgentChannel>,
    ),
}

/// Why a task on another node is refused when remote exec is off, naming the task, its node, this
/// one and the way to allow it.
fn on_another_node(task: &TaskInfo, local: &str, local_host: &str) -> String {
    format!(
        "task {} runs on node {} ({}), not on the API server's node {local_host} ({local}): Swarm \
         runs a command only through the engine of the node that runs the container, and this API \
         server does not start exec agents on other nodes (its operator allows that with \
         --allow-remote-exec). Choose a task on {local_host} with --task (see `berth ps`)",
        task.log_prefix(),
        task.node,
        task.node_id,
    )
}

fn check_command(command: &[String]) -> ApiResult<()> {
    let bad = |m: String| ApiError::field("command", m);
    if command.is_empty() || command[0].is_empty() {
        return Err(bad(
            "give the program to run (`berth exec SERVICE -- CMD ...`)".into(),
        ));
    }
    if command.len() > 4096 {
        return Err(bad(format!("{} arguments (at most 4096)", command.len())));
    }
    if command.iter().any(|a| a.contains('\0')) {
        return Err(bad("an argument holds a NUL byte".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_selector_is_a_slot_or_an_id_prefix() {
        let t = TaskInfo {
            id: "k3x9abc".into(),
            slot: Some(2),
            ..TaskInfo::default()
        };
        assert!(task_matches(&t, None));
        assert!(task_matches(&t, Some("2")));
        assert!(!task_matches(&t, Some("1")));
        assert!(task_matches(&t, Some("k3x")));
        assert!(!task_matches(&t, Some("zz")));
    }

    #[test]
    fn a_task_on_another_node_is_refused_by_name_node_and_reason() {
        let t = TaskInfo {
            id: "abcdefghijklmnop".into(),
            name: "web.2".into(),
            node_id: "n2id".into(),
            node: "node2".into(),
            ..TaskInfo::default()
        };
        assert_eq!(
            on_another_node(&t, "n1id", "node1"),
            "task web.2.abcdefghijkl@node2 runs on node node2 (n2id), not on the API server's node \
             node1 (n1id): Swarm runs a command only through the engine of the node that runs the \
             container, and this API server does not start exec agents on other nodes (its \
             operator allows that with --allow-remote-exec). Choose a task on node1 with --task \
             (see `berth ps`)"
        );
    }

    #[test]
    fn a_command_is_checked_before_anything_runs() {
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_command(&cmd(&["sh", "-c", "echo hi"])).is_ok());
        for bad in [cmd(&[]), cmd(&[""]), cmd(&["sh", "a\0b"])] {
            assert!(check_command(&bad).is_err(), "{bad:?}");
        }
    }
}
