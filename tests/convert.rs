//! `torchfn-local convert`: an eager archive (`--model-file` with a state_dict), which
//! torchfn refuses, becomes a TorchScript archive made by the real torch-model-archiver that
//! `torchfn-local` serves with the eager model's answers, scripted or traced; archives it
//! cannot convert are refused with the reason.

#![allow(clippy::unwrap_used)]

use torchfn_test_support::{self as common, path_str, server};

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{assert_json_close, fixtures, reference, venv_python};
use serde_json::{json, Value};
use server::Server;
use torchfn_archive::mar::{self, Limits};

/// The longest one conversion may take (importing torch is most of it).
const CONVERT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a `torchfn-local convert` run gave.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The one-line JSON summary a successful run prints.
    fn summary(&self) -> Value {
        assert!(
            self.status.success(),
            "convert failed ({}):\n{}",
            self.status,
            self.stderr
        );
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "stdout: {:?}", self.stdout);
        serde_json::from_str(lines[0]).unwrap()
    }
}

/// Runs `torchfn-local convert ARGS --python <venv python>`, killed after CONVERT_TIMEOUT.
fn convert(args: &[&dyn AsRef<OsStr>]) -> Outcome {
    let python = venv_python();
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_torchfn-local"))
        .arg("convert")
        .args(args)
        .arg("--python")
        .arg(&python)
        .current_dir(logs.path())
        .env_remove("TORCHFN_PYTHON")
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("torchfn-local did not start");
    let deadline = Instant::now() + CONVERT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "convert took over {CONVERT_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        status,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// An eager archive `<dir>/<name>.mar` made by the real torch-model-archiver from `model_py`
/// (no serialized file: the models here have no weights).
fn eager_archive(dir: &Path, name: &str, model_py: &str) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("model.py"), model_py).unwrap();
    let archiver = venv_python().parent().unwrap().join("torch-model-archiver");
    let out = Command::new(archiver)
        .args(["--model-name", name, "--version", "1.0", "--model-file"])
        .arg(src.join("model.py"))
        .args(["--handler", "base_handler", "--export-path"])
        .arg(dir)
        // The archiver gathers files in $TMPDIR/<model-name>.
        .env("TMPDIR", &src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "torch-model-archiver failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(format!("{name}.mar"))
}

/// The converted archive: named as asked, TorchScript (`model.pt`, no model file), the
/// original handler, without the eager model file and weights.
fn check_archive(path: &Path, name: &str, version: &str) {
    let unpack = tempfile::tempdir().unwrap();
    let archive = mar::open(path, unpack.path(), &Limits::default()).unwrap();
    let model = &archive.manifest().model;
    assert_eq!(model.model_name, name);
    assert_eq!(model.model_version, version);
    assert_eq!(model.model_file, None, "still eager: {model:?}");
    assert_eq!(model.serialized_file.as_deref(), Some("model.pt"));
    assert_eq!(model.handler.as_deref(), Some("base_handler"));
    assert!(archive.has_file("model.pt"));
    assert!(!archive.has_file("model.py") && !archive.has_file("model_weights.pth"));
}

/// Serves `store/<name>.mar` and checks the seed features give the scripted seed model's
/// output.
fn serves_the_reference(store: &Path, name: &str) {
    let reference = reference();
    let server = Server::start(&[
        "--model-store",
        path_str(store),
        "--models",
        &format!("{name}.mar"),
        "--ts-config",
        path_str(&fixtures().join("config.properties")),
    ])
    .wait_healthy();
    let (status, got, _) = server.predict(name, reference["seed_features"].to_string());
    assert_eq!(status, 200, "{got}");
    assert_json_close(&got, &reference["tensor_single"], 1e-5, name);
}

#[test]
fn eager_archive_is_scripted_and_served() {
    let out = tempfile::tempdir().unwrap();
    let eager = fixtures().join("eager/eager.mar");
    let run = convert(&[&eager, &"--out", &out.path()]);
    let archive = out.path().join("eager.mar");
    assert_eq!(
        run.summary(),
        json!({"archive": path_str(&archive), "method": "script", "model": "eager", "version": "1.0"})
    );
    check_archive(&archive, "eager", "1.0");
    serves_the_reference(out.path(), "eager");

    // Once converted, the archive is TorchScript: converting it again is refused.
    let again = tempfile::tempdir().unwrap();
    let run = convert(&[&archive, &"--out", &again.path()]);
    assert!(!run.status.success());
    assert!(run.stderr.contains("already TorchScript"), "{}", run.stderr);
}

#[test]
fn trace_with_an_example_input_under_another_name_and_version() {
    let out = tempfile::tempdir().unwrap();
    let eager = fixtures().join("eager/eager.mar");
    let features = reference()["seed_features"].to_string();
    let run = convert(&[
        &eager,
        &"--out",
        &out.path(),
        &"--trace",
        &"--example-input",
        &features,
        &"--model-name",
        &"eager_traced",
        &"--version",
        &"2.0",
    ]);
    let archive = out.path().join("eager_traced.mar");
    assert_eq!(
        run.summary(),
        json!({"archive": path_str(&archive), "method": "trace", "model": "eager_traced", "version": "2.0"})
    );
    check_archive(&archive, "eager_traced", "2.0");
    serves_the_reference(out.path(), "eager_traced");

    // The archive is there now: a second run refuses to overwrite it without --force.
    let run = convert(&[
        &eager,
        &"--out",
        &out.path(),
        &"--model-name",
        &"eager_traced",
    ]);
    assert!(!run.status.success());
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
}

#[test]
fn torchscript_archive_is_left_alone() {
    let out = tempfile::tempdir().unwrap();
    let run = convert(&[
        &fixtures().join("store/scripted.mar"),
        &"--out",
        &out.path(),
    ]);
    assert!(!run.status.success());
    assert!(
        run.stderr
            .contains("already TorchScript; nothing to convert"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn model_file_with_two_modules_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let archive = eager_archive(
        dir.path(),
        "two",
        "import torch.nn as nn\n\n\n\
         class Encoder(nn.Module):\n    def forward(self, x):\n        return x\n\n\n\
         class Net(nn.Module):\n    def forward(self, x):\n        return x * 2\n",
    );
    let out = dir.path().join("out");
    let run = convert(&[&archive, &"--out", &out]);
    assert!(!run.status.success());
    assert!(
        run.stderr
            .contains("2 torch.nn.Module subclasses (Encoder, Net)"),
        "{}",
        run.stderr
    );
    assert!(!out.join("two.mar").exists());
}

#[test]
fn unscriptable_model_needs_an_example_input_then_is_traced() {
    let dir = tempfile::tempdir().unwrap();
    // torch.jit.script refuses `**kwargs`.
    let archive = eager_archive(
        dir.path(),
        "kwargs",
        "import torch.nn as nn\n\n\n\
         class Doubler(nn.Module):\n    def forward(self, x, **kwargs):\n        return x * 2\n",
    );
    let out = dir.path().join("out");
    let run = convert(&[&archive, &"--out", &out]);
    assert!(!run.status.success());
    for want in [
        "torch.jit.script failed",
        "variable number of arguments",
        "--example-input",
    ] {
        assert!(run.stderr.contains(want), "no {want:?} in:\n{}", run.stderr);
    }
    assert!(!out.join("kwargs.mar").exists());

    let run = convert(&[
        &archive,
        &"--out",
        &out,
        &"--example-input",
        &"[1.0, 2.0, 3.0]",
    ]);
    assert_eq!(run.summary()["method"], "trace");
    let unpack = tempfile::tempdir().unwrap();
    let converted = mar::open(&out.join("kwargs.mar"), unpack.path(), &Limits::default()).unwrap();
    assert_eq!(converted.manifest().model.model_file, None);
}
