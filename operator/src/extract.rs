//! Request extractors whose every rejection is the API's JSON error envelope (`ApiError`), not
//! axum's plain-text answer: a malformed query (`?dryRun=maybe`), path segment (bad
//! percent-encoding) or JSON body gets an answer a client can parse, naming what was wrong.
//! Handlers use these instead of axum's `Query`, `Path` and `Json` extractors.

use crate::server::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// The query string, deserialized; a bad parameter is a 400 naming it.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.inner().to_string();
                if path == "." {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("query string: {message}"),
                    )
                } else {
                    ApiError::field(&path, message)
                        .with_status(StatusCode::BAD_REQUEST, "BadRequest")
                }
            })
    }
}

/// Path parameters, deserialized; a segment that does not decode is a 400.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", r.body_text()))
    }
}

/// A path parameter that is a credential (a hook token): whatever is wrong with it, the answer
/// is the same 404 as for an unknown path, so it tells a caller nothing.
pub struct OpaquePath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for OpaquePath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(OpaquePath(p.0)),
            Err(_) => Err(crate::server::not_found().await),
        }
    }
}

/// A JSON request body; malformed JSON is a 400, the wrong shape a 422 naming the field.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|j| JsonBody(j.0))
            .map_err(|r: JsonRejection| {
                let status = r.status();
                let reason = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "RequestTooLarge",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
                    StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
                    _ => "BadRequest",
                };
                ApiError::new(status, reason, r.body_text())
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::hooks::HookState;
    use crate::server::AppState;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use berth_api_types::wire::ErrorBody;
    use berth_controllers::bus::{DeployQueue, EmbeddedBus};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tower::ServiceExt;

    /// The whole HTTP surface: the API, the backup routes and the hooks, as `berth up` serves it.
    async fn app() -> (axum::Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::from_bytes([4u8; 32], "test key");
        let store = Store::open(dir.path(), &key).await.unwrap();
        let bus: Arc<dyn DeployQueue> = Arc::new(EmbeddedBus::new());
        let api = AppState::for_tests(store.clone()).await;
        let hooks = HookState::new(store, bus, 100).unwrap();
        let app = crate::server::router(api.clone()).merge(crate::hooks::router(api, hooks));
        (app, dir)
    }

    /// Status, the JSON error body (the test fails if it is not one), and its content type.
    async fn call(
        app: &axum::Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (u16, ErrorBody) {
        let mut req = Request::builder().method(method).uri(uri).header(
            "authorization",
            format!("Bearer {}", crate::server::TEST_ADMIN),
        );
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(
            ct.as_deref(),
            Some("application/json"),
            "{method} {uri}: {status} {text}"
        );
        let err: ErrorBody = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {uri}: not the JSON envelope ({e}): {text}"));
        assert_eq!(err.code, status, "{text}");
        (status, err)
    }

    #[tokio::test]
    async fn bad_query_parameters_are_json_400s_naming_the_parameter() {
        let (app, _d) = app().await;
        let items = Some(r#"{"items": []}"#);
        for (method, uri, body, param) in [
            ("POST", "/apis/berth/v1/apply?dryRun=maybe", items, "dryRun"),
            (
                "POST",
                "/apis/berth/v1/services?dryRun=1",
                Some("{}"),
                "dryRun",
            ),
            (
                "PUT",
                "/apis/berth/v1/services/web?dryRun=",
                Some("{}"),
                "dryRun",
            ),
            (
                "PATCH",
                "/apis/berth/v1/services/web?dryRun=yes",
                Some("{}"),
                "dryRun",
            ),
            ("GET", "/apis/berth/v1/events?limit=-1", None, "limit"),
            (
                "GET",
                "/apis/berth/v1/events?limit=99999999999999999999999",
                None,
                "limit",
            ),
            ("GET", "/apis/berth/v1/events?watch=perhaps", None, "watch"),
        ] {
            let (status, err) = call(&app, method, uri, body).await;
            assert_eq!(
                (status, err.reason.as_str()),
                (400, "BadRequest"),
                "{uri}: {err:?}"
            );
            assert_eq!(
                err.details.first().map(|d| d.path.as_str()),
                Some(param),
                "{uri}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn bad_percent_encoding_in_a_path_is_a_json_400() {
        let (app, _d) = app().await;
        for (method, uri) in [
            ("GET", "/apis/berth/v1/services/%FF"),
            ("GET", "/apis/berth/v1/%C3%28"),
            ("DELETE", "/apis/berth/v1/secrets/%FFdb"),
            ("GET", "/apis/berth/v1/services/%FF/status"),
            ("GET", "/apis/berth/v1/secrets/%FF/data"),
            ("POST", "/apis/berth/v1/backups/%FF/run"),
            ("DELETE", "/apis/berth/v1/webhooks/%FF"),
            ("POST", "/apis/berth/v1/webhooks/%FF/rotate"),
        ] {
            let (status, err) = call(&app, method, uri, None).await;
            assert_eq!(
                (status, err.reason.as_str()),
                (400, "BadRequest"),
                "{method} {uri}: {err:?}"
            );
            assert!(err.message.contains("UTF-8"), "{uri}: {}", err.message);
        }
    }

    /// A hook token is a credential: a malformed one answers exactly what an unknown path does.
    #[tokio::test]
    async fn a_malformed_hook_token_is_the_generic_404() {
        let (app, _d) = app().await;
        let (_, unknown) = call(&app, "GET", "/no/such/path", None).await;
        for uri in ["/hooks/v1/%FF", "/hooks/v1/registry/%FF%FE"] {
            let (status, err) = call(&app, "POST", uri, Some("{}")).await;
            assert_eq!(status, 404, "{uri}");
            assert_eq!(
                (err.reason, err.message),
                (unknown.reason.clone(), unknown.message.clone())
            );
        }
    }

    #[tokio::test]
    async fn bad_json_bodies_are_json_errors() {
        let (app, _d) = app().await;
        let verify = "/apis/berth/v1/snapshots/verify";
        let (status, err) = call(&app, "POST", verify, Some("{not json")).await;
        assert_eq!(
            (status, err.reason.as_str()),
            (400, "BadRequest"),
            "{err:?}"
        );
        let (status, err) = call(&app, "POST", verify, Some(r#"{"all": "yes"}"#)).await;
        assert_eq!((status, err.reason.as_str()), (422, "Invalid"), "{err:?}");
        assert!(err.message.contains("all"), "{}", err.message);
        let (status, err) = call(&app, "POST", verify, None).await;
        assert_eq!(
            (status, err.reason.as_str()),
            (415, "UnsupportedMediaType"),
            "{err:?}"
        );
    }
}
