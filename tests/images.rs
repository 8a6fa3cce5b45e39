//! The container images, built by `scripts/build-image` and run as a platform runs them:
//! not as root (the image's own user), with a read-only root filesystem and a tmpfs `/tmp`,
//! the model pulled at start from a real S3 server (moto_server on loopback), on the host's
//! network with the port from `$PORT`, so that all test traffic stays on loopback.
//!
//! These tests build and start images (minutes), so they are not in the default run:
//! `scripts/test --images` installs podman, runc and mmdebstrap where it can, builds the three
//! images and runs these tests with the images named in `TORCHFN_IMAGE_CPU`,
//! `TORCHFN_IMAGE_GPU` and `TORCHFN_IMAGE_LAMBDA`.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, moto, runtime_api};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{assert_json_close, fixtures, reference};
use serde_json::json;
use torchfn_store::store::{Location, ObjectStore};

/// The image `scripts/test --images` built, from its variable.
fn image(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run these tests with scripts/test --images"))
}

/// podman as these machines need it (runc, cgroupfs), or docker where that is what there is.
fn container_tool() -> Command {
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has("podman") {
        let mut c = Command::new("podman");
        if has("runc") {
            c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
        }
        c
    } else {
        Command::new("docker")
    }
}

/// `run --rm` with the limits these machines need (runc's defaults are refused here).
fn container_run() -> Command {
    let mut c = container_tool();
    c.args(["run", "--rm"]).args([
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=4096:4096",
    ]);
    c
}

/// Uploads a fixture archive to a new bucket; returns its `s3://` URI.
fn upload(fixture: &str) -> String {
    moto::env();
    let bucket = format!(
        "images-{}-{}",
        std::process::id(),
        fixture.replace(['/', '.'], "-")
    );
    let uri = format!(
        "s3://{bucket}/archives/{}",
        fixture.rsplit('/').next().unwrap()
    );
    let archive = std::fs::read(fixtures().join(fixture)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        moto::new_bucket(&bucket).await;
        let location: Location = uri.parse().unwrap();
        ObjectStore::from_env()
            .put(&location, archive)
            .await
            .unwrap();
    });
    uri
}

/// A running container: its log (stdout and stderr, as lines) is collected; dropping it
/// removes the container.
struct Container {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    started: Instant,
}

impl Container {
    /// `podman run` of `image` as a platform runs it, with the S3 server's settings and
    /// `env`; `extra` goes before the image (devices, entry point).
    fn run(image: &str, env: &[(&str, String)], extra: &[&str]) -> Container {
        let mut args = extra.to_vec();
        args.push(image);
        Self::run_with_args(env, &args)
    }

    /// As [`Container::run`], with `args` ending in the image and what follows it.
    fn run_with_args(env: &[(&str, String)], args: &[&str]) -> Container {
        let moto = moto::env();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "torchfn-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut cmd = container_run();
        cmd.args(["--name", &name, "--network", "host"]).args([
            "--read-only",
            "--tmpfs",
            "/tmp:rw,size=512m",
        ]);
        let mut vars: Vec<(String, String)> = [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_ENDPOINT_URL_S3",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        ]
        .iter()
        .map(|k| (k.to_string(), std::env::var(k).unwrap()))
        .collect();
        assert!(vars.iter().any(|(_, v)| v == &moto.endpoint));
        vars.push(("TORCHFN_HOST".into(), "127.0.0.1".into()));
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        for (k, v) in &vars {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        cmd.args(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Container {
            name,
            child,
            log,
            started: Instant::now(),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to `secs`) for `ready`, failing with the container's log; the container
    /// must keep running meanwhile.
    fn wait_for(&mut self, what: &str, secs: u64, mut ready: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if ready(&self.log()) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the container exited ({status}) before {what}; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the container's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `/ping` on `port` to answer 200.
    fn wait_ping(&mut self, port: u16) {
        let client = client();
        let url = format!("http://127.0.0.1:{port}/ping");
        self.wait_for("/ping to answer 200", 180, |_| {
            client
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().as_u16() == 200)
        });
    }

    /// The user id the container's main process runs as, from the host's `/proc`.
    fn process_uid(&self) -> u32 {
        let out = container_tool()
            .args(["inspect", "--format", "{{.State.Pid}}", &self.name])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
        uid.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Sends SIGTERM to the container's process.
    fn sigterm(&self) {
        let status = container_tool()
            .args(["kill", "--signal", "TERM", &self.name])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (up to 60 s) for the container to exit, which must be with status 0.
    fn expect_clean_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 60 s after SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "exit on SIGTERM: {status}; log:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then a clean exit.
    fn terminate(&mut self) {
        self.sigterm();
        self.expect_clean_exit();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = container_tool()
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Runs `image` serving `fixture` (uploaded to S3) on a free port, with `env` and the
/// `extra` run arguments, and waits for `/ping`; returns the container and its port.
fn serve_from_s3(
    image: &str,
    fixture: &str,
    env: &[(&str, String)],
    extra: &[&str],
) -> (Container, u16) {
    let port = moto::free_port();
    let mut vars = vec![
        ("PORT", port.to_string()),
        ("TORCHFN_MODEL_URI", upload(fixture)),
    ];
    vars.extend(env.iter().cloned());
    let mut c = Container::run(image, &vars, extra);
    c.wait_ping(port);
    (c, port)
}

/// Serves the classifier from S3 with `image`; checks health, a correct answer and the
/// metrics; returns the running container and its port.
fn serve_classifier(image: &str, extra: &[&str]) -> (Container, u16) {
    let (c, port) = serve_from_s3(
        image,
        "store/classifier.mar",
        &[
            ("TORCHFN_HANDLER", "classifier".into()),
            ("RUST_LOG", "info".into()),
        ],
        extra,
    );
    let reference = reference();
    let r = client()
        .post(format!("http://127.0.0.1:{port}/predictions/classifier"))
        .body(json!({"features": reference["seed_features"]}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", c.log());
    let body: serde_json::Value = r.json().unwrap();
    assert_json_close(&body, &reference["classifier_single"], 1e-5, image);
    eprintln!(
        "{image}: first correct answer {:.2} s after `run` (model pulled from S3)",
        c.started.elapsed().as_secs_f64()
    );
    let metrics = client()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ts_inference_requests_total{"))
        .collect();
    assert_eq!(
        counted.len(),
        1,
        "the request is counted once, under one version:\n{metrics}"
    );
    assert!(
        counted[0].contains("model_name=\"classifier\""),
        "{metrics}"
    );
    assert!(counted[0].ends_with(" 1.0"), "{metrics}");
    (c, port)
}

/// The CPU image as Kubernetes or a serverless platform runs it: the image's own non-root
/// user, read-only root with a tmpfs `/tmp`, the model from S3; health, a correct answer,
/// metrics, and a clean exit on SIGTERM.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn cpu_image_serves_a_model_from_s3_read_only_and_not_as_root() {
    let (mut c, _) = serve_classifier(&image("TORCHFN_IMAGE_CPU"), &[]);
    assert_eq!(c.process_uid(), 65532, "the image runs as its own user");
    c.terminate();
}

/// SIGTERM while a request is in flight: the request is answered, then the server exits 0.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn cpu_image_answers_the_request_in_flight_on_sigterm() {
    let (mut c, port) = serve_from_s3(
        &image("TORCHFN_IMAGE_CPU"),
        "slow/slow.mar",
        &[
            ("RUST_LOG", "info,torchfn_http=debug".into()),
            ("OMP_NUM_THREADS", "1".into()),
        ],
        &[],
    );
    let url = format!("http://127.0.0.1:{port}/predictions/slow");
    let warm = client()
        .post(&url)
        .body(json!({"data": [0, 1]}).to_string())
        .send()
        .unwrap();
    assert_eq!(warm.status(), 200, "{}", c.log());
    let received = |log: &str| {
        log.lines()
            .filter(|l| l.contains("received") && l.contains("/predictions/slow"))
            .count()
    };
    assert_eq!(received(&c.log()), 1, "{}", c.log());

    // A forward pass of several seconds.
    let in_flight = std::thread::spawn(move || {
        let r = client()
            .post(&url)
            .body(json!({"data": [300_000, 7]}).to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    c.wait_for("the server to take the request", 60, |log| {
        received(log) == 2
    });
    assert!(
        !in_flight.is_finished(),
        "answered before SIGTERM: the pass is too short to test with"
    );
    c.sigterm();
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}; log:\n{}", c.log());
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer, json!([14.0]), "{body}");
    c.expect_clean_exit();
}

/// The GPU image without a GPU but with the driver's device node present (as on a node
/// whose driver cannot start): every shipped library resolves inside the image, the CUDA
/// backend and all it links load, the fallback to the CPU is a warning, and the model
/// answers correctly.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn gpu_image_loads_its_cuda_backend_and_falls_back_to_the_cpu_with_a_warning() {
    let image = image("TORCHFN_IMAGE_GPU");
    let out = container_run()
        .args(["--network", "none", "--entrypoint", "/bin/sh"])
        .arg(&image)
        .args([
            "-c",
            // The binary through its own rpath; each library as the process finds the
            // others (all in one folder, which the loader has by then searched).
            "list() { out=$(\"$@\") || echo \"FAILED $*\"; echo \"$out\" | grep 'not found' | sed \"s|^|$*: |\"; }; \
             list /lib64/ld-linux-x86-64.so.2 --list /opt/torchfn/bin/torchfn-model; n=1; \
             for f in /opt/torchfn/lib/*.so*; do n=$((n+1)); \
               list /lib64/ld-linux-x86-64.so.2 --library-path /opt/torchfn/lib --list \"$f\"; \
             done; echo \"checked $n\"",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("not found") && !text.contains("FAILED"),
        "unresolved libraries in the image:\n{text}"
    );
    let checked: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("checked "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(checked > 20, "{text}");

    let (mut c, _) = serve_classifier(&image, &["--device", "/dev/null:/dev/nvidiactl"]);
    let log = c.log();
    assert!(
        log.contains("libtorch CUDA backend loaded"),
        "the CUDA backend did not load:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("CUDA cannot be used")),
        "no warning about the CPU fallback:\n{log}"
    );
    c.terminate();
}

/// The Lambda image in Lambda mode: the binary is its own runtime and takes an API Gateway v2
/// event from the Runtime API (this project's harness, on loopback), with the model pulled
/// from S3 during INIT.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn lambda_image_answers_an_api_gateway_event_through_the_runtime_api() {
    let image = image("TORCHFN_IMAGE_LAMBDA");
    let uri = upload("store/classifier.mar");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (api, tx, addr) = runtime_api::start().await;
        let c = Container::run(
            &image,
            &[
                ("AWS_LAMBDA_RUNTIME_API", addr.to_string()),
                ("AWS_LAMBDA_FUNCTION_NAME", "classifier".into()),
                ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048".into()),
                ("AWS_LAMBDA_FUNCTION_VERSION", "1".into()),
                ("TORCHFN_MODEL_URI", uri),
                ("TORCHFN_HANDLER", "classifier".into()),
            ],
            &[],
        );
        let reference = reference();
        let event = runtime_api::http_api_event(
            "first",
            "/predictions/classifier",
            &json!({"features": reference["seed_features"]}),
        );
        let answer = runtime_api::invoke(&api, &tx, "first", event, 180).await;
        assert_eq!(answer["statusCode"], 200, "{answer}; log:\n{}", c.log());
        let body: serde_json::Value =
            serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_json_close(&body, &reference["classifier_single"], 1e-5, "lambda image");
        eprintln!(
            "{image}: first answer through the Runtime API {:.2} s after `run`",
            c.started.elapsed().as_secs_f64()
        );
    });
}

/// The KServe serving runtime (`deploy/kserve/servingruntime.yaml`) as KServe runs it: the
/// storage initializer has put the InferenceService's archive in `/mnt/models`, the container
/// gets the runtime's arguments with `{{.Name}}` filled in, and answers KServe's v1 and v2
/// protocols under the InferenceService's name.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn kserve_runtime_serves_the_archive_the_storage_initializer_left() {
    let runtime =
        std::fs::read_to_string(common::repo_root().join("deploy/kserve/servingruntime.yaml"))
            .unwrap();
    let args: Vec<String> = runtime
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|a| format!("--{}", a.replace("{{.Name}}", "my-classifier")))
        .collect();
    assert_eq!(
        args,
        ["--model-uri=/mnt/models", "--model-name=my-classifier"]
    );
    let models = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("store/classifier.mar"),
        models.path().join("classifier.mar"),
    )
    .unwrap();
    let port = moto::free_port();
    let mount = format!("{}:/mnt/models:ro", models.path().display());
    let mut extra: Vec<&str> = vec![
        "-v",
        &mount,
        "--entrypoint",
        "/opt/torchfn/bin/torchfn-model",
    ];
    let image = image("TORCHFN_IMAGE_CPU");
    // The runtime's arguments follow the image, as KServe passes them.
    extra.push(&image);
    extra.extend(args.iter().map(String::as_str));
    let mut c = Container::run_with_args(
        &[
            ("PORT", port.to_string()),
            ("TORCHFN_HANDLER", "classifier".into()),
        ],
        &extra,
    );
    c.wait_ping(port);
    let reference = reference();
    let base = format!("http://127.0.0.1:{port}");
    let r = client()
        .post(format!("{base}/v1/models/my-classifier:predict"))
        .body(json!({"instances": [{"features": reference["seed_features"]}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", c.log());
    let body: serde_json::Value = r.json().unwrap();
    assert_json_close(
        &body["predictions"][0],
        &reference["classifier_single"],
        1e-5,
        "KServe v1",
    );
    let r = client()
        .get(format!("{base}/v2/models/my-classifier/ready"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", c.log());
    c.terminate();
}

/// The Python-backend image runs an archive with its own Python handler unchanged (no
/// handler mapping): TorchServe's MNIST example, an eager-mode model whose handler imports
/// torchvision and answers the argmax, pulled from S3; answers equal TorchServe's.
#[test]
#[ignore = "builds and runs container images: scripts/test --images"]
fn python_image_runs_a_python_handler_archive_unchanged() {
    let (mut c, port) = serve_from_s3(
        &image("TORCHFN_IMAGE_PYTHON"),
        "python/mnist.mar",
        &[("RUST_LOG", "info".into())],
        &[],
    );
    let want = reference()["mnist_answers"].clone();
    for (k, want) in want.as_array().unwrap().iter().enumerate() {
        let image = std::fs::read(fixtures().join(format!("python/digit{k}.png"))).unwrap();
        let r = client()
            .put(format!("http://127.0.0.1:{port}/predictions/mnist"))
            .body(image)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", c.log());
        let got: serde_json::Value = r.json().unwrap();
        assert_eq!(got, *want, "digit{k}");
        if k == 0 {
            eprintln!(
                "torchfn-model:python: first correct answer {:.2} s after `run` (Python worker, model pulled from S3)",
                c.started.elapsed().as_secs_f64()
            );
        }
    }
    assert_eq!(c.process_uid(), 65532);
    c.terminate();
}
