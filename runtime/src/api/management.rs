//! The management API, read side: list and describe. Registration, scaling, set-default
//! and unregister answer 405, as TorchServe 0.12 does while its model API is disabled.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{json_response, AppState};
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    let not_allowed = || async { ApiError::method_not_allowed() };
    Router::new()
        .route("/models", get(list).fallback(not_allowed))
        .route(
            "/models/{name}",
            get(describe_default).fallback(not_allowed),
        )
        .route(
            "/models/{name}/{version}",
            get(describe_version).fallback(not_allowed),
        )
        .route(
            "/models/{name}/{version}/set-default",
            axum::routing::any(not_allowed),
        )
}

/// `GET /models?limit=&next_page_token=`: default versions, sorted by name, paginated as
/// TorchServe does (limit 1..=100, default 100; the token is an offset).
async fn list(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let limit = q
        .get("limit")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|l| (0..=100).contains(l))
        .unwrap_or(100) as usize;
    let offset = q
        .get("next_page_token")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        .max(0) as usize;
    let all = state.manager.defaults();
    let page: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|m| json!({"modelName": m.name, "modelUrl": m.url}))
        .collect();
    let mut body = serde_json::Map::new();
    if offset + limit < all.len() {
        body.insert("nextPageToken".into(), json!((offset + limit).to_string()));
    }
    body.insert("models".into(), Value::Array(page));
    json_response(StatusCode::OK, &Value::Object(body))
}

async fn describe_default(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    describe(&state, &name, None)
}

async fn describe_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    describe(&state, &name, Some(&version))
}

fn describe(state: &AppState, name: &str, version: Option<&str>) -> Response {
    let models = match version {
        Some("all") => state.manager.all_versions(name),
        v => state.manager.get(name, v).map(|m| vec![m]),
    };
    match models {
        Ok(models) => json_response(
            StatusCode::OK,
            &Value::Array(models.iter().map(|m| m.describe()).collect()),
        ),
        Err(e) => e.into_response(),
    }
}
