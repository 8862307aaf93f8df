//! The webhook bridge's HTTP side: `POST /hooks/v1/<token>` (a CI system, optionally signed),
//! `POST /hooks/v1/registry/<token>` (a registry's push notifications), and the authenticated
//! administration endpoints under `/apis/berth/v1/webhooks` that `berth webhook` uses.
//!
//! A hook call publishes a deploy event on `berth.deploy.<service>` and answers 202 with the event
//! id once the bus has accepted it (NATS: the JetStream ack); the deploy applier (`deploy_applier.rs`)
//! then changes the Service. The token in the path is the only credential, so every way a call
//! can fail before the token is known to be good looks the same: an unknown token gets exactly
//! the API's generic 404, and no event. Calls are rate-limited per source address, bodies are
//! capped at 64 KiB, and the token is never logged.

use crate::extract::{OpaquePath, Path, Query};
use crate::push_hooks;
use crate::server::{not_found, ApiError, AppState};
use crate::store::{Store, StoreError};
use crate::webhook::{
    verify_signature, CreateWebhook, HookKind, ReplayGuard, SignatureError, Webhook,
    WebhookSecrets, WebhookView, Webhooks, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{middleware, Json, Router};
use berth_api_types::deploy::{retarget, DeployEvent, DeploySource};
use berth_api_types::image::ImageRef;
use berth_api_types::names::paths;
use berth_api_types::wire::List;
use berth_api_types::Kind;
use berth_controllers::bus::DeployQueue;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Largest hook body: a deploy request is a few bytes, a registry batch a few KiB.
pub const MAX_HOOK_BODY: usize = 64 * 1024;
/// Rate-limiter entries kept before idle ones are dropped.
const LIMITER_KEYS: usize = 10_000;

#[derive(Clone)]
pub struct HookState {
    pub store: Store,
    pub hooks: Webhooks,
    pub bus: Arc<dyn DeployQueue>,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    replay: Arc<ReplayGuard>,
    /// Monotonic even within one millisecond: the applier treats a smaller id as an older deploy.
    ids: Arc<std::sync::Mutex<ulid::Generator>>,
}

impl HookState {
    /// `per_second` sustained calls per source address, with bursts of five seconds' worth.
    pub fn new(
        store: Store,
        bus: Arc<dyn DeployQueue>,
        per_second: u32,
    ) -> Result<Self, StoreError> {
        let rate = NonZeroU32::new(per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(per_second.max(1).saturating_mul(5)).expect("at least 5");
        let replay = ReplayGuard::open(&store)?;
        Ok(HookState {
            hooks: Webhooks::open(&store)?,
            store,
            bus,
            limiter: Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )),
            replay: Arc::new(replay),
            ids: Arc::new(std::sync::Mutex::new(ulid::Generator::new())),
        })
    }

    fn next_id(&self) -> String {
        let mut g = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        // Fails only when 2^80 ids are made in one millisecond.
        g.generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }
}

/// The hook endpoints and, behind the API's bearer-token check, webhook administration: what the
/// API listener serves when webhooks have no listener of their own.
pub fn router(api: AppState, state: HookState) -> Router {
    hook_routes(api.clone(), state.clone()).merge(admin_routes(api, state))
}

/// Webhook administration (`/apis/berth/v1/webhooks...`): admin API, always on the API listener.
pub fn admin_routes(api: AppState, state: HookState) -> Router {
    Router::new()
        .route(paths::WEBHOOKS, get(list).post(create))
        .route(&format!("{}/{{id}}", paths::WEBHOOKS), delete(remove))
        .route(&format!("{}/{{id}}/rotate", paths::WEBHOOKS), post(rotate))
        .layer(middleware::from_fn_with_state(
            api,
            crate::access::authorize,
        ))
        .with_state(state)
}

/// The hook endpoints alone. They are public in the access table (their URL token and signature
/// are their credential, checked here); the access layer is what leaves an audit record when a
/// call is refused.
fn hook_routes(api: AppState, state: HookState) -> Router {
    Router::new()
        .route(
            &format!("{}/registry/{{token}}", paths::HOOKS),
            post(registry_hook),
        )
        .route(&format!("{}/{{token}}", paths::HOOKS), post(service_hook))
        .layer(middleware::from_fn_with_state(
            api,
            crate::access::authorize,
        ))
        // Outermost: the access layer's refusals are calls too.
        .layer(middleware::map_response(count_answer))
        .with_state(state)
}

/// Counts a webhook call by how it was answered (the metric's labels are outcomes only: the
/// URL holds the hook's token).
async fn count_answer(response: Response) -> Response {
    berth_controllers::metrics::global().webhook_answered(response.status().as_u16());
    response
}

/// The routers of the two listeners when webhooks have their own (`--hooks-listen`): the API
/// listener answers `/hooks/...` with the generic 404, and the hooks listener serves only the hook
/// endpoints and `/healthz` (404 for everything else, the admin API included), so a CI system can
/// reach its hooks without reaching the admin API.
pub fn separate_listeners(api: AppState, state: HookState) -> (Router, Router) {
    let main = crate::server::router(api.clone())
        .merge(admin_routes(api.clone(), state.clone()))
        // Without these routes the API's authenticated fallback would answer 401, which tells a
        // caller that something lives there.
        .route(paths::HOOKS, any(unknown))
        .route(&format!("{}/{{*rest}}", paths::HOOKS), any(unknown));
    let hooks = Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok" }))
        .merge(hook_routes(api, state))
        .fallback(unknown);
    (main, hooks)
}

fn err(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, reason, message).into_response()
}

/// The same body as any other unknown path: it says nothing about the token.
async fn unknown() -> Response {
    not_found().await.into_response()
}

fn internal(e: StoreError) -> Response {
    warn!(error = %e, "webhook store failure");
    ApiError::from(e).into_response()
}

/// Per-source rate limit; `Err` is the 429 answer.
/// An early answer that ends a hook call (boxed: a `Response` is large).
type Refused = Box<Response>;

fn limit(state: &HookState, parts: &Parts) -> Result<(), Refused> {
    let ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if state.limiter.len() > LIMITER_KEYS {
        state.limiter.retain_recent();
    }
    match state.limiter.check_key(&ip) {
        Ok(()) => Ok(()),
        Err(not_until) => {
            let wait = not_until.wait_time_from(state.limiter.clock().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            debug!(%ip, "webhook rate limit");
            let mut resp = err(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                format!("too many webhook calls from this address; retry in {secs} s"),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, secs.max(1).into());
            Err(Box::new(resp))
        }
    }
}

async fn read_body(body: Body) -> Result<Bytes, Refused> {
    axum::body::to_bytes(body, MAX_HOOK_BODY)
        .await
        .map_err(|_| {
            Box::new(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                format!("a webhook body is at most {MAX_HOOK_BODY} bytes"),
            ))
        })
}

/// What a CI call may name, in a JSON body or the query string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployRequest {
    tag: Option<String>,
    digest: Option<String>,
}

pub(crate) fn deploy_request(parts: &Parts, body: &[u8]) -> Result<DeployRequest, String> {
    let from_query = match parts.uri.query() {
        Some(q) if !q.is_empty() => Some(
            axum::extract::Query::<DeployRequest>::try_from_uri(&parts.uri)
                .map_err(|e| format!("query string: {}", e.body_text()))?
                .0,
        ),
        _ => None,
    };
    let from_body =
        if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(serde_json::from_slice::<DeployRequest>(body).map_err(|e| {
                format!("body: expected {{\"tag\": ...}} or {{\"digest\": ...}}: {e}")
            })?)
        };
    match (from_query, from_body) {
        (Some(_), Some(_)) => {
            Err("name the tag or digest in the body or in the query, not both".into())
        }
        (q, b) => Ok(q.or(b).unwrap_or_default()),
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `POST /hooks/v1/<token>`
async fn service_hook(
    State(state): State<HookState>,
    OpaquePath(token): OpaquePath<String>,
    req: Request,
) -> Response {
    let (parts, hook, body) = match admit(&state, &token, HookKind::Service, req).await {
        Ok(admitted) => admitted,
        Err(resp) => return *resp,
    };
    let source = match signed(&state, &hook, &parts, &body).await {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    let request = match deploy_request(&parts, &body) {
        Ok(r) => r,
        Err(why) => return err(StatusCode::BAD_REQUEST, "BadRequest", why),
    };
    let service = hook.service.clone().unwrap_or_default();
    let current = match current_image(&state.store, &service) {
        Ok(Some(image)) => image,
        Ok(None) => {
            return err(
                StatusCode::CONFLICT,
                "ServiceMissing",
                format!(
                    "webhook {} deploys service `{service}`, which does not exist",
                    hook.id
                ),
            )
        }
        Err(resp) => return *resp,
    };
    let image = match retarget(&current, request.tag.as_deref(), request.digest.as_deref()) {
        Ok(i) => i,
        Err(why) => return err(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", why),
    };
    let mut event = DeployEvent {
        id: state.next_id(),
        service,
        tag: image.tag.clone(),
        digest: image.digest.clone(),
        image: image.to_string(),
        source,
        time: chrono::Utc::now(),
        instance: Some(state.store.instance().to_string()),
        signature: None,
    };
    // The applier refuses unsigned events: only this process can vouch for a deploy.
    state.store.deploy_key().sign(&mut event);
    if let Err(resp) = publish(&state, &hook, &event).await {
        return *resp;
    }
    state.hooks.touch(&hook).await;
    (
        StatusCode::ACCEPTED,
        Json(json!({"id": event.id, "service": event.service, "image": event.image})),
    )
        .into_response()
}

/// What every hook call goes through first, in this order: the per-source rate limit (unknown
/// tokens count too), the body size, then the token, which must be a webhook of `kind`; anything
/// else is the same 404 as an unknown path.
async fn admit(
    state: &HookState,
    token: &str,
    kind: HookKind,
    req: Request,
) -> Result<(Parts, Webhook, Bytes), Refused> {
    let (parts, body) = req.into_parts();
    limit(state, &parts)?;
    let body = read_body(body).await?;
    match state.hooks.find(token) {
        Ok(Some(h)) if h.kind == kind => Ok((parts, h, body)),
        Ok(_) => Err(Box::new(unknown().await)),
        Err(e) => Err(Box::new(internal(e))),
    }
}

/// For a signed webhook, checks signature, window and replay; the deploy's source either way.
async fn signed(
    state: &HookState,
    hook: &Webhook,
    parts: &Parts,
    body: &[u8],
) -> Result<DeploySource, Refused> {
    let secret = match state.hooks.signing_secret(hook) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(DeploySource::Webhook),
        Err(e) => return Err(Box::new(internal(e))),
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let (ts, sig) = (header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER));
    let now = now_secs();
    let refused = |why: &dyn std::fmt::Debug| {
        debug!(webhook = %hook.id, reason = ?why, "webhook signature refused");
        Box::new(err(
            StatusCode::UNAUTHORIZED,
            "BadSignature",
            format!(
                "this webhook needs a valid {SIGNATURE_HEADER} over `<{TIMESTAMP_HEADER}>.<body>`, \
                 signed within the last 5 minutes and not sent before"
            ),
        ))
    };
    let signed_at = verify_signature(&secret, ts, sig, body, now).map_err(|e| refused(&e))?;
    let first = state
        .replay
        .first_use(&hook.id, sig.unwrap_or_default(), signed_at, now)
        .await
        .map_err(|e| Box::new(internal(e)))?;
    if !first {
        return Err(refused(&SignatureError::Replayed));
    }
    Ok(DeploySource::Signed)
}

/// The image a service runs now; `Ok(None)` when there is no such service.
fn current_image(store: &Store, service: &str) -> Result<Option<ImageRef>, Refused> {
    let obj = match store.get(Kind::Service, service) {
        Ok(Some(o)) => o,
        Ok(None) => return Ok(None),
        Err(e) => return Err(Box::new(internal(e))),
    };
    obj.spec
        .get("image")
        .and_then(|v| v.as_str())
        .and_then(|s| ImageRef::parse(s).ok())
        .map(Some)
        .ok_or_else(|| {
            Box::new(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "StorageError",
                format!("service `{service}` has a stored image that does not parse"),
            ))
        })
}

async fn publish(state: &HookState, hook: &Webhook, event: &DeployEvent) -> Result<(), Refused> {
    match state.bus.publish_deploy(event).await {
        Ok(()) => {
            info!(webhook = %hook.id, id = %event.id, service = %event.service,
                  image = %event.image, source = %event.source, "deploy requested");
            Ok(())
        }
        Err(e) => {
            warn!(webhook = %hook.id, id = %event.id, error = %e, "cannot publish deploy event");
            let mut resp = err(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "the deploy could not be queued (event bus unavailable); retry",
            );
            resp.headers_mut().insert(header::RETRY_AFTER, 5u64.into());
            Err(Box::new(resp))
        }
    }
}

/// `POST /hooks/v1/registry/<token>`: a registry's notification envelope. Every tagged manifest
/// push deploys each Service running that repository:tag, pinned to the pushed digest.
async fn registry_hook(
    State(state): State<HookState>,
    OpaquePath(token): OpaquePath<String>,
    req: Request,
) -> Response {
    let (_, hook, body) = match admit(&state, &token, HookKind::Registry, req).await {
        Ok(admitted) => admitted,
        Err(resp) => return *resp,
    };
    let Some(registry_host) = hook.registry_host.clone() else {
        // Made before a registry host was required: which registry it speaks for is unknown,
        // and the body's word for it is not taken.
        return err(
            StatusCode::CONFLICT,
            "NoRegistryHost",
            format!(
                "webhook {} names no registry host; delete it and create it again with \
                 `berth webhook create --registry --registry-host HOST`",
                hook.id
            ),
        );
    };
    let pushes = match push_hooks::pushes(&body, chrono::Utc::now()) {
        Ok(p) => p,
        Err(why) => return err(StatusCode::BAD_REQUEST, "BadRequest", why),
    };
    let events = if pushes.is_empty() {
        Vec::new()
    } else {
        match registry_events(&state.store, &registry_host, &pushes) {
            Ok(e) => e,
            Err(e) => return internal(e),
        }
    };
    for event in &events {
        if let Err(resp) = publish(&state, &hook, event).await {
            return *resp;
        }
    }
    if !events.is_empty() {
        state.hooks.touch(&hook).await;
    }
    debug!(webhook = %hook.id, pushes = pushes.len(), deploys = events.len(), "registry notification");
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    (StatusCode::ACCEPTED, Json(json!({ "ids": ids }))).into_response()
}

/// One deploy event per (push, service running it from `registry_host`).
fn registry_events(
    store: &Store,
    registry_host: &str,
    pushes: &[push_hooks::Push],
) -> Result<Vec<DeployEvent>, StoreError> {
    let services: Vec<(String, ImageRef)> = store
        .list(Kind::Service)?
        .into_iter()
        .filter_map(|o| {
            let image = ImageRef::parse(o.spec.get("image")?.as_str()?).ok()?;
            Some((o.metadata.name, image))
        })
        .collect();
    let mut out = Vec::new();
    for push in pushes {
        for (name, current) in &services {
            if !push_hooks::runs(current, push, registry_host) {
                continue;
            }
            let Ok(image) = retarget(current, Some(&push.tag), push.digest.as_deref()) else {
                continue;
            };
            let mut event = DeployEvent {
                id: push_hooks::event_id(push, name),
                service: name.clone(),
                image: image.to_string(),
                tag: Some(push.tag.clone()),
                digest: push.digest.clone(),
                source: DeploySource::Registry,
                time: push.time.unwrap_or_else(chrono::Utc::now),
                instance: Some(store.instance().to_string()),
                signature: None,
            };
            store.deploy_key().sign(&mut event);
            out.push(event);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Administration (bearer token)

#[derive(Deserialize)]
struct ListQuery {
    service: Option<String>,
}

async fn list(
    State(state): State<HookState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<List<WebhookView>>, ApiError> {
    let items = state
        .hooks
        .list()
        .await?
        .into_iter()
        .filter(|h| q.service.is_none() || h.service == q.service)
        .map(|h| h.view())
        .collect();
    Ok(Json(List { items }))
}

fn invalid(path: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(path, message)
}

fn secrets(hook: Webhook, token: String, signing_secret: Option<String>) -> WebhookSecrets {
    let path = match hook.kind {
        HookKind::Service => paths::hook(&token),
        HookKind::Registry => paths::registry_hook(&token),
    };
    WebhookSecrets {
        webhook: hook.view(),
        token,
        path,
        signing_secret,
    }
}

async fn create(
    State(state): State<HookState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req: CreateWebhook = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("request body: {e}"),
        )
    })?;
    let (kind, service) =
        match (req.registry, req.service) {
            (false, Some(s)) => {
                if req.registry_host.is_some() {
                    return Err(invalid(
                        "registryHost",
                        "only registry webhooks have a registry host",
                    ));
                }
                if state.store.get(Kind::Service, &s)?.is_none() {
                    return Err(StoreError::NotFound {
                        kind: Kind::Service,
                        name: s,
                    }
                    .into());
                }
                (HookKind::Service, Some(s))
            }
            (false, None) => {
                return Err(invalid(
                    "service",
                    "name the service the webhook deploys (or ask for a registry webhook)",
                ))
            }
            (true, Some(_)) => return Err(invalid(
                "service",
                "a registry webhook deploys every service running the pushed image; it names none",
            )),
            (true, None) => (HookKind::Registry, None),
        };
    if kind == HookKind::Registry && req.registry_host.is_none() {
        return Err(invalid(
            "registryHost",
            "a registry webhook needs the registry's host as services name it in their images \
             (e.g. `registry.internal:5000`): only that registry's services are deployed",
        ));
    }
    if kind == HookKind::Registry && req.signed {
        return Err(invalid(
            "signed",
            "registries do not sign notifications; a registry webhook is authenticated by its URL alone",
        ));
    }
    if let Some(h) = &req.registry_host {
        let parsed = ImageRef::parse(&format!("{h}/x")).ok();
        if parsed.and_then(|r| r.registry).as_deref() != Some(h.as_str()) {
            return Err(invalid(
                "registryHost",
                format!("`{h}` is not a registry host (e.g. `registry.example.com` or `127.0.0.1:5000`)"),
            ));
        }
    }
    let (hook, token, secret) = state
        .hooks
        .create(kind, service, req.registry_host, req.signed)
        .await?;
    info!(webhook = %hook.id, kind = ?hook.kind, service = ?hook.service, signed = req.signed, "webhook created");
    Ok((StatusCode::CREATED, Json(secrets(hook, token, secret))).into_response())
}

fn no_webhook(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("webhook `{id}` not found"),
    )
}

async fn rotate(
    State(state): State<HookState>,
    Path(id): Path<String>,
) -> Result<Json<WebhookSecrets>, ApiError> {
    let (hook, token, secret) = state
        .hooks
        .rotate(&id)
        .await?
        .ok_or_else(|| no_webhook(&id))?;
    info!(webhook = %hook.id, "webhook rotated");
    Ok(Json(secrets(hook, token, secret)))
}

async fn remove(
    State(state): State<HookState>,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let hook = state
        .hooks
        .delete(&id)
        .await?
        .ok_or_else(|| no_webhook(&id))?;
    info!(webhook = %hook.id, "webhook deleted");
    Ok(Json(hook.view()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::sign;
    use axum::http::Request as HttpRequest;
    use berth_api_types::typed::decode_object;
    use berth_controllers::bus::{DeployMessage, DeploySubscription, EmbeddedBus};
    use futures::StreamExt;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use std::time::Duration;
    use tower::ServiceExt;

    const ADMIN: &str = crate::server::TEST_ADMIN;

    struct Setup {
        app: Router,
        deploys: DeploySubscription,
        store: Store,
        hooks: Webhooks,
        _dir: tempfile::TempDir,
    }

    async fn setup(rate: u32) -> Setup {
        setup_listeners(rate, false).await.0
    }

    /// `separate`: the API listener's router and the hooks listener's (`--hooks-listen`).
    async fn setup_listeners(rate: u32, separate: bool) -> (Setup, Option<Router>) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([5u8; 32], "test key");
        let store = Store::open(dir.path(), &key).await.unwrap();
        let bus: Arc<dyn DeployQueue> = Arc::new(EmbeddedBus::new());
        let deploys = bus.subscribe_deploys(None).await.unwrap();
        let api = AppState::for_tests(store.clone()).await;
        let hooks = HookState::new(store.clone(), bus, rate).unwrap();
        let webhooks = hooks.hooks.clone();
        let (app, hooks_app) = if separate {
            let (main, hooks) = separate_listeners(api, hooks);
            (main, Some(hooks))
        } else {
            (
                crate::server::router(api.clone()).merge(router(api, hooks)),
                None,
            )
        };
        for (name, image) in [
            ("web", "127.0.0.1:5731/team/app:1"),
            ("web2", "127.0.0.1:5731/team/app:2"),
            ("other", "127.0.0.1:5731/team/other:2"),
        ] {
            let obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Service",
                "metadata": {"name": name}, "spec": {"image": image}}))
            .unwrap();
            store
                .write(vec![obj], crate::store::WriteMode::Create, None, false)
                .await
                .unwrap();
        }
        (
            Setup {
                app,
                deploys,
                store,
                hooks: webhooks,
                _dir: dir,
            },
            hooks_app,
        )
    }

    /// With `--hooks-listen`: the hooks listener serves the hook endpoints and /healthz only (the
    /// admin API is 404 there, token or not); the API listener serves webhook administration and
    /// answers the hook endpoints with the generic 404, sending no deploy.
    #[tokio::test]
    async fn separate_listeners_serve_disjoint_routes() {
        let (mut s, hooks_app) = setup_listeners(100, true).await;
        let hooks_app = hooks_app.unwrap();
        let created = create_hook(&s.app, json!({"service": "web"})).await;

        let (code, v, _) = hook(&s.app, &created.path, r#"{"tag": "2"}"#).await;
        assert_eq!((code, v["reason"].as_str()), (404, Some("NotFound")));
        let (code, _, _) = hook(&s.app, "/hooks/v1/registry/x", "{}").await;
        assert_eq!(code, 404);
        let (code, _, _, _) = send(&s.app, "GET", paths::HOOKS, &[], vec![]).await;
        assert_eq!(code, 404);
        no_deploy(&mut s).await;
        let (code, _) = admin(&s.app, "GET", paths::API_ROOT, None).await;
        assert_eq!(code, 200, "the admin API stays on the API listener");

        for path in [
            paths::API_ROOT.to_string(),
            paths::collection(Kind::Service),
            paths::WEBHOOKS.to_string(),
            "/anything".to_string(),
        ] {
            let (code, v) = admin(&hooks_app, "GET", &path, None).await;
            assert_eq!(
                (code, v["reason"].as_str()),
                (404, Some("NotFound")),
                "{path}"
            );
        }
        let (code, _) = admin(
            &hooks_app,
            "POST",
            paths::WEBHOOKS,
            Some(json!({"service": "web"})),
        )
        .await;
        assert_eq!(code, 404);
        let (code, _, text, _) = send(&hooks_app, "GET", paths::HEALTHZ, &[], vec![]).await;
        assert_eq!((code, text.as_str()), (200, "ok"));

        let (code, v, _) = hook(&hooks_app, &created.path, r#"{"tag": "2"}"#).await;
        assert_eq!(code, 202, "{v}");
        assert_eq!(next_deploy(&mut s).await.image, "127.0.0.1:5731/team/app:2");
    }

    async fn send(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> (u16, Value, String, axum::http::HeaderMap) {
        let mut req = HttpRequest::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
            headers,
        )
    }

    fn bearer() -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {ADMIN}"))]
    }

    async fn admin(app: &Router, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let (code, v, _, _) = send(app, method, path, &bearer(), body).await;
        (code, v)
    }

    async fn hook(app: &Router, path: &str, body: &str) -> (u16, Value, String) {
        let (code, v, text, _) = send(app, "POST", path, &[], body.as_bytes().to_vec()).await;
        (code, v, text)
    }

    async fn next_deploy(s: &mut Setup) -> DeployEvent {
        match tokio::time::timeout(Duration::from_secs(1), s.deploys.next()).await {
            Ok(Some(DeployMessage::Deploy(d, _))) => d,
            other => panic!("no deploy event: {other:?}"),
        }
    }

    async fn no_deploy(s: &mut Setup) {
        let got = tokio::time::timeout(Duration::from_millis(50), s.deploys.next()).await;
        assert!(got.is_err(), "unexpected deploy: {got:?}");
    }

    async fn create_hook(app: &Router, body: Value) -> WebhookSecrets {
        let (code, v) = admin(app, "POST", paths::WEBHOOKS, Some(body)).await;
        assert_eq!(code, 201, "{v}");
        serde_json::from_value(v).unwrap()
    }

    #[tokio::test]
    async fn a_call_publishes_a_deploy_event_and_answers_its_id() {
        let mut s = setup(100).await;
        let created = create_hook(&s.app, json!({"service": "web"})).await;
        assert!(created.path.starts_with("/hooks/v1/bh_"));
        assert!(created.signing_secret.is_none());

        let (code, v, _) = hook(&s.app, &created.path, r#"{"tag": "2"}"#).await;
        assert_eq!(code, 202, "{v}");
        let ev = next_deploy(&mut s).await;
        assert_eq!(v["id"], ev.id.as_str());
        assert_eq!(ev.service, "web");
        assert_eq!(ev.image, "127.0.0.1:5731/team/app:2");
        assert_eq!(ev.tag.as_deref(), Some("2"));
        assert_eq!(ev.source, DeploySource::Webhook);
        assert_eq!(ev.instance.as_deref(), Some(s.store.instance()));
        assert!(ulid::Ulid::from_string(&ev.id).is_ok());
        assert_eq!(
            s.store.deploy_key().verify(&ev),
            Ok(()),
            "the bridge signs what it publishes"
        );

        // Query form, and digest form.
        let digest = format!("sha256:{}", "c".repeat(64));
        let (code, _, _) = hook(&s.app, &format!("{}?tag=3", created.path), "").await;
        assert_eq!(code, 202);
        assert_eq!(next_deploy(&mut s).await.image, "127.0.0.1:5731/team/app:3");
        let body = json!({"digest": digest}).to_string();
        let (code, _, _) = hook(&s.app, &created.path, &body).await;
        assert_eq!(code, 202);
        let ev = next_deploy(&mut s).await;
        assert_eq!(ev.image, format!("127.0.0.1:5731/team/app@{digest}"));
        assert_eq!(ev.digest.as_deref(), Some(digest.as_str()));
        // Nothing named: the current tag again (the applier forces a new pull).
        let (code, _, _) = hook(&s.app, &created.path, "").await;
        assert_eq!(code, 202);
        assert_eq!(next_deploy(&mut s).await.image, "127.0.0.1:5731/team/app:1");

        let (_, list) = admin(&s.app, "GET", paths::WEBHOOKS, None).await;
        assert!(list["items"][0]["lastUsed"].is_string(), "{list}");
    }

    #[tokio::test]
    async fn bad_calls_are_refused_without_an_event() {
        let counted = |outcome| {
            let series = format!("berth_webhook_requests_total{{outcome=\"{outcome}\"}} ");
            berth_controllers::metrics::global()
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (not_found, invalid) = (counted("not_found"), counted("invalid"));
        let mut s = setup(100).await;
        let created = create_hook(&s.app, json!({"service": "web"})).await;
        // Unknown token: the very same 404 as any unknown path.
        let (_, _, generic, _) = send(
            &s.app,
            "GET",
            "/apis/berth/v1/nothing/here/at/all",
            &bearer(),
            vec![],
        )
        .await;
        for path in [
            "/hooks/v1/bh_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string(),
            format!("{}x", created.path),
            "/hooks/v1/registry/nope".to_string(),
            // A service hook's token is not a registry hook's.
            created.path.replace("/hooks/v1/", "/hooks/v1/registry/"),
        ] {
            let (code, _, text) = hook(&s.app, &path, r#"{"tag": "2"}"#).await;
            assert_eq!(code, 404, "{path}");
            assert_eq!(text, generic, "{path}");
        }
        for (body, code, want) in [
            (r#"{"tag": "-x"}"#, 422, "tag must be"),
            (r#"{"tag": "a/b"}"#, 422, "invalid image reference"),
            (r#"{"digest": "sha256:1"}"#, 422, "digest must"),
            (r#"{"tga": "2"}"#, 400, "unknown field `tga`"),
            ("not json", 400, "expected {\"tag\""),
        ] {
            let (got, v, _) = hook(&s.app, &created.path, body).await;
            assert_eq!(got, code, "{body}: {v}");
            assert!(v["message"].as_str().unwrap().contains(want), "{body}: {v}");
        }
        let (code, v, _) = hook(&s.app, &format!("{}?tag=2", created.path), r#"{"tag":"2"}"#).await;
        assert_eq!(code, 400, "{v}");
        let big = format!(r#"{{"tag": "2", "pad": "{}"}}"#, "x".repeat(MAX_HOOK_BODY));
        let (code, _, _) = hook(&s.app, &created.path, &big).await;
        assert_eq!(code, 413);
        no_deploy(&mut s).await;
        assert_eq!(
            s.store
                .get(Kind::Service, "web")
                .unwrap()
                .unwrap()
                .metadata
                .generation,
            1
        );
        // A webhook whose service is gone says so (the caller holds a valid token).
        s.store
            .delete(Kind::Service, "web", "berth-internal")
            .await
            .unwrap();
        let (code, v, _) = hook(&s.app, &created.path, "").await;
        assert_eq!(code, 409, "{v}");
        no_deploy(&mut s).await;
        // Each refusal is counted by its outcome (other tests count into the same registry).
        assert!(counted("not_found") >= not_found + 4);
        assert!(counted("invalid") >= invalid + 5);
    }

    #[tokio::test]
    async fn signed_calls_need_a_fresh_unreplayed_signature() {
        let mut s = setup(100).await;
        let created = create_hook(&s.app, json!({"service": "web", "signed": true})).await;
        assert!(created.webhook.signed);
        let secret = created.signing_secret.clone().unwrap();
        let body = r#"{"tag":"2"}"#;
        let now = chrono::Utc::now().timestamp();
        let headers = |ts: i64, sig: String| {
            vec![(TIMESTAMP_HEADER, ts.to_string()), (SIGNATURE_HEADER, sig)]
        };
        let app = s.app.clone();
        let post = |h: Vec<(&'static str, String)>, b: &'static str| {
            let app = app.clone();
            let path = created.path.clone();
            async move { send(&app, "POST", &path, &h, b.as_bytes().to_vec()).await }
        };
        // No signature at all.
        let (code, v, _, _) = post(vec![], body).await;
        assert_eq!(code, 401, "{v}");
        assert_eq!(v["reason"], "BadSignature");
        // Wrong key, other body, stale and future timestamps.
        let (code, ..) = post(headers(now, sign(b"wrong", now, body.as_bytes())), body).await;
        assert_eq!(code, 401);
        let (code, ..) = post(headers(now, sign(secret.as_bytes(), now, b"{}")), body).await;
        assert_eq!(code, 401);
        let old = now - 400;
        let (code, ..) = post(
            headers(old, sign(secret.as_bytes(), old, body.as_bytes())),
            body,
        )
        .await;
        assert_eq!(code, 401);
        let future = now + 400;
        let (code, ..) = post(
            headers(future, sign(secret.as_bytes(), future, body.as_bytes())),
            body,
        )
        .await;
        assert_eq!(code, 401);
        no_deploy(&mut s).await;

        let good = headers(now, sign(secret.as_bytes(), now, body.as_bytes()));
        let (code, v, _, _) = post(good.clone(), body).await;
        assert_eq!(code, 202, "{v}");
        let ev = next_deploy(&mut s).await;
        assert_eq!(ev.source, DeploySource::Signed);
        assert_eq!(ev.image, "127.0.0.1:5731/team/app:2");
        // The same signed request again is a replay.
        let (code, v, _, _) = post(good, body).await;
        assert_eq!(code, 401, "{v}");
        no_deploy(&mut s).await;
        // Without the URL token a signature is worth nothing.
        let (code, ..) = send(
            &s.app,
            "POST",
            "/hooks/v1/bh_unknown",
            &headers(now, sign(secret.as_bytes(), now, b"")),
            vec![],
        )
        .await;
        assert_eq!(code, 404);
    }

    #[tokio::test]
    async fn registry_notifications_deploy_the_services_running_the_pushed_tag() {
        let mut s = setup(100).await;
        let created = create_hook(
            &s.app,
            json!({"registry": true, "registryHost": "127.0.0.1:5731"}),
        )
        .await;
        assert!(created.path.starts_with("/hooks/v1/registry/bh_"));
        let envelope = include_str!("../tests/data/registry-push.json");
        let (code, v, _) = hook(&s.app, &created.path, envelope).await;
        assert_eq!(code, 202, "{v}");
        let ev = next_deploy(&mut s).await;
        assert_eq!(v["ids"], json!([ev.id]));
        assert_eq!(ev.service, "web2", "only the service running team/app:2");
        assert_eq!(
            ev.image,
            "127.0.0.1:5731/team/app:2@sha256:810386da0edfa3e00bd421601b617c3bf245454c39e3ccfee7a03070790409bd"
        );
        assert_eq!(ev.source, DeploySource::Registry);
        assert_eq!(ev.tag.as_deref(), Some("2"));
        no_deploy(&mut s).await;
        // The registry retrying the same notification produces the same event id (deduplicated).
        let (code, again, _) = hook(&s.app, &created.path, envelope).await;
        assert_eq!(code, 202);
        assert_eq!(again["ids"], v["ids"]);
        no_deploy(&mut s).await;
        // Blob pushes and pulls deploy nothing but are acknowledged (a registry retries non-2xx).
        for other in [
            include_str!("../tests/data/registry-blob-push.json"),
            include_str!("../tests/data/registry-pull.json"),
        ] {
            let (code, v, _) = hook(&s.app, &created.path, other).await;
            assert_eq!((code, &v["ids"]), (202, &json!([])));
        }
        let (code, _, _) = hook(&s.app, &created.path, "{}").await;
        assert_eq!(code, 400);
        // A registry host as services name it, whatever host the registry reports.
        let aliased = create_hook(
            &s.app,
            json!({"registry": true, "registryHost": "registry.internal:5000"}),
        )
        .await;
        assert_eq!(
            aliased.webhook.registry_host.as_deref(),
            Some("registry.internal:5000")
        );
        let obj = decode_object(&json!({"apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": "aliased"}, "spec": {"image": "registry.internal:5000/team/app:2"}}))
        .unwrap();
        s.store
            .write(vec![obj], crate::store::WriteMode::Create, None, false)
            .await
            .unwrap();
        let (code, v, _) = hook(&s.app, &aliased.path, envelope).await;
        assert_eq!(code, 202);
        let ev = next_deploy(&mut s).await;
        assert_eq!(
            v["ids"],
            json!([ev.id]),
            "only the configured registry's service"
        );
        assert_eq!(ev.service, "aliased");
        no_deploy(&mut s).await;
    }

    /// The body's `request.host` cannot pick the registry: a registry webhook for one host does
    /// not deploy the services of another, even when the body names that one.
    #[tokio::test]
    async fn a_registry_webhook_deploys_only_its_own_registrys_services() {
        let mut s = setup(100).await;
        let other = create_hook(
            &s.app,
            json!({"registry": true, "registryHost": "other:5000"}),
        )
        .await;
        // The captured envelope says `request.host: 127.0.0.1:5731`, where web2 pulls from.
        let envelope = include_str!("../tests/data/registry-push.json");
        let (code, v, _) = hook(&s.app, &other.path, envelope).await;
        assert_eq!((code, &v["ids"]), (202, &json!([])), "{v}");
        no_deploy(&mut s).await;
        // A far-future timestamp is refused: it would otherwise order after every later deploy.
        let future = envelope.replace("2026-11-22T11:25:03.554335104Z", "2999-01-01T00:00:00Z");
        let own = create_hook(
            &s.app,
            json!({"registry": true, "registryHost": "127.0.0.1:5731"}),
        )
        .await;
        let (code, v, _) = hook(&s.app, &own.path, &future).await;
        assert_eq!(code, 400, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("events[0].timestamp"),
            "{v}"
        );
        no_deploy(&mut s).await;
    }

    /// A registry webhook stored without a host (made before one was required) deploys nothing
    /// and says why.
    #[tokio::test]
    async fn a_stored_registry_webhook_without_a_host_deploys_nothing() {
        let mut s = setup(100).await;
        let (_, token, _) = s
            .hooks
            .create(HookKind::Registry, None, None, false)
            .await
            .unwrap();
        let envelope = include_str!("../tests/data/registry-push.json");
        let (code, v, _) = hook(&s.app, &paths::registry_hook(&token), envelope).await;
        assert_eq!(
            (code, v["reason"].as_str()),
            (409, Some("NoRegistryHost")),
            "{v}"
        );
        no_deploy(&mut s).await;
    }

    #[tokio::test]
    async fn calls_are_rate_limited_per_source() {
        let mut s = setup(1).await;
        let created = create_hook(&s.app, json!({"service": "web"})).await;
        // 1/s with a burst of 5: the sixth call at once is refused, with a Retry-After.
        for _ in 0..5 {
            let (code, v, _) = hook(&s.app, &created.path, "").await;
            assert_eq!(code, 202, "{v}");
            next_deploy(&mut s).await;
        }
        let (code, v, _, headers) = send(&s.app, "POST", &created.path, &[], vec![]).await;
        assert_eq!(code, 429, "{v}");
        assert!(
            headers[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        // Unknown tokens count too: guessing is throttled as well.
        let (code, ..) = send(&s.app, "POST", "/hooks/v1/bh_guess", &[], vec![]).await;
        assert_eq!(code, 429);
        no_deploy(&mut s).await;
    }

    #[tokio::test]
    async fn administration_needs_the_admin_token_and_never_shows_a_token() {
        let s = setup(100).await;
        let (code, _, _, _) = send(&s.app, "GET", paths::WEBHOOKS, &[], vec![]).await;
        assert_eq!(code, 401);
        let (code, _, _, _) = send(
            &s.app,
            "POST",
            paths::WEBHOOKS,
            &[],
            json!({"service": "web"}).to_string().into_bytes(),
        )
        .await;
        assert_eq!(code, 401);
        let created = create_hook(&s.app, json!({"service": "web", "signed": true})).await;
        let token = created.token.clone();
        let secret = created.signing_secret.clone().unwrap();
        let (code, list, text, _) = send(&s.app, "GET", paths::WEBHOOKS, &bearer(), vec![]).await;
        assert_eq!(code, 200);
        assert_eq!(list["items"][0]["id"], created.webhook.id.as_str());
        assert_eq!(list["items"][0]["signed"], true);
        assert!(!text.contains(&token) && !text.contains(&secret), "{text}");
        assert!(
            !text.contains(&crate::webhook::token_hash(&token)),
            "{text}"
        );

        let (code, rotated) = admin(
            &s.app,
            "POST",
            &paths::webhook_rotate(&created.webhook.id),
            None,
        )
        .await;
        assert_eq!(code, 200, "{rotated}");
        let rotated: WebhookSecrets = serde_json::from_value(rotated).unwrap();
        assert_ne!(rotated.token, token);
        assert_ne!(rotated.signing_secret.as_deref(), Some(secret.as_str()));
        let (code, ..) = hook(&s.app, &created.path, "").await;
        assert_eq!(code, 404, "the old URL stops working");
        let (code, ..) = hook(&s.app, &rotated.path, "").await;
        assert_eq!(code, 401, "the new URL works (and wants a signature)");

        let (code, _) = admin(&s.app, "DELETE", &paths::webhook(&created.webhook.id), None).await;
        assert_eq!(code, 200);
        let (code, ..) = hook(&s.app, &rotated.path, "").await;
        assert_eq!(code, 404);
        let (code, v) = admin(&s.app, "DELETE", &paths::webhook(&created.webhook.id), None).await;
        assert_eq!(code, 404, "{v}");

        for (body, code, want) in [
            (
                json!({"service": "ghost"}),
                404,
                "Service `ghost` not found",
            ),
            (json!({}), 422, "service: name the service"),
            (
                json!({"registry": true, "service": "web"}),
                422,
                "names none",
            ),
            (
                json!({"registry": true, "signed": true, "registryHost": "r:5000"}),
                422,
                "do not sign",
            ),
            (
                json!({"registry": true, "registryHost": "not a host"}),
                422,
                "not a registry host",
            ),
            (
                json!({"registry": true}),
                422,
                "registryHost: a registry webhook needs the registry's host",
            ),
            (
                json!({"service": "web", "token": "mine"}),
                400,
                "unknown field `token`",
            ),
        ] {
            let (got, v) = admin(&s.app, "POST", paths::WEBHOOKS, Some(body.clone())).await;
            assert_eq!(got, code, "{body}: {v}");
            assert!(v["message"].as_str().unwrap().contains(want), "{body}: {v}");
        }
    }
}
