//! TorchServe's built-in handlers served by `torchfn-local` over real HTTP, checked against
//! what TorchServe's own handler classes answer in Python for the same archives and inputs
//! (`tests/fixtures/make_handler_fixtures.py`): image classifier, segmenter, detector, text
//! classifier; models that return tuples, dicts and integers; binary tensors (`.npy`, raw
//! float32) and the KServe v1 / Open Inference Protocol v2 routes; every bad input a clear
//! 4xx in TorchServe's error shape.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, server};

use base64::Engine;
use common::{handler_fixtures, handler_reference};
use serde_json::{json, Value};
use server::Server;

fn serve(models: &[&str]) -> Server {
    let store = handler_fixtures().join("store");
    let list = models
        .iter()
        .map(|m| format!("{m}={m}.mar"))
        .collect::<Vec<_>>()
        .join(",");
    // Loopback, ports chosen by the OS; batching on.
    // Written once per process (the tests of this file run on parallel threads), through a
    // temporary file so another process reading it never sees half of it.
    static CONFIG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let config = handler_fixtures().join("handlers.properties");
        let text = "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\n\
                    metrics_address=http://127.0.0.1:0\nbatch_size=8\nmax_batch_delay=5\n";
        let tmp = config.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        config
    });
    Server::start(&[
        "--model-store",
        store.to_str().unwrap(),
        "--models",
        &list,
        "--ts-config",
        config.to_str().unwrap(),
    ])
    .wait_healthy()
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(handler_fixtures().join("images").join(name)).unwrap()
}

/// POSTs `body` with `content_type` to `path` on the inference port.
fn post(server: &Server, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = server
        .client
        .post(format!("{}{path}", server.inference))
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path}: response is not JSON ({e}): {text}"));
    (status, value)
}

/// A TorchServe-shaped client error whose message contains `needle`.
fn assert_client_error(status: u16, body: &Value, needle: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], 400, "{body}");
    assert!(body["type"].is_string(), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

/// `{label: p}` maps equal in keys and key order, probabilities within `tol`.
fn assert_label_map(got: &Value, want: &Value, tol: f64, at: &str) {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    let gk: Vec<&String> = g.keys().collect();
    let wk: Vec<&String> = w.keys().collect();
    assert_eq!(
        gk, wk,
        "{at}: labels or their order differ: {got} vs {want}"
    );
    for (k, wv) in w {
        let (a, b) = (g[k].as_f64().unwrap(), wv.as_f64().unwrap());
        assert!(
            (a - b).abs() <= tol,
            "{at}: {k}: {a} vs {b} (tolerance {tol})"
        );
    }
}

#[test]
fn image_classifier_answers_as_torchserve() {
    let reference = handler_reference();
    let server = serve(&["image_classifier"]);
    let results = reference["image_classifier"]["results"]
        .as_object()
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut all = Vec::new();
    let mut wants = Vec::new();
    for (name, want) in results {
        let bytes = image(name);
        let mime = if name.ends_with(".jpg") {
            "image/jpeg"
        } else {
            "image/png"
        };
        // PNG decodes to the same pixels as Pillow, and the resize is Pillow's arithmetic:
        // probabilities agree to float rounding. JPEG decoders differ by a level here and
        // there: within 1e-3.
        let tol = if name.ends_with(".jpg") { 1e-3 } else { 2e-5 };
        let (status, got) = post(
            &server,
            "/predictions/image_classifier",
            mime,
            bytes.clone(),
        );
        assert_eq!(status, 200, "{name}: {got}");
        assert_label_map(&got, &want["response"], tol, name);
        // The same image as base64 in JSON, and as a multipart form's data field.
        let body = json!({"data": b64.encode(&bytes)}).to_string().into_bytes();
        let (_, got) = post(
            &server,
            "/predictions/image_classifier",
            "application/json",
            body,
        );
        assert_label_map(&got, &want["response"], tol, &format!("{name} as base64"));
        let form = reqwest::blocking::multipart::Form::new().part(
            "data",
            reqwest::blocking::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
        );
        let got: Value = server
            .client
            .post(format!("{}/predictions/image_classifier", server.inference))
            .multipart(form)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_label_map(
            &got,
            &want["response"],
            tol,
            &format!("{name} as multipart"),
        );
        all.push(json!({"data": b64.encode(&bytes)}));
        wants.push((name.clone(), want["response"].clone(), tol));
    }
    // Batch invariance: all images in one request (one forward pass) answer as they did alone.
    let body = json!({"instances": all}).to_string().into_bytes();
    let (status, got) = post(
        &server,
        "/predictions/image_classifier",
        "application/json",
        body,
    );
    assert_eq!(status, 200, "{got}");
    for ((name, want, tol), got) in wants.iter().zip(got.as_array().unwrap()) {
        assert_label_map(got, want, *tol, &format!("{name} in a batch"));
    }
    // Broken images: each a 400 that says why, and the model keeps serving.
    for (name, mime, needle) in [
        ("corrupt.jpg", "image/jpeg", "cannot be decoded"),
        (
            "not_an_image.bin",
            "application/octet-stream",
            "not an image",
        ),
        ("empty.png", "image/png", "empty"),
    ] {
        let (status, body) = post(&server, "/predictions/image_classifier", mime, image(name));
        assert_client_error(status, &body, needle);
    }
    let (status, body) = post(
        &server,
        "/predictions/image_classifier",
        "application/json",
        br#"{"data": "not base64!"}"#.to_vec(),
    );
    assert_client_error(status, &body, "not base64");
    // A corrupt image in a batch fails alone.
    let body = json!({"instances": [all[0].clone(), {"data": b64.encode(image("corrupt.jpg"))}]});
    let (status, got) = post(
        &server,
        "/predictions/image_classifier",
        "application/json",
        body.to_string().into_bytes(),
    );
    assert_client_error(status, &got, "instance 1");
    let (status, _) = post(
        &server,
        "/predictions/image_classifier",
        "image/png",
        image("tiny.png"),
    );
    assert_eq!(status, 200);
    // An image whose header claims 100000 × 100000 pixels is refused before any decoding.
    let mut huge = image("tiny.png");
    huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let (status, body) = post(&server, "/predictions/image_classifier", "image/png", huge);
    assert_client_error(status, &body, "the limit is");
    // An already-preprocessed tensor of the wrong size: the model's first layer refuses it.
    let body = json!({"data": vec![vec![vec![0.5f32; 8]; 8]; 1]})
        .to_string()
        .into_bytes();
    let (status, body) = post(
        &server,
        "/predictions/image_classifier",
        "application/json",
        body,
    );
    assert_client_error(status, &body, "the model cannot take this input");
}

#[test]
fn segmenter_and_detector_answer_as_torchserve() {
    let reference = handler_reference();
    let server = serve(&["image_segmenter", "object_detector", "detector_no_tv"]);
    // Segmenter: a 224 × 224 grid of [class, probability] per image.
    let seg = &reference["image_segmenter"];
    let full = seg["full_image"].as_str().unwrap();
    let (status, got) = post(
        &server,
        "/predictions/image_segmenter",
        "image/png",
        image(full),
    );
    assert_eq!(status, 200);
    let (g, w) = (got.as_array().unwrap(), seg["full"].as_array().unwrap());
    assert_eq!(g.len(), 224);
    let mut same = 0usize;
    for (grow, wrow) in g.iter().zip(w) {
        for (gp, wp) in grow
            .as_array()
            .unwrap()
            .iter()
            .zip(wrow.as_array().unwrap())
        {
            if gp[0] == wp[0] {
                same += 1;
                let (a, b) = (gp[1].as_f64().unwrap(), wp[1].as_f64().unwrap());
                assert!((a - b).abs() < 1e-4, "segmenter probability {a} vs {b}");
            }
        }
    }
    assert!(
        same >= 224 * 224 - 10,
        "only {same} pixels share the reference's class"
    );
    for (name, want) in seg["results"].as_object().unwrap() {
        let mime = if name.ends_with(".jpg") {
            "image/jpeg"
        } else {
            "image/png"
        };
        let (_, got) = post(&server, "/predictions/image_segmenter", mime, image(name));
        let mut counts = [0i64; 4];
        for row in got.as_array().unwrap() {
            for p in row.as_array().unwrap() {
                counts[p[0].as_f64().unwrap() as usize] += 1;
            }
        }
        for (c, w) in counts.iter().zip(want["class_counts"].as_array().unwrap()) {
            assert!(
                (c - w.as_i64().unwrap()).abs() <= 250,
                "{name}: class counts {counts:?} vs {}",
                want["class_counts"]
            );
        }
    }
    // Detector: scripted, calling torchvision::nms (torchvision's operator library is loaded
    // for it); the same model without torchvision operators answers the same.
    for model in ["object_detector", "detector_no_tv"] {
        for (name, want) in reference[model]["results"].as_object().unwrap() {
            let mime = if name.ends_with(".jpg") {
                "image/jpeg"
            } else {
                "image/png"
            };
            let (status, got) = post(&server, &format!("/predictions/{model}"), mime, image(name));
            assert_eq!(status, 200, "{model} {name}: {got}");
            let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
            assert_eq!(g.len(), w.len(), "{model} {name}: {got} vs {want}");
            for (gd, wd) in g.iter().zip(w) {
                let label = wd
                    .as_object()
                    .unwrap()
                    .keys()
                    .find(|k| *k != "score")
                    .unwrap();
                let (gb, wb) = (gd[label].as_array().unwrap(), wd[label].as_array().unwrap());
                for (a, b) in gb.iter().zip(wb) {
                    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                    let tol = if name.ends_with(".jpg") { 0.5 } else { 1e-3 };
                    assert!((a - b).abs() <= tol, "{model} {name} box {a} vs {b}");
                }
                let (a, b) = (gd["score"].as_f64().unwrap(), wd["score"].as_f64().unwrap());
                assert!((a - b).abs() < 2e-3, "{model} {name} score {a} vs {b}");
            }
        }
    }
}

#[test]
fn text_classifier_tokenises_and_answers_as_torchserve() {
    let reference = handler_reference();
    let server = serve(&["text_classifier", "text_single_input"]);
    for model in ["text_classifier", "text_single_input"] {
        let texts = reference[model]["texts"].as_array().unwrap();
        let path = format!("/predictions/{model}");
        for t in texts {
            let text = t["text"].as_str().unwrap();
            let (status, got) = post(&server, &path, "text/plain", text.as_bytes().to_vec());
            assert_eq!(status, 200, "{got}");
            assert_label_map(&got, &t["response"], 1e-5, text);
            let body = json!({"data": text}).to_string().into_bytes();
            let (_, got) = post(&server, &path, "application/json", body);
            assert_label_map(&got, &t["response"], 1e-5, text);
        }
        // One padded batch answers as each text alone.
        let all: Vec<&Value> = texts.iter().map(|t| &t["text"]).collect();
        let body = json!({"instances": all}).to_string().into_bytes();
        let (status, got) = post(&server, &path, "application/json", body);
        assert_eq!(status, 200, "{got}");
        for (t, g) in texts.iter().zip(got.as_array().unwrap()) {
            assert_label_map(g, &t["response"], 1e-5, "batched");
        }
    }
    let (status, body) = post(
        &server,
        "/predictions/text_classifier",
        "text/plain",
        vec![b'o', b'k', 0xff, 0xfe],
    );
    assert_client_error(status, &body, "not UTF-8");
    let (status, body) = post(
        &server,
        "/predictions/text_classifier",
        "text/plain",
        b"  ".to_vec(),
    );
    assert_client_error(status, &body, "empty");
    // A torchtext archive (source_vocab.pt, no tokenizer.json) is TorchServe's own handler's
    // to serve: the Python backend runs it. Mapped onto the built-in by name, it is refused,
    // saying what to ship instead.
    let store = handler_fixtures().join("store");
    let register = |query: &str| {
        let r = server
            .client
            .post(format!(
                "{}/models?url=text_vocab.mar&initial_workers=1&synchronous=true{query}",
                server.management
            ))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let (status, body) = register("&model_name=text_vocab_builtin&handler=text_classifier");
    assert!(status >= 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("source_vocab.pt") && message.contains("tokenizer.json"),
        "{message}"
    );
    let (status, body) = register("");
    assert_eq!(status, 200, "{body}");
    let (status, got) = post(
        &server,
        "/predictions/text_vocab",
        "text/plain",
        b"good".to_vec(),
    );
    assert_eq!(status, 200, "{got}");
    let labels: Vec<&String> = got.as_object().unwrap().keys().collect();
    assert_eq!(labels.len(), 3, "{got}");
    assert!(store.exists());
}

#[test]
fn model_outputs_binary_tensors_and_kserve_routes() {
    let reference = handler_reference();
    let server = serve(&[
        "tuple_out",
        "dict_out",
        "two_inputs",
        "int_out",
        "str_out",
        "npy_echo",
        "image_classifier",
    ]);
    // Tuples and dicts of tensors: one list or object per instance.
    let t = &reference["tuple_out"];
    let body = json!({"instances": t["input"]}).to_string().into_bytes();
    let (status, got) = post(&server, "/predictions/tuple_out", "application/json", body);
    assert_eq!(status, 200, "{got}");
    for (i, row) in got.as_array().unwrap().iter().enumerate() {
        assert_eq!(row[0], t["output"][0][i]);
        assert_eq!(row[1], t["output"][1][i]);
    }
    let d = &reference["dict_out"];
    let body = json!({"data": d["input"][0]}).to_string().into_bytes();
    let (_, got) = post(&server, "/predictions/dict_out", "application/json", body);
    assert_eq!(got["double"], d["output"]["double"][0]);
    assert_eq!(got["sum"], d["output"]["sum"][0]);
    let n = &reference["int_out"];
    let body = json!({"data": n["input"][0]}).to_string().into_bytes();
    let (_, got) = post(&server, "/predictions/int_out", "application/json", body);
    assert_eq!(got, n["output"][0]);
    assert!(got[0].is_i64(), "{got}");
    // A model answering strings cannot be split per instance: 503 saying so.
    let body = json!({"data": reference["str_out"]["input"][0]})
        .to_string()
        .into_bytes();
    let (status, got) = post(&server, "/predictions/str_out", "application/json", body);
    assert_eq!(status, 503, "{got}");
    assert!(
        got["message"].as_str().unwrap().contains("list of strings"),
        "{got}"
    );

    // .npy bodies (any byte order and layout) and raw float32 in; .npy out on request.
    for (file, want) in reference["npy"].as_object().unwrap() {
        let bytes = std::fs::read(handler_fixtures().join("npy").join(file)).unwrap();
        let (status, got) = post(&server, "/predictions/npy_echo", "application/x-npy", bytes);
        assert_eq!(status, 200, "{file}: {got}");
        let expected = want
            .get("output")
            .cloned()
            .unwrap_or_else(|| times3(&want["input"]));
        assert!(
            common::json_close(&got, &expected, 1e-6),
            "{file}: {got} vs {expected}"
        );
    }
    let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let r = server
        .client
        .post(format!("{}/predictions/npy_echo", server.inference))
        .header("content-type", "application/octet-stream")
        .header("x-tensor-shape", "2,3")
        .header("accept", "application/x-npy")
        .body(raw.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-npy");
    let npy = r.bytes().unwrap();
    assert!(npy.starts_with(b"\x93NUMPY"));
    let data = &npy[npy.len() - 24..];
    let values: Vec<f32> = data
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values, vec![3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);
    let r = server
        .client
        .post(format!("{}/predictions/npy_echo", server.inference))
        .header("content-type", "application/octet-stream")
        .header("x-tensor-shape", "4,4")
        .body(raw)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let (status, body) = post(
        &server,
        "/predictions/npy_echo",
        "application/x-npy",
        b"\x93NUMPY\x01\x00\x05\x00{'de".to_vec(),
    );
    assert_client_error(status, &body, ".npy body is not valid");

    // KServe v1.
    let body = json!({"instances": [[1.0, 2.0], [3.0, 4.0]]})
        .to_string()
        .into_bytes();
    let (status, got) = post(
        &server,
        "/v1/models/npy_echo:predict",
        "application/json",
        body,
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, json!({"predictions": [[3.0, 6.0], [9.0, 12.0]]}));
    let (status, got) = server.get(format!("{}/v1/models/npy_echo", server.inference));
    assert_eq!(
        (status, got),
        (200, json!({"name": "npy_echo", "ready": true}))
    );

    // Open Inference Protocol v2: typed tensors in and out, several inputs, BYTES images.
    let body = json!({"id": "req-7", "inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}
    ]});
    let (status, got) = post(
        &server,
        "/v2/models/npy_echo/infer",
        "application/json",
        body.to_string().into_bytes(),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], "req-7");
    assert_eq!(got["model_name"], "npy_echo");
    assert_eq!(
        got["outputs"][0],
        json!({"name": "output-0", "shape": [2, 2], "datatype": "INT64", "data": [3, 6, 9, 12]})
    );
    let ti = &reference["two_inputs"];
    let (x, y) = (&ti["inputs"][0], &ti["inputs"][1]);
    let rows = x.as_array().unwrap().len();
    let body = json!({"inputs": [
        {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x},
        {"name": "y", "shape": [rows, 4], "datatype": "FP32", "data": y},
    ]});
    let (status, got) = post(
        &server,
        "/v2/models/two_inputs/infer",
        "application/json",
        body.to_string().into_bytes(),
    );
    assert_eq!(status, 200, "{got}");
    let mut want = Vec::new();
    flatten(&ti["output"], &mut want);
    assert!(
        common::json_close(&got["outputs"][0]["data"], &Value::Array(want), 1e-6),
        "{got}"
    );
    let photo = image("photo_green.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let body =
        json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let (status, got) = post(
        &server,
        "/v2/models/image_classifier/infer",
        "application/json",
        body.to_string().into_bytes(),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["outputs"][0]["datatype"], "BYTES");
    let labels: Value =
        serde_json::from_str(got["outputs"][0]["data"][0].as_str().unwrap()).unwrap();
    let want = &reference["image_classifier"]["results"]["photo_green.png"]["response"];
    assert_label_map(&labels, want, 2e-5, "v2 BYTES image");
    for (body, needle) in [
        (
            json!({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}),
            "holds 3 elements",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]}),
            "FP8",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [-1]}]}),
            "not an integer",
        ),
        (json!({"instances": []}), "inputs"),
    ] {
        let (status, got) = post(
            &server,
            "/v2/models/npy_echo/infer",
            "application/json",
            body.to_string().into_bytes(),
        );
        assert_client_error(status, &got, needle);
    }
    let (status, got) = server.get(format!("{}/v2/models/npy_echo", server.inference));
    assert_eq!(status, 200);
    assert_eq!(got["name"], "npy_echo");
    assert_eq!(got["versions"], json!(["1.0"]));
    for path in [
        "/v2/health/ready",
        "/v2/health/live",
        "/v2/models/npy_echo/ready",
        "/v2",
    ] {
        let (status, _) = server.get(format!("{}{path}", server.inference));
        assert_eq!(status, 200, "{path}");
    }
    let (status, _) = server.get(format!("{}/v2/models/nope/ready", server.inference));
    assert_eq!(status, 404);
}

fn times3(v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(times3).collect()),
        Value::Number(n) if n.is_i64() => json!(n.as_i64().unwrap() * 3),
        Value::Number(n) => json!(n.as_f64().unwrap() * 3.0),
        other => other.clone(),
    }
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
