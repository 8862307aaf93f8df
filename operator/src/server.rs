//! The REST API (`/apis/berth/v1/...`): the only writer of `spec`. Requests carry a bearer token;
//! bodies are size-limited; every error is a JSON document with the same precise, field-addressed
//! messages the CLI prints.

use crate::store::{Store, StoreError, WriteMode};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use berth_api_types::names::{paths, API_VERSION};
use berth_api_types::typed::decode_object;
use berth_api_types::validate::FieldError;
use berth_api_types::{DynObject, Kind};
use berth_controllers::client::{Discovery, ErrorBody, ErrorDetail, List};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tracing::info;

/// Largest request body: a whole manifest directory in one apply fits comfortably.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub token: Arc<String>,
    /// The Network services join when they list none of their own.
    pub default_network: Arc<String>,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(paths::API_ROOT, get(discovery))
        .route(paths::APPLY, post(apply))
        .route(paths::EVENTS, get(events))
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
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
}

/// An API error: status code, reason, message and field details.
pub struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    details: Vec<ErrorDetail>,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            reason,
            message: message.into(),
            details: vec![],
        }
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
        let (status, reason) = match &e {
            StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
            StoreError::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            StoreError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            StoreError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "StorageError"),
        };
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

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time, so the token cannot be guessed byte by byte from response timing.
    if bool::from(given.as_bytes().ct_eq(state.token.as_bytes())) && !given.is_empty() {
        next.run(req).await
    } else {
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing or wrong bearer token (set BERTH_TOKEN or --token)",
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("static header"),
        );
        resp
    }
}

async fn not_found() -> ApiError {
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

async fn discovery(State(state): State<AppState>) -> Json<Discovery> {
    Json(Discovery {
        api_version: API_VERSION.to_string(),
        instance: state.store.instance().to_string(),
        default_network: state.default_network.to_string(),
        kinds: Kind::ALL.into_iter().filter(|k| k.is_served()).collect(),
    })
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
    let results = state
        .store
        .write(objects, WriteMode::Upsert, None, q.dry_run)
        .await?;
    for (r, _) in &results {
        info!(kind = %r.kind, name = %r.name, outcome = ?r.outcome, dry_run = q.dry_run, "apply");
    }
    Ok(Json(List {
        items: results.into_iter().map(|(r, _)| r).collect(),
    })
    .into_response())
}

fn object_label(item: &Value, index: usize) -> String {
    let kind = item.get("kind").and_then(Value::as_str).unwrap_or("?");
    match item.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) => format!("{kind}/{n}"),
        None => format!("items[{index}]"),
    }
}

async fn list(
    State(state): State<AppState>,
    Path(plural): Path<String>,
) -> ApiResult<Json<List<DynObject>>> {
    let kind = kind_of(&plural)?;
    Ok(Json(List {
        items: state.store.list(kind)?,
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
        .map(Json)
        .ok_or_else(|| StoreError::NotFound { kind, name }.into())
}

async fn get_one_status(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let Json(obj) = get_one(State(state), Path((plural, name))).await?;
    Ok(Json(obj.status))
}

async fn create(
    State(state): State<AppState>,
    Path(plural): Path<String>,
    Query(q): Query<WriteQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = kind_of(&plural)?;
    let obj = checked(&parse_body(body)?, kind, None)?;
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Create, None, q.dry_run)
        .await?;
    let (_, obj) = out.remove(0);
    Ok((StatusCode::CREATED, Json(obj)).into_response())
}

async fn replace(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DynObject>> {
    let kind = kind_of(&plural)?;
    let value = parse_body(body)?;
    let rv = value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let obj = checked(&value, kind, Some(&name))?;
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Replace, rv, q.dry_run)
        .await?;
    Ok(Json(out.remove(0).1))
}

/// JSON merge patch (RFC 7386) over the stored object; the result is validated like a PUT.
async fn patch(
    State(state): State<AppState>,
    Path((plural, name)): Path<(String, String)>,
    Query(q): Query<WriteQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DynObject>> {
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
    // Without an explicit resourceVersion, the patch applies to the version it was computed from.
    let rv = rv.or(current.metadata.resource_version.clone());
    let mut out = state
        .store
        .write(vec![obj], WriteMode::Replace, rv, q.dry_run)
        .await?;
    Ok(Json(out.remove(0).1))
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
) -> ApiResult<Json<DynObject>> {
    let kind = kind_of(&plural)?;
    let obj = state.store.delete(kind, &name).await?;
    info!(%kind, %name, "deleted");
    Ok(Json(obj))
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
    Ok(Json(state.store.update_status(kind, &name, status).await?))
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
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
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
            let keep =
                kind.is_none_or(|k| k == e.kind) && name.as_deref().is_none_or(|n| n == e.name);
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
    let items =
        state
            .store
            .recent_events(kind, q.name.as_deref(), q.limit.unwrap_or(100).min(5000))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::json;
    use tower::ServiceExt;

    fn app() -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let app = router(AppState {
            store,
            token: Arc::new("secret-token".into()),
            default_network: Arc::new("berth-internal".into()),
        });
        (app, dir)
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: bool,
    ) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if token {
            req = req.header("authorization", "Bearer secret-token");
        }
        let req = req
            .header("content-type", "application/json")
            .body(
                body.map(|b| Body::from(b.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn svc(name: &str, replicas: Value) -> Value {
        json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"image": "a:1", "replicas": replicas}})
    }

    #[tokio::test]
    async fn token_is_required_except_for_healthz() {
        let (app, _d) = app();
        let (code, body) = call(&app, "GET", "/apis/berth/v1/services", None, false).await;
        assert_eq!(code, 401);
        assert_eq!(body["reason"], "Unauthorized");
        let (code, _) = call(&app, "GET", "/healthz", None, false).await;
        assert_eq!(code, 200);
        let (code, _) = call(&app, "GET", "/apis/berth/v1/services", None, true).await;
        assert_eq!(code, 200);
    }

    #[tokio::test]
    async fn invalid_objects_get_field_errors_and_change_nothing() {
        let (app, _d) = app();
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
        let (app, _d) = app();
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
    async fn oversized_and_malformed_bodies() {
        let (app, _d) = app();
        let big = "x".repeat(MAX_BODY + 1);
        let req = Request::builder()
            .method("POST")
            .uri("/apis/berth/v1/apply")
            .header("authorization", "Bearer secret-token")
            .body(Body::from(big))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 413);
        let req = Request::builder()
            .method("POST")
            .uri("/apis/berth/v1/apply")
            .header("authorization", "Bearer secret-token")
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
}
