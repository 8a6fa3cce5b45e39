//! The runtime in-process: model loading rules and the routers answered through
//! `tower::ServiceExt::oneshot`, the way other front ends (functions) will mount them.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

use torchfn_test_support as common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{fixtures, reference};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use torchfn_archive::settings::Settings;
use torchfn_engine::error::ErrorKind;
use torchfn_engine::manager::{retire, LoadSpec, Manager};
use torchfn_engine::metrics::Metrics;
use torchfn_http::{self as api, AppState};
use torchfn_store::store::Location;
use tower::ServiceExt;

fn manager(settings: Settings) -> Arc<Manager> {
    Arc::new(Manager::new(settings, Arc::new(Metrics::new().unwrap())).unwrap())
}

fn spec(path: PathBuf, name: Option<&str>) -> LoadSpec {
    LoadSpec {
        url: path.display().to_string(),
        source: Location::File(path),
        expect: Default::default(),
        name: name.map(String::from),
        loaded_at_startup: false,
        params: Default::default(),
    }
}

/// A request through the inference router, answered by whatever serves the model.
async fn predict(m: &Arc<Manager>, name: &str, body: Value) -> (StatusCode, Value) {
    let state = AppState::new(m.clone());
    let router = api::with_common(api::inference::routes(), state);
    let req = Request::post(format!("/predictions/{name}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    call(router, req).await
}

async fn load(
    m: &Arc<Manager>,
    path: PathBuf,
    name: Option<&'static str>,
) -> Result<Arc<torchfn_engine::manager::ModelVersion>, torchfn_engine::error::ServeError> {
    let m = m.clone();
    tokio::task::spawn_blocking(move || m.load(&spec(path, name)))
        .await
        .unwrap()
}

/// The getting-started guide's archive (its own handler.py) with no mapping is served by the
/// Python backend, with the answers Python torch gives; `default_service_handler` (for
/// archives that name a handler file) or a per-model mapping takes the Rust built-in instead.
#[tokio::test]
async fn a_python_handler_runs_in_the_python_backend_unless_mapped_onto_a_builtin() {
    let reference = reference();
    let single = json!({"features": reference["seed_features"]});
    let m = manager(Settings::default());
    let path = fixtures().join("store/classifier.mar");
    let model = load(&m, path.clone(), None).await.unwrap();
    assert_eq!(model.handler_name(), "handler.py");
    assert!(model.pool().is_some());
    let (status, body) = predict(&m, "classifier", single.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    common::assert_json_close(
        &body,
        &reference["classifier_single"],
        1e-5,
        "python backend",
    );
    // The same name and version again is a conflict; another name is a new model.
    let err = load(&m, path.clone(), None).await.err().expect("conflict");
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert_eq!(
        err.message,
        "Model version 1.0 is already registered for model classifier"
    );
    m.shutdown();

    for mapped in ["default", "per-model"] {
        let mut settings = Settings::default();
        if mapped == "default" {
            settings.default_service_handler = Some("classifier".into());
        } else {
            settings
                .handlers
                .insert("classifier".into(), "classifier".into());
        }
        let m = manager(settings);
        let model = load(&m, path.clone(), None).await.unwrap();
        assert_eq!(model.handler_name(), "classifier", "{mapped}");
        assert!(model.pool().is_none());
        let (status, body) = predict(&m, "classifier", single.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        common::assert_json_close(&body, &reference["classifier_single"], 1e-5, mapped);
    }

    // default_service_handler never replaces a built-in the manifest names.
    let mut settings = Settings::default();
    settings.default_service_handler = Some("classifier".into());
    let m = manager(settings);
    let model = load(&m, fixtures().join("store/scripted.mar"), None)
        .await
        .unwrap();
    assert_eq!(model.handler_name(), "tensor");

    // A TorchServe handler with no built-in goes to Python, whose worker says what is missing.
    let mut settings = Settings::default();
    settings
        .handlers
        .insert("classifier".into(), "vllm_handler".into());
    let err = load(&manager(settings), path, None)
        .await
        .err()
        .expect("vllm is not installed");
    assert_eq!(err.kind, ErrorKind::Internal);
    assert!(
        err.message
            .starts_with("Failed to start workers for model classifier"),
        "{}",
        err.message
    );
    assert!(err.message.contains("vllm"), "{}", err.message);
}

/// An eager-mode archive (`--model-file` with a state_dict) is served by the Python backend,
/// with the scripted model's answers (the same weights); mapping it onto a built-in is refused
/// with the way out.
#[tokio::test]
async fn an_eager_archive_is_served_by_the_python_backend() {
    let reference = reference();
    let m = manager(Settings::default());
    let model = load(&m, fixtures().join("eager/eager_classifier.mar"), None)
        .await
        .unwrap();
    assert!(model.pool().is_some());
    let (status, body) = predict(
        &m,
        "eager_classifier",
        json!({"features": reference["seed_features"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    common::assert_json_close(&body, &reference["classifier_single"], 1e-5, "eager");

    // describe with ?customized=true asks a worker for the handler's describe_handle().
    let state = AppState::new(m.clone());
    let req = Request::get("/models/eager_classifier?customized=true")
        .body(Body::empty())
        .unwrap();
    let (status, d) = call(api::management_router(state.clone()), req).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(
        d[0]["customizedMetadata"],
        json!({"labels": reference["labels"]})
    );
    let req = Request::get("/models/eager_classifier")
        .body(Body::empty())
        .unwrap();
    let (_, d) = call(api::management_router(state), req).await;
    assert!(d[0].get("customizedMetadata").is_none(), "{d}");

    let mut settings = Settings::default();
    settings.handlers.insert("eager".into(), "tensor".into());
    let err = load(&manager(settings), fixtures().join("eager/eager.mar"), None)
        .await
        .err()
        .expect("a built-in cannot load a state_dict");
    assert_eq!(err.kind, ErrorKind::InvalidModel);
    assert!(err.message.contains("eager-mode"), "{}", err.message);
    assert!(
        err.message.contains("torchfn-local convert"),
        "{}",
        err.message
    );
}

#[test]
fn a_serialized_file_that_is_not_torchscript_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.mar");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("model.pt", opts).unwrap();
    zip.write_all(b"this is not a TorchScript archive").unwrap();
    zip.start_file("MAR-INF/MANIFEST.json", opts).unwrap();
    zip.write_all(
        br#"{"runtime": "python", "model": {"modelName": "bad", "serializedFile": "model.pt",
            "handler": "base_handler", "modelVersion": "1.0"}, "archiverVersion": "0.12.0"}"#,
    )
    .unwrap();
    zip.finish().unwrap();
    let m = manager(Settings::default());
    let err = m.load(&spec(path, None)).err().expect("refused");
    assert_eq!(err.kind, ErrorKind::InvalidModel);
    assert!(
        err.message.contains("could not be loaded as TorchScript"),
        "{}",
        err.message
    );
    assert!(m.get("bad", None).is_err());
}

/// Retiring a version frees it when the last request holding it lets go, and not before:
/// while a request holds it, its workers run and its unpacked archive stays; once that request
/// drops it, the clean-up (started by the version's drop, no polling) stops the workers and
/// removes the archive, and says so.
#[tokio::test]
async fn a_retired_version_is_freed_when_its_last_holder_lets_go() {
    let m = manager(Settings::default());
    let path = fixtures().join("store/scripted.mar");
    let loader = m.clone();
    let in_flight = tokio::task::spawn_blocking(move || loader.load(&spec(path, None)))
        .await
        .unwrap()
        .unwrap();
    let unpacked = in_flight.archive.dir().to_path_buf();
    assert!(unpacked.is_dir(), "{}", unpacked.display());
    let (name, version) = (in_flight.name.clone(), in_flight.version.clone());

    let retired = retire(m.unload(&name, &version).unwrap());
    assert!(
        m.get(&name, None).is_err(),
        "unloaded versions take no new requests"
    );
    // A request still holds the version: nothing of it is freed.
    assert!(unpacked.is_dir());
    assert!(in_flight.workers() > 0);

    drop(in_flight);
    tokio::time::timeout(std::time::Duration::from_secs(60), retired.finished())
        .await
        .expect("the retired version is cleaned up once its last holder lets go");
    assert!(!unpacked.exists(), "{}", unpacked.display());
}

async fn call(router: axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    assert!(resp.headers().contains_key("x-request-id"));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn ping_turns_healthy_when_ready_and_routers_answer_in_process() {
    let m = manager(Settings::default());
    let state = AppState::new(m.clone());
    let ping = || Request::get("/ping").body(Body::empty()).unwrap();
    let (status, body) = call(api::inference_router(state.clone()), ping()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, json!({"status": "Unhealthy"}));

    let model = fixtures().join("store/scripted.mar");
    tokio::task::spawn_blocking(move || m.load(&spec(model, None)).map(|_| ()))
        .await
        .unwrap()
        .unwrap();
    state.set_ready();
    let (status, body) = call(api::inference_router(state.clone()), ping()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "Healthy"}));

    let reference = reference();
    let req = Request::put("/predictions/scripted")
        .body(Body::from(reference["seed_features"].to_string()))
        .unwrap();
    let (status, body) = call(api::inference_router(state.clone()), req).await;
    assert_eq!(status, StatusCode::OK);
    common::assert_json_close(&body, &reference["tensor_single"], 1e-5, "oneshot");

    // OPTIONS on a model: its predictions API, as TorchServe describes it; trailing slashes
    // change nothing.
    for (path, url) in [
        ("/predictions/scripted", "/predictions/scripted"),
        ("/predictions/scripted/1.0/", "/predictions/scripted/1.0"),
    ] {
        let req = Request::options(path).body(Body::empty()).unwrap();
        let (status, doc) = call(api::inference_router(state.clone()), req).await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        assert_eq!(doc["info"]["title"], "RESTful API for: scripted");
        assert!(doc["paths"][url]["post"].is_object(), "{doc}");
    }
    let req = Request::options("/predictions/nope")
        .body(Body::empty())
        .unwrap();
    let (status, _) = call(api::inference_router(state.clone()), req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // With the model API off, unregistering is refused; with it on (the default), the
    // version goes and its predictions answer 404.
    let closed = state
        .clone()
        .with_access(api::security::Access::default().model_api(false));
    let delete = || {
        Request::delete("/models/scripted")
            .body(Body::empty())
            .unwrap()
    };
    let (status, body) = call(api::management_router(closed), delete()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["type"], "MethodNotAllowedException");
    // A trailing slash is ignored, as TorchServe's path split drops it.
    let delete = Request::delete("/models/scripted/?synchronous=true")
        .body(Body::empty())
        .unwrap();
    let (status, body) = call(api::management_router(state.clone()), delete).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let req = Request::post("/predictions/scripted")
        .body(Body::from(reference["seed_features"].to_string()))
        .unwrap();
    let (status, _) = call(api::inference_router(state.clone()), req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Item i of a batch equals the single-item result within 1e-6 relative, for every built-in
/// handler, on models of different shapes.
#[test]
fn batching_does_not_change_answers() {
    use torchfn_engine::handler::{ClassifierHandler, Handler, Instance, TensorHandler};
    use torchfn_engine::session::Session;

    let fx = fixtures();
    let labels = std::fs::read(fx.join("src/index_to_name.json")).unwrap();
    let classifier = ClassifierHandler::from_labels_json(&labels).unwrap();
    let tensor = TensorHandler;
    let cases: [(&dyn Handler, &str, Vec<i64>); 5] = [
        (&classifier, "model_scripted.pt", vec![10]),
        (&tensor, "model_scripted.pt", vec![10]),
        (&tensor, "model_traced.pt", vec![10]),
        (&tensor, "conv_scripted.pt", vec![1, 8, 8]),
        (&tensor, "wide_scripted.pt", vec![256]),
    ];
    for (handler, file, shape) in cases {
        let session = Session::load(&fx.join("models").join(file), tch::Device::Cpu).unwrap();
        let numel: i64 = shape.iter().product();
        // 33 distinct inputs: one more than a full batch of 32.
        let instances: Vec<Instance> = (0..33)
            .map(|k| {
                Instance::f32(
                    (0..numel)
                        .map(|j| ((k * 31 + j * 7) % 97) as f32 / 48.5 - 1.0)
                        .collect(),
                    shape.clone(),
                )
            })
            .collect();
        let run = |items: &[&Instance]| {
            let input = handler.preprocess(items, session.device()).unwrap();
            let output = handler.inference(&session, &input).unwrap();
            handler.postprocess(output, items.len()).unwrap()
        };
        let all: Vec<&Instance> = instances.iter().collect();
        let batched = run(&all);
        assert_eq!(batched.len(), 33);
        for (i, inst) in instances.iter().enumerate() {
            let single = run(&[inst]);
            common::assert_json_close(
                &batched[i],
                &single[0],
                1e-6,
                &format!("{} {file} item {i}", handler.name()),
            );
        }
    }
}
