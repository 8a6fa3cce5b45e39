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

#[test]
fn eager_archive_is_refused_with_the_fix() {
    let m = manager(Settings::default());
    let err = m
        .load(&spec(fixtures().join("eager/eager.mar"), None))
        .err()
        .expect("an eager archive must not load");
    assert_eq!(err.kind, ErrorKind::InvalidModel);
    assert!(err.message.contains("eager-mode"), "{}", err.message);
    assert!(
        err.message.contains("torchfn-local convert"),
        "{}",
        err.message
    );
    assert!(m.get("eager", None).is_err());
}

#[test]
fn python_handler_needs_a_named_builtin() {
    let m = manager(Settings::default());
    let path = fixtures().join("store/classifier.mar");
    let err = m.load(&spec(path.clone(), None)).err().expect("refused");
    assert_eq!(err.kind, ErrorKind::InvalidModel);
    assert!(err.message.contains("handler.py"), "{}", err.message);
    assert!(
        err.message.contains("--handler classifier=classifier")
            && err.message.contains("default_service_handler"),
        "{}",
        err.message
    );

    let mut settings = Settings::default();
    settings.default_service_handler = Some("classifier".into());
    let m = manager(settings);
    let model = m.load(&spec(path.clone(), None)).unwrap();
    assert_eq!(model.handler.name(), "classifier");
    // The same name and version again is a conflict; another name is a new model.
    let err = m.load(&spec(path.clone(), None)).err().expect("conflict");
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert_eq!(
        err.message,
        "Model version 1.0 is already registered for model classifier"
    );
    m.load(&spec(path, Some("other"))).unwrap();
    assert_eq!(m.defaults().len(), 2);

    let mut settings = Settings::default();
    settings
        .handlers
        .insert("classifier".into(), "vllm_handler".into());
    let err = manager(settings)
        .load(&spec(fixtures().join("store/classifier.mar"), None))
        .err()
        .expect("not served yet");
    assert!(err.message.contains("not served"), "{}", err.message);
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
    assert!(in_flight.batcher.workers() > 0);

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
    let (status, body) = call(api::management_router(state.clone()), delete()).await;
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
