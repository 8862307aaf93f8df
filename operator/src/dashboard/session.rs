//! Signing in to the dashboard: a person pastes a berth token once; the browser keeps it in an
//! HttpOnly, Secure, SameSite=Strict cookie, and the access middleware takes it from there as it
//! takes a bearer header, with the same roles and audit.
//!
//! The CSRF token of a session is an HMAC of the session's token: the server recomputes it on
//! every write without keeping state (any API server of the installation can check it), a page
//! gets it in a `<meta>` tag, and another site can neither read it nor derive it.

use crate::server::AppState;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use berth_api_types::access::AuditEntry;
use berth_api_types::names::{paths, session};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::SocketAddr;
use subtle::ConstantTimeEq;

/// What the HMAC of a session's token is taken over: a CSRF token is good for nothing else.
const CSRF_CONTEXT: &[u8] = b"berth dashboard csrf v1";

/// The CSRF token of the session whose cookie holds `token`.
pub fn csrf_token(token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(CSRF_CONTEXT);
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// The token in the request's session cookie, if it has one.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether a request carries the CSRF token of the session `token`: in the header, or (for a
/// WebSocket, which cannot set one) in the query.
pub fn csrf_ok(token: &str, headers: &HeaderMap, uri: &Uri) -> bool {
    let given = headers
        .get(session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .find(|(k, _)| k == session::CSRF_PARAM)
                .map(|(_, v)| v.into_owned())
        });
    let Some(given) = given else {
        return false;
    };
    bool::from(given.as_bytes().ct_eq(csrf_token(token).as_bytes()))
}

/// A page asked for without a valid session goes to the sign-in form.
pub fn to_sign_in() -> Response {
    let mut resp = Redirect::to(paths::UI_LOGIN).into_response();
    // A cookie that no longer authenticates (revoked, expired) goes too.
    resp.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    resp
}

fn session_cookie(token: &str) -> HeaderValue {
    // No Max-Age: the session ends with the browser; the token's own expiry still applies.
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; HttpOnly; Secure; SameSite=Strict",
        session::COOKIE
    ))
    .expect("a token is a header-safe string")
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        session::COOKIE
    ))
    .expect("static")
}

/// `GET /ui/login`
pub async fn form() -> Response {
    super::pages::sign_in(None, StatusCode::OK)
}

#[derive(serde::Deserialize)]
pub struct SignIn {
    token: String,
}

/// `POST /ui/login`: checks the token, then sets the session cookie. Every attempt is audited, as
/// a request with that token would be.
pub async fn sign_in(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    uri: Uri,
    headers: HeaderMap,
    axum::Form(form): axum::Form<SignIn>,
) -> Response {
    // A sign-in form posted from another site would sign the browser in to the attacker's
    // token (login CSRF); browsers always send Origin with a POST.
    if !super::same_origin(&headers, &uri) {
        return super::pages::sign_in(
            Some("sign in from this server's own page"),
            StatusCode::FORBIDDEN,
        );
    }
    let token = form.token.trim();
    let result = state.tokens.authenticate(token);
    let (principal, code, outcome) = match &result {
        Ok(p) => (Some(p), StatusCode::SEE_OTHER, "SignedIn".to_string()),
        Err(_) => (None, StatusCode::UNAUTHORIZED, "Unauthorized".to_string()),
    };
    state
        .audit
        .record(AuditEntry {
            token_id: principal
                .map(|p| p.token_id.clone())
                .unwrap_or_else(|| "anonymous".into()),
            role: principal.map(|p| p.role),
            source: extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string()),
            action: "sign-in".into(),
            kind: None,
            name: None,
            generation_before: None,
            generation_after: None,
            task: None,
            program: None,
            code: code.as_u16(),
            outcome,
        })
        .await;
    match result {
        Ok(_) => {
            let mut resp = Redirect::to(paths::UI_HOME).into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, session_cookie(token));
            resp
        }
        // The reason (revoked, expired, unknown) names no secret.
        Err(e) => super::pages::sign_in(Some(&e.to_string()), StatusCode::UNAUTHORIZED),
    }
}

/// `POST /ui/logout`
pub async fn sign_out() -> Response {
    let mut resp = Redirect::to(paths::UI_LOGIN).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csrf_token_is_bound_to_the_session_and_checked_from_header_or_query() {
        let a = csrf_token("berth_a_1");
        assert_ne!(a, csrf_token("berth_a_2"));
        assert_eq!(a.len(), 32);
        let mut h = HeaderMap::new();
        let uri: Uri = "/x".parse().unwrap();
        assert!(!csrf_ok("berth_a_1", &h, &uri), "no token, no write");
        h.insert(session::CSRF_HEADER, a.parse().unwrap());
        assert!(csrf_ok("berth_a_1", &h, &uri));
        assert!(!csrf_ok("berth_a_2", &h, &uri), "another session's token");
        let q: Uri = format!("/x?request=%7B%7D&csrf={a}").parse().unwrap();
        assert!(csrf_ok("berth_a_1", &HeaderMap::new(), &q));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=b; berth_session=berth_x_y ; c=d".parse().unwrap(),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("berth_x_y"));
        let mut empty = HeaderMap::new();
        empty.append(header::COOKIE, "berth_session=".parse().unwrap());
        assert_eq!(cookie_token(&empty), None);
        let c = session_cookie("berth_x_y");
        let c = c.to_str().unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c}");
        }
    }
}
