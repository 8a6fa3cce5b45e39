//! The deployment template: `template.yaml` passes cfn-lint (PyPI, in the project venv) with
//! its SAM transform, and the same linter does fail on a broken copy (so a pass means
//! something). Its structure is checked for what the functions rely on: the registrar fed
//! through SQS with a dead-letter queue, model functions pinned to a model version with a
//! canary, the HTTP API not public.

#![allow(clippy::unwrap_used)]

mod common;

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
        "DefaultAuthorizer: !If [HasJwt, JwtAuthorizer, AWS_IAM]",
    ] {
        assert!(text.contains(needle), "template.yaml lacks {needle}");
    }
    // Every environment variable the template sets is one the model function reads.
    let main =
        std::fs::read_to_string(common::repo_root().join("functions/model/src/main.rs")).unwrap();
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
