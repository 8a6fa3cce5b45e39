//! The OpenAPI 3 description each port serves on `OPTIONS /` and `/api-description`
//! (TorchServe's API description), made from the route tables below. The tests send every
//! operation listed here to a running server and check that it is routed, so the tables
//! and the routers cannot drift apart.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::json_response;

/// A parameter of an operation.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    /// `path` or `query`.
    pub location: &'static str,
    /// `string`, `integer` or `boolean`.
    pub kind: &'static str,
    pub required: bool,
    pub description: &'static str,
}

/// One operation: a method on a path.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub params: &'static [Param],
    /// Whether the body is the request (predictions: any content type).
    pub body: bool,
    pub responses: &'static [(u16, &'static str)],
    pub deprecated: bool,
}

const fn path(name: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: "path",
        kind: "string",
        required: true,
        description,
    }
}

const fn query(name: &'static str, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: "query",
        kind,
        required: false,
        description,
    }
}

const MODEL: Param = path("model_name", "Name of the model.");
const VERSION: Param = path("model_version", "Version of the model.");

const fn op(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    params: &'static [Param],
    responses: &'static [(u16, &'static str)],
) -> Op {
    Op {
        method,
        path,
        summary,
        params,
        body: false,
        responses,
        deprecated: false,
    }
}

const DESCRIBE_API: Op = op(
    "options",
    "/",
    "This API description.",
    &[],
    &[(200, "An OpenAPI 3 document.")],
);
const API_DESCRIPTION: Op = Op {
    deprecated: true,
    ..op(
        "get",
        "/api-description",
        "This API description (legacy path).",
        &[],
        &[(200, "An OpenAPI 3 document.")],
    )
};
const PREDICT_RESPONSES: &[(u16, &str)] = &[
    (200, "The model's output."),
    (400, "The input could not be read."),
    (404, "No such model or version."),
    (413, "The body is over max_request_size."),
    (500, "The model failed."),
    (503, "The model's queue is full or it has no workers."),
];

/// The inference port.
pub const INFERENCE: &[Op] = &[
    DESCRIBE_API,
    API_DESCRIPTION,
    op(
        "get",
        "/ping",
        "Health: Healthy once the models named at start-up are loaded.",
        &[],
        &[(200, "Healthy."), (500, "Unhealthy.")],
    ),
    Op {
        body: true,
        ..op(
            "post",
            "/predictions/{model_name}",
            "Predictions from the model's default version (any method is accepted).",
            &[MODEL],
            PREDICT_RESPONSES,
        )
    },
    Op {
        body: true,
        ..op(
            "post",
            "/predictions/{model_name}/{model_version}",
            "Predictions from one version of the model (any method is accepted).",
            &[MODEL, VERSION],
            PREDICT_RESPONSES,
        )
    },
    Op {
        body: true,
        ..op(
            "post",
            "/v1/models/{model_name}:predict",
            "KServe v1: {\"instances\": [...]} in, {\"predictions\": [...]} out.",
            &[MODEL],
            PREDICT_RESPONSES,
        )
    },
    op(
        "get",
        "/v1/models/{model_name}",
        "KServe v1 readiness: {\"name\", \"ready\"}.",
        &[MODEL],
        &[(200, "The model's readiness."), (404, "No such model.")],
    ),
    op(
        "get",
        "/v2",
        "Open Inference Protocol: the server's metadata.",
        &[],
        &[(200, "Name, version, extensions.")],
    ),
    op(
        "get",
        "/v2/health/live",
        "Open Inference Protocol: liveness.",
        &[],
        &[(200, "Live.")],
    ),
    op(
        "get",
        "/v2/health/ready",
        "Open Inference Protocol: readiness (the models named at start-up are loaded).",
        &[],
        &[(200, "Ready."), (503, "Not ready yet.")],
    ),
    op(
        "get",
        "/v2/models/{model_name}",
        "Open Inference Protocol: the model's metadata.",
        &[MODEL],
        &[(200, "Name, versions, platform."), (404, "No such model.")],
    ),
    op(
        "get",
        "/v2/models/{model_name}/ready",
        "Open Inference Protocol: whether the model has workers.",
        &[MODEL],
        &[(200, "Ready."), (404, "No such model."), (503, "No workers.")],
    ),
    Op {
        body: true,
        ..op(
            "post",
            "/v2/models/{model_name}/infer",
            "Open Inference Protocol: typed tensors {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]} in, {\"outputs\": [...]} out.",
            &[MODEL],
            PREDICT_RESPONSES,
        )
    },
];

const MIN_WORKER: Param = query("min_worker", "integer", "Workers to run (default 1).");
const MAX_WORKER: Param = query("max_worker", "integer", "Upper bound (default min_worker).");
const SYNCHRONOUS: Param = query(
    "synchronous",
    "boolean",
    "Answer once scaled (default false: 202).",
);
const TIMEOUT: Param = query(
    "timeout",
    "integer",
    "Accepted and ignored, as in TorchServe.",
);
const MODEL_VERSION_QUERY: Param = query(
    "model_version",
    "string",
    "The version to scale instead of the default.",
);
const SCALE_RESPONSES: &[(u16, &str)] = &[
    (200, "Scaled."),
    (202, "Scaling in the background."),
    (
        206,
        "Only some of the new Python workers started; the model keeps those.",
    ),
    (400, "max_worker below min_worker, or a missing token."),
    (404, "No such model or version."),
    (500, "Workers could not start."),
];
const UNREGISTER_RESPONSES: &[(u16, &str)] = &[
    (200, "Unregistered; requests in flight finish."),
    (400, "A missing or wrong token."),
    (403, "The default version while others remain."),
    (404, "No such model or version."),
    (405, "The model API is turned off."),
];
const DESCRIBE_RESPONSES: &[(u16, &str)] = &[
    (200, "An array of versions."),
    (404, "No such model or version."),
];

/// The management port.
pub const MANAGEMENT: &[Op] = &[
    DESCRIBE_API,
    API_DESCRIPTION,
    op(
        "get",
        "/token",
        "Rotate a key of token authorization (send the API key as the bearer token).",
        &[query("type", "string", "management or inference.")],
        &[
            (200, "The new key and its expiry."),
            (
                400,
                "A wrong API key, a bad type, or token authorization off.",
            ),
        ],
    ),
    op(
        "get",
        "/models",
        "Registered models (default versions), sorted by name.",
        &[
            query("limit", "integer", "Page size, 1 to 100 (default 100)."),
            query("next_page_token", "integer", "Offset of the page."),
        ],
        &[(200, "A page of models.")],
    ),
    op(
        "post",
        "/models",
        "Register a model archive (query parameters, or the same keys in a JSON body).",
        &[
            Param {
                required: true,
                ..query(
                    "url",
                    "string",
                    "Archive: a file in the model store, an absolute path, a file:// or s3:// URL.",
                )
            },
            query(
                "model_name",
                "string",
                "Name to serve it under (default: the manifest's).",
            ),
            query("handler", "string", "Built-in handler to serve it with."),
            query("runtime", "string", "python, python3 or LSP."),
            query("batch_size", "integer", "Most instances per forward pass."),
            query(
                "max_batch_delay",
                "integer",
                "Longest wait for a batch to fill, in ms.",
            ),
            query(
                "initial_workers",
                "integer",
                "Workers to start with (0 allowed).",
            ),
            query(
                "synchronous",
                "boolean",
                "Answer once loaded (default true).",
            ),
            query("response_timeout", "integer", "Seconds a request may take."),
        ],
        &[
            (200, "Registered."),
            (202, "Loading in the background."),
            (
                206,
                "Only some of its Python workers started; the model keeps those.",
            ),
            (400, "A missing url, a bad archive, or a missing token."),
            (404, "No such file, or a URL outside allowed_urls."),
            (405, "The model API is turned off."),
            (409, "That name and version are loaded."),
            (500, "Workers could not start."),
        ],
    ),
    op(
        "get",
        "/models/{model_name}",
        "Describe the default version.",
        &[MODEL],
        DESCRIBE_RESPONSES,
    ),
    op(
        "put",
        "/models/{model_name}",
        "Scale the default version's workers.",
        &[
            MODEL,
            MIN_WORKER,
            MAX_WORKER,
            SYNCHRONOUS,
            TIMEOUT,
            MODEL_VERSION_QUERY,
        ],
        SCALE_RESPONSES,
    ),
    op(
        "delete",
        "/models/{model_name}",
        "Unregister the default version.",
        &[MODEL],
        UNREGISTER_RESPONSES,
    ),
    op(
        "get",
        "/models/{model_name}/{model_version}",
        "Describe one version (`all` for every version).",
        &[MODEL, VERSION],
        DESCRIBE_RESPONSES,
    ),
    op(
        "put",
        "/models/{model_name}/{model_version}",
        "Scale one version's workers.",
        &[MODEL, VERSION, MIN_WORKER, MAX_WORKER, SYNCHRONOUS, TIMEOUT],
        SCALE_RESPONSES,
    ),
    op(
        "delete",
        "/models/{model_name}/{model_version}",
        "Unregister one version.",
        &[MODEL, VERSION],
        UNREGISTER_RESPONSES,
    ),
    op(
        "put",
        "/models/{model_name}/{model_version}/set-default",
        "Make a version the default.",
        &[MODEL, VERSION],
        &[
            (200, "The default changed."),
            (400, "A missing or wrong token."),
            (404, "No such model or version."),
        ],
    ),
];

/// The OpenAPI 3.0.1 document for `ops`.
pub fn document(ops: &[Op]) -> Value {
    let mut paths = Map::new();
    for o in ops {
        let parameters: Vec<Value> = o
            .params
            .iter()
            .map(|p| {
                json!({
                    "in": p.location,
                    "name": p.name,
                    "description": p.description,
                    "required": p.required,
                    "schema": {"type": p.kind},
                })
            })
            .collect();
        let mut responses = Map::new();
        for (code, description) in o.responses {
            let content = if *code >= 400 {
                json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}})
            } else {
                json!({"application/json": {"schema": {}}})
            };
            responses.insert(
                code.to_string(),
                json!({"description": description, "content": content}),
            );
        }
        let mut operation = Map::new();
        operation.insert("summary".into(), json!(o.summary));
        operation.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                o.method,
                o.path
                    .replace(['/', '{', '}', '-'], "_")
                    .trim_end_matches('_')
            )),
        );
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        if o.body {
            operation.insert(
                "requestBody".into(),
                json!({"description": "The input, as the model's handler reads it.",
                       "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}),
            );
        }
        operation.insert("responses".into(), Value::Object(responses));
        if o.deprecated {
            operation.insert("deprecated".into(), json!(true));
        }
        let entry = paths
            .entry(o.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(methods) = entry {
            methods.insert(o.method.to_string(), Value::Object(operation));
        }
    }
    json!({
        "openapi": "3.0.1",
        "info": {
            "title": "torchfn APIs",
            "description": "torchfn serves TorchServe's REST APIs; this is what this port serves.",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "paths": Value::Object(paths),
        "components": {"schemas": {"Error": {
            "type": "object",
            "required": ["code", "type", "message"],
            "properties": {
                "code": {"type": "integer"},
                "type": {"type": "string"},
                "message": {"type": "string"},
            },
        }}},
    })
}

/// `OPTIONS /predictions/{model}[/{version}]`: the predictions API of one model (TorchServe's
/// per-model description, titled `RESTful API for: <model>`).
pub fn model_document(name: &str, version: Option<&str>) -> Value {
    let path = match version {
        Some(_) => "/predictions/{model_name}/{model_version}",
        None => "/predictions/{model_name}",
    };
    let ops: Vec<Op> = INFERENCE
        .iter()
        .filter(|o| o.path == path)
        .copied()
        .collect();
    let mut doc = document(&ops);
    let concrete = match version {
        Some(v) => format!("/predictions/{name}/{v}"),
        None => format!("/predictions/{name}"),
    };
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        if let Some(entry) = paths.remove(path) {
            paths.insert(concrete, entry);
        }
    }
    doc["info"]["title"] = json!(format!("RESTful API for: {name}"));
    doc
}

/// A handler answering with the document for `ops`.
pub fn respond(ops: &'static [Op]) -> Response {
    json_response(StatusCode::OK, &document(ops))
}
