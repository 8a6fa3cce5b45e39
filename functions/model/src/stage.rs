//! API Gateway's stage and the request path.
//!
//! A REST API (v1) event's `path` leaves the stage out, and `lambda_http` puts a named stage
//! back in front of it (`/prod/predictions/m`); an HTTP API (v2) event's `rawPath` carries a
//! named stage itself. The routes are the same under every stage, so the function serves the
//! path without it. (`$default`, and the ALB, put nothing in front.)

use lambda_http::request::RequestContext;
use lambda_http::RequestExt;

/// `path` without `/{stage}` in front; `path` itself when it does not start with that
/// segment.
pub fn without_stage<'a>(path: &'a str, stage: &str) -> &'a str {
    if stage.is_empty() || stage == "$default" {
        return path;
    }
    match path.strip_prefix('/').and_then(|p| p.strip_prefix(stage)) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// `req` with the stage taken off the front of its URI's path (the query is kept).
pub fn strip_stage(mut req: lambda_http::Request) -> lambda_http::Request {
    // The stage, and whether the event's own path carries it.
    let (stage, in_event_path) = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => (context.stage.clone(), false),
        Some(RequestContext::ApiGatewayV2(context)) => (context.stage.clone(), true),
        _ => return req,
    };
    let Some(stage) = stage.filter(|s| !s.is_empty() && s != "$default") else {
        return req;
    };
    let uri = req.uri();
    let mut path = uri.path();
    // lambda_http puts the stage in front unless the event's path already starts with it.
    if !req.raw_http_path().starts_with(&format!("/{stage}/")) {
        path = without_stage(path, &stage);
    }
    if in_event_path {
        path = without_stage(path, &stage);
    }
    if path.len() == uri.path().len() {
        return req;
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    match path_and_query.parse() {
        Ok(path_and_query) => parts.path_and_query = Some(path_and_query),
        Err(_) => return req,
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_stage_segment_only() {
        assert_eq!(
            without_stage("/prod/predictions/m", "prod"),
            "/predictions/m"
        );
        assert_eq!(without_stage("/prod", "prod"), "/");
        assert_eq!(without_stage("/prod/", "prod"), "/");
        assert_eq!(without_stage("/production/m", "prod"), "/production/m");
        assert_eq!(without_stage("/predictions/m", "prod"), "/predictions/m");
        assert_eq!(
            without_stage("/predictions/m", "$default"),
            "/predictions/m"
        );
        assert_eq!(without_stage("/predictions/m", ""), "/predictions/m");
    }

    fn rest_api(stage: &str, path: &str) -> serde_json::Value {
        json!({
            "resource": "/{proxy+}",
            "path": path,
            "httpMethod": "POST",
            "headers": {"host": "example.execute-api.us-east-1.amazonaws.com"},
            "multiValueHeaders": {},
            "queryStringParameters": {"a": "1"},
            "multiValueQueryStringParameters": {"a": ["1"]},
            "requestContext": {
                "accountId": "123456789012",
                "resourceId": "abc123",
                "stage": stage,
                "requestId": "r",
                "identity": {"sourceIp": "127.0.0.1"},
                "resourcePath": "/{proxy+}",
                "httpMethod": "POST",
                "apiId": "example"
            },
            "body": null,
            "isBase64Encoded": false
        })
    }

    fn http_api(stage: &str, raw_path: &str) -> serde_json::Value {
        let mut event = torchfn_test_support::runtime_api::http_api_event(
            "r",
            raw_path,
            &serde_json::Value::Null,
        );
        event["rawQueryString"] = json!("a=1");
        event["requestContext"]["stage"] = json!(stage);
        event["body"] = serde_json::Value::Null;
        event
    }

    fn served(event: serde_json::Value) -> (String, Option<String>) {
        let req = strip_stage(lambda_http::request::from_str(&event.to_string()).unwrap());
        (
            req.uri().path().to_string(),
            req.uri().query().map(String::from),
        )
    }

    #[test]
    fn requests_are_served_without_their_stage() {
        let path_and_a = |path: &str| (path.to_string(), Some("a=1".to_string()));
        // REST API: lambda_http puts the stage back in front of the event's path.
        assert_eq!(
            served(rest_api("prod", "/predictions/m")),
            path_and_a("/predictions/m")
        );
        // A REST API path that starts with the stage's name is left as the event gave it.
        assert_eq!(
            served(rest_api("predictions", "/predictions/m")),
            path_and_a("/predictions/m")
        );
        assert_eq!(served(rest_api("prod", "/prod")), path_and_a("/prod"));
        // HTTP API: a named stage is in the raw path; `$default` is not.
        assert_eq!(
            served(http_api("prod", "/prod/predictions/m")),
            path_and_a("/predictions/m")
        );
        assert_eq!(
            served(http_api("$default", "/predictions/m")),
            path_and_a("/predictions/m")
        );
        assert_eq!(served(http_api("prod", "/prod")), path_and_a("/"));
    }
}
