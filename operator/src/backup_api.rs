//! The API's backup routes (paths in `api_types::names::paths`): take a snapshot now, list the
//! evidence, verify, restore a volume or the environment, and hand out the repository key. Every
//! route is behind the admin token (the router's `auth` layer): they read every volume's data,
//! print the key to the whole repository, or rewrite objects.
//!
//! Long operations answer with JSON lines as they go (`{"progress": ...}`), ending with
//! `{"result": ...}` or `{"error": "..."}`; the operation itself runs to the end even if the client
//! goes away (a backup half-written because a terminal closed helps nobody).

use crate::environment;
use crate::extract::{JsonBody, Path, Query};
use crate::server::{ApiError, AppState};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_api_types::backup::Backup;
use berth_api_types::names::paths;
use berth_api_types::Kind;
use berth_controllers::backup::operations::{
    typed_plan, BackupError, Backups, Progress, RestoreVolume,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&paths::backup_run("{plan}"), post(run))
        .route(paths::SNAPSHOTS, get(list))
        .route(paths::SNAPSHOTS_VERIFY, post(verify))
        .route(paths::RESTORE_VOLUME, post(restore_volume))
        .route(paths::RESTORE_ENVIRONMENT, post(restore_environment))
        .route(paths::BACKUP_KEY, get(key))
}

fn backups(state: &AppState) -> ApiResult<Arc<Backups>> {
    state.backups.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BackupsUnavailable",
            "this API server runs no backups (it has no engine connection)",
        )
    })
}

fn plan(state: &AppState, name: &str) -> ApiResult<Backup> {
    let obj = state.store.get(Kind::Backup, name)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("Backup `{name}` not found (plans: `berth get backups`)"),
        )
    })?;
    typed_plan(obj).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Corrupt",
            format!("Backup `{name}`: {e}"),
        )
    })
}

/// The plan a recorded snapshot belongs to.
fn plan_of_snapshot(state: &AppState, b: &Backups, snapshot: &str) -> ApiResult<Backup> {
    let rec = b.snapshot(snapshot).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no snapshot `{snapshot}` (list them with `berth backup list`)"),
        )
    })?;
    plan(state, &rec.plan)
}

fn op_error(e: BackupError) -> String {
    e.to_string()
}

/// Runs `op` on its own task and streams its progress, then its result, as JSON lines.
fn streamed<T, F, Fut>(op: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(Arc<dyn Fn(Progress) + Send + Sync>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress_tx = tx.clone();
    let progress: Arc<dyn Fn(Progress) + Send + Sync> = Arc::new(move |p: Progress| {
        let _ = progress_tx.send(json!({ "progress": p }).to_string());
    });
    tokio::spawn(async move {
        let line = match op(progress).await {
            Ok(v) => json!({ "result": v }),
            Err(e) => json!({ "error": e }),
        };
        let _ = tx.send(line.to_string());
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|mut line| {
            line.push('\n');
            (Ok::<_, std::convert::Infallible>(line), rx)
        })
    })
    .boxed();
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn run(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let b = backups(&state)?;
    let plan = plan(&state, &name)?;
    Ok(streamed(move |progress| async move {
        b.run(&plan, &*progress).await.map_err(op_error)
    }))
}

#[derive(Deserialize)]
struct ListQuery {
    plan: Option<String>,
    /// `csv` or `json`: the evidence as a file to download (`Content-Disposition: attachment`),
    /// as `berth backup list -o csv|json` prints it.
    format: Option<String>,
}

async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let b = backups(&state)?;
    let items = b.snapshots(q.plan.as_deref());
    let attachment = |mime: &'static str, ext: &str, body: String| {
        (
            [
                (header::CONTENT_TYPE, mime.to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"berth-backup-evidence.{ext}\""),
                ),
            ],
            body,
        )
            .into_response()
    };
    match q.format.as_deref() {
        None => Ok(Json(json!({ "items": items })).into_response()),
        Some("csv") => Ok(attachment(
            "text/csv; charset=utf-8",
            "csv",
            crate::backup_cli::evidence_csv(&items),
        )),
        Some("json") => Ok(attachment(
            "application/json",
            "json",
            serde_json::to_string_pretty(&json!({ "items": items })).unwrap_or_default(),
        )),
        Some(other) => Err(ApiError::field(
            "format",
            format!("`{other}` is not an evidence format (csv or json)"),
        )
        .with_status(StatusCode::BAD_REQUEST, "BadRequest")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VerifyBody {
    #[serde(default)]
    snapshot: Option<String>,
    /// Every pack of the plan's repository (`plan`, default `environment`).
    #[serde(default)]
    all: bool,
    #[serde(default)]
    plan: Option<String>,
}

async fn verify(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<VerifyBody>,
) -> ApiResult<Response> {
    let b = backups(&state)?;
    match (body.snapshot, body.all) {
        (Some(id), false) => {
            let plan = plan_of_snapshot(&state, &b, &id)?;
            Ok(streamed(move |progress| async move {
                b.verify(&plan, &id, &*progress)
                    .await
                    .map(|r| vec![r])
                    .map_err(op_error)
            }))
        }
        (None, true) => {
            let name = body
                .plan
                .unwrap_or_else(|| berth_api_types::backup::DEFAULT_PLAN.to_string());
            let plan = plan(&state, &name)?;
            Ok(streamed(move |progress| async move {
                b.verify_all(&plan, &*progress).await.map_err(op_error)
            }))
        }
        _ => Err(ApiError::field(
            "snapshot",
            "give either a snapshot id or `all: true`",
        )),
    }
}

async fn restore_volume(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RestoreVolume>,
) -> ApiResult<Response> {
    let b = backups(&state)?;
    let plan = plan_of_snapshot(&state, &b, &body.snapshot)?;
    if let Some(n) = &body.as_name {
        let mut errors = berth_api_types::validate::Errors::default();
        berth_api_types::validate::check_dns_label(&mut errors, "as", n);
        if let Err(e) = errors.into_result() {
            return Err(ApiError::field("as", e[0].message.clone()));
        }
        // Restoring over the ingress proxy's state (or an agent's) would plant its keys.
        let proxy = &state.store.policy().ingress_proxy;
        if let Some(why) = berth_api_types::names::swarm::reserved(n, proxy) {
            return Err(ApiError::field("as", format!("`{n}` {why}")));
        }
    }
    Ok(streamed(move |progress| async move {
        b.restore_volume(&plan, &body, &*progress)
            .await
            .map_err(op_error)
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RestoreEnvironmentBody {
    snapshot: String,
    #[serde(default)]
    dry_run: bool,
}

/// Re-applies a snapshot's objects into this installation (never deletes). A snapshot of another
/// installation is refused here: its Swarm objects are that installation's, and only a restore
/// into a fresh data directory (`berth restore environment --data-dir`) can adopt them.
async fn restore_environment(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RestoreEnvironmentBody>,
) -> ApiResult<Response> {
    let b = backups(&state)?;
    let plan = plan_of_snapshot(&state, &b, &body.snapshot)?;
    let doc = b
        .environment_of(&plan, &body.snapshot)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "RepositoryError", e.to_string()))?;
    if doc.installation != state.store.instance() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "OtherInstallation",
            format!(
                "snapshot {} is of installation {}, this is {}: restore it into a fresh data \
                 directory with `berth restore environment --data-dir DIR ...` while berth is \
                 stopped, so the restored berth adopts what that installation made in Swarm",
                body.snapshot,
                doc.installation,
                state.store.instance()
            ),
        ));
    }
    let plan = environment::restore(&state.store, &doc, body.dry_run)
        .await
        .map_err(|e| match e {
            environment::RestoreError::Store(s) => ApiError::from(s),
            other => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "BadSnapshot",
                other.to_string(),
            ),
        })?;
    Ok(Json(plan).into_response())
}

/// The repository key. Never logged; the CLI prints it for a person to keep off the machine.
async fn key(State(state): State<AppState>) -> ApiResult<Response> {
    let b = backups(&state)?;
    let key = b.key().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "KeyUnavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(json!({
        "key": key,
        "repository": state
            .store
            .get(Kind::Backup, berth_api_types::backup::DEFAULT_PLAN)?
            .and_then(|o| typed_plan(o).ok())
            .map(|p| b.describe_repository(&p.spec)),
    }))
    .into_response())
}
