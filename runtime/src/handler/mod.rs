//! Handlers turn request bodies into model inputs and model outputs into responses, over a
//! batch: `decode` (per request, on the async side; cheap), then on a model worker thread
//! `preprocess` (stack a batch of same-shape instances) → `inference` → `postprocess`
//! (one JSON value per instance).
//!
//! Built-ins: `tensor` (TorchServe's `base_handler`) and `classifier` (the custom
//! `ClassifierHandler` of TorchServe's getting-started guide).

mod classifier;
mod decode;
mod tensor;

use std::sync::Arc;

use serde_json::Value;
use tch::{Device, Tensor};

use crate::error::ApiError;
use crate::mar::ModelArchive;
use crate::session::{Session, SessionError};

pub use classifier::ClassifierHandler;
pub use decode::{Decoded, Instance};
pub use tensor::TensorHandler;

/// Names of the built-in handlers, as a manifest or `--handler` may give them.
pub const BUILTINS: &[&str] = &["tensor", "base_handler", "classifier"];

/// TorchServe handler names torchfn does not serve yet.
const NOT_YET: &[&str] = &[
    "image_classifier",
    "image_segmenter",
    "object_detector",
    "text_classifier",
    "dali_image_classifier",
    "vllm_handler",
    "trt_llm_handler",
];

/// A model's request/response logic. Implementations are shared by the HTTP side and the
/// model's worker threads.
pub trait Handler: Send + Sync + 'static {
    /// The handler's name, as reported by describe.
    fn name(&self) -> &'static str;

    /// Decodes one request body into its instances. Errors are the client's (400).
    fn decode(&self, body: &[u8]) -> Result<Decoded, ApiError>;

    /// Stacks instances that share one shape into a batch tensor on `device`.
    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Tensor, SessionError> {
        decode::stack(items, device)
    }

    /// Runs the model on a batch.
    fn inference(&self, session: &Session, batch: &Tensor) -> Result<Tensor, SessionError> {
        session.forward(batch)
    }

    /// One JSON value per batch row. `rows` is how many instances went in.
    fn postprocess(&self, output: &Tensor, rows: usize) -> Result<Vec<Value>, SessionError>;
}

/// Picks the handler for an archive. `configured` is the built-in named by the server's
/// settings (`--handler`, the `models` JSON or `default_service_handler`); it wins over the
/// manifest, and is required when the manifest names a Python handler file.
pub fn for_archive(
    archive: &ModelArchive,
    model_name: &str,
    configured: Option<&str>,
) -> Result<Arc<dyn Handler>, ApiError> {
    let manifest_handler = archive.manifest().model.handler.as_deref().unwrap_or("");
    let chosen = match configured {
        Some(name) => name,
        None if manifest_handler.is_empty() => "tensor",
        None => manifest_handler,
    };
    if let Some(handler) = builtin(chosen, archive)? {
        return Ok(handler);
    }
    let base = chosen.split(':').next().unwrap_or(chosen);
    let message = if NOT_YET.contains(&base) {
        format!(
            "model {model_name}: TorchServe's `{base}` handler is not served by this version of \
             torchfn; built-in handlers are: tensor (base_handler), classifier"
        )
    } else if configured.is_some() {
        format!(
            "model {model_name}: `{chosen}` is not a built-in handler; built-in handlers are: \
             tensor (base_handler), classifier"
        )
    } else {
        format!(
            "model {model_name}: its manifest names the Python handler `{manifest_handler}`, \
             which torchfn does not run. Serve it with a built-in handler that does the same \
             work: start torchfn-local with `--handler {model_name}=classifier` (or `tensor`), \
             or set `default_service_handler=classifier` in config.properties; a model \
             function takes `TORCHFN_HANDLER=classifier`"
        )
    };
    Err(ApiError::new(
        crate::error::ErrorKind::InvalidModel,
        message,
    ))
}

/// A built-in handler by name, or `None` if `name` is not one.
pub fn builtin(name: &str, archive: &ModelArchive) -> Result<Option<Arc<dyn Handler>>, ApiError> {
    Ok(match name {
        "tensor" | "base_handler" => Some(Arc::new(TensorHandler)),
        "classifier" => Some(Arc::new(ClassifierHandler::from_archive(archive)?)),
        _ => None,
    })
}
