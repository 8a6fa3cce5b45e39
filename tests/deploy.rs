//! The deployment template: `template.yaml` passes cfn-lint (PyPI, in the project venv) with
//! its SAM transform, and the same linter does fail on a broken copy (so a pass means
//! something). Its structure is checked for what the functions rely on: the registrar fed
//! through SQS with a dead-letter queue, model functions pinned to a model version with a
//! canary, the HTTP API not public.

#![allow(clippy::unwrap_used)]

use torchfn_test_support as common;

use std::path::Path;
use std::process::Command;

fn cfn_lint(template: &Path) -> (bool, String) {
    let bin = common::venv_python().parent().unwrap().join("cfn-lint");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup",
        bin.display()
    );
    let out = Command::new(bin)
        .arg(template)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_template_lints_clean_and_a_broken_one_does_not() {
    let template = common::repo_root().join("template.yaml");
    let (ok, output) = cfn_lint(&template);
    assert!(ok, "cfn-lint template.yaml:\n{output}");

    let text = std::fs::read_to_string(&template).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("template.yaml");
    std::fs::write(
        &broken,
        text.replace("MemorySize: 512", "MemorySize: 99999"),
    )
    .unwrap();
    let (ok, output) = cfn_lint(&broken);
    assert!(!ok, "cfn-lint passed a function with 99999 MB:\n{output}");
    assert!(output.contains("99999"), "{output}");
}

/// The `sam` of aws-sam-cli's own venv (scripts/setup makes it beside the project's).
fn sam() -> std::path::PathBuf {
    common::tool("venv-sam-1.170.0", "sam")
}

/// AWS SAM's own validation (the SAM translator, then with `--lint`), offline: it catches
/// what cfn-lint does not (for example conditional `CapacityProviderConfig`).
#[test]
fn sam_validates_the_template() {
    let sam = sam();
    for lint in [false, true] {
        let mut cmd = Command::new(&sam);
        cmd.args(["validate", "-t"])
            .arg(common::repo_root().join("template.yaml"))
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("SAM_CLI_TELEMETRY", "0");
        if lint {
            cmd.arg("--lint");
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("is a valid SAM Template"),
            "{text}"
        );
    }
}

#[test]
fn the_template_wires_what_the_functions_expect() {
    let text = std::fs::read_to_string(common::repo_root().join("template.yaml")).unwrap();
    // The registrar's environment and event source are what functions/registrar reads.
    for needle in [
        "TORCHFN_REGISTRY:",
        "TORCHFN_ARCHIVE_PREFIX:",
        "Binary: torchfn-registrar",
        "BuildMethod: rust-cargolambda",
        "Type: SQS",
        "deadLetterTargetArn:",
        "s3:ObjectCreated:*",
        "s3:ObjectRemoved:*",
        // Model functions: pinned version, canary through an alias, image packaging.
        "TORCHFN_MODEL_NAME: classifier",
        "TORCHFN_MODEL_VERSION: !Ref ClassifierVersion",
        "AutoPublishAlias: live",
        "DeploymentPreference:",
        "PackageType: Image",
        // Not public by default.
        "DefaultAuthorizer: AWS_IAM",
    ] {
        assert!(text.contains(needle), "template.yaml lacks {needle}");
    }
    // Every environment variable the template sets is one the model function reads.
    let main =
        std::fs::read_to_string(common::repo_root().join("functions/model/src/lib.rs")).unwrap();
    for line in text.lines() {
        let line = line.trim();
        if let Some((name, _)) = line.split_once(':') {
            if name.starts_with("TORCHFN_") && !name.contains("ARCHIVE_PREFIX") {
                assert!(
                    main.contains(name),
                    "{name} is set by the template but not read"
                );
            }
        }
    }
}

/// The layer is complete: a copy of the model function whose only library path is the
/// layer's `lib/`, started with an empty environment, loads libtorch from the layer and
/// answers a prediction. (The layer is assembled even though this libtorch is over Lambda's
/// 250 MB limit: the script says so, exit status 3, and the images use the same folder.)
#[test]
fn the_layer_holds_the_whole_closure() {
    use std::io::{BufRead, BufReader, Read};
    let root = common::repo_root();
    // The model function beside this test's binaries (built by the workspace build).
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("debug/torchfn-model");
    if !binary.exists() {
        let status =
            common::cargo_tool(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["build", "-p", "torchfn-model"])
                .current_dir(&root)
                .status()
                .unwrap();
        assert!(status.success());
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    let out = Command::new(root.join("layers/build-layer"))
        .arg("--binary")
        .arg(&binary)
        .arg("--out")
        .arg(&layer)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{report}");
    assert!(report.contains("over Lambda's 250 MiB"), "{report}");
    let out = Command::new(root.join("layers/build-layer"))
        .arg("--binary")
        .arg(&binary)
        .arg("--out")
        .arg(&layer)
        .arg("--assemble-only")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let libs = layer.join("lib");
    assert!(libs.join("libtorch_cpu.so").exists());

    // The function as the images hold it: bin/bootstrap, whose rpath is $ORIGIN/../lib (the
    // layer alone: no libtorch folder, no LD_LIBRARY_PATH).
    let function = layer.join("bin/bootstrap");
    assert!(function.exists());
    let archive = common::fixtures().join("store/classifier.mar");
    let mut child = Command::new(&function)
        .env_clear()
        .current_dir(dir.path())
        .env("LD_DEBUG", "libs")
        .env("PORT", "0")
        .env("TORCHFN_HOST", "127.0.0.1")
        .env("TORCHFN_MODEL_URI", &archive)
        .env("TORCHFN_HANDLER", "classifier")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let loader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let addr = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("Inference API bind to: ").map(String::from));
    let answer = addr.as_ref().map(|addr| {
        let body = serde_json::json!({"features": common::reference()["seed_features"]});
        reqwest::blocking::Client::new()
            .post(format!("{addr}/predictions/classifier"))
            .body(body.to_string())
            .send()
            .unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = loader.join().unwrap();
    let answer = answer.unwrap_or_else(|| panic!("the function did not start:\n{log}"));
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().unwrap();
    common::assert_json_close(
        &body,
        &common::reference()["classifier_single"],
        1e-5,
        "layer",
    );
    // libtorch came from the layer, and so did every library that is not the system's.
    let loaded: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("calling init: ").nth(1))
        .map(str::trim)
        .collect();
    assert!(
        loaded.iter().any(|l| l.ends_with("/libtorch_cpu.so")),
        "no libtorch in the loader's log:\n{log}"
    );
    for lib in loaded {
        let system = ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"]
            .iter()
            .any(|p| lib.starts_with(p));
        let real = std::fs::canonicalize(lib).unwrap();
        assert!(
            system || real.starts_with(std::fs::canonicalize(&libs).unwrap()),
            "{lib} was loaded from outside the layer"
        );
    }
}

/// Every path the Dockerfiles copy is what `layers/build-layer` produces (the CPU layer is
/// built here; the CUDA one has the same layout and its closure is listed, since copying its
/// 3.5 GB would not prove more).
#[test]
fn the_dockerfiles_copy_what_the_build_produces() {
    let root = common::repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("debug/torchfn-model");
    assert!(binary.exists(), "build torchfn-model first");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(root.join("layers/build-layer"))
        .arg("--binary")
        .arg(&binary)
        .arg("--out")
        .arg(dir.path().join("layer"))
        .arg("--assemble-only")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = Command::new(root.join("layers/build-layer"))
        .arg("--binary")
        .arg(&binary)
        .args(["--cuda", "--list"])
        .output()
        .unwrap();
    let cuda_libs = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(cuda_libs.contains("/libtorch_cuda.so"), "{cuda_libs}");
    assert!(cuda_libs.contains("libcudart"), "{cuda_libs}");

    let mut copies = 0;
    for name in ["layers/Dockerfile.lambda", "layers/Dockerfile"] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        for line in text.lines().filter(|l| l.starts_with("COPY ")) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let source = parts[1];
            // layers/Dockerfile copies from the layer its LAYER argument names
            // (target/layer-cuda or target/layer, as scripts/build-image passes it).
            let rel = source
                .strip_prefix("target/layer-cuda/")
                .or_else(|| source.strip_prefix("target/layer/"))
                .or_else(|| source.strip_prefix("${LAYER}/"))
                .unwrap_or_else(|| panic!("{name}: {source} is not made by layers/build-layer"));
            let built = dir.path().join("layer").join(rel);
            assert!(
                built.exists(),
                "{name} copies {source}, which the build does not make"
            );
            copies += 1;
        }
        assert!(text.contains("ENTRYPOINT"), "{name} has no entry point");
    }
    assert_eq!(copies, 4);
}

/// `cargo lambda build --release` of both functions: the registrar through `sam build
/// --beta-features RegistrarFunction` (SAM's `rust-cargolambda` build method runs
/// `cargo lambda build --release --bin torchfn-registrar` in its CodeUri, cross-linked with zig,
/// cargo-lambda's default; it links no libtorch) and the model function as the README builds it
/// for its image, with `--compiler cargo` (libtorch is built with libstdc++ and linked from its
/// own folder). Both bootstraps start; the model's libraries all resolve (its layer can be
/// built). SAM cannot build the image functions here (no Docker), so it builds by logical id.
///
/// Both builds run with the release profile's optimisation and debug info turned down
/// (`CARGO_PROFILE_RELEASE_*` in their environment): the test proves the build pipeline
/// and the binaries it makes, not their speed, and a fully optimised release build of the
/// workspace's crates took most of the suite's time on a 2-core machine. `scripts/bench`
/// and the images build with the real release profile.
#[test]
fn sam_and_cargo_lambda_build_both_functions() {
    let root = common::repo_root();
    let quick_release = [
        ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0"),
        ("CARGO_PROFILE_RELEASE_DEBUG", "0"),
        ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256"),
        ("CARGO_PROFILE_RELEASE_LTO", "false"),
    ];
    let bin = common::venv_python().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let built = tempfile::tempdir().unwrap();
    let sam_build = common::cargo_tool(sam())
        .args(["build", "--beta-features", "--build-dir"])
        .arg(built.path())
        .arg("RegistrarFunction")
        .env("PATH", &path)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("SAM_CLI_TELEMETRY", "0")
        .envs(quick_release)
        .current_dir(&root)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&sam_build.stdout),
        String::from_utf8_lossy(&sam_build.stderr)
    );
    assert!(
        sam_build.status.success() && said.contains("Build Succeeded"),
        "sam build RegistrarFunction:\n{said}"
    );
    // The built template points the function at what SAM built.
    let template = std::fs::read_to_string(built.path().join("template.yaml")).unwrap();
    assert!(
        template.contains("CodeUri: RegistrarFunction"),
        "{template}"
    );
    let model = common::cargo_tool(bin.join("cargo-lambda"))
        .args(["lambda", "build", "--release", "-p", "torchfn-model"])
        .args(["--compiler", "cargo"])
        .env("PATH", &path)
        .envs(quick_release)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        model.status.success(),
        "cargo lambda build -p torchfn-model:\n{}",
        String::from_utf8_lossy(&model.stderr)
    );
    for (package, bootstrap) in [
        (
            "torchfn-registrar",
            built.path().join("RegistrarFunction/bootstrap"),
        ),
        (
            "torchfn-model",
            target.join("lambda/torchfn-model/bootstrap"),
        ),
    ] {
        assert!(bootstrap.exists(), "{} missing", bootstrap.display());
        // Started under a (dead) Runtime API with Lambda's variables but no configuration,
        // each says what is missing and stops (so it loads and runs).
        let run = Command::new(&bootstrap)
            .env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9")
            .env("AWS_LAMBDA_FUNCTION_NAME", package)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(!run.status.success());
        assert!(
            said.contains("TORCHFN_REGISTRY") || said.contains("TORCHFN_MODEL_URI"),
            "{package}: {said}"
        );
    }
    let listed = Command::new(root.join("layers/build-layer"))
        .arg("--binary")
        .arg(target.join("lambda/torchfn-model/bootstrap"))
        .arg("--list")
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("libtorch_cpu.so"));
}

/// The Kubernetes, Knative and KServe manifests under `deploy/` validate offline
/// (`scripts/validate-deploy`: kubernetes-validate in strict mode for core objects, the KServe
/// SDK's and Kubernetes client's models field by field for the rest), and a copy with one
/// wrong field fails, so a pass means something. They carry what the images need to run as
/// platforms run them.
#[test]
fn the_kubernetes_and_kserve_manifests_validate() {
    let root = common::repo_root();
    let python = common::tool("venv-deploy-validators-1", "python");
    let validate = |files: &[&Path]| {
        let out = Command::new(&python)
            .arg(root.join("scripts/validate-deploy"))
            .args(files)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, text) = validate(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("8 objects in 5 files, 0 problems"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let mut broken = Vec::new();
    for (name, from, to) in [
        (
            "cpu.yaml",
            "k8s/cpu.yaml",
            (
                "readOnlyRootFilesystem: true",
                "readOnlyRootFileSystem: true",
            ),
        ),
        (
            "knative.yaml",
            "k8s/knative.yaml",
            ("containerConcurrency: 64", "containerConcurrency: \"64\""),
        ),
        (
            "isvc.yaml",
            "kserve/inferenceservice.yaml",
            ("storageUri:", "storageURI:"),
        ),
        (
            "runtime.yaml",
            "kserve/servingruntime.yaml",
            ("protocolVersions:", "protocolVersion:"),
        ),
    ] {
        let text = std::fs::read_to_string(root.join("deploy").join(from)).unwrap();
        assert!(text.contains(to.0), "{from}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replacen(to.0, to.1, 1)).unwrap();
        broken.push(path);
    }
    let paths: Vec<&Path> = broken.iter().map(|p| p.as_path()).collect();
    let (ok, text) = validate(&paths);
    assert!(!ok, "{text}");
    for needle in [
        "readOnlyRootFileSystem",
        "containerConcurrency: expected int",
        "'storageURI' is not a field",
        "'protocolVersion' is not a field",
        "4 problems",
    ] {
        assert!(text.contains(needle), "{needle} not reported:\n{text}");
    }

    let k8s = |name: &str| std::fs::read_to_string(root.join("deploy/k8s").join(name)).unwrap();
    for name in ["cpu.yaml", "gpu.yaml", "knative.yaml"] {
        let text = k8s(name);
        for needle in [
            "path: /ping",
            "mountPath: /tmp",
            "emptyDir",
            "readOnlyRootFilesystem: true",
            "runAsNonRoot: true",
        ] {
            assert!(text.contains(needle), "{name} lacks {needle}");
        }
    }
    assert!(k8s("gpu.yaml").contains("nvidia.com/gpu: \"1\""));
    assert!(k8s("cpu.yaml").contains("kind: HorizontalPodAutoscaler"));
}
