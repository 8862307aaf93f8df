//! The web dashboard under `/ui/`: the environment at a glance (Services, Nodes, Ingress routes,
//! backups, events), a Service's page (spec, conditions, tasks, revisions with undo, logs, a
//! terminal), the backup evidence and the audit trail.
//!
//! It is served by the API server itself, behind the same access middleware, tokens and roles:
//! a page shows what the API would answer its token, and every action on a page is an ordinary
//! API request that the API authorizes and audits (the page only hides what the role may not
//! do). Pages are rendered on the server; one script adds the live updates, logs, undo and the
//! terminal. Every asset is built into the binary, and the Content-Security-Policy lets a page
//! load nothing from anywhere else.

pub mod pages;
pub mod session;

use crate::server::AppState;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use berth_api_types::names::paths;

/// The dashboard's routes (their access rules are in `access.rs`, with every other route's).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::UI, get(|| async { Redirect::to(paths::UI_HOME) }))
        .route(paths::UI_LOGIN, get(session::form).post(session::sign_in))
        .route(paths::UI_LOGOUT, post(session::sign_out))
        .route(&format!("{}/{{file}}", paths::UI_ASSETS), get(asset))
        .route(paths::UI_HOME, get(pages::overview))
        .route(&paths::ui_service("{name}"), get(pages::service))
        .route(
            &paths::ui_service_row("{name}"),
            get(pages::service_row_page),
        )
        .route(&paths::ui_section("{section}"), get(pages::section))
        .route(paths::UI_BACKUPS, get(pages::backups))
        .route(paths::UI_AUDIT, get(pages::audit))
        .layer(middleware::from_fn(security_headers))
}

/// The policy of every dashboard response: scripts, styles, images and connections from this
/// server only; no frames, no plugins, no forms posting elsewhere. The terminal's renderer adds
/// `<style>` elements at run time; they carry the page's nonce (set by `pages::layout`).
fn content_security_policy(nonce: &str) -> String {
    let styles = if nonce.is_empty() {
        String::new()
    } else {
        format!(" 'nonce-{nonce}'")
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'{styles}; \
         img-src 'self' data:; font-src 'self'; connect-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    )
}

/// A response's style nonce, handed from the page renderer to [`security_headers`].
#[derive(Clone)]
pub struct StyleNonce(pub String);

async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let nonce = resp
        .extensions()
        .get::<StyleNonce>()
        .map(|n| n.0.clone())
        .unwrap_or_default();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_security_policy(&nonce)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: with it a browser sends `Origin: null` on a form POST, and the sign-in
    // checks the Origin. Other sites still get no referrer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        // Pages show what a token may see: never kept for another.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Whether a request comes from a page of this server: its `Origin` names the host it was sent
/// to (the `Host` header, or over HTTP/2 the URI's authority). A request without `Origin` is not
/// a browser's cross-site request, but a browser always sends one with a POST and a WebSocket,
/// which is what this guards.
pub fn same_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    match (headers.get(header::ORIGIN).map(|v| v.to_str()), host) {
        (None, _) => true,
        (Some(Ok(origin)), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(scheme, rest)| matches!(scheme, "http" | "https") && rest == host),
        _ => false,
    }
}

/// The files the pages load, built into the binary.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript", include_bytes!("assets/app.js")),
    ("app.css", "text/css", include_bytes!("assets/app.css")),
    (
        "xterm.js",
        "text/javascript",
        include_bytes!("assets/vendor/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css",
        include_bytes!("assets/vendor/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript",
        include_bytes!("assets/vendor/addon-fit.js"),
    ),
];

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                // The same binary serves the same bytes: a browser may keep them for a while.
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_servers_pages_pass_the_origin_check() {
        let h = |origin: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, "berth.example:8443".parse().unwrap());
            if let Some(o) = origin {
                h.insert(header::ORIGIN, o.parse().unwrap());
            }
            h
        };
        let path: Uri = "/ui/login".parse().unwrap();
        assert!(same_origin(&h(Some("https://berth.example:8443")), &path));
        assert!(
            same_origin(&h(None), &path),
            "not a browser's cross-site request"
        );
        assert!(!same_origin(&h(Some("https://evil.example")), &path));
        assert!(!same_origin(
            &h(Some("https://berth.example:8443.evil")),
            &path
        ));
        assert!(!same_origin(&h(Some("null")), &path));
        // HTTP/2: no Host header, the authority is in the URI.
        let mut h2 = HeaderMap::new();
        h2.insert(
            header::ORIGIN,
            "https://berth.example:8443".parse().unwrap(),
        );
        let full: Uri = "https://berth.example:8443/ui/login".parse().unwrap();
        assert!(same_origin(&h2, &full));
        assert!(!same_origin(&h2, &path), "no host to compare with");
    }

    #[test]
    fn the_policy_allows_nothing_from_elsewhere() {
        let csp = content_security_policy("n0nce");
        assert!(csp.starts_with("default-src 'none'"));
        assert!(
            csp.contains("script-src 'self';"),
            "no inline scripts: {csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(!csp.contains("http"), "no other origin: {csp}");
    }
}
