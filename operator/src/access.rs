//! Who may call which route: the one table of route requirements, the roles each requirement
//! admits, and the middleware that authenticates the bearer token, enforces the table, and leaves
//! an audit record for every write, every secret read and every refusal.
//!
//! The table fails closed: a route that is served but missing here answers 500 `NoAccessRule` to
//! everyone, the admin included, so a new route cannot ship open by omission (and the test that
//! walks the table with every role catches the omission first).

use crate::server::{ApiError, AppState};
use crate::tokens::{AuthError, Principal};
use axum::extract::{ConnectInfo, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_api_types::access::{AuditEntry, Role};
use berth_api_types::names::paths;
use std::net::SocketAddr;
use std::sync::LazyLock;

/// What a route asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No berth token: liveness, and the webhook endpoints (their URL token and HMAC signature
    /// are the credential, checked by the hook itself).
    Public,
    /// Any valid token (discovery, whoami).
    Token,
    /// Read objects, status, events, evidence. A deployer reads only the Services on its token.
    Read,
    /// Change spec (apply, create, replace, patch, delete). A deployer may change the image of the
    /// Services on its token through apply, replace or patch; the handler checks that nothing but
    /// the image changed ([`deployer_may_write`]). A controller may only register and deregister
    /// Nodes ([`controller_path_allows`]), as a kubelet registers its Node.
    Write,
    /// Write an object's status: controllers only (the API server is the only writer of spec,
    /// controllers the only writers of status).
    WriteStatus,
    /// Read a Secret's or Config's values, which the engine needs to create them.
    SecretData,
    /// Take and verify backups (reads every volume, writes nothing back).
    RunBackups,
    /// Everything that hands out keys to the kingdom: tokens, the swarm join token, the backup
    /// repository key, restores, webhook credentials, the audit trail.
    Admin,
    /// Run a command in a running container (`berth exec`): it reads and changes whatever the
    /// container can, secrets included, so it is a grant of its own rather than part of any
    /// role. The admin always may; an operator or deployer token only when created with `--exec`
    /// (a deployer's only in its own Services); a viewer or controller never ([`exec_allowed`]).
    Exec,
}

impl Need {
    /// The roles a requirement admits without a narrower scope, as a refusal names them.
    pub fn unscoped_roles(self) -> Vec<Role> {
        let scoped: &[Role] = match self {
            Need::Read => &[Role::Deployer],
            Need::Write => &[Role::Deployer, Role::Controller],
            _ => &[],
        };
        self.roles()
            .iter()
            .copied()
            .filter(|r| !scoped.contains(r))
            .collect()
    }

    /// The roles a requirement admits (a deployer's and a controller's narrower rights are
    /// checked on top).
    pub fn roles(self) -> &'static [Role] {
        use Role::*;
        match self {
            Need::Public | Need::Token => &[Admin, Operator, Deployer, Viewer, Controller],
            Need::Read => &[Admin, Operator, Deployer, Viewer, Controller],
            Need::Write => &[Admin, Operator, Deployer, Controller],
            Need::WriteStatus => &[Admin, Controller],
            Need::SecretData => &[Admin, Controller],
            Need::RunBackups => &[Admin, Operator],
            // The roles that may hold the grant are in `exec_allowed`; by role alone, the admin.
            Need::Admin | Need::Exec => &[Admin],
        }
    }
}

/// One row of the table: a route as the router declares it (`{param}` placeholders).
#[derive(Clone, Debug)]
pub struct Rule {
    pub method: Method,
    pub path: String,
    pub need: Need,
}

fn api(rel: &str) -> String {
    format!("{}{rel}", paths::API_ROOT)
}

/// Every route berth serves, with what it needs. The one place to look, and the one to extend.
pub static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    use Method as M;
    let rows: Vec<(Method, String, Need)> = vec![
        (M::GET, paths::HEALTHZ.into(), Need::Public),
        (M::GET, format!("{}/{{file}}", paths::SCHEMAS), Need::Public),
        (M::GET, paths::OPENAPI.into(), Need::Public),
        // Names which dependency is not ready, nothing more (see `probes`).
        (M::GET, paths::READYZ.into(), Need::Public),
        // Counts by kind and outcome, never an object's name; still what runs and how busy it is.
        (M::GET, paths::METRICS.into(), Need::Read),
        (
            M::POST,
            format!("{}/registry/{{token}}", paths::HOOKS),
            Need::Public,
        ),
        (M::POST, format!("{}/{{token}}", paths::HOOKS), Need::Public),
        (M::GET, paths::API_ROOT.into(), Need::Token),
        (M::GET, paths::WHOAMI.into(), Need::Token),
        // Objects.
        (M::POST, paths::APPLY.into(), Need::Write),
        (M::GET, api("/{plural}"), Need::Read),
        (M::POST, api("/{plural}"), Need::Write),
        (M::GET, api("/{plural}/{name}"), Need::Read),
        (M::PUT, api("/{plural}/{name}"), Need::Write),
        (M::PATCH, api("/{plural}/{name}"), Need::Write),
        (M::DELETE, api("/{plural}/{name}"), Need::Write),
        (M::GET, api("/{plural}/{name}/status"), Need::Read),
        (M::PUT, api("/{plural}/{name}/status"), Need::WriteStatus),
        (M::GET, api("/{plural}/{name}/data"), Need::SecretData),
        // Day-2: what runs (tasks), what it printed (logs; audited, they may hold user data) and
        // a command in it (exec: its own grant).
        (M::GET, api("/{plural}/{name}/tasks"), Need::Read),
        (M::GET, api("/{plural}/{name}/logs"), Need::Read),
        (M::POST, api("/{plural}/{name}/exec"), Need::Exec),
        // The same exec for the dashboard's terminal (a WebSocket opens with a GET).
        (M::GET, api("/{plural}/{name}/exec/ws"), Need::Exec),
        (M::GET, paths::EVENTS.into(), Need::Read),
        (M::GET, paths::CONTROLLERS.into(), Need::Read),
        // The swarm's join token lets a machine into the cluster.
        (M::GET, paths::JOIN_COMMAND.into(), Need::Admin),
        // Backups: evidence is for every reader; taking and verifying snapshots for operators;
        // the key and restores (which write data and objects back) for the admin.
        (M::GET, paths::SNAPSHOTS.into(), Need::Read),
        (M::POST, paths::backup_run("{plan}"), Need::RunBackups),
        (M::POST, paths::SNAPSHOTS_VERIFY.into(), Need::RunBackups),
        (M::POST, paths::RESTORE_VOLUME.into(), Need::Admin),
        (M::POST, paths::RESTORE_ENVIRONMENT.into(), Need::Admin),
        (M::GET, paths::BACKUP_KEY.into(), Need::Admin),
        // Webhooks mint deploy credentials.
        (M::GET, paths::WEBHOOKS.into(), Need::Admin),
        (M::POST, paths::WEBHOOKS.into(), Need::Admin),
        (
            M::DELETE,
            format!("{}/{{id}}", paths::WEBHOOKS),
            Need::Admin,
        ),
        (
            M::POST,
            format!("{}/{{id}}/rotate", paths::WEBHOOKS),
            Need::Admin,
        ),
        // Tokens.
        (M::GET, paths::TOKENS.into(), Need::Admin),
        (M::POST, paths::TOKENS.into(), Need::Admin),
        (M::POST, paths::ADMIN_TOKEN_ROTATE.into(), Need::Admin),
        (M::DELETE, paths::token("{id}"), Need::Admin),
        // The audit trail names every token, address and object touched.
        (M::GET, paths::AUDIT.into(), Need::Admin),
        (M::GET, paths::AUDIT_VERIFY.into(), Need::Admin),
        // The dashboard: its pages show what the API would answer the same token, so each asks
        // what its API reads ask. Signing in is public (the form's token is the credential, and
        // the handler audits every attempt); its scripts and styles are public too.
        (M::GET, paths::UI.into(), Need::Public),
        (M::GET, paths::UI_LOGIN.into(), Need::Public),
        (M::POST, paths::UI_LOGIN.into(), Need::Public),
        (
            M::GET,
            format!("{}/{{file}}", paths::UI_ASSETS),
            Need::Public,
        ),
        (M::POST, paths::UI_LOGOUT.into(), Need::Token),
        (M::GET, paths::UI_HOME.into(), Need::Read),
        (M::GET, paths::ui_service("{name}"), Need::Read),
        (M::GET, paths::ui_service_row("{name}"), Need::Read),
        (M::GET, paths::ui_section("{section}"), Need::Read),
        (M::GET, paths::UI_BACKUPS.into(), Need::Read),
        (M::GET, paths::UI_AUDIT.into(), Need::Admin),
    ];
    rows.into_iter()
        .map(|(method, path, need)| Rule { method, path, need })
        .collect()
});

/// What the table says about a routed request.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    Rule(Need),
    /// The path is in the table with other methods only: 405, whatever the router would do, so
    /// that a method added to a path without a rule is refused too.
    OtherMethods(Vec<Method>),
    /// The path is not in the table at all.
    Missing,
}

pub fn lookup(method: &Method, route: &str) -> Lookup {
    // HEAD is served by GET routes and asks what GET asks.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let same_path: Vec<&Rule> = RULES.iter().filter(|r| r.path == route).collect();
    if same_path.is_empty() {
        return Lookup::Missing;
    }
    match same_path.iter().find(|r| r.method == *method) {
        Some(r) => Lookup::Rule(r.need),
        None => Lookup::OtherMethods(same_path.iter().map(|r| r.method.clone()).collect()),
    }
}

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// A deployer's extra limits that the path alone decides: only the Services on its token, and
/// only reading them or writing their spec (never creating, deleting or listing).
fn deployer_path_allows(
    p: &Principal,
    method: &Method,
    route: &str,
    params: &[(String, String)],
) -> bool {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if route == paths::APPLY || route == paths::UI_HOME || route == paths::EVENTS {
        // Every object of the apply is checked by the handler; the overview and the events show
        // a deployer its own Services only.
        return true;
    }
    if route == paths::ui_section("{section}") {
        // Its own Services' table and counts; the cluster's sections are not a deployer's.
        return param("section")
            .is_some_and(|s| crate::dashboard::pages::DEPLOYER_SECTIONS.contains(&s));
    }
    let own = param("name").is_some_and(|n| p.services.iter().any(|s| s == n));
    if *method == Method::GET
        && (route == paths::ui_service("{name}") || route == paths::ui_service_row("{name}"))
    {
        return own;
    }
    let own_service = param("plural") == Some("services") && own;
    let shape_ok = match *method {
        Method::GET | Method::HEAD => [
            "/{plural}/{name}",
            "/{plural}/{name}/status",
            "/{plural}/{name}/tasks",
            "/{plural}/{name}/logs",
            "/{plural}/{name}/exec/ws",
        ]
        .iter()
        .any(|r| route == api(r)),
        Method::PUT | Method::PATCH => route == api("/{plural}/{name}"),
        // Exec, with the grant (checked by `exec_allowed`).
        Method::POST => route == api("/{plural}/{name}/exec"),
        _ => false,
    };
    own_service && shape_ok
}

/// Whether a principal may run commands in containers: the admin always; an operator or a
/// deployer only with the exec grant on its token; a viewer or a controller never, whatever its
/// token says (the token API refuses the grant to them, and this refuses it again).
pub fn exec_allowed(p: &Principal) -> bool {
    match p.role {
        Role::Admin => true,
        Role::Operator | Role::Deployer => p.exec,
        Role::Viewer | Role::Controller => false,
    }
}

/// A controller's one kind of spec write: the Node controller registers a node it finds in the
/// swarm (an object with an empty spec; `controller_may_create` checks that) and deregisters it
/// once the node is gone. Nothing else.
fn controller_path_allows(method: &Method, route: &str, params: &[(String, String)]) -> bool {
    let nodes = params
        .iter()
        .any(|(k, v)| k == "plural" && v == berth_api_types::Kind::Node.plural());
    nodes
        && ((*method == Method::POST && route == api("/{plural}"))
            || (*method == Method::DELETE && route == api("/{plural}/{name}")))
}

/// A controller creates only registrations: an object with an empty spec, which teams then set.
pub fn controller_may_create(
    p: &Principal,
    obj: &berth_api_types::DynObject,
) -> Result<(), ApiError> {
    let empty = obj.spec.as_object().is_none_or(|m| m.is_empty());
    if p.role == Role::Controller && !empty {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "a controller registers {}/{} with an empty spec; its spec is for role admin or operator",
                obj.kind, obj.metadata.name
            ),
        ));
    }
    Ok(())
}

/// May this principal make a spec change from `before` to `after`? Everyone the table let through
/// may, except a deployer: only the image of a Service on its token, and nothing else of it.
pub fn deployer_may_write(
    p: &Principal,
    before: Option<&berth_api_types::DynObject>,
    after: &berth_api_types::DynObject,
) -> Result<(), ApiError> {
    if p.role != Role::Deployer {
        return Ok(());
    }
    let deny = |why: String| {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "a deployer token may only change the image of {}: {why} (needs role admin or operator)",
                if p.services.is_empty() { "its Services".to_string() } else { p.services.join(", ") }
            ),
        ))
    };
    if after.kind != berth_api_types::Kind::Service || !p.services.contains(&after.metadata.name) {
        return deny(format!(
            "{}/{} is not one of them",
            after.kind, after.metadata.name
        ));
    }
    let Some(before) = before else {
        return deny(format!(
            "Service/{} does not exist yet",
            after.metadata.name
        ));
    };
    let without_image = |o: &berth_api_types::DynObject| {
        let mut spec = o.spec.clone();
        if let Some(m) = spec.as_object_mut() {
            m.remove("image");
        }
        (
            spec,
            o.metadata.labels.clone(),
            o.metadata.annotations.clone(),
        )
    };
    if without_image(before) != without_image(after) {
        return deny(format!(
            "the change to Service/{} touches more than spec.image",
            after.metadata.name
        ));
    }
    Ok(())
}

/// What a handler tells the audit about the objects its request changed (a response extension).
#[derive(Clone, Debug, Default)]
pub struct Audited {
    /// Overrides the action derived from the method (`apply`, `token-create`, ...).
    pub action: Option<&'static str>,
    pub changes: Vec<Change>,
}

#[derive(Clone, Debug, Default)]
pub struct Change {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub generation_before: Option<u64>,
    pub generation_after: Option<u64>,
    /// An exec's task (`web.1.abcdef012345@node1`).
    pub task: Option<String>,
    /// An exec's program name (never its arguments).
    pub program: Option<String>,
}

fn default_action(method: &Method, need: Option<Need>) -> &'static str {
    match (need, method) {
        (Some(Need::SecretData), _) => "read-secret-data",
        (Some(Need::Exec), _) => "exec",
        (_, &Method::POST) => "create",
        (_, &Method::PUT) => "replace",
        (_, &Method::PATCH) => "patch",
        (_, &Method::DELETE) => "delete",
        _ => "read",
    }
}

/// Whether a finished request leaves an audit record: every write (status writes aside, which
/// controllers make continuously and which change no intent), every read of secret values, and
/// every refusal of a token or a role.
fn audited(method: &Method, need: Option<Need>, code: StatusCode) -> bool {
    if code == StatusCode::UNAUTHORIZED || code == StatusCode::FORBIDDEN {
        return true;
    }
    match need {
        Some(Need::Public) | Some(Need::WriteStatus) => false,
        Some(Need::SecretData) | Some(Need::Exec) => true,
        _ => !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS),
    }
}

/// The middleware every API route runs behind.
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // With several API servers on one NATS store, this one first takes in every commit
    // acknowledged before the request arrived: a token or webhook made through another server
    // authenticates here, and a read shows every write acknowledged anywhere (nothing on sled).
    if let Err(e) = state.store.catch_up().await {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            format!("{e}; try another API server"),
        )
        .into_response();
    }
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let (mut parts, body) = req.into_parts();
    let params = raw_params(&mut parts, &state).await.unwrap_or_default();
    let req = Request::from_parts(parts, body);
    let need = match &route {
        Some(r) => match lookup(&method, r) {
            Lookup::Rule(n) => Some(n),
            Lookup::OtherMethods(allowed) => {
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut resp = ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{method} is not served on {r}; use {allow}"),
                )
                .into_response();
                if let Ok(v) = allow.parse() {
                    resp.headers_mut().insert(header::ALLOW, v);
                }
                return resp;
            }
            Lookup::Missing => {
                tracing::error!(%method, route = %r, "a served route has no access rule; refusing it");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "NoAccessRule",
                    format!("{method} {r} has no access rule; nobody may call it (operator/src/access.rs)"),
                )
                .into_response();
            }
        },
        // Unknown paths: 404 for any valid token, and nothing about the path without one.
        None => Some(Need::Token),
    };
    let object = |params: &[(String, String)]| {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let kind = get("plural").map(|p| {
            berth_api_types::Kind::ALL
                .into_iter()
                .find(|k| k.plural() == p)
                .map(|k| k.to_string())
                .unwrap_or(p)
        });
        (
            kind,
            get("name").or_else(|| get("id")).or_else(|| get("plan")),
        )
    };
    let entry = |principal: Option<&Principal>,
                 action: &str,
                 code: StatusCode,
                 outcome: &str,
                 change: Change| {
        let (kind, name) = object(&params);
        AuditEntry {
            token_id: principal
                .map(|p| p.token_id.clone())
                .unwrap_or_else(|| "anonymous".into()),
            role: principal.map(|p| p.role),
            source: source.clone(),
            action: action.to_string(),
            kind: change.kind.or(kind),
            name: change.name.or(name),
            generation_before: change.generation_before,
            generation_after: change.generation_after,
            task: change.task,
            program: change.program,
            code: code.as_u16(),
            outcome: outcome.to_string(),
        }
    };
    if need == Some(Need::Public) {
        // A hook refused (unknown URL token, bad signature, rate limit) is a refused request
        // too: who knocked, from where, and what they were told.
        let resp = next.run(req).await;
        let code = resp.status();
        let refused = matches!(code.as_u16(), 401 | 403 | 404 | 429);
        if refused
            && route
                .as_deref()
                .is_some_and(|r| r.starts_with(paths::HOOKS))
        {
            let outcome = code.canonical_reason().unwrap_or("refused");
            let mut e = entry(None, "deploy-hook", code, outcome, Change::default());
            // The path's token is the hook's credential: never in a record.
            e.name = None;
            state.audit.record(e).await;
        }
        return resp;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    // A browser signed in to the dashboard sends its token in the session cookie instead.
    let cookie = match bearer {
        Some(_) => None,
        None => crate::dashboard::session::cookie_token(req.headers()),
    };
    let given = bearer.or_else(|| cookie.clone()).unwrap_or_default();
    let page = method == Method::GET
        && route
            .as_deref()
            .is_some_and(|r| r == paths::UI_HOME || r.starts_with(&format!("{}/", paths::UI)));
    let principal = match state.tokens.authenticate(&given) {
        Ok(p) => p,
        Err(e) => {
            let action = default_action(&method, need);
            state
                .audit
                .record(entry(
                    None,
                    action,
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    Change::default(),
                ))
                .await;
            if page {
                return crate::dashboard::session::to_sign_in();
            }
            return unauthorized(&e);
        }
    };
    // A request the cookie authenticated is one a page made, or one another site had the
    // browser make: every write, and an exec, must carry the page's CSRF token too.
    if let Some(token) = &cookie {
        let writes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS)
            || need == Some(Need::Exec);
        if writes && !crate::dashboard::session::csrf_ok(token, req.headers(), req.uri()) {
            let action = default_action(&method, need);
            state
                .audit
                .record(entry(
                    Some(&principal),
                    action,
                    StatusCode::FORBIDDEN,
                    "CsrfRejected",
                    Change::default(),
                ))
                .await;
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "CsrfRejected",
                "a write with the dashboard's session cookie needs the page's CSRF token \
                 (header x-berth-csrf); reload the page",
            )
            .into_response();
        }
    }
    let need = need.expect("set above for every routed request");
    let route_str = route.as_deref().unwrap_or("");
    let admitted = if need == Need::Exec {
        exec_allowed(&principal)
    } else {
        need.roles().contains(&principal.role)
    };
    let allowed = admitted
        && (principal.role != Role::Deployer
            || matches!(need, Need::Token)
            || deployer_path_allows(&principal, &method, route_str, &params))
        && (principal.role != Role::Controller
            || need != Need::Write
            || controller_path_allows(&method, route_str, &params));
    if !allowed {
        let action = default_action(&method, Some(need));
        state
            .audit
            .record(entry(
                Some(&principal),
                action,
                StatusCode::FORBIDDEN,
                "Forbidden",
                Change::default(),
            ))
            .await;
        let roles = need.unscoped_roles();
        let scope = if principal.role == Role::Deployer && need.roles().contains(&Role::Deployer) {
            format!(
                " (a deployer token reaches only the Services {}, and only to read them or change their image)",
                principal.services.join(", ")
            )
        } else {
            String::new()
        };
        let grant = if need == Need::Exec {
            ", or an operator or deployer token created with `--exec` (berth token create --exec)"
        } else {
            ""
        };
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "role `{}` may not {method} {route_str}: it needs role {}{grant}{scope}",
                principal.role,
                role_list(&roles)
            ),
        )
        .into_response();
    }
    let mut req = req;
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    let code = resp.status();
    // A handler that notes what it served is recorded even for a read (a Service's logs: user
    // data, possibly health data, that an auditor asks who read).
    let noted = resp.extensions().get::<Audited>().is_some();
    if noted || audited(&method, Some(need), code) {
        let note = resp
            .extensions()
            .get::<Audited>()
            .cloned()
            .unwrap_or_default();
        let action = note
            .action
            .unwrap_or_else(|| default_action(&method, Some(need)));
        // 101: an exec's stream was opened (the command starts once this record is written).
        let outcome = if code.is_success() || code == StatusCode::SWITCHING_PROTOCOLS {
            "ok".to_string()
        } else {
            code.canonical_reason().unwrap_or("error").to_string()
        };
        let changes = if note.changes.is_empty() {
            vec![Change::default()]
        } else {
            note.changes
        };
        let entries = changes
            .into_iter()
            .map(|change| entry(Some(&principal), action, code, &outcome, change))
            .collect();
        state.audit.record_all(entries).await;
    }
    resp
}

async fn raw_params(
    parts: &mut axum::http::request::Parts,
    state: &AppState,
) -> Option<Vec<(String, String)>> {
    use axum::extract::FromRequestParts;
    let raw = RawPathParams::from_request_parts(parts, state).await.ok()?;
    Some(
        raw.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Where audit records go. The store's hash-chained log in the server; a collector in tests.
#[async_trait::async_trait]
pub trait AuditSink: Send + Sync + 'static {
    /// Records one entry durably before returning. A failure is logged, not returned: the
    /// request it describes already happened, and its answer must not lie about that.
    async fn record(&self, entry: AuditEntry) {
        self.record_all(vec![entry]).await
    }

    /// Records the entries of one request together (one transaction, one flush).
    async fn record_all(&self, entries: Vec<AuditEntry>);
}

/// The store's hash-chained log (`crate::audit`).
#[async_trait::async_trait]
impl AuditSink for crate::audit::AuditLog {
    async fn record_all(&self, entries: Vec<AuditEntry>) {
        let n = entries.len();
        if let Err(e) = self.append_all(entries).await {
            tracing::error!(error = %e, records = n, "audit records not written");
        }
    }
}

/// Keeps entries in memory, for tests that check what was recorded.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryAudit(pub std::sync::Mutex<Vec<AuditEntry>>);

#[cfg(test)]
#[async_trait::async_trait]
impl AuditSink for MemoryAudit {
    async fn record_all(&self, entries: Vec<AuditEntry>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(entries);
    }
}

fn unauthorized(e: &AuthError) -> Response {
    let mut resp =
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", e.to_string()).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("static header"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{self, HookState};
    use crate::server::{router, TEST_ADMIN};
    use crate::store::Store;
    use axum::Router;
    use berth_api_types::access::TokenRequest;
    use berth_controllers::bus::{DeployQueue, EmbeddedBus};
    use serde_json::{json, Value};
    use std::collections::HashMap;
    use std::sync::Arc;

    struct World {
        app: Router,
        tokens: HashMap<Role, String>,
        audit: Arc<MemoryAudit>,
        _dir: tempfile::TempDir,
    }

    /// The whole API as the daemon serves it (objects, backups, tokens, webhooks, hooks), with
    /// one token per role; the deployer may deploy `web` only.
    async fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &crate::store::testing::test_key())
            .await
            .unwrap();
        let mut state = AppState::for_tests(store.clone()).await;
        let audit = Arc::new(MemoryAudit::default());
        state.audit = audit.clone();
        let mut tokens = HashMap::from([(Role::Admin, TEST_ADMIN.to_string())]);
        for role in Role::ALL.into_iter().filter(|r| *r != Role::Admin) {
            let services = if role == Role::Deployer {
                vec!["web".into()]
            } else {
                vec![]
            };
            let t = state
                .tokens
                .create(&TokenRequest {
                    role: role.as_str().into(),
                    services,
                    ..TokenRequest::default()
                })
                .await
                .unwrap();
            tokens.insert(role, t.token);
        }
        let bus: Arc<dyn DeployQueue> = Arc::new(EmbeddedBus::new());
        let hooks = HookState::new(store.clone(), bus, 100).unwrap();
        let app = router(state.clone()).merge(hooks::router(state, hooks));
        // Objects for the routes to find: the deployer's Service, another one, a Secret.
        for obj in [
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"image": "a:1"}}),
            json!({"apiVersion": "berth/v1", "kind": "Service", "metadata": {"name": "other"}, "spec": {"image": "a:1"}}),
            json!({"apiVersion": "berth/v1", "kind": "Secret", "metadata": {"name": "pw"}, "spec": {"stringData": {"k": "v"}}}),
        ] {
            let (code, body) = call(
                &app,
                "POST",
                paths::APPLY,
                Some(tokens[&Role::Admin].as_str()),
                Some(json!({"items": [obj]})),
            )
            .await;
            assert_eq!(code, 200, "{body}");
        }
        audit.0.lock().unwrap().clear();
        World {
            app,
            tokens,
            audit,
            _dir: dir,
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (code, text) = crate::server::send_test(app, method, path, token, body).await;
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A concrete path for a rule's pattern; `name` fills `{name}`.
    fn concrete(pattern: &str, name: &str) -> String {
        pattern
            .replace("{plural}", "services")
            .replace("{name}", name)
            .replace("{id}", "nosuch")
            .replace("{plan}", "environment")
            .replace("{token}", "nosuch")
            .replace("{section}", "events")
    }

    /// Every route of the table, called with every role (and without a token): a role the rule
    /// admits is never refused, any other gets 403 naming the roles needed, and nobody meets a
    /// route the table forgot (`NoAccessRule`) or one it lists that is not served.
    #[tokio::test]
    async fn every_route_with_every_role() {
        let mut w = world().await;
        let mut checked = 0;
        for rule in RULES.iter() {
            for name in ["web", "other"] {
                let path = concrete(&rule.path, name);
                let body = (rule.method != Method::GET && rule.method != Method::DELETE)
                    .then(|| json!({}));
                let (code, resp) =
                    call(&w.app, rule.method.as_str(), &path, None, body.clone()).await;
                if rule.need == Need::Public {
                    assert!(
                        code != 401 && code != 403,
                        "{} {path} is public, got {code} {resp}",
                        rule.method
                    );
                } else if rule.method == Method::GET && rule.path.starts_with(paths::UI) {
                    // A dashboard page sends a browser to the sign-in form instead.
                    assert_eq!(code, 303, "{} {path} without a token", rule.method);
                } else {
                    assert_eq!(code, 401, "{} {path} without a token: {resp}", rule.method);
                }
                for role in Role::ALL {
                    let (code, resp) = call(
                        &w.app,
                        rule.method.as_str(),
                        &path,
                        Some(&w.tokens[&role]),
                        body.clone(),
                    )
                    .await;
                    let what = format!("{} {path} as {role}: {code} {resp}", rule.method);
                    if rule.path == paths::ADMIN_TOKEN_ROTATE && code == 200 {
                        // The rotation worked: the walk goes on with the new admin token.
                        w.tokens
                            .insert(Role::Admin, resp["token"].as_str().unwrap().to_string());
                    }
                    assert_ne!(resp["reason"], "NoAccessRule", "{what}");
                    assert_ne!(resp["reason"], "MethodNotAllowed", "{what}");
                    assert_ne!(
                        code, 405,
                        "the table lists a route the router does not serve: {what}"
                    );
                    // (A hook answers an unknown hook token like an unknown path, on purpose.)
                    assert!(
                        rule.need == Need::Public
                            || !(code == 404 && resp["message"] == "no such API path"),
                        "the table lists a path the router does not serve: {what}"
                    );
                    assert_ne!(code, 401, "{what}");
                    let admitted = rule.need.roles().contains(&role);
                    // A deployer's own Service on the routes that serve one; apply checks each
                    // object in the handler instead, and the overview shows only its own.
                    let deployer_scope = role != Role::Deployer
                        || matches!(rule.need, Need::Token | Need::Public)
                        || rule.path == paths::APPLY
                        || rule.path == paths::UI_HOME
                        || rule.path == paths::EVENTS
                        || (name == "web"
                            && rule.path.contains("{name}")
                            && !rule.path.ends_with("/data")
                            && matches!(rule.method, Method::GET | Method::PUT | Method::PATCH));
                    // A controller writes spec only to register Nodes (the walk names Services).
                    let controller_scope = role != Role::Controller || rule.need != Need::Write;
                    if admitted && deployer_scope && controller_scope {
                        assert_ne!(resp["reason"], "Forbidden", "{what}");
                    } else {
                        assert_eq!(code, 403, "{what}");
                        assert!(
                            resp["message"].as_str().unwrap().contains("it needs role"),
                            "{what}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked >= RULES.len() * 10, "{checked}");
    }

    /// The dashboard shows a role what the API would answer it: a deployer's overview lists its
    /// own Service only and no cluster-wide sections; a viewer sees no undo and no terminal; the
    /// admin sees both.
    #[tokio::test]
    async fn dashboard_pages_follow_the_role() {
        let w = world().await;
        let get = |role: Role, path: &'static str| {
            let app = w.app.clone();
            let token = w.tokens[&role].clone();
            async move { crate::server::send_test(&app, "GET", path, Some(&token), None).await }
        };
        let (code, html) = get(Role::Deployer, "/ui/").await;
        assert_eq!(code, 200);
        assert!(html.contains("id=\"svc-web\""), "{html}");
        assert!(
            !html.contains("svc-other"),
            "a deployer sees only its own Services"
        );
        assert!(!html.contains("id=\"nodes\""), "nor the cluster's nodes");
        let (code, html) = get(Role::Viewer, "/ui/").await;
        assert_eq!(code, 200);
        assert!(html.contains("svc-other") && html.contains("id=\"nodes\""));
        assert!(
            !html.contains("href=\"/ui/audit\""),
            "the audit is the admin's"
        );
        let (_, html) = get(Role::Viewer, "/ui/services/web").await;
        assert!(!html.contains("terminal-section"), "a viewer has no exec");
        let (_, html) = get(Role::Admin, "/ui/services/web").await;
        assert!(html.contains("terminal-section"));
        assert_eq!(get(Role::Deployer, "/ui/services/other").await.0, 403);
        assert_eq!(get(Role::Deployer, "/ui/backups").await.0, 403);
        assert_eq!(get(Role::Viewer, "/ui/audit").await.0, 403);
        assert_eq!(get(Role::Deployer, "/ui/sections/nodes").await.0, 403);
        let (code, html) = get(Role::Deployer, "/ui/sections/summary").await;
        assert_eq!(code, 200);
        assert!(html.contains("1 Services"), "its own only: {html}");
        // The table a live page reads again after its event stream was down.
        let (code, html) = get(Role::Deployer, "/ui/sections/services?page=1").await;
        assert_eq!(code, 200);
        assert!(html.starts_with("<section id=\"services\""), "{html}");
        assert!(
            html.contains("svc-web") && !html.contains("svc-other"),
            "{html}"
        );
        // The event stream a live overview reads: a deployer's holds its own Services only.
        let (code, events) = get(Role::Deployer, "/apis/berth/v1/events").await;
        assert_eq!(code, 200);
        let events: Value = serde_json::from_str(&events).unwrap();
        let items = events["items"].as_array().unwrap();
        assert!(!items.is_empty());
        assert!(
            items
                .iter()
                .all(|e| e["kind"] == "Service" && e["name"] == "web"),
            "{events}"
        );
        let (_, all) = get(Role::Viewer, "/apis/berth/v1/events").await;
        assert!(all.contains("\"other\"") && all.contains("\"pw\""), "{all}");
    }

    /// Who may do what, spelled out for the rows an auditor asks about first.
    #[tokio::test]
    async fn least_privilege_by_role() {
        let w = world().await;
        let t = |r: Role| Some(w.tokens[&r].as_str());
        let secret_data =
            concrete(&api("/{plural}/{name}/data"), "x").replace("services/x", "secrets/pw");
        for (role, want) in [
            (Role::Admin, 200),
            (Role::Controller, 200),
            (Role::Operator, 403),
            (Role::Viewer, 403),
            (Role::Deployer, 403),
        ] {
            assert_eq!(
                call(&w.app, "GET", &secret_data, t(role), None).await.0,
                want,
                "{role} reading secret values"
            );
        }
        let (code, body) = call(&w.app, "GET", &secret_data, t(Role::Viewer), None).await;
        assert_eq!(code, 403);
        assert_eq!(
            body["message"],
            format!(
                "role `viewer` may not GET {}: it needs role admin or controller",
                api("/{plural}/{name}/data")
            )
        );
        // Writes of spec: operator yes, viewer and controller no.
        let new = json!({"items": [{"apiVersion": "berth/v1", "kind": "Config", "metadata": {"name": "c"}, "spec": {"stringData": {"k": "v"}}}]});
        assert_eq!(
            call(
                &w.app,
                "POST",
                paths::APPLY,
                t(Role::Operator),
                Some(new.clone())
            )
            .await
            .0,
            200
        );
        for role in [Role::Viewer, Role::Controller] {
            assert_eq!(
                call(&w.app, "POST", paths::APPLY, t(role), Some(new.clone()))
                    .await
                    .0,
                403,
                "{role}"
            );
        }
        // Status: controllers yes, operators no.
        let status = json!({"status": {"observedGeneration": 1}});
        let sp = api("/services/web/status");
        assert_eq!(
            call(
                &w.app,
                "PUT",
                &sp,
                t(Role::Controller),
                Some(status.clone())
            )
            .await
            .0,
            200
        );
        assert_eq!(
            call(&w.app, "PUT", &sp, t(Role::Operator), Some(status))
                .await
                .0,
            403
        );
        // Tokens and the audit trail: the admin only.
        for role in [
            Role::Operator,
            Role::Viewer,
            Role::Controller,
            Role::Deployer,
        ] {
            assert_eq!(
                call(&w.app, "GET", paths::TOKENS, t(role), None).await.0,
                403,
                "{role}"
            );
            assert_eq!(
                call(&w.app, "POST", paths::ADMIN_TOKEN_ROTATE, t(role), None)
                    .await
                    .0,
                403,
                "{role}"
            );
        }
    }

    /// The Node controller registers the nodes it finds (empty spec) and deregisters them; its
    /// token can do no other spec write.
    #[tokio::test]
    async fn a_controller_registers_and_deregisters_nodes_only() {
        let w = world().await;
        let c = Some(w.tokens[&Role::Controller].as_str());
        let node = |spec: Value| json!({"apiVersion": "berth/v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": spec});
        let (code, body) = call(
            &w.app,
            "POST",
            &api("/nodes"),
            c,
            Some(node(json!({"availability": "drain"}))),
        )
        .await;
        assert_eq!(code, 403, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("empty spec"),
            "{body}"
        );
        let (code, body) = call(&w.app, "POST", &api("/nodes"), c, Some(node(json!({})))).await;
        assert_eq!(code, 201, "{body}");
        for (method, path, body) in [
            ("PUT", api("/nodes/n1"), Some(node(json!({})))),
            ("DELETE", api("/services/web"), None),
            (
                "POST",
                paths::APPLY.to_string(),
                Some(json!({"items": [node(json!({}))]})),
            ),
        ] {
            let (code, resp) = call(&w.app, method, &path, c, body).await;
            assert_eq!(code, 403, "{method} {path}: {resp}");
            assert!(
                resp["message"]
                    .as_str()
                    .unwrap()
                    .contains("it needs role admin or operator"),
                "{resp}"
            );
        }
        assert_eq!(
            call(&w.app, "DELETE", &api("/nodes/n1"), c, None).await.0,
            200
        );
    }

    #[tokio::test]
    async fn a_deployer_changes_only_the_image_of_its_services() {
        let w = world().await;
        let d = Some(w.tokens[&Role::Deployer].as_str());
        let web = api("/services/web");
        let (code, body) = call(
            &w.app,
            "PATCH",
            &web,
            d,
            Some(json!({"spec": {"image": "a:2"}})),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["spec"]["image"], "a:2");
        let (code, body) = call(
            &w.app,
            "PATCH",
            &web,
            d,
            Some(json!({"spec": {"replicas": 9}})),
        )
        .await;
        assert_eq!(code, 403, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("touches more than spec.image"),
            "{body}"
        );
        let (code, _) = call(
            &w.app,
            "PATCH",
            &api("/services/other"),
            d,
            Some(json!({"spec": {"image": "a:2"}})),
        )
        .await;
        assert_eq!(code, 403);
        // Through apply: its own Service's image yes; anything else refused, nothing written.
        let svc = |name: &str, image: &str| {
            json!({"apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": name}, "spec": {"image": image}})
        };
        let (code, body) = call(
            &w.app,
            "POST",
            paths::APPLY,
            d,
            Some(json!({"items": [svc("web", "a:3")]})),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let (code, _) = call(
            &w.app,
            "POST",
            paths::APPLY,
            d,
            Some(json!({"items": [svc("web", "a:4"), svc("other", "a:4")]})),
        )
        .await;
        assert_eq!(code, 403);
        let mut scaled = svc("web", "a:4");
        scaled["spec"]["replicas"] = json!(3);
        let (code, _) = call(
            &w.app,
            "POST",
            paths::APPLY,
            d,
            Some(json!({"items": [scaled]})),
        )
        .await;
        assert_eq!(code, 403, "a deployer does not scale");
        let (_, now) = call(&w.app, "GET", &web, d, None).await;
        assert_eq!(
            now["spec"]["image"], "a:3",
            "a refused apply writes nothing"
        );
        for (method, path) in [
            ("DELETE", web.clone()),
            ("GET", api("/services")),
            // (Events it may read: those of its own Services; see dashboard_pages_follow_the_role.)
            ("GET", api("/services/other")),
        ] {
            assert_eq!(
                call(&w.app, method, &path, d, None).await.0,
                403,
                "{method} {path}"
            );
        }
        let (code, me) = call(&w.app, "GET", paths::WHOAMI, d, None).await;
        assert_eq!(
            (code, me["role"].clone(), me["services"].clone()),
            (200, json!("deployer"), json!(["web"]))
        );
    }

    #[tokio::test]
    async fn writes_secret_reads_and_refusals_are_audited_status_writes_are_not() {
        let w = world().await;
        let admin = Some(w.tokens[&Role::Admin].as_str());
        let patch = json!({"spec": {"image": "a:2"}});
        assert_eq!(
            call(&w.app, "PATCH", &api("/services/web"), admin, Some(patch))
                .await
                .0,
            200
        );
        assert_eq!(
            call(&w.app, "GET", &api("/secrets/pw/data"), admin, None)
                .await
                .0,
            200
        );
        assert_eq!(
            call(
                &w.app,
                "GET",
                &api("/secrets/pw/data"),
                Some(&w.tokens[&Role::Viewer]),
                None
            )
            .await
            .0,
            403
        );
        assert_eq!(
            call(
                &w.app,
                "GET",
                &api("/services"),
                Some("berth_nosuch_00"),
                None
            )
            .await
            .0,
            401
        );
        let status = json!({"status": {"observedGeneration": 2}});
        assert_eq!(
            call(
                &w.app,
                "PUT",
                &api("/services/web/status"),
                Some(&w.tokens[&Role::Controller]),
                Some(status)
            )
            .await
            .0,
            200
        );
        assert_eq!(
            call(&w.app, "GET", &api("/services"), admin, None).await.0,
            200
        );
        let (code, created) = call(
            &w.app,
            "POST",
            paths::TOKENS,
            admin,
            Some(json!({"role": "viewer"})),
        )
        .await;
        assert_eq!(code, 201);
        let hook = format!("{}/guessed-hook-token", paths::HOOKS);
        assert_eq!(
            call(&w.app, "POST", &hook, None, Some(json!({}))).await.0,
            404
        );
        let got: Vec<(String, Option<String>, Option<String>, u16)> = w
            .audit
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.action.clone(), e.kind.clone(), e.name.clone(), e.code))
            .collect();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            got,
            vec![
                ("patch".into(), s("Service"), s("web"), 200),
                ("read-secret-data".into(), s("Secret"), s("pw"), 200),
                ("read-secret-data".into(), s("Secret"), s("pw"), 403),
                ("read".into(), s("Service"), None, 401),
                (
                    "token-create".into(),
                    s("Token"),
                    created["id"].as_str().map(str::to_string),
                    201
                ),
                ("deploy-hook".into(), None, None, 404),
            ]
        );
        let log = w.audit.0.lock().unwrap();
        assert_eq!(
            (log[0].generation_before, log[0].generation_after),
            (Some(1), Some(2))
        );
        assert_eq!(
            (log[0].token_id.as_str(), log[0].role),
            ("admin", Some(Role::Admin))
        );
        assert_eq!((log[3].token_id.as_str(), log[3].role), ("anonymous", None));
        // No record carries a token or a secret value.
        let text = serde_json::to_string(&*log).unwrap();
        assert!(
            !text.contains(TEST_ADMIN) && !text.contains("\"v\""),
            "{text}"
        );
        assert!(!text.contains("guessed-hook-token"), "{text}");
    }

    #[test]
    fn exec_is_a_grant_of_its_own_never_a_viewers_or_a_controllers() {
        let p = |role: Role, exec: bool| Principal {
            token_id: "t".into(),
            role,
            services: vec![],
            exec,
        };
        assert!(exec_allowed(&p(Role::Admin, false)));
        for role in [Role::Operator, Role::Deployer] {
            assert!(!exec_allowed(&p(role, false)), "{role} without the grant");
            assert!(exec_allowed(&p(role, true)), "{role} with the grant");
        }
        for role in [Role::Viewer, Role::Controller] {
            assert!(
                !exec_allowed(&p(role, true)),
                "{role}, even with the flag set"
            );
        }
    }

    /// Exec through the router: refused (and recorded) without the grant, let through with it
    /// (to the handler, which then wants the HTTP upgrade this test does not make); a deployer's
    /// grant reaches only its own Services.
    #[tokio::test]
    async fn exec_needs_the_grant_and_every_attempt_is_recorded() {
        let w = world().await;
        let admin = Some(w.tokens[&Role::Admin].as_str());
        let mut granted = HashMap::new();
        for role in ["operator", "deployer"] {
            let (code, t) = call(
                &w.app,
                "POST",
                paths::TOKENS,
                admin,
                Some(json!({"role": role, "exec": true, "services": if role == "deployer" { json!(["web"]) } else { json!([]) }})),
            )
            .await;
            assert_eq!(code, 201, "{t}");
            assert_eq!(t["exec"], true);
            granted.insert(role, t["token"].as_str().unwrap().to_string());
        }
        let (code, t) = call(
            &w.app,
            "POST",
            paths::TOKENS,
            admin,
            Some(json!({"role": "viewer", "exec": true})),
        )
        .await;
        assert_eq!(code, 422, "a viewer is never given exec: {t}");
        w.audit.0.lock().unwrap().clear();
        let body = json!({"command": ["sh", "-c", "echo secret-arg"]});
        let exec = |name: &str| paths::exec(berth_api_types::Kind::Service, name);
        for (token, name, want) in [
            (w.tokens[&Role::Viewer].as_str(), "web", 403),
            (w.tokens[&Role::Operator].as_str(), "web", 403),
            (w.tokens[&Role::Deployer].as_str(), "web", 403),
            (w.tokens[&Role::Controller].as_str(), "web", 403),
            (granted["operator"].as_str(), "web", 426),
            (granted["deployer"].as_str(), "web", 426),
            (granted["deployer"].as_str(), "other", 403),
            (w.tokens[&Role::Admin].as_str(), "web", 426),
        ] {
            let (code, resp) =
                call(&w.app, "POST", &exec(name), Some(token), Some(body.clone())).await;
            assert_eq!(code, want, "{name}: {resp}");
            if want == 403 {
                assert!(
                    resp["message"]
                        .as_str()
                        .unwrap()
                        .contains("created with `--exec`"),
                    "{resp}"
                );
            }
        }
        let log = w.audit.0.lock().unwrap();
        assert_eq!(log.len(), 8, "every exec attempt is a record: {log:?}");
        assert!(log.iter().all(|e| e.action == "exec"), "{log:?}");
        let text = serde_json::to_string(&*log).unwrap();
        assert!(
            !text.contains("secret-arg"),
            "no argument is recorded: {text}"
        );
    }

    #[test]
    fn the_table_has_one_rule_per_route_and_unknown_methods_are_refused() {
        let mut seen = std::collections::HashSet::new();
        for r in RULES.iter() {
            assert!(
                seen.insert((r.method.clone(), r.path.clone())),
                "{} {} twice",
                r.method,
                r.path
            );
        }
        assert_eq!(
            lookup(&Method::HEAD, paths::API_ROOT),
            Lookup::Rule(Need::Token)
        );
        assert!(
            matches!(lookup(&Method::DELETE, paths::APPLY), Lookup::OtherMethods(m) if m == vec![Method::POST])
        );
        assert_eq!(
            lookup(&Method::GET, "/apis/berth/v1/new-thing"),
            Lookup::Missing
        );
    }
}
