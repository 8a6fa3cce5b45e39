//! Handlers turn requests into model inputs and model outputs into responses, over a
//! batch: `decode` (per request, on the async side; cheap: image and text bytes stay
//! encoded), then on a model worker thread `preprocess` (decode images, tokenise text, stack
//! a batch of same-shape instances) → `inference` → `postprocess` (one JSON value per
//! instance).
//!
//! Built-ins: `tensor` (TorchServe's `base_handler`), `classifier` (the custom
//! `ClassifierHandler` of TorchServe's getting-started guide), and TorchServe's
//! `image_classifier`, `image_segmenter`, `object_detector` and `text_classifier`.
//!
//! A user's own handler implements [`Handler`] in its own crate and is served by a model
//! function built around it (see `functions/regressor` for a worked example).

mod classifier;
mod decode;
mod image;
mod output;
mod tensor;
pub mod tensors;
mod text;

use std::sync::Arc;

use serde_json::Value;
use tch::{Device, IValue};

use crate::error::ServeError;
use crate::session::{Session, SessionError};
use torchfn_archive::mar::ModelArchive;

pub use classifier::ClassifierHandler;
pub use decode::{
    decode_list, f32_json, f32_shortest, form_fields, kind_of, parse_json, stack, stack_inputs,
    tensor_from_json, tensor_to_json, to_device, Decoded, FormField, Input, Instance,
};
pub use image::{decode_rgb, ImageClassifier, ImageSegmenter, ObjectDetector};
pub use output::{batch_rows, device_of, numel_of, shape_of, single_tensor};
pub use tensor::TensorHandler;
pub use tensors::TypedTensor;
pub use text::TextClassifier;

/// A request as a handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub body: &'a [u8],
    /// The `Content-Type` header, if any (with its parameters: multipart needs the boundary).
    pub content_type: Option<&'a str>,
    /// The `X-Tensor-Shape` header (`2,3`), the shape of a raw `application/octet-stream`
    /// float32 body.
    pub tensor_shape: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A JSON body (what tests and the KServe v1 route hand over).
    pub fn json(body: &'a [u8]) -> Self {
        Self {
            body,
            content_type: Some("application/json"),
            tensor_shape: None,
        }
    }

    /// The media type without parameters, as sent (compare with [`Request::media_is`]).
    pub fn media_type(&self) -> Option<&'a str> {
        self.content_type
            .map(|c| c.split(';').next().unwrap_or("").trim())
    }

    /// Whether the media type is one of `types` (lowercase), ignoring case and parameters.
    /// No allocation: it runs for every request.
    pub fn media_is(&self, types: &[&str]) -> bool {
        self.media_type()
            .is_some_and(|m| types.iter().any(|t| m.eq_ignore_ascii_case(t)))
    }
}

/// A model's request/response logic. Implementations are shared by the HTTP side and the
/// model's worker threads.
pub trait Handler: Send + Sync + 'static {
    /// The handler's name, as reported by describe.
    fn name(&self) -> &'static str;

    /// Decodes one request into its instances. Errors are the client's (400).
    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError>;

    /// Instances from typed, batch-first tensors (the Open Inference Protocol's inputs):
    /// row `i` of every input makes instance `i`; several inputs become several positional
    /// arguments of the model's forward.
    fn decode_tensors(&self, inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        tensors::rows(inputs)
    }

    /// The model's positional inputs for a batch of instances that batch together, on
    /// `device`. Errors for one instance are the client's when they are
    /// [`SessionError::Input`].
    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        decode::stack_inputs(items, device)
    }

    /// Runs the model on a batch.
    fn inference(&self, session: &Session, inputs: &[IValue]) -> Result<IValue, SessionError> {
        session.run(inputs)
    }

    /// One JSON value per batch row. `rows` is how many instances went in.
    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError>;

    /// What the model worker hands over for each batch row: by default `postprocess`'s
    /// values. A handler whose answers are small and many may print them here instead
    /// ([`Answer::Pretty`], the same JSON as its `postprocess` values): building a map of
    /// owned keys per row on the model worker and printing it again on the async side is a
    /// measurable part of a small model's answer.
    fn answers(&self, output: IValue, rows: usize) -> Result<Vec<Answer>, SessionError> {
        Ok(self
            .postprocess(output, rows)?
            .into_iter()
            .map(Answer::Value)
            .collect())
    }
}

/// One instance's answer, as a model worker hands it to the request's task.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Value(Value),
    /// The answer's JSON already printed in the predictions API's pretty form
    /// (`serde_json::to_string_pretty`, two-space indents).
    Pretty(String),
}

impl Answer {
    /// The answer as a JSON value (a printed one is read back).
    pub fn into_value(self) -> Result<Value, ServeError> {
        match self {
            Answer::Value(v) => Ok(v),
            Answer::Pretty(text) => serde_json::from_str(&text).map_err(|e| {
                ServeError::internal(format!("a handler printed an answer that is not JSON: {e}"))
            }),
        }
    }

    /// Appends the answer's pretty JSON to `out`, as it prints nested `level` deep in a
    /// pretty-printed document (each of its lines after the first indented by two spaces
    /// per level, as `serde_json::to_vec_pretty` indents a nested value).
    pub fn write_pretty(&self, level: usize, out: &mut Vec<u8>) {
        let printed;
        let text = match (self, level) {
            (Answer::Pretty(text), _) => text.as_bytes(),
            (Answer::Value(v), 0) => {
                let _ = serde_json::to_writer_pretty(&mut *out, v);
                return;
            }
            (Answer::Value(v), _) => {
                printed = serde_json::to_vec_pretty(v).unwrap_or_default();
                printed.as_slice()
            }
        };
        if level == 0 {
            out.extend_from_slice(text);
            return;
        }
        // JSON text holds no raw newline inside a string, so every newline starts a line.
        for line in text.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line);
            if line.ends_with(b"\n") {
                out.extend(std::iter::repeat_n(b' ', 2 * level));
            }
        }
    }
}

/// Makes a handler for a loaded archive (custom handlers register one under their name).
pub type HandlerFactory =
    Arc<dyn Fn(&ModelArchive) -> Result<Arc<dyn Handler>, ServeError> + Send + Sync>;

fn custom_handlers() -> &'static std::sync::RwLock<std::collections::HashMap<String, HandlerFactory>>
{
    static CUSTOM: std::sync::OnceLock<
        std::sync::RwLock<std::collections::HashMap<String, HandlerFactory>>,
    > = std::sync::OnceLock::new();
    CUSTOM.get_or_init(Default::default)
}

/// Registers a custom handler under `name`, for the rest of the process: a manifest's
/// `handler`, `--handler model=name` or `TORCHFN_HANDLER=name` then selects it like a
/// built-in. A custom name shadows a built-in of the same name.
pub fn register(
    name: &str,
    factory: impl Fn(&ModelArchive) -> Result<Arc<dyn Handler>, ServeError> + Send + Sync + 'static,
) {
    let mut map = custom_handlers().write().unwrap_or_else(|e| e.into_inner());
    map.insert(name.to_string(), Arc::new(factory));
}

/// A handler by name: a registered custom handler, else a built-in; `None` if neither.
pub fn builtin(name: &str, archive: &ModelArchive) -> Result<Option<Arc<dyn Handler>>, ServeError> {
    let custom = custom_handlers()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned();
    if let Some(factory) = custom {
        return factory(archive).map(Some);
    }
    Ok(match name {
        "tensor" | "base_handler" => Some(Arc::new(TensorHandler)),
        "classifier" => Some(Arc::new(ClassifierHandler::from_archive(archive)?)),
        "image_classifier" => Some(Arc::new(ImageClassifier::from_archive(archive)?)),
        "image_segmenter" => Some(Arc::new(ImageSegmenter)),
        "object_detector" => Some(Arc::new(ObjectDetector::from_archive(archive)?)),
        "text_classifier" => Some(Arc::new(TextClassifier::from_archive(archive)?)),
        _ => None,
    })
}
