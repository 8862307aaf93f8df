//! The REST API (`/apis/berth/v1/...`): the only writer of `spec`. Requests carry a bearer token
//! whose role the access table (`access.rs`) checks; bodies are size-limited; every error is a JSON
//! document with the same precise, field-addressed messages the CLI prints.
//!
//! A Secret's values never appear in a response about the Secret: its `spec` is shown as
//! `secret_config::redacted_view` (keys, sizes, keyed digests). Only `GET .../{secrets|configs}/{name}/data` returns
//! values, for controllers.

use crate::access::{deployer_may_write, Audited, Change};
use crate::extract::{Path, Query};
use crate::store::{Store, StoreError, WriteMode};
use crate::tokens::Principal;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Extension;
use axum::{Json, Router};
use berth_api_types::names::{paths, API_VERSION};
use berth_api_types::secret_config::{redacted_view, ContentKey, DataSpec};
use berth_api_types::selector::Selector;
use berth_api_types::typed::decode_object;
use berth_api_types::validate::FieldError;
use berth_api_types::wire::{DataBody, Discovery, ErrorBody, ErrorDetail, List};
use berth_api_types::{DynObject, Kind};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use tracing::info;

/// Largest request body: a whole manifest directory in one apply fits comfortably.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The API tokens (hashes, roles) that requests authenticate with.
    pub tokens: crate::tokens::Tokens,
    /// Where the access middleware records writes, secret reads and refusals.
    pub audit: Arc<dyn crate::access::AuditSink>,
    /// The Network services join when they list none of their own.
    pub default_network: Arc<String>,
    /// The engine of a manager (`None`: DOCKER_HOST or the local socket), for what the API reads
    /// from the swarm itself.
    pub docker_host: Option<Arc<String>>,
    /// Backups of this installation (`None` when the engine was not reachable at start).
    pub backups: Option<Arc<berth_controllers::backup::operations::Backups>>,
    /// Exec agents for tasks on other nodes (`None` unless `--allow-remote-exec`).
    pub remote_exec: Option<Arc<crate::exec_agent::RemoteExec>>,
    /// Where controller instances report themselves (`berth controllers`).
    pub controllers: Arc<dyn berth_controllers::runtime::shares::LeaseStore>,
    /// The hash-chained audit trail (`berth audit`), in the store's database.
    pub audit_log: crate::audit::AuditLog,
    /// The NATS connection, when there is one: `/readyz` reports its state.
    pub nats: Option<async_nats::Client>,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(paths::API_ROOT, get(discovery))
        .route(paths::APPLY, post(apply))
        .route(paths::EVENTS, get(events))
        .route(paths::JOIN_COMMAND, get(join_command))
        .route(paths::CONTROLLERS, get(controllers))
        .route(&format!("{}/{{file}}", paths::SCHEMAS), get(schema_file))
        .route(
            paths::OPENAPI,
            get(|| async { axum::Json(crate::openapi::served()) }),
        )
        .route(paths::METRICS, get(crate::probes::metrics))
        .route(
            &format!("{}/{{plural}}", paths::API_ROOT),
            get(list).post(create),
        )
        .route(
            &format!("{}/{{plural}}/{{name}}", paths::API_ROOT),
            get(get_one).put(replace).patch(patch).delete(delete),
        )
        .route(
            &format!("{}/{{plural}}/{{name}}/status", paths::API_ROOT),
            put(put_status).get(get_one_status),
        )
        .route(
            &format!("{}/{{plural}}/{{name}}/data", paths::API_ROOT),
            get(get_data),
        )
        .merge(crate::backup_api::routes())
        .merge(crate::token_api::routes())
        .merge(crate::audit_api::routes())
        .merge(crate::day2_api::routes())
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::access::authorize,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .route(paths::READYZ, get(crate::probes::readyz))
        .merge(api)
        .with_state(state)
}

/// `GET /schemas/<kind>.json` or `/schemas/berth.json` (every kind).
async fn schema_file(
    crate::extract::Path(file): crate::extract::Path<String>,
) -> Result<Response, ApiError> {
    let schema = match file.strip_suffix(".json") {
        Some("berth") => berth_api_types::schema::any_kind(),
        Some(k) => match Kind::ALL.into_iter().find(|kind| kind.lower() == k) {
            Some(kind) if kind.is_served() => berth_api_types::schema::for_kind(kind),
            _ => return Err(no_schema(&file)),
        },
        None => return Err(no_schema(&file)),
    };
    Ok((
        [(header::CONTENT_TYPE, "application/schema+json")],
        axum::Json(schema),
    )
        .into_response())
}

fn no_schema(file: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "no schema `{file}`: one per kind (`service.json`, `secret.json`, ...) or `berth.json` for any kind"
        ),
    )
}

/// An API error: status code, reason, message and field details.
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    details: Vec<ErrorDetail>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            reason,
            message: message.into(),
            details: vec![],
        }
    }

    /// 422 for one field of a request body.
    pub(crate) fn field(path: &str, message: impl Into<String>) -> Self {
        Self::invalid(None, vec![FieldError::new(path, message)])
    }

    /// The same error with another status and reason (a bad query parameter is a 400).
    pub(crate) fn with_status(mut self, status: StatusCode, reason: &'static str) -> Self {
        self.status = status;
        self.reason = reason;
        self
    }

    fn invalid(object: Option<String>, errors: Vec<FieldError>) -> Self {
        let prefix = object.clone().map(|o| format!("{o}: ")).unwrap_or_default();
        let message = errors
            .iter()
            .map(|e| format!("{prefix}{e}"))
            .collect::<Vec<_>>()
            .join("\n");
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message,
            details: errors
                .into_iter()
                .map(|e| ErrorDetail {
                    object: object.clone(),
                    path: e.path,
                    message: e.message,
                })
                .collect(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.status.as_u16(),
            reason: self.reason.to_string(),
            message: self.message,
            details: self.details,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Refused { kind, name, errors } = e {
            return ApiError::invalid(Some(format!("{kind}/{name}")), errors);
        }
        let (code, reason) = e.status_and_reason();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, reason, e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                format!("request body is larger than {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", r.body_text())
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such API path")
}

fn kind_of(plural: &str) -> ApiResult<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| k.plural() == plural)
        .filter(|k| k.is_served())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no resource type `{plural}` is served here"),
            )
        })
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = body?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("request body is not valid JSON: {e}"),
        )
    })
}

/// Validates one object from a request and checks it is addressed where it was sent.
fn checked(value: &Value, kind: Kind, name: Option<&str>) -> ApiResult<DynObject> {
    let obj = decode_object(value).map_err(|e| ApiError::invalid(None, e))?;
    if obj.kind != kind {
        return Err(ApiError::invalid(
            None,
            vec![FieldError::new(
                "kind",
                format!("`{}` sent to the `{}` collection", obj.kind, kind.plural()),
            )],
        ));
    }
    if let Some(n) = name {
        if obj.metadata.name != n {
            return Err(ApiError::invalid(
                None,
                vec![FieldError::new(
                    "metadata.name",
                    format!(
                        "`{}` does not match the name in the path (`{n}`)",
                        obj.metadata.name
                    ),
                )],
            ));
        }
    }
    Ok(obj)
}

/// An object as the API shows it: a Secret's spec replaced by its redacted view (keys, sizes,
/// keyed digests under `key`, the store's content key). A spec that does not parse shows no keys
/// rather than anything of its content.
pub fn redact(key: &ContentKey, mut obj: DynObject) -> DynObject {
    if obj.kind == Kind::Secret {
        obj.spec = match serde_json::from_value::<DataSpec>(std::mem::take(&mut obj.spec)) {
            Ok(d) => redacted_view(&d, key),
            Err(_) => serde_json::json!({ "redacted": {} }),
        };
    }
    obj
}

async fn discovery(State(state): State<AppState>) -> Json<Discovery> {
    Json(Discovery {
        api_version: API_VERSION.to_string(),
        instance: state.store.instance().to_string(),
        default_network: state.default_network.to_string(),
        kinds: Kind::ALL.into_iter().filter(|k| k.is_served()).collect(),
        quarantined: state.store.quarantined_count(),
    })
}

/// The controller instances running for this installation, as they last reported themselves
/// (each renews its record with its leases, so none is older than the lease time).
async fn controllers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let items = berth_controllers::runtime::shares::instances(
        state.controllers.as_ref(),
        state.store.instance(),
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            format!("cannot read the controller instances: {e}"),
        )
    })?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriteQuery {
    #[serde(default)]
    dry_run: bool,
}

/// All-or-nothing apply of a list of objects (`berth apply -f DIR`).
async fn apply(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<WriteQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let value = parse_body(body)?;
    let items = value
        .get("items")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "expected {\"items\": [...]}",
            )
        })?;
    let mut objects = Vec::with_capacity(items.len());
    let mut details = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let label = object_label(item, i);
        match decode_object(item) {
            Ok(o) => {
                if !seen.insert((o.kind, o.metadata.name.clone())) {
                    details.push((
                        label,
                        vec![FieldError::new(
                            "metadata.name",
                            "appears twice in one apply",
                        )],
                    ));
                }
                objects.push(o)
            }
            Err(errs) => details.push((label, errs)),
        }
    }
    if !details.is_empty() {
        let mut all = ApiError::invalid(None, vec![]);
        let mut lines = Vec::new();
        for (label, errs) in details {
            let e = ApiError::invalid(Some(label), errs);
            lines.push(e.message);
            all.details.extend(e.details);
        }
        all.message = lines.join("\n");
        return Err(all);
    }
    let before = generations_before(&state, &principal, &objects)?;
    let results = state
        .store
        .write(objects, WriteMode::Upsert, None, q.dry_run)
        .await?;
    for (r, _) in &results {
        info!(kind = %r.kind, name = %r.name, outcome = ?r.outcome, dry_run = q.dry_run, "apply");
    }
    let changes = results
        .iter()
        .zip(before)
        .map(|((r, _), before)| change(r.kind, &r.name, before, Some(r.generation)))
        .collect();
    let mut resp = Json(List {
        items: results.into_iter().map(|(r, _)| r).collect(),
    })
    .into_response();
    audited(
        &mut resp,
        if q.dry_run { "apply-dry-run" } else { "apply" },
        changes,
    );
    Ok(resp)
}

/// The generation each object has before a write (none: it does not exist yet), after checking
/// that the caller may make the write at all (a deployer: only the image of its Services).
fn generations_before(
    state: &AppState,
    principal: &Principal,
    objects: &[DynObject],
) -> ApiResult<Vec<Option<u64>>> {
    objects
        .iter()
        .map(|o| {
            let current = state.store.get(o.kind, &o.metadata.name)?;
            deployer_may_write(principal, current.as_ref(), o)?;
            Ok(current.map(|c| c.metadata.generation))
        })
        .collect()
}

fn change(kind: Kind, name: &str, before: Option<u64>, after: Option<u64>) -> Change {
    Change {
        kind: Some(kind.to_string()),
        name: Some(name.to_string()),
        generation_before: before,
        generation_after: after,
        ..Change::default()
    }
}

/// Tells the access middleware what to write into the audit record of this response.
fn audited(resp: &mut Response, action: &'static str, changes: Vec<Change>) {
    resp.extensions_mut().insert(Audited {
        action: Some(action),
        changes,
    });
}

fn object_label(item: &Value, index: usize) -> String {
    let kind = item.get("kind").and_then(Value::as_str).unwrap_or("?");
    match item.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) => format!("{kind}/{n}"),
        None => format!("items[{index}]"),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    /// `paths::LABEL_SELECTOR_PARAM`: only objects whose labels match (see `selector.rs`).
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    Path(plural): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<DynObject>>> {
    let kind = kind_of(&plural)?;
    let selector = match q.label_selector.as_deref() {
        Some(text) => Selector::parse(text).map_err(|e| {
            ApiError::field(paths::LABEL_SELECTOR_PARAM, e.to_string())
                .with_status(StatusCode::BAD_REQUEST, "BadRequest")
        })?,
        None => Selector::default(),
    };
    Ok(Json(List {
        items: state
            .store
            .list(kind)?
            .into_iter()
            .filter(|o| selector.matches(&o.metadata.labels))
            .map(|o| redact(state.store.content_key(), o))
            .collect(),
    }))
}

async fn get_one(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<DynObject>> {
    let kind = kind_of(&plural)?;
    state
        .store
        .get(kind, &name)?
        .map(|o| Json(redact(state.store.content_key(), o)))
        .ok_or_else(|| StoreError::NotFound { kind, name }.into())
}

/// `GET /apis/berth/v1/{secrets|configs}/{name}/data`: the object's files, base64 per key,
/// decrypted. **For controllers only**: it is how a controller running as its own process gets the
/// values it hands to the engine, and the only response that carries a Secret's values. Every other
/// response shows a Secret redacted. Other kinds have no data (404).
async fn get_data(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<DataBody>> {
    use base64::Engine;
    let kind = kind_of(&plural)?;
    if !matches!(kind, Kind::Secret | Kind::Config) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{kind} has no data; only secrets and configs do"),
        ));
    }
    let obj = state
        .store
        .get(kind, &name)?
        .ok_or_else(|| StoreError::NotFound {
            kind,
            name: name.clone(),
        })?;
    let spec: DataSpec = serde_json::from_value(obj.spec).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "StorageError",
            format!("{kind} `{name}` has a stored spec that does not parse"),
        )
    })?;
    let files = spec.files();
    // Keyed digests: what controllers name Swarm secrets and configs by (they have no master key).
    let digests = state.store.content_key().digests(&files);
    let data = files
        .into_iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect();
    Ok(Json(DataBody { data, digests }))
}

async fn get_one_status(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let Json(obj) = get_one(State(state), Path((plural, name))).await?;
    Ok(Json(obj.status))
}

#[derive(serde::Deserialize)]
struct JoinQuery {
    role: Option<String>,
}

/// The `docker swarm join` command for a new node. Behind the admin token like every route here:
/// the join token it returns lets a machine into the cluster (and, for `manager`, into Raft). It is
/// read from the engine on each call, never stored or logged.
async fn join_command(
    State(state): State<AppState>,
    Query(q): Query<JoinQuery>,
) -> ApiResult<Json<berth_api_types::wire::JoinCommand>> {
    let role = q.role.unwrap_or_else(|| "worker".to_string());
    if role != "worker" && role != "manager" {
        return Err(ApiError::field(
            "role",
            format!("`{role}` is not a role; use `worker` or `manager`"),
        ));
    }
    let unavailable =
        |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "EngineUnavailable", e);
    let docker =
        berth_controllers::swarm::engine::connect(state.docker_host.as_deref().map(|h| h.as_str()))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
    let swarm = docker.inspect_swarm().await.map_err(|e| {
        unavailable(format!(
            "cannot read the swarm (is this engine a swarm manager?): {}",
            berth_controllers::swarm::engine::message(&e)
        ))
    })?;
    let tokens = swarm.join_tokens.unwrap_or_default();
    let token = if role == "manager" {
        tokens.manager
    } else {
        tokens.worker
    }
    .ok_or_else(|| unavailable("the engine has no join token".into()))?;
    let info = docker
        .info()
        .await
        .map_err(|e| unavailable(berth_controllers::swarm::engine::message(&e)))?;
    let managers: Vec<String> = info
        .swarm
        .and_then(|s| s.remote_managers)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.addr)
        .collect();
    let first = managers
        .first()
        .cloned()
        .ok_or_else(|| unavailable("the engine knows no manager address".into()))?;
    Ok(Json(berth_api_types::wire::JoinCommand {
        command: format!("docker swarm join --token {token} {first}"),
        role,
        managers,
    }))
}

async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(plural): Path<String>,
    Query(q): Query<WriteQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    let obj = checked(&parse_body(body)?, kind, None)?;
    deployer_may_write(&principal, None, &obj)?;
    crate::access::controller_may_create(&principal, &obj)?;
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Create, None, q.dry_run)
        .await?;
    let (_, obj) = out.remove(0);
    let c = change(
        kind,
        &obj.metadata.name,
        None,
        Some(obj.metadata.generation),
    );
    let mut resp = (
        StatusCode::CREATED,
        Json(redact(state.store.content_key(), obj)),
    )
        .into_response();
    audited(&mut resp, "create", vec![c]);
    Ok(resp)
}

async fn replace(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    let value = parse_body(body)?;
    let rv = value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let obj = checked(&value, kind, Some(&name))?;
    let before = generations_before(&state, &principal, std::slice::from_ref(&obj))?;
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Replace, rv, q.dry_run)
        .await?;
    let obj = out.remove(0).1;
    let c = change(kind, &name, before[0], Some(obj.metadata.generation));
    let mut resp = Json(redact(state.store.content_key(), obj)).into_response();
    audited(&mut resp, "replace", vec![c]);
    Ok(resp)
}

/// JSON merge patch (RFC 7386) over the stored object; the result is validated like a PUT. For a
/// Secret the patch applies to the plaintext server-side (so `{"spec": {"stringData": {"k": "new"}}}`
/// replaces one value), and the response is redacted like every other.
async fn patch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        if !(ct.starts_with("application/merge-patch+json") || ct.starts_with("application/json")) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("`{ct}` is not supported; send a JSON merge patch (application/merge-patch+json)"),
            ));
        }
    }
    let patch = parse_body(body)?;
    let current = state
        .store
        .get(kind, &name)?
        .ok_or_else(|| StoreError::NotFound {
            kind,
            name: name.clone(),
        })?;
    let rv = patch
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut doc = serde_json::to_value(&current)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    merge_patch(&mut doc, &patch);
    // Status is not patched here, and server-set metadata is not the client's to change.
    doc["status"] = Value::Null;
    let obj = checked(&doc, kind, Some(&name))?;
    deployer_may_write(&principal, Some(&current), &obj)?;
    // Without an explicit resourceVersion, the patch applies to the version it was computed from.
    let rv = rv.or(current.metadata.resource_version.clone());
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Replace, rv, q.dry_run)
        .await?;
    let obj = out.remove(0).1;
    let c = change(
        kind,
        &name,
        Some(current.metadata.generation),
        Some(obj.metadata.generation),
    );
    let mut resp = Json(redact(state.store.content_key(), obj)).into_response();
    audited(&mut resp, "patch", vec![c]);
    Ok(resp)
}

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn delete(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    let obj = state
        .store
        .delete(kind, &name, &state.default_network)
        .await?;
    info!(%kind, %name, "deleted");
    let c = change(kind, &name, Some(obj.metadata.generation), None);
    let mut resp = Json(redact(state.store.content_key(), obj)).into_response();
    audited(&mut resp, "delete", vec![c]);
    Ok(resp)
}

async fn put_status(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DynObject>> {
    let kind = kind_of(&plural)?;
    let value = parse_body(body)?;
    let status = value.get("status").cloned().ok_or_else(|| {
        ApiError::invalid(
            None,
            vec![FieldError::new("status", "missing field `status`")],
        )
    })?;
    if !status.is_object() {
        return Err(ApiError::invalid(
            None,
            vec![FieldError::new("status", "must be an object")],
        ));
    }
    // A controller sends the resourceVersion it read, so that its status never overwrites one
    // written after that read (e.g. a revision history appended by a racing writer).
    let expected_rv = match value.pointer("/metadata/resourceVersion") {
        None | Some(Value::Null) => None,
        Some(Value::String(rv)) => Some(rv.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                None,
                vec![FieldError::new(
                    "metadata.resourceVersion",
                    "must be a string",
                )],
            ))
        }
    };
    Ok(Json(redact(
        state.store.content_key(),
        state
            .store
            .update_status(kind, &name, status, expected_rv.as_deref())
            .await?,
    )))
}

#[derive(Deserialize)]
struct EventsQuery {
    kind: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    watch: bool,
}

async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    // A deployer reads the events of the Services on its token only, as it reads those Services.
    let scope = (principal.role == berth_api_types::access::Role::Deployer)
        .then(|| Arc::new(principal.services.clone()));
    let visible = move |e: &berth_api_types::Event| {
        scope
            .as_ref()
            .is_none_or(|s| e.kind == Kind::Service && s.contains(&e.name))
    };
    let kind = match q.kind.as_deref() {
        Some(k) => Some(Kind::parse_loose(k).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("unknown kind `{k}`"),
            )
        })?),
        None => None,
    };
    if q.watch {
        let rx = state.store.watch();
        let name = q.name.clone();
        let stream = tokio_stream_from(rx).filter_map(move |e| {
            let keep = kind.is_none_or(|k| k == e.kind)
                && name.as_deref().is_none_or(|n| n == e.name)
                && visible(&e);
            let line = keep.then(|| {
                let mut s = serde_json::to_string(&e).unwrap_or_default();
                s.push('\n');
                Ok::<_, std::convert::Infallible>(s)
            });
            async move { line }
        });
        return Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(stream),
        )
            .into_response());
    }
    let mut items =
        state
            .store
            .recent_events(kind, q.name.as_deref(), q.limit.unwrap_or(100).min(5000))?;
    items.retain(|e| visible(e));
    Ok(Json(List { items }).into_response())
}

/// A broadcast receiver as a stream; a watcher that falls behind skips ahead rather than stalling writers.
fn tokio_stream_from(
    rx: tokio::sync::broadcast::Receiver<berth_api_types::Event>,
) -> impl futures::Stream<Item = berth_api_types::Event> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((e, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// The admin token of [`AppState::for_tests`].
#[cfg(test)]
pub(crate) const TEST_ADMIN: &str =
    "berth_admin_0000000000000000000000000000000000000000000000000000000000000000";

#[cfg(test)]
impl AppState {
    /// A state over `store` with [`TEST_ADMIN`] as its admin token, no engine and no audit.
    pub(crate) async fn for_tests(store: Store) -> AppState {
        let tokens = crate::tokens::Tokens::open(&store).unwrap();
        tokens.set_admin_for_tests(TEST_ADMIN).await;
        AppState {
            tokens,
            audit: Arc::new(crate::access::MemoryAudit::default()),
            default_network: Arc::new("berth-internal".into()),
            docker_host: None,
            backups: None,
            remote_exec: None,
            controllers: Arc::new(berth_controllers::runtime::shares::MemoryLeases::default()),
            audit_log: crate::audit::AuditLog::open(&store).await.unwrap(),
            nats: None,
            store,
        }
    }
}

/// One JSON request through a router, with `token` as the bearer; (status, body text).
#[cfg(test)]
pub(crate) async fn send_test(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(
            body.map(|b| axum::body::Body::from(b.to_string()))
                .unwrap_or_else(axum::body::Body::empty),
        )
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use serde_json::json;
    use tower::ServiceExt;

    async fn app() -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([9u8; 32], "test key");
        let store = Store::open(dir.path(), &key).await.unwrap();
        let app = router(AppState::for_tests(store).await);
        (app, dir)
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (u16, Value) {
        let (status, text) = call_raw(app, method, path, body, token).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The response body as text, for asserting what it does not contain.
    async fn call_raw(
        app: &Router,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (u16, String) {
        send_test(app, method, path, token.then_some(TEST_ADMIN), body).await
    }

    fn svc(name: &str, replicas: Value) -> Value {
        json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"image": "a:1", "replicas": replicas}})
    }

    #[tokio::test]
    async fn token_is_required_except_for_healthz() {
        let (app, _d) = app().await;
        let (code, body) = call(&app, "GET", "/apis/berth/v1/services", None, false).await;
        assert_eq!(code, 401);
        assert_eq!(body["reason"], "Unauthorized");
        let (code, _) = call(&app, "GET", "/healthz", None, false).await;
        assert_eq!(code, 200);
        let (code, _) = call(&app, "GET", "/apis/berth/v1/services", None, true).await;
        assert_eq!(code, 200);
    }

    /// Editors fetch schemas from a `$schema` line, without a token.
    #[tokio::test]
    async fn schemas_are_served_without_a_token() {
        let (app, _d) = app().await;
        let (code, body) = call(&app, "GET", "/schemas/service.json", None, false).await;
        assert_eq!((code, body["title"].as_str()), (200, Some("Service")));
        let (code, body) = call(&app, "GET", "/schemas/berth.json", None, false).await;
        assert_eq!(code, 200);
        assert!(
            body["oneOf"].as_array().is_some_and(|k| k.len() == 9),
            "{body}"
        );
        let (code, body) = call(&app, "GET", "/schemas/gadget.json", None, false).await;
        assert_eq!(code, 404, "{body}");
        let (code, body) = call(&app, "GET", "/openapi.json", None, false).await;
        assert_eq!((code, body["openapi"].as_str()), (200, Some("3.1.0")));
    }

    /// `?labelSelector=` keeps exactly the matching objects; a bad selector is a 400 naming the
    /// parameter and what is wrong.
    #[tokio::test]
    async fn list_filters_by_label_selector() {
        let (app, _d) = app().await;
        for (name, tier) in [("a", "web"), ("b", "db"), ("c", "")] {
            let mut s = svc(name, json!(1));
            if !tier.is_empty() {
                s["metadata"]["labels"] = json!({ "app": "shop", "tier": tier });
            }
            let (code, body) = call(&app, "POST", "/apis/berth/v1/services", Some(s), true).await;
            assert_eq!(code, 201, "{body}");
        }
        let names = |body: &Value| -> Vec<String> {
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        for (selector, expect) in [
            ("app%3Dshop", vec!["a", "b"]),
            ("tier%21%3Ddb", vec!["a", "c"]),
            ("tier+in+%28db%2Ccache%29", vec!["b"]),
            ("%21app", vec!["c"]),
        ] {
            let path = format!("/apis/berth/v1/services?labelSelector={selector}");
            let (code, body) = call(&app, "GET", &path, None, true).await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(names(&body), expect, "{selector}");
        }
        let path = "/apis/berth/v1/services?labelSelector=tier+in+db";
        let (code, body) = call(&app, "GET", path, None, true).await;
        assert_eq!(code, 400, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("labelSelector") && message.contains("parenthesised list"),
            "{message}"
        );
    }

    /// The join command carries the swarm's join token: no answer without the admin token, and a
    /// bad role is refused before the engine is asked.
    #[tokio::test]
    async fn the_join_command_needs_the_token_and_a_known_role() {
        let (app, _d) = app().await;
        let path = format!("{}?role=worker", paths::JOIN_COMMAND);
        let (code, body) = call_raw(&app, "GET", &path, None, false).await;
        assert_eq!(code, 401);
        assert!(!body.contains("SWMTKN"), "{body}");
        let path = format!("{}?role=boss", paths::JOIN_COMMAND);
        let (code, body) = call(&app, "GET", &path, None, true).await;
        assert_eq!(code, 422, "{body}");
        assert!(body["message"]
            .as_str()
            .unwrap_or("")
            .contains("`boss` is not a role"));
    }

    /// The backup routes read every volume, hand out the repository key or rewrite objects: none
    /// answers without the admin token, and the key never leaks into a refusal.
    #[tokio::test]
    async fn backup_routes_need_the_admin_token() {
        let (app, _d) = app().await;
        for (method, path) in [
            ("POST", paths::backup_run("environment")),
            ("GET", paths::SNAPSHOTS.to_string()),
            ("POST", paths::SNAPSHOTS_VERIFY.to_string()),
            ("POST", paths::RESTORE_VOLUME.to_string()),
            ("POST", paths::RESTORE_ENVIRONMENT.to_string()),
            ("GET", paths::BACKUP_KEY.to_string()),
        ] {
            let (code, body) = call(&app, method, &path, Some(json!({})), false).await;
            assert_eq!(code, 401, "{method} {path}: {body}");
        }
        // With the token but no engine here: unavailable, said plainly.
        let (code, body) = call(&app, "GET", paths::BACKUP_KEY, None, true).await;
        assert_eq!(code, 503, "{body}");
    }

    #[tokio::test]
    async fn the_controller_list_needs_the_admin_token() {
        let (app, _d) = app().await;
        let (code, body) = call(&app, "GET", paths::CONTROLLERS, None, false).await;
        assert_eq!(code, 401, "{body}");
        // With the token: the instances of this installation (none run in this test).
        let (code, body) = call(&app, "GET", paths::CONTROLLERS, None, true).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["items"], json!([]));
    }

    #[tokio::test]
    async fn invalid_objects_get_field_errors_and_change_nothing() {
        let (app, _d) = app().await;
        let body = json!({"items": [svc("ok", json!(1)), svc("bad", json!("three"))]});
        let (code, err) = call(&app, "POST", "/apis/berth/v1/apply", Some(body), true).await;
        assert_eq!(code, 422);
        assert_eq!(err["details"][0]["object"], "Service/bad");
        assert_eq!(err["details"][0]["path"], "spec.replicas");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .starts_with("Service/bad: spec.replicas: invalid type"),
            "{err}"
        );
        let (_, list) = call(&app, "GET", "/apis/berth/v1/services", None, true).await;
        assert_eq!(
            list["items"],
            json!([]),
            "one bad object means nothing is applied"
        );
    }

    #[tokio::test]
    async fn crud_patch_and_status() {
        let (app, _d) = app().await;
        let (code, created) = call(
            &app,
            "POST",
            "/apis/berth/v1/services",
            Some(svc("web", json!(1))),
            true,
        )
        .await;
        assert_eq!(code, 201);
        assert_eq!(created["metadata"]["generation"], 1);
        let (code, _) = call(
            &app,
            "POST",
            "/apis/berth/v1/services",
            Some(svc("web", json!(1))),
            true,
        )
        .await;
        assert_eq!(code, 409);
        let (code, patched) = call(
            &app,
            "PATCH",
            "/apis/berth/v1/services/web",
            Some(json!({"spec": {"replicas": 4}})),
            true,
        )
        .await;
        assert_eq!(code, 200, "{patched}");
        assert_eq!(patched["spec"]["replicas"], 4);
        assert_eq!(patched["metadata"]["generation"], 2);
        let (code, err) = call(
            &app,
            "PATCH",
            "/apis/berth/v1/services/web",
            Some(json!({"spec": {"image": "Nope Nope"}})),
            true,
        )
        .await;
        assert_eq!(code, 422);
        assert_eq!(err["details"][0]["path"], "spec.image");
        let (code, err) = call(
            &app,
            "PUT",
            "/apis/berth/v1/services/other",
            Some(svc("web", json!(1))),
            true,
        )
        .await;
        assert_eq!(code, 422, "{err}");
        let (code, _) = call(
            &app,
            "PUT",
            "/apis/berth/v1/services/web/status",
            Some(json!({"status": {"runningReplicas": 4}})),
            true,
        )
        .await;
        assert_eq!(code, 200);
        let (_, got) = call(&app, "GET", "/apis/berth/v1/services/web", None, true).await;
        assert_eq!(got["status"]["runningReplicas"], 4);
        assert_eq!(
            got["metadata"]["generation"], 2,
            "status writes do not bump generation"
        );
        let (code, _) = call(&app, "DELETE", "/apis/berth/v1/services/web", None, true).await;
        assert_eq!(code, 200);
        let (code, err) = call(&app, "GET", "/apis/berth/v1/services/web", None, true).await;
        assert_eq!(code, 404);
        assert_eq!(err["message"], "Service `web` not found");
        let (_, events) = call(&app, "GET", "/apis/berth/v1/events?name=web", None, true).await;
        let types: Vec<&str> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Applied", "Applied", "StatusChanged", "Deleted"]);
    }

    #[tokio::test]
    async fn status_writes_with_a_stale_resource_version_conflict() {
        let (app, _d) = app().await;
        let (_, created) = call(
            &app,
            "POST",
            "/apis/berth/v1/services",
            Some(svc("web", json!(1))),
            true,
        )
        .await;
        let rv = created["metadata"]["resourceVersion"].clone();
        let put = |status: Value, rv: Option<Value>| {
            let mut body = json!({ "status": status });
            if let Some(rv) = rv {
                body["metadata"] = json!({ "resourceVersion": rv });
            }
            let app = app.clone();
            async move {
                call(
                    &app,
                    "PUT",
                    "/apis/berth/v1/services/web/status",
                    Some(body),
                    true,
                )
                .await
            }
        };
        // Matching: written.
        let (code, body) = put(json!({"n": 1}), Some(rv.clone())).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"]["n"], 1);
        assert_ne!(body["metadata"]["resourceVersion"], rv);
        // Stale: 409 Conflict, nothing written.
        let (code, body) = put(json!({"n": 2}), Some(rv.clone())).await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["reason"], "Conflict");
        let (_, got) = call(&app, "GET", "/apis/berth/v1/services/web", None, true).await;
        assert_eq!(got["status"]["n"], 1);
        // Absent: unconditional.
        let (code, body) = put(json!({"n": 3}), None).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"]["n"], 3);
        // Not a string: a field error.
        let (code, body) = put(json!({"n": 4}), Some(json!(7))).await;
        assert_eq!(code, 422, "{body}");
        assert_eq!(body["details"][0]["path"], "metadata.resourceVersion");
    }

    #[tokio::test]
    async fn oversized_and_malformed_bodies() {
        let (app, _d) = app().await;
        let big = "x".repeat(MAX_BODY + 1);
        let req = Request::builder()
            .method("POST")
            .uri("/apis/berth/v1/apply")
            .header("authorization", &format!("Bearer {TEST_ADMIN}"))
            .body(Body::from(big))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        let req = Request::builder()
            .method("POST")
            .uri("/apis/berth/v1/apply")
            .header("authorization", &format!("Bearer {TEST_ADMIN}"))
            .body(Body::from("{\"items\": [}"))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let (code, _) = call(&app, "GET", "/apis/berth/v1/pods", None, true).await;
        assert_eq!(code, 404);
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge_patch(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    fn object(kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": "berth/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
    }

    fn b64(v: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(v)
    }

    /// Sends a request and checks its response shows none of `values`, in clear or in base64.
    async fn call_clean(
        app: &Router,
        method: &str,
        path: &str,
        body: Option<Value>,
        values: &[&str],
    ) -> (u16, Value) {
        let (code, text) = call_raw(app, method, path, body, true).await;
        for v in values {
            assert!(!text.contains(v), "{method} {path} shows `{v}`: {text}");
            assert!(
                !text.contains(&b64(v)),
                "{method} {path} shows `{v}` in base64: {text}"
            );
        }
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn secrets_are_redacted_in_every_response() {
        let (app, _d) = app().await;
        let (v1, v2, bin) = (
            "pelican-7781-first",
            "walrus-5120-second",
            "heron-0042-bytes",
        );
        let values = [v1, v2, bin];
        let base = "/apis/berth/v1/secrets";
        let one = "/apis/berth/v1/secrets/db";
        let spec = json!({"stringData": {"pw": v1}, "data": {"cert": b64(bin)}});
        let (code, created) = call_clean(
            &app,
            "POST",
            base,
            Some(object("Secret", "db", spec.clone())),
            &values,
        )
        .await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["spec"]["redacted"]["pw"]["size"], v1.len());
        assert_eq!(
            created["spec"]["redacted"]["pw"]["digest"],
            crate::crypto::MasterKey::from_bytes([9u8; 32], "test key")
                .content_key()
                .digest(v1.as_bytes())
        );
        assert!(created["spec"]["redacted"]["cert"].is_object());
        let (code, dry) = call_clean(
            &app,
            "POST",
            "/apis/berth/v1/secrets?dryRun=true",
            Some(object("Secret", "dry", spec.clone())),
            &values,
        )
        .await;
        assert_eq!(code, 201, "{dry}");

        let (code, got) = call_clean(&app, "GET", one, None, &values).await;
        assert_eq!(code, 200);
        assert_eq!(got["spec"], created["spec"]);
        let (_, list) = call_clean(&app, "GET", base, None, &values).await;
        assert_eq!(list["items"][0]["spec"], created["spec"]);

        // PATCH applies to the plaintext: one value replaced, the other key kept.
        let (code, patched) = call_clean(
            &app,
            "PATCH",
            one,
            Some(json!({"spec": {"stringData": {"pw": v2}}})),
            &values,
        )
        .await;
        assert_eq!(code, 200, "{patched}");
        assert_eq!(patched["metadata"]["generation"], 2);
        assert_eq!(patched["spec"]["redacted"]["pw"]["size"], v2.len());
        assert!(patched["spec"]["redacted"]["cert"].is_object());
        // The same value again is no change; a label is a change without a new generation.
        let (_, same) = call_clean(
            &app,
            "PATCH",
            one,
            Some(json!({"spec": {"stringData": {"pw": v2}}})),
            &values,
        )
        .await;
        assert_eq!(same["metadata"]["generation"], 2);
        assert_eq!(
            same["metadata"]["resourceVersion"],
            patched["metadata"]["resourceVersion"]
        );
        let (_, labelled) = call_clean(
            &app,
            "PATCH",
            one,
            Some(json!({"metadata": {"labels": {"team": "x"}}})),
            &values,
        )
        .await;
        assert_eq!(labelled["metadata"]["generation"], 2);
        assert_ne!(
            labelled["metadata"]["resourceVersion"],
            patched["metadata"]["resourceVersion"]
        );
        // The redacted view is not accepted back.
        let (code, err) = call_clean(
            &app,
            "PUT",
            one,
            Some(object("Secret", "db", got["spec"].clone())),
            &values,
        )
        .await;
        assert_eq!(code, 422, "{err}");
        let (code, put) = call_clean(
            &app,
            "PUT",
            one,
            Some(object("Secret", "db", json!({"stringData": {"pw": v1}}))),
            &values,
        )
        .await;
        assert_eq!(code, 200, "{put}");
        assert_eq!(put["metadata"]["generation"], 3);
        let (code, _) = call_clean(
            &app,
            "PUT",
            "/apis/berth/v1/secrets/db/status",
            Some(json!({"status": {"observed": 3}})),
            &values,
        )
        .await;
        assert_eq!(code, 200);
        let (code, _) = call_clean(&app, "GET", "/apis/berth/v1/events", None, &values).await;
        assert_eq!(code, 200);

        // Only the data endpoint carries values.
        let (code, data) = call(&app, "GET", "/apis/berth/v1/secrets/db/data", None, true).await;
        assert_eq!(code, 200);
        let ck = crate::crypto::MasterKey::from_bytes([9u8; 32], "test key").content_key();
        assert_eq!(
            data,
            json!({"data": {"pw": b64(v1)}, "digests": {"pw": ck.digest(v1.as_bytes())}}),
            "the digest shown in the redacted view, for naming the Swarm secret"
        );
        assert_eq!(
            data["digests"]["pw"],
            created["spec"]["redacted"]["pw"]["digest"]
        );

        let (code, deleted) = call_clean(&app, "DELETE", one, None, &values).await;
        assert_eq!(code, 200);
        assert_eq!(deleted["spec"]["redacted"]["pw"]["size"], v1.len());
    }

    #[tokio::test]
    async fn data_endpoint_is_for_secrets_and_configs() {
        let (app, _d) = app().await;
        for (kind, plural) in [("Secret", "secrets"), ("Config", "configs")] {
            let (code, _) = call(
                &app,
                "POST",
                &format!("/apis/berth/v1/{plural}"),
                Some(object(
                    kind,
                    "app",
                    json!({"stringData": {"a": "text"}, "data": {"b": b64("bytes")}}),
                )),
                true,
            )
            .await;
            assert_eq!(code, 201);
            let path = format!("/apis/berth/v1/{plural}/app/data");
            let (code, data) = call(&app, "GET", &path, None, true).await;
            assert_eq!(code, 200);
            assert_eq!(data["data"], json!({"a": b64("text"), "b": b64("bytes")}));
            // Configs get keyed digests as Secrets do: one naming rule for both.
            let ck = crate::crypto::MasterKey::from_bytes([9u8; 32], "test key").content_key();
            assert_eq!(
                data["digests"],
                json!({"a": ck.digest(b"text"), "b": ck.digest(b"bytes")})
            );
            let (code, _) = call(&app, "GET", &path, None, false).await;
            assert_eq!(code, 401);
            let (code, err) = call(
                &app,
                "GET",
                &format!("/apis/berth/v1/{plural}/missing/data"),
                None,
                true,
            )
            .await;
            assert_eq!(code, 404);
            assert_eq!(err["message"], format!("{kind} `missing` not found"));
        }
        // Configs are shown in clear.
        let (_, cfg) = call(&app, "GET", "/apis/berth/v1/configs/app", None, true).await;
        assert_eq!(cfg["spec"]["stringData"]["a"], "text");
        let (code, _) = call(
            &app,
            "POST",
            "/apis/berth/v1/services",
            Some(svc("app", json!(1))),
            true,
        )
        .await;
        assert_eq!(code, 201);
        for path in [
            "/apis/berth/v1/services/app/data",
            "/apis/berth/v1/networks/x/data",
        ] {
            let (code, err) = call(&app, "GET", path, None, true).await;
            assert_eq!(code, 404, "{path}");
            assert!(
                err["message"].as_str().unwrap().contains("has no data"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn objects_used_by_services_cannot_be_deleted() {
        let (app, _d) = app().await;
        let deps = [
            object("Secret", "db", json!({"stringData": {"pw": "x"}})),
            object("Config", "nginx", json!({"stringData": {"conf": "x"}})),
            object("Volume", "pgdata", json!({})),
            object("Network", "backend", json!({})),
            object("Network", "berth-internal", json!({})),
        ];
        let full = json!({"image": "a:1", "secrets": [{"name": "db"}], "configs": [{"name": "nginx"}],
                          "volumes": [{"target": "/data", "volume": "pgdata"}], "networks": ["backend"]});
        let mut items = deps.to_vec();
        items.push(object("Service", "api", full.clone()));
        items.push(object("Service", "worker", full));
        let (code, r) = call(
            &app,
            "POST",
            "/apis/berth/v1/apply",
            Some(json!({"items": items})),
            true,
        )
        .await;
        assert_eq!(code, 200, "{r}");
        for (plural, kind, name) in [
            ("secrets", "Secret", "db"),
            ("configs", "Config", "nginx"),
            ("volumes", "Volume", "pgdata"),
            ("networks", "Network", "backend"),
        ] {
            let path = format!("/apis/berth/v1/{plural}/{name}");
            let (code, err) = call(&app, "DELETE", &path, None, true).await;
            assert_eq!(code, 409, "{path}: {err}");
            assert_eq!(err["reason"], "InUse");
            assert_eq!(
                err["message"],
                format!(
                    "{kind} `{name}` is used by service/api, service/worker; remove those references first"
                )
            );
            let (code, _) = call(&app, "GET", &path, None, true).await;
            assert_eq!(code, 200, "a refused delete keeps the object");
        }
        // The default network cannot be deleted even when nothing uses it.
        let (code, err) = call(
            &app,
            "DELETE",
            "/apis/berth/v1/networks/berth-internal",
            None,
            true,
        )
        .await;
        assert_eq!(code, 409, "{err}");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("the default network cannot be deleted"),
            "{err}"
        );

        // worker drops every reference (and so joins the default network); api is deleted.
        let (code, r) = call(
            &app,
            "PUT",
            "/apis/berth/v1/services/worker",
            Some(svc("worker", json!(1))),
            true,
        )
        .await;
        assert_eq!(code, 200, "{r}");
        let (code, err) = call(&app, "DELETE", "/apis/berth/v1/secrets/db", None, true).await;
        assert_eq!(code, 409);
        assert_eq!(
            err["message"],
            "Secret `db` is used by service/api; remove those references first"
        );
        let (code, _) = call(&app, "DELETE", "/apis/berth/v1/services/api", None, true).await;
        assert_eq!(code, 200);
        for path in [
            "/apis/berth/v1/secrets/db",
            "/apis/berth/v1/configs/nginx",
            "/apis/berth/v1/volumes/pgdata",
            "/apis/berth/v1/networks/backend",
        ] {
            let (code, r) = call(&app, "DELETE", path, None, true).await;
            assert_eq!(code, 200, "{path}: {r}");
        }
        let (code, _) = call(
            &app,
            "DELETE",
            "/apis/berth/v1/networks/berth-internal",
            None,
            true,
        )
        .await;
        assert_eq!(code, 409);
    }
}
