//! The API's audit routes (paths in `api_types::names::paths`): the trail, oldest first, and the
//! chain recomputed. The access table keeps them for admins: the trail names every token,
//! source address and object touched.

use crate::audit::parse_since;
use crate::server::{ApiError, AppState};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use berth_api_types::access::{AuditRecord, AuditVerification};
use berth_api_types::names::paths;
use berth_api_types::wire::List;
use serde::Deserialize;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::AUDIT, get(list))
        .route(paths::AUDIT_VERIFY, get(verify))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// RFC 3339, or a duration back from now (`1h`).
    since: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<AuditRecord>>> {
    let since = q
        .since
        .as_deref()
        .map(|s| parse_since(s, chrono::Utc::now()))
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", format!("since: {e}")))?;
    let log = state.audit_log.clone();
    // A full scan of the log: off the async threads.
    let items = tokio::task::spawn_blocking(move || log.list(since))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "StorageError",
                format!("audit list task failed: {e}"),
            )
        })??;
    Ok(Json(List { items }))
}

/// 200 with the verdict either way: a broken chain is a finding to report, not a failed request.
async fn verify(State(state): State<AppState>) -> ApiResult<Json<AuditVerification>> {
    let log = state.audit_log.clone();
    let v = tokio::task::spawn_blocking(move || log.verify())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "StorageError",
                format!("audit verify task failed: {e}"),
            )
        })??;
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use berth_api_types::access::AuditEntry;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::ServiceExt;

    async fn get(app: &axum::Router, uri: &str) -> (u16, Value) {
        let req = Request::builder()
            .uri(uri)
            .header(
                "authorization",
                format!("Bearer {}", crate::server::TEST_ADMIN),
            )
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn the_trail_and_its_verification_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &crate::store::testing::test_key())
            .await
            .unwrap();
        let state = AppState::for_tests(store).await;
        let log = state.audit_log.clone();
        let app = crate::server::router(state);
        for outcome in ["ok", "Forbidden"] {
            log.append(AuditEntry {
                token_id: "ci".into(),
                action: "delete".into(),
                outcome: outcome.into(),
                code: if outcome == "ok" { 200 } else { 403 },
                ..AuditEntry::default()
            })
            .await
            .unwrap();
        }
        let (code, body) = get(&app, paths::AUDIT).await;
        assert_eq!(code, 200, "{body}");
        let items: Vec<AuditRecord> = serde_json::from_value(body["items"].clone()).unwrap();
        assert_eq!(items.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(items[1].entry.outcome, "Forbidden");

        let (code, body) = get(&app, &format!("{}?since=1h", paths::AUDIT)).await;
        assert_eq!(
            (code, body["items"].as_array().map(Vec::len)),
            (200, Some(2))
        );
        // `+` percent-encoded, as the CLI sends an offset.
        let (code, body) = get(
            &app,
            &format!("{}?since=2999-01-01T00:00:00%2B01:00", paths::AUDIT),
        )
        .await;
        assert_eq!(
            (code, body["items"].as_array().map(Vec::len)),
            (200, Some(0))
        );
        let (code, body) = get(&app, &format!("{}?since=last-week", paths::AUDIT)).await;
        assert_eq!(code, 400, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("since: `last-week` is neither"),
            "{body}"
        );

        let (code, body) = get(&app, paths::AUDIT_VERIFY).await;
        assert_eq!(code, 200);
        let v: AuditVerification = serde_json::from_value(body).unwrap();
        assert!(
            v.ok && v.records == 2 && v.head.as_deref() == Some(items[1].hash.as_str()),
            "{v:?}"
        );
    }
}
