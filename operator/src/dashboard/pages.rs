//! The dashboard's pages, rendered on the server from the store (maud escapes every value).
//! A page shows what its token may read, as the API answers it; controls appear only for roles
//! the API would let through (the API checks again when they are used).

use super::StyleNonce;
use crate::access::exec_allowed;
use crate::server::{ApiError, AppState};
use crate::tokens::Principal;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use berth_api_types::access::Role;
use berth_api_types::backup::{SnapshotRecord, Verification};
use berth_api_types::meta::{condition, format_time};
use berth_api_types::names::{paths, session};
use berth_api_types::service::{Revision, RolloutResult};
use berth_api_types::{Condition, ConditionStatus, DynObject, Kind};
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

type PageResult = Result<Response, ApiError>;

/// The shared frame of every page: the session's CSRF token and the style nonce for the script,
/// the navigation the role may use, and who is signed in.
fn layout(title: &str, who: Option<(&Principal, &str)>, body: Markup) -> Response {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let csrf = who.map(|(_, token)| super::session::csrf_token(token));
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · berth" }
                @if let Some(csrf) = &csrf { meta name="berth-csrf" content=(csrf); }
                meta name="berth-style-nonce" content=(nonce);
                // No request for /favicon.ico (it would need a token).
                link rel="icon" href="data:,";
                link rel="stylesheet" href=(asset("app.css"));
                script src=(asset("app.js")) defer {}
            }
            // The paths and names the script uses, from their one definition (names.rs).
            body data-path-events=(paths::EVENTS) data-path-row=(paths::ui_service_row(""))
                data-path-section=(paths::ui_section("")) data-csrf-header=(session::CSRF_HEADER)
                data-csrf-param=(session::CSRF_PARAM) {
                header.top {
                    a.brand href=(paths::UI_HOME) { "berth" }
                    @if let Some((p, _)) = who {
                        nav {
                            a href=(paths::UI_HOME) { "Overview" }
                            @if p.role != Role::Deployer { a href=(paths::UI_BACKUPS) { "Backups" } }
                            @if p.role == Role::Admin { a href=(paths::UI_AUDIT) { "Audit" } }
                        }
                        form.who method="post" action=(format!("{}?{}={}", paths::UI_LOGOUT, session::CSRF_PARAM, csrf.as_deref().unwrap_or(""))) {
                            span #whoami { (p.token_id) " (" (p.role.as_str()) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    let mut resp = (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response();
    resp.extensions_mut().insert(StyleNonce(nonce));
    resp
}

fn asset(file: &str) -> String {
    format!("{}/{file}", paths::UI_ASSETS)
}

/// The sign-in form, with why the last attempt failed.
pub fn sign_in(error: Option<&str>, code: StatusCode) -> Response {
    let body = html! {
        section.signin {
            h1 { "Sign in" }
            p { "Paste a berth token (" code { "berth token create" } "). The browser keeps it in a cookie that page scripts cannot read; it ends with the browser session." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action=(paths::UI_LOGIN) {
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        }
    };
    let mut resp = layout("Sign in", None, body);
    *resp.status_mut() = code;
    resp
}

/// The token of the request's session (for its CSRF token), from the cookie or bearer header.
fn token_of(headers: &axum::http::HeaderMap) -> String {
    super::session::cookie_token(headers).unwrap_or_default()
}

/// The Services `p` may read: every one, or a deployer's own.
fn visible_services(state: &AppState, p: &Principal) -> Result<Vec<DynObject>, ApiError> {
    let mut all = state.store.list(Kind::Service)?;
    if p.role == Role::Deployer {
        all.retain(|o| p.services.contains(&o.metadata.name));
    }
    Ok(all)
}

fn conditions(o: &DynObject) -> Vec<Condition> {
    crate::output::status_conditions(o)
}

/// A Service's state in one word, as `berth get services` shows it.
pub fn service_state(o: &DynObject) -> String {
    let conds = conditions(o);
    let is_true = |t: &str| condition(&conds, t).is_some_and(|c| c.status == ConditionStatus::True);
    if is_true("Ready") {
        "Ready".into()
    } else if is_true("Degraded") {
        "Degraded".into()
    } else if let Some(c) = condition(&conds, "Ready") {
        c.reason.clone()
    } else {
        "Pending".into()
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "Ready" | "ready" | "True" => "ok",
        "Degraded" | "down" | "False" | "disconnected" => "bad",
        _ => "wait",
    }
}

/// The revision history, empty when absent or malformed: a page shows what it can read rather
/// than failing on one object.
fn revisions(o: &DynObject) -> Vec<Revision> {
    o.status
        .get("revisions")
        .cloned()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default()
}

fn ago(t: &DateTime<Utc>) -> String {
    crate::output::age_since(*t)
}

fn time_cell(t: &DateTime<Utc>) -> Markup {
    html! { time datetime=(format_time(t)) title=(format_time(t)) { (ago(t)) " ago" } }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// One row of the Services table (also served alone, for live updates).
fn service_row(o: &DynObject) -> Markup {
    let name = &o.metadata.name;
    let state = service_state(o);
    let st = &o.status;
    let replicas = match (st.get("runningReplicas"), st.get("desiredReplicas")) {
        (Some(r), Some(d)) => format!("{r}/{d}"),
        _ => "-".into(),
    };
    let last = revisions(o).pop();
    html! {
        tr id=(format!("svc-{name}")) data-name=(name) data-state=(state) {
            td { a href=(paths::ui_service(name)) { (name) } }
            td.replicas { (replicas) }
            td { span class=(format!("badge {}", state_class(&state))) { (state) } }
            td.image { (str_at(&o.spec, "/image")) }
            td {
                @if let Some(r) = &last {
                    "r" (r.revision) " " (r.result.to_string()) " · " (time_cell(&r.time))
                } @else { "-" }
            }
        }
    }
}

/// Services on one page of the overview: a person reads the ones that need attention first, and
/// a browser lays out a hundred rows in a few milliseconds where a thousand take hundreds.
pub const PAGE_SIZE: usize = 100;

/// Which Services the overview lists: a page of them, optionally filtered by name or image.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ServicesQuery {
    #[serde(default)]
    page: Option<usize>,
    /// A part of the name or image.
    #[serde(default)]
    q: Option<String>,
}

/// Not Ready first (Degraded, then rolling out or waiting), then by name.
fn attention(state: &str) -> u8 {
    match state {
        "Ready" => 2,
        "Degraded" => 0,
        _ => 1,
    }
}

/// Counts by state, over every Service the token may read.
fn services_summary(services: &[DynObject]) -> Markup {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for o in services {
        *counts.entry(service_state(o)).or_default() += 1;
    }
    html! {
        p #services-summary data-section="summary" {
            (services.len()) " Services"
            @for (state, n) in &counts {
                " · " span class=(format!("badge {}", state_class(state))) { (n) " " (state) }
            }
        }
    }
}

fn services_table(all: &[DynObject], q: &ServicesQuery) -> Markup {
    let filter = q.q.as_deref().map(str::trim).filter(|f| !f.is_empty());
    // Each state worked out once: the sort compares them n log n times.
    let mut shown: Vec<(u8, &DynObject)> = all
        .iter()
        .filter(|o| {
            filter.is_none_or(|f| {
                o.metadata.name.contains(f) || str_at(&o.spec, "/image").contains(f)
            })
        })
        .map(|o| (attention(&service_state(o)), o))
        .collect();
    shown.sort_by(|a, b| (a.0, &a.1.metadata.name).cmp(&(b.0, &b.1.metadata.name)));
    let pages = shown.len().div_ceil(PAGE_SIZE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let rows =
        &shown[((page - 1) * PAGE_SIZE).min(shown.len())..(page * PAGE_SIZE).min(shown.len())];
    let link = |n: usize| {
        let mut qs = form_urlencoded::Serializer::new(String::new());
        qs.append_pair("page", &n.to_string());
        if let Some(f) = filter {
            qs.append_pair("q", f);
        }
        format!("{}?{}", paths::UI_HOME, qs.finish())
    };
    html! {
        section #services data-page=(page) data-filtered=(filter.is_some()) data-page-size=(PAGE_SIZE) {
            div.heading {
                h2 { "Services" }
                (services_summary(all))
                form.filter method="get" action=(paths::UI_HOME) {
                    input type="search" name="q" placeholder="name or image" value=(filter.unwrap_or(""));
                    button type="submit" { "Filter" }
                }
            }
            table {
                thead { tr { th { "Name" } th { "Replicas" } th { "State" } th { "Image" } th { "Last rollout" } } }
                tbody #services-body {
                    @for (_, o) in rows { (service_row(o)) }
                }
            }
            @if pages > 1 {
                nav.pages {
                    @if page > 1 { a #prev-page href=(link(page - 1)) { "‹ previous" } }
                    span { "page " (page) " of " (pages) " (" (shown.len()) " Services, not Ready first)" }
                    @if page < pages { a #next-page href=(link(page + 1)) { "next ›" } }
                }
            }
        }
    }
}

fn nodes_section(state: &AppState) -> Result<Markup, ApiError> {
    let nodes = state.store.list(Kind::Node)?;
    Ok(html! {
        section #nodes data-section="nodes" {
            h2 { "Nodes " span.count { (nodes.len()) } }
            table {
                thead { tr { th { "Name" } th { "State" } th { "Role" } th { "Availability" } th { "Tasks" } } }
                tbody {
                    @for n in &nodes {
                        @let st = &n.status;
                        @let node_state = str_at(st, "/state");
                        tr {
                            td { (n.metadata.name) }
                            td { span class=(format!("badge {}", state_class(node_state))) { (if node_state.is_empty() { "unknown" } else { node_state }) } }
                            td { (str_at(st, "/role")) @if st.get("leader").and_then(Value::as_bool) == Some(true) { " (leader)" } }
                            td { (str_at(st, "/availability")) }
                            td { (st.get("tasks").and_then(Value::as_u64).unwrap_or(0)) }
                        }
                    }
                }
            }
        }
    })
}

fn ingresses_section(state: &AppState) -> Result<Markup, ApiError> {
    let ingresses = state.store.list(Kind::Ingress)?;
    Ok(html! {
        section #ingresses data-section="ingresses" {
            h2 { "Ingress routes" }
            table {
                thead { tr { th { "Host" } th { "Service" } th { "Certificate" } th { "State" } } }
                tbody {
                    @for i in &ingresses {
                        @let ready = if conditions(i).iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True) { "Ready" } else { "Pending" };
                        @let tls = certificate(i);
                        @for rule in i.spec.get("rules").and_then(Value::as_array).into_iter().flatten() {
                            @for path in rule.get("paths").and_then(Value::as_array).into_iter().flatten() {
                                tr {
                                    td { "https://" (str_at(rule, "/host")) (str_at(path, "/path")) }
                                    td { (str_at(path, "/service")) ":" (path.get("port").and_then(Value::as_u64).unwrap_or(0)) }
                                    td { (tls) }
                                    td { span class=(format!("badge {}", state_class(ready))) { (ready) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Where an Ingress's certificate comes from and when it expires (red within 14 days).
fn certificate(i: &DynObject) -> Markup {
    let not_after = i
        .status
        .get("certificateNotAfter")
        .and_then(|v| serde_json::from_value::<DateTime<Utc>>(v.clone()).ok());
    let source = match str_at(&i.spec, "/tls/secretRef") {
        "" => "internal CA".to_string(),
        s => format!("Secret {s}"),
    };
    html! {
        (source)
        @if let Some(t) = not_after {
            @let days = (t - Utc::now()).num_days();
            " · " span class=(if days < 14 { "error" } else { "" }) title=(format_time(&t)) {
                @if days < 0 { "expired " (format_time(&t)) } @else { "expires in " (days) " days" }
            }
        }
    }
}

fn verification_cell(v: Option<&Verification>) -> Markup {
    html! {
        @match v {
            Some(v) => span class=(format!("badge {}", if v.ok { "ok" } else { "bad" })) title=(v.problems.join("; ")) {
                (if v.ok { "verified" } else { "FAILED" }) " · " (time_cell(&v.time))
            },
            None => span.muted { "not verified" },
        }
    }
}

fn backups_section(state: &AppState) -> Result<Markup, ApiError> {
    let plans = state.store.list(Kind::Backup)?;
    // The records are the evidence: a run by hand shows at once, before the plan's next status.
    let records = |plan: &str| {
        state
            .backups
            .as_ref()
            .map(|b| b.snapshots(Some(plan)))
            .unwrap_or_default()
    };
    Ok(html! {
        section #backup-plans data-section="backups" {
            h2 { "Backups" }
            table {
                thead { tr { th { "Plan" } th { "Last backup" } th { "Next backup" } th { "Last verification" } th { "Snapshots" } } }
                tbody {
                    @for b in &plans {
                        @let st: berth_api_types::backup::BackupStatus = serde_json::from_value(b.status.clone()).unwrap_or_default();
                        @let recs = records(&b.metadata.name);
                        @let verified = recs.iter().filter_map(|r| r.verification.as_ref()).chain(st.last_verification.as_ref()).max_by_key(|v| v.time);
                        tr {
                            td { (b.metadata.name) }
                            td {
                                @if let Some(r) = recs.last() {
                                    span class=(format!("badge {}", if r.ok { "ok" } else { "bad" })) title=(r.error) { (if r.ok { "ok" } else { "failed" }) }
                                    " " (time_cell(&r.time))
                                } @else if let Some(r) = &st.last_run {
                                    span class=(format!("badge {}", if r.ok { "ok" } else { "bad" })) title=(r.message) { (if r.ok { "ok" } else { "failed" }) }
                                    " " (time_cell(&r.finished))
                                } @else {
                                    span.muted { "none yet" }
                                }
                            }
                            td { @match &st.next_run { Some(t) => (format_time(t)), None => "-" } }
                            td { (verification_cell(verified)) }
                            td { (recs.len().max(st.snapshots as usize)) }
                        }
                    }
                }
            }
        }
    })
}

fn events_section(state: &AppState) -> Result<Markup, ApiError> {
    let mut events = state.store.recent_events(None, None, 20)?;
    events.reverse();
    Ok(html! {
        section #events data-section="events" {
            h2 { "Recent events" }
            ol.events {
                @for e in &events {
                    li { (time_cell(&e.time)) " " strong { (e.kind.to_string()) "/" (e.name) } " " (event_word(e.type_)) @if !e.message.is_empty() { ": " (e.message) } }
                }
            }
        }
    })
}

fn event_word(t: berth_api_types::EventType) -> &'static str {
    use berth_api_types::EventType::*;
    match t {
        Applied => "applied",
        Deleted => "deleted",
        StatusChanged => "status",
    }
}

/// `GET /ui/`
pub async fn overview(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    crate::extract::Query(q): crate::extract::Query<ServicesQuery>,
    headers: axum::http::HeaderMap,
) -> PageResult {
    let services = visible_services(&state, &p)?;
    let everything = p.role != Role::Deployer;
    let body = html! {
        div.overview data-live="overview" {
            (services_table(&services, &q))
            @if everything {
                div.grid {
                    (nodes_section(&state)?)
                    (ingresses_section(&state)?)
                    (backups_section(&state)?)
                    (events_section(&state)?)
                }
            }
        }
    };
    Ok(layout("Overview", Some((&p, &token_of(&headers))), body))
}

/// `GET /ui/rows/services/{name}`: the row, or 404 once the Service is gone.
pub async fn service_row_fragment(state: &AppState, name: &str) -> PageResult {
    match state.store.get(Kind::Service, name)? {
        Some(o) => Ok(html_fragment(service_row(&o))),
        None => Err(not_found(name)),
    }
}

pub async fn service_row_page(
    State(state): State<AppState>,
    crate::extract::Path(name): crate::extract::Path<String>,
) -> PageResult {
    service_row_fragment(&state, &name).await
}

/// The overview sections about a deployer's own Services (the others are the cluster's).
pub const DEPLOYER_SECTIONS: [&str; 2] = ["services", "summary"];

/// `GET /ui/sections/{section}`
pub async fn section(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    crate::extract::Path(section): crate::extract::Path<String>,
    crate::extract::Query(q): crate::extract::Query<ServicesQuery>,
) -> PageResult {
    if p.role == Role::Deployer && !DEPLOYER_SECTIONS.contains(&section.as_str()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "a deployer token sees its own Services only",
        ));
    }
    let m = match section.as_str() {
        "summary" => services_summary(&visible_services(&state, &p)?),
        // The page's table again (same page and filter), after the event stream was down.
        "services" => services_table(&visible_services(&state, &p)?, &q),
        "nodes" => nodes_section(&state)?,
        "ingresses" => ingresses_section(&state)?,
        "backups" => backups_section(&state)?,
        "events" => events_section(&state)?,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "no section `{other}` (services, summary, nodes, ingresses, backups, events)"
                ),
            ))
        }
    };
    Ok(html_fragment(m))
}

fn html_fragment(m: Markup) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("no Service `{name}`"),
    )
}

/// Whether the role may change a Service's spec the way undo does (a deployer changes only the
/// image, and an undo also marks the deploy's source).
fn may_undo(p: &Principal) -> bool {
    matches!(p.role, Role::Admin | Role::Operator)
}

/// `GET /ui/services/{name}`
pub async fn service(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    crate::extract::Path(name): crate::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> PageResult {
    let o = state
        .store
        .get(Kind::Service, &name)?
        .ok_or_else(|| not_found(&name))?;
    let state_word = service_state(&o);
    let conds = conditions(&o);
    let revs = revisions(&o);
    let latest = revs.last().map(|r| r.revision);
    let api = paths::object(Kind::Service, &name);
    let spec_yaml = crate::output::to_yaml(&o.spec);
    let body = html! {
        div.service data-service=(name) data-api=(api) data-exec=(paths::exec_ws(Kind::Service, &name)) {
            h1 { (name) " " span #state class=(format!("badge {}", state_class(&state_word))) { (state_word) } }
            p.image { "image " code { (str_at(&o.spec, "/image")) } " · generation " (o.metadata.generation) }
            section #conditions {
                h2 { "Conditions" }
                table {
                    thead { tr { th { "Type" } th { "Status" } th { "Reason" } th { "Message" } th { "Since" } } }
                    tbody {
                        @for c in &conds {
                            tr {
                                td { (c.type_) }
                                td { (format!("{:?}", c.status)) }
                                td { (c.reason) }
                                td.message { (c.message) }
                                td { (time_cell(&c.last_transition_time)) }
                            }
                        }
                    }
                }
            }
            section #tasks {
                h2 { "Tasks" }
                table { thead { tr { th { "Task" } th { "Node" } th { "Desired" } th { "State" } th { "Since" } th { "Image" } th { "Error" } } } tbody #tasks-body {} }
            }
            section #revisions {
                h2 { "Revisions" }
                table {
                    thead { tr { th { "Revision" } th { "Image" } th { "Result" } th { "Trigger" } th { "When" } th {} } }
                    tbody {
                        @for r in revs.iter().rev() {
                            tr data-revision=(r.revision) {
                                td { (r.revision) }
                                td.image { (r.image) }
                                td { span class=(format!("badge {}", match r.result { RolloutResult::Complete => "ok", RolloutResult::Progressing | RolloutResult::Paused | RolloutResult::Superseded => "wait", _ => "bad" })) title=(r.message.as_deref().unwrap_or("")) { (r.result.to_string()) } }
                                td { (r.trigger) }
                                td { (time_cell(&r.time)) }
                                td {
                                    @if may_undo(&p) && Some(r.revision) != latest && r.result != RolloutResult::FailedPredeploy {
                                        button.undo type="button" data-revision=(r.revision)
                                            data-patch=(crate::rollout_cli::deploy_patch(&o, "rollback", serde_json::json!({ "image": crate::rollout_cli::pinned(r) })).to_string()) {
                                            "Roll back to r" (r.revision)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                p #undo-result role="status" {}
            }
            section #logs-section {
                h2 { "Logs" }
                div.controls {
                    label { input #follow type="checkbox" checked; " follow" }
                }
                pre #logs {}
            }
            @if exec_allowed(&p) {
                link rel="stylesheet" href=(asset("xterm.css"));
                script src=(asset("xterm.js")) {}
                script src=(asset("addon-fit.js")) {}
                section #terminal-section {
                    h2 { "Terminal" }
                    form #terminal-form {
                        label for="terminal-command" { "Command" }
                        input #terminal-command type="text" value="sh";
                        label for="terminal-task" { "Task" }
                        input #terminal-task type="text" placeholder="slot or id (any running)";
                        button type="submit" { "Open" }
                    }
                    div #terminal {}
                }
            }
            section #spec {
                h2 { "Spec" }
                pre { (spec_yaml) }
            }
        }
    };
    Ok(layout(&name, Some((&p, &token_of(&headers))), body))
}

fn snapshot_row(s: &SnapshotRecord) -> Markup {
    let bytes: u64 = s.volumes.iter().map(|v| v.bytes).sum();
    html! {
        tr data-snapshot=(s.id) {
            td { code { (s.id) } }
            td { (s.plan) }
            td { (time_cell(&s.time)) }
            td { span class=(format!("badge {}", if s.ok { "ok" } else { "bad" })) title=(s.error) { (if s.ok { "ok" } else { "failed" }) } }
            td { (s.objects.values().sum::<u64>()) }
            td { (s.volumes.len()) " (" (bytes) " bytes)" }
            td { (verification_cell(s.verification.as_ref())) }
        }
    }
}

/// `GET /ui/backups`
pub async fn backups(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    headers: axum::http::HeaderMap,
) -> PageResult {
    let mut snapshots = state
        .backups
        .as_ref()
        .map(|b| b.snapshots(None))
        .unwrap_or_default();
    snapshots.reverse();
    let body = html! {
        h1 { "Backups" }
        (backups_section(&state)?)
        section #snapshots {
            h2 { "Snapshots " span.count { (snapshots.len()) } }
            p.downloads {
                "Evidence export: "
                a #evidence-csv href=(format!("{}?format=csv", paths::SNAPSHOTS)) download="berth-backup-evidence.csv" { "CSV" }
                " · "
                a #evidence-json href=(format!("{}?format=json", paths::SNAPSHOTS)) download="berth-backup-evidence.json" { "JSON" }
            }
            @if state.backups.is_none() { p.error { "this API server runs no backups (it has no engine connection)" } }
            table {
                thead { tr { th { "Snapshot" } th { "Plan" } th { "Taken" } th { "Result" } th { "Objects" } th { "Volumes" } th { "Verification" } } }
                tbody { @for s in &snapshots { (snapshot_row(s)) } }
            }
        }
    };
    Ok(layout("Backups", Some((&p, &token_of(&headers))), body))
}

/// How many of the newest audit records the page shows.
const AUDIT_PAGE: usize = 500;

/// `GET /ui/audit`
pub async fn audit(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    headers: axum::http::HeaderMap,
) -> PageResult {
    let log = state.audit_log.clone();
    let (records, verdict) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((log.list(None)?, log.verify()?))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))??;
    let shown: Vec<_> = records.iter().rev().take(AUDIT_PAGE).collect();
    let body = html! {
        h1 { "Audit trail" }
        section #audit-verify {
            @if verdict.ok {
                p { span.badge.ok { "chain intact" } " " (verdict.records) " records, each hashed with the one before" }
            } @else {
                p.error role="alert" { span.badge.bad { "chain BROKEN" } " at record " (verdict.first_broken.unwrap_or(0)) ": " (verdict.problem.as_deref().unwrap_or("")) }
            }
        }
        p.muted { "The newest " (shown.len()) " of " (records.len()) " records; all of them: " code { "berth audit" } }
        table #audit {
            thead { tr { th { "#" } th { "Time" } th { "Token" } th { "Source" } th { "Action" } th { "Object" } th { "Result" } } }
            tbody {
                @for r in &shown {
                    tr {
                        td { (r.seq) }
                        td { (r.time) }
                        td { (r.entry.token_id) @if let Some(role) = r.entry.role { " (" (role.as_str()) ")" } }
                        td { (r.entry.source.as_deref().unwrap_or("")) }
                        td { (r.entry.action) @if let Some(prog) = &r.entry.program { " " code { (prog) } } }
                        td { (r.entry.kind.as_deref().unwrap_or("")) @if let Some(n) = &r.entry.name { "/" (n) } }
                        td { (r.entry.code) " " (r.entry.outcome) }
                    }
                }
            }
        }
    };
    Ok(layout("Audit", Some((&p, &token_of(&headers))), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, status: Value) -> DynObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth/v1", "kind": "Service",
            "metadata": {"name": name, "generation": 2},
            "spec": {"image": "<img>:1"},
            "status": status,
        }))
        .unwrap()
    }

    fn ready(ok: bool) -> Value {
        serde_json::json!({"conditions": [{"type": "Ready", "status": if ok { "True" } else { "False" },
            "reason": if ok { "AllTasksRunning" } else { "TaskFailed" }, "message": "",
            "lastTransitionTime": "2026-11-30T00:00:00Z"}]})
    }

    #[test]
    fn the_overview_pages_services_not_ready_first_and_filters_them() {
        let all: Vec<DynObject> = (0..250)
            .map(|i| svc(&format!("s{i:03}"), ready(i != 200)))
            .collect();
        let page = |q: ServicesQuery| services_table(&all, &q).into_string();
        let first = page(ServicesQuery::default());
        assert_eq!(first.matches("<tr id=\"svc-").count(), PAGE_SIZE);
        let first_row = first.find("<tr id=\"svc-").unwrap();
        assert!(
            first[first_row..].starts_with("<tr id=\"svc-s200\""),
            "the failing one leads"
        );
        assert!(first.contains("page 1 of 3"));
        assert!(first.contains("250 Services"));
        let last = page(ServicesQuery {
            page: Some(9),
            q: None,
        });
        assert!(
            last.contains("page 3 of 3"),
            "a page past the end is the last"
        );
        assert_eq!(last.matches("<tr id=\"svc-").count(), 50);
        let found = page(ServicesQuery {
            page: None,
            q: Some("s12".into()),
        });
        assert_eq!(found.matches("<tr id=\"svc-").count(), 10, "s120..s129");
        assert!(!found.contains("page 1 of"), "one page needs no pager");
    }

    #[test]
    fn a_row_escapes_what_users_wrote_and_states_readiness() {
        let o = svc(
            "web",
            serde_json::json!({
                "runningReplicas": 1, "desiredReplicas": 2,
                "conditions": [{"type": "Ready", "status": "False", "reason": "Progressing", "message": "", "lastTransitionTime": "2026-11-30T00:00:00Z"},
                               {"type": "Degraded", "status": "True", "reason": "TaskFailed", "message": "", "lastTransitionTime": "2026-11-30T00:00:00Z"}]
            }),
        );
        let html = service_row(&o).into_string();
        assert!(html.contains("&lt;img&gt;:1"), "{html}");
        assert!(!html.contains("<img>"), "{html}");
        assert!(html.contains(">1/2<"), "{html}");
        assert!(html.contains("badge bad\">Degraded"), "{html}");
        assert_eq!(service_state(&svc("x", serde_json::json!({}))), "Pending");
    }
}
