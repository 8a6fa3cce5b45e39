//! `torchfn-regressor` end to end: a tiny regression model scripted by real PyTorch and
//! packaged by the real `torch-model-archiver` with `--handler house_price --extra-files
//! features.json` (`make_house_price.py`), served by the binary in plain-HTTP mode on
//! loopback. Prices must equal what Python torch computes for the same houses; a batch of
//! houses runs through one forward pass; a bad house is a 400 in TorchServe's error shape; an
//! archive without `features.json` does not start.

#![allow(clippy::unwrap_used)]

use torchfn_test_support as common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// The packaged model: a folder with `house_price.mar`, `no_features.mar` and
/// `expected.json`.
fn package() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = torchfn_test_support::manifest_dir().join("tests/make_house_price.py");
    // torch-model-archiver stages each archive in $TMPDIR/<model name>: a folder of the
    // test's own, so that tests packaging at the same time do not share it.
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let out = Command::new(common::venv_python())
        .arg(&script)
        .arg(dir.path())
        .env("TMPDIR", &staging)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make_house_price.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A running `torchfn-regressor`, killed when dropped.
struct Function {
    child: Child,
    log: PathBuf,
}

impl Function {
    /// Starts the binary on `mar` in plain-HTTP mode (no Lambda Runtime API) on a free
    /// loopback port. Returns it and the address it printed once the model was loaded, or
    /// `None` when it exited without serving.
    fn start(mar: &Path, work: &Path) -> (Self, Option<String>) {
        let log = work.join(format!(
            "{}.log",
            mar.file_stem().unwrap().to_string_lossy()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_torchfn-regressor"))
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .env_remove("TORCHFN_HANDLER")
            .env_remove("TORCHFN_REGISTRY")
            .env_remove("TORCHFN_MODEL_NAME")
            .env_remove("TORCHFN_MODEL_VERSION")
            .env_remove("TORCHFN_MODEL_SHA256")
            .env("TORCHFN_MODEL_URI", mar)
            .env("PORT", "0")
            .env("TORCHFN_HOST", "127.0.0.1")
            .env("TORCHFN_BATCH_SIZE", "8")
            .env("TORCHFN_MAX_BATCH_DELAY_MS", "20")
            // Archives unpack under the temporary folder: keep them in the test's own.
            .env("TMPDIR", work)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("Inference API bind to: ").map(String::from));
        // Keep draining stdout so the function never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        (Self { child, log }, addr)
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a price is Python's, to the cent (and float32 rounding of large prices).
fn assert_price(got: &Value, want: f64, currency: &str, at: &str) {
    assert_eq!(got["currency"], currency, "{at}: {got}");
    assert_eq!(got.as_object().unwrap().len(), 2, "{at}: {got}");
    let price = got["price"].as_f64().unwrap();
    let tol = (want.abs() * 1e-6).max(0.011);
    assert!(
        (price - want).abs() <= tol,
        "{at}: got {price}, Python computed {want}"
    );
}

#[test]
fn serves_prices_batches_and_validation_errors() {
    let work = package();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("expected.json")).unwrap()).unwrap();
    let houses = expected["houses"].as_array().unwrap();
    let prices: Vec<f64> = expected["prices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    let currency = expected["currency"].as_str().unwrap();

    let (function, addr) = Function::start(&work.path().join("house_price.mar"), work.path());
    let addr = addr.unwrap_or_else(|| panic!("the function did not start:\n{}", function.log()));
    assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("{addr}/predictions/house_price");
    assert_eq!(
        client.get(format!("{addr}/ping")).send().unwrap().status(),
        200
    );

    // One house per request: one price, as Python computes it.
    for (i, house) in houses.iter().enumerate() {
        let r = client.post(&url).json(house).send().unwrap();
        assert_eq!(r.status(), 200, "house {i}");
        assert_price(
            &r.json().unwrap(),
            prices[i],
            currency,
            &format!("house {i}"),
        );
    }

    // All of them in one request: a list back, in order, from one forward pass.
    let r = client
        .post(&url)
        .json(&json!({ "instances": houses }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let batch: usize = r.headers()["x-torchfn-batch-size"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(batch, houses.len(), "the houses did not share a batch");
    let answers: Vec<Value> = r.json().unwrap();
    assert_eq!(answers.len(), houses.len());
    for (i, answer) in answers.iter().enumerate() {
        assert_price(answer, prices[i], currency, &format!("instances[{i}]"));
    }

    // Concurrent requests share batches and still get their own answers.
    std::thread::scope(|s| {
        for round in 0..3 {
            for (i, house) in houses.iter().enumerate() {
                let (client, url, prices) = (&client, &url, &prices);
                s.spawn(move || {
                    let r = client.post(url).json(house).send().unwrap();
                    assert_eq!(r.status(), 200);
                    assert_price(
                        &r.json().unwrap(),
                        prices[i],
                        currency,
                        &format!("round {round}, house {i}"),
                    );
                });
            }
        }
    });

    // The KServe v1 route takes the same list.
    let r = client
        .post(format!("{addr}/v1/models/house_price:predict"))
        .json(&json!({ "instances": [houses[0]] }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    assert_price(&body["predictions"][0], prices[0], currency, "KServe v1");

    // A bad house: 400, TorchServe's error body, a message naming the field.
    for (body, needle) in [
        (
            json!({"rooms": 0, "area_m2": 84.5, "year_built": 1998}),
            "rooms must be from 1 to 20, got 0",
        ),
        (
            json!({"instances": [houses[0], {"rooms": 3, "area_m2": "84", "year_built": 1998}]}),
            "instances[1].area_m2 must be a number from 5 to 2000, got a string",
        ),
        (
            json!({"rooms": 3, "area_m2": 84.5, "year_built": 1998, "pool": true}),
            "pool is not a field of this model",
        ),
        (
            json!({"rooms": 3, "area_m2": 84.5}),
            "year_built is missing",
        ),
    ] {
        let r = client.post(&url).json(&body).send().unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let error: Value = r.json().unwrap();
        assert_eq!(error["code"], 400, "{error}");
        assert_eq!(error["type"], "BadRequestException", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "wanted {needle:?} in {message:?}");
        assert_eq!(
            error.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["code", "type", "message"]
        );
    }

    // The model was served by the custom handler (describe is a management route; the log
    // says which handler loaded it).
    assert!(
        function.log().contains("handler=\"house_price\""),
        "{}",
        function.log()
    );
}

#[test]
fn an_archive_without_features_json_does_not_start() {
    let work = package();
    let (mut function, addr) = Function::start(&work.path().join("no_features.mar"), work.path());
    assert_eq!(addr, None, "it served without features.json");
    let status = function.child.wait().unwrap();
    assert!(!status.success());
    let log = function.log();
    assert!(
        log.contains("needs features.json in the archive")
            && log.contains("--extra-files features.json"),
        "{log}"
    );
}
