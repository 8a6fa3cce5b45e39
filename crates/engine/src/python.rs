//! Where the Python backend meets the engine: which archives it serves, the interpreter it
//! runs, a model's requirements, and a request turned into the worker's form.
//!
//! An archive goes to a Rust built-in when one is named for it (`--handler NAME=BUILTIN`, the
//! `models` JSON, a registration's `handler`, or a path to TorchServe's own handler file that
//! a built-in matches), when its manifest names a built-in, or when its manifest names a Python
//! handler file and `default_service_handler` names a built-in. Everything else — a handler
//! file of its own, a TorchServe handler torchfn has no built-in for, an eager-mode model, a
//! `text_classifier` archive with a torchtext vocabulary — is served by TorchServe's own
//! Python backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{ErrorKind, ServeError};
use crate::handler::{self, form_fields, Handler, Request};
use torchfn_archive::handlers;
use torchfn_archive::mar::ModelArchive;
use torchfn_archive::settings::Settings;
use torchfn_python::Input;

/// Who serves an archive.
pub enum Choice {
    /// A Rust handler on a TorchScript session.
    Builtin(Arc<dyn Handler>),
    /// TorchServe's Python backend, with this handler (as TorchServe hands it to the worker).
    Python(String),
}

/// The built-in a handler names: itself, or the built-in of a path to TorchServe's own
/// handler file (`serve/ts/torch_handler/image_classifier.py:handle`).
fn builtin_name(handler: &str) -> Option<&str> {
    let file = handler.split(':').next().unwrap_or(handler);
    if let Some(stem) = file
        .strip_suffix(".py")
        .filter(|f| f.contains("ts/torch_handler/") || f.starts_with("torch_handler/"))
        .and_then(|f| f.rsplit('/').next())
    {
        return handlers::is_builtin(stem).then_some(stem);
    }
    Some(handler)
}

/// Picks the backend for an archive. `configured` is the handler named for this model (a
/// registration's, `--handler`, the `models` JSON); `default` is `default_service_handler`.
pub fn choose(
    archive: &ModelArchive,
    model_name: &str,
    configured: Option<&str>,
    default: Option<&str>,
) -> Result<Choice, ServeError> {
    let manifest = &archive.manifest().model;
    let manifest_handler = manifest.handler.as_deref().unwrap_or("");
    let eager = manifest.model_file.is_some();
    let builtin = |name: &str| -> Result<Option<Arc<dyn Handler>>, ServeError> {
        match builtin_name(name) {
            Some(n) => handler::builtin(n, archive),
            None => Ok(None),
        }
    };
    if let Some(name) = configured {
        if let Some(h) = builtin(name)? {
            if eager {
                // A path to TorchServe's own handler file runs that handler where the Rust
                // one cannot (an eager-mode model), as TorchServe would: in its worker, by
                // its module name.
                return match builtin_name(name).filter(|stem| *stem != name) {
                    Some(stem) => Ok(Choice::Python(stem.to_string())),
                    None => Err(eager_with_builtin(model_name, name)),
                };
            }
            return Ok(Choice::Builtin(h));
        }
        return Ok(Choice::Python(name.to_string()));
    }
    if eager {
        return Ok(Choice::Python(manifest_handler.to_string()));
    }
    if manifest_handler.is_empty() {
        return Ok(Choice::Builtin(Arc::new(handler::TensorHandler)));
    }
    if torchtext_archive(manifest_handler, archive) {
        return Ok(Choice::Python(manifest_handler.to_string()));
    }
    if let Some(h) = builtin(manifest_handler)? {
        return Ok(Choice::Builtin(h));
    }
    let names_a_file = manifest_handler
        .split(':')
        .next()
        .is_some_and(|f| f.ends_with(".py"));
    if names_a_file {
        if let Some(h) = default.map(builtin).transpose()?.flatten() {
            return Ok(Choice::Builtin(h));
        }
    }
    Ok(Choice::Python(manifest_handler.to_string()))
}

/// A TorchServe text archive as its examples make them: `text_classifier` with a torchtext
/// vocabulary (`source_vocab.pt`) and no `tokenizer.json`. Only Python reads that vocabulary,
/// so TorchServe's own handler serves it in the Python backend, as under TorchServe; the Rust
/// built-in serves archives that ship a `tokenizer.json`.
fn torchtext_archive(handler: &str, archive: &ModelArchive) -> bool {
    builtin_name(handler) == Some("text_classifier")
        && archive.has_file("source_vocab.pt")
        && !archive.has_file("tokenizer.json")
}

fn eager_with_builtin(model_name: &str, builtin: &str) -> ServeError {
    ServeError::new(
        ErrorKind::InvalidModel,
        format!(
            "model {model_name}: the archive holds an eager-mode model (a modelFile with a \
             state_dict), which the built-in `{builtin}` cannot load: drop the handler mapping \
             to serve it through the Python backend, or convert it once with \
             `torchfn-local convert <archive> --out <model store>` for the Rust path"
        ),
    )
}

/// The interpreter the Python backend runs: the configured one, else the project venv's
/// that this binary was built against (when it is still there), else `python3`.
pub fn interpreter(settings: &Settings) -> PathBuf {
    if let Some(p) = &settings.python {
        return p.clone();
    }
    if let Some(p) = option_env!("TORCHFN_BUILD_PYTHON")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return p;
    }
    PathBuf::from("python3")
}

/// `install_py_dep_per_model`: installs the archive's requirements file into its folder (on
/// the workers' `PYTHONPATH`), as TorchServe does: `pip install -U -t <model dir> -r <file>`.
/// Blocking.
pub fn install_requirements(python: &Path, dir: &Path, file: &str) -> Result<(), ServeError> {
    let requirements = dir.join(file);
    tracing::info!(requirements = %requirements.display(), "installing the model's Python dependencies");
    let out = std::process::Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-U",
            "-t",
        ])
        .arg(dir)
        .arg("-r")
        .arg(&requirements)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            ServeError::new(
                ErrorKind::InvalidModel,
                format!(
                    "cannot run {} for the model's requirements: {e}",
                    python.display()
                ),
            )
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(ServeError::new(
        ErrorKind::InvalidModel,
        format!(
            "installing {file} (install_py_dep_per_model=true) failed: {}",
            tail.join(" | ")
        ),
    ))
}

/// A request as TorchServe hands it to a worker: every query parameter an input; a form's
/// fields one input each; any other body one input named `body` with the request's media type;
/// every header.
pub fn request(
    id: String,
    headers: Vec<(String, Vec<u8>)>,
    query: Option<&str>,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<torchfn_python::Request, ServeError> {
    let mut inputs = Vec::new();
    if let Some(q) = query {
        for (k, v) in percent_pairs(q) {
            inputs.push(Input {
                name: k,
                content_type: String::new(),
                value: v,
            });
        }
    }
    let as_request = Request {
        body,
        content_type,
        tensor_shape: None,
    };
    match form_fields(&as_request)? {
        Some(fields) => inputs.extend(fields.into_iter().map(|f| Input {
            name: f.name,
            content_type: f.content_type.unwrap_or_default(),
            value: f.value,
        })),
        None => inputs.push(Input {
            name: "body".into(),
            content_type: as_request.media_type().unwrap_or("").to_string(),
            value: body.to_vec(),
        }),
    }
    Ok(torchfn_python::Request {
        id,
        headers,
        inputs,
    })
}

/// A query string's pairs, `+` as space and %-escapes decoded (bad escapes kept as they are,
/// as Netty's decoder does).
fn percent_pairs(q: &str) -> Vec<(String, Vec<u8>)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| -> Vec<u8> {
                let spaced = s.replace('+', " ");
                percent_encoding::percent_decode_str(&spaced).collect()
            };
            (String::from_utf8_lossy(&dec(k)).into_owned(), dec(v))
        })
        .collect()
}

/// A worker failure as the engine's error, with TorchServe's status.
pub fn failure(f: torchfn_python::Failure) -> ServeError {
    let kind = match f.status {
        503 => ErrorKind::PredictionFailed,
        500 => ErrorKind::Internal,
        s => ErrorKind::Status(s),
    };
    ServeError::new(kind, f.message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn torchserve_handler_files_map_onto_builtins() {
        assert_eq!(
            builtin_name("serve/ts/torch_handler/image_classifier.py:handle"),
            Some("image_classifier")
        );
        assert_eq!(
            builtin_name("/venv/lib/python3.11/site-packages/ts/torch_handler/base_handler.py"),
            Some("base_handler")
        );
        assert_eq!(builtin_name("serve/ts/torch_handler/vllm_handler.py"), None);
        assert_eq!(builtin_name("my_handler.py"), Some("my_handler.py"));
    }

    #[test]
    fn a_request_reaches_the_worker_as_torchserve_forms_it() {
        let r = request(
            "id".into(),
            vec![("content-type".into(), b"application/json".to_vec())],
            Some("k=a+b%21&flag"),
            b"[1]",
            Some("application/json; charset=utf-8"),
        )
        .unwrap();
        assert_eq!(r.inputs.len(), 3);
        assert_eq!(r.inputs[0].name, "k");
        assert_eq!(r.inputs[0].value, b"a b!");
        assert_eq!(r.inputs[1].name, "flag");
        assert_eq!(r.inputs[2].name, "body");
        assert_eq!(r.inputs[2].content_type, "application/json");

        let form = request(
            "id".into(),
            Vec::new(),
            None,
            b"data=x&other=%FFy",
            Some("application/x-www-form-urlencoded"),
        )
        .unwrap();
        let names: Vec<_> = form.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["data", "other"]);
        assert_eq!(form.inputs[1].value, b"\xffy");
    }
}
