//! `GET /metrics`: Prometheus text format, optionally filtered with `?name[]=...`.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let names = filter_names(query.as_deref().unwrap_or(""));
    // nvidia-smi runs on a blocking thread; the scrape awaits it (briefly) here.
    state.metrics.refresh_gpu_memory().await;
    let mut resp = state.metrics.render(&names).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The `name[]` values of a query string (URL-encoded or not).
fn filter_names(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| matches!(*k, "name[]" | "name%5B%5D" | "name%5b%5d" | "name"))
        .map(|(_, v)| v.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_names() {
        assert_eq!(
            super::filter_names("name[]=a&name%5B%5D=b&other=c"),
            vec!["a", "b"]
        );
    }
}
