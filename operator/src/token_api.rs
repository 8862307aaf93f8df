//! The API's token routes (`berth token ...`, paths in `api_types::names::paths`): list, create,
//! revoke, rotate the admin token, and `whoami`. The access table makes all but `whoami`
//! admin-only; each change is an audit record (kind `Token`, the token's id as the name).

use crate::access::{Audited, Change};
use crate::extract::Path;
use crate::server::{ApiError, AppState};
use crate::tokens::{CreateError, Principal};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use berth_api_types::access::{TokenInfo, TokenRequest, WhoAmI, ADMIN_TOKEN_ID};
use berth_api_types::names::paths;
use berth_api_types::wire::List;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::WHOAMI, get(whoami))
        .route(paths::TOKENS, get(list).post(create))
        .route(paths::ADMIN_TOKEN_ROTATE, post(rotate_admin))
        .route(&paths::token("{id}"), delete(revoke))
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m)
            }
            CreateError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "NotFound", e.to_string())
            }
            CreateError::Store(s) => s.into(),
        }
    }
}

fn token_change(resp: &mut Response, action: &'static str, id: &str) {
    resp.extensions_mut().insert(Audited {
        action: Some(action),
        changes: vec![Change {
            kind: Some("Token".into()),
            name: Some(id.to_string()),
            ..Change::default()
        }],
    });
}

async fn whoami(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<WhoAmI>> {
    let info = state
        .tokens
        .list()?
        .into_iter()
        .find(|t| t.id == p.token_id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "NotFound", "your token is gone"))?;
    Ok(Json(info))
}

async fn list(State(state): State<AppState>) -> ApiResult<Json<List<TokenInfo>>> {
    Ok(Json(List {
        items: state.tokens.list()?,
    }))
}

async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body?;
    let req: TokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("expected {{\"role\", \"services\"?, \"expires\"?, \"description\"?}}: {e}"),
        )
    })?;
    let issued = state.tokens.create(&req).await?;
    tracing::info!(id = %issued.info.id, role = %issued.info.role, "token created");
    let id = issued.info.id.clone();
    let mut resp = (StatusCode::CREATED, Json(issued)).into_response();
    token_change(&mut resp, "token-create", &id);
    Ok(resp)
}

async fn revoke(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let info = state.tokens.revoke(&id).await?;
    tracing::info!(%id, "token revoked");
    let mut resp = Json(info).into_response();
    token_change(&mut resp, "token-revoke", &id);
    Ok(resp)
}

async fn rotate_admin(State(state): State<AppState>) -> ApiResult<Response> {
    let issued = state.tokens.rotate_admin().await?;
    tracing::info!("admin token rotated");
    let mut resp = Json(issued).into_response();
    token_change(&mut resp, "admin-rotate", ADMIN_TOKEN_ID);
    Ok(resp)
}
