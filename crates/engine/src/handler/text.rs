//! `text_classifier`: text in, `{label: probability}` over every class out (softmax; labels
//! from `index_to_name.json`, else the class index), as TorchServe's text classifier answers.
//!
//! The archive ships a Hugging Face `tokenizer.json` as an extra file; it tokenises each
//! batch on the model's worker thread, padded to the batch's longest text. The model is
//! called as `forward(input_ids, attention_mask)` (both int64 `[N, L]`), or
//! `forward(input_ids)` when its forward takes one argument. TorchServe's own text classifier
//! relies on a torchtext vocabulary (`source_vocab.pt`), which cannot be read outside Python:
//! such archives go to the Python backend (`python::choose`), and mapped onto this built-in
//! by name they are refused with a message saying what to ship instead.
//!
//! Requests: a `text/plain` (or any non-JSON) body is one text; JSON may be a string,
//! `{"data"|"text"|"body": "..."}`, or `{"instances": [...]}` of those; a form's `data` field.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::{Map, Value};
use tch::{Device, IValue, Tensor};
use tokenizers::Tokenizer;

use super::classifier::{archive_labels, label, read_small_file, softmax_rows};
use super::decode::{
    decode_list, form_input, kind_of, parse_json, to_device, Decoded, Input, Instance,
};
use super::tensors::{TensorData, TypedTensor};
use super::{single_tensor, Handler, Request};
use crate::error::{ErrorKind, ServeError};
use crate::session::{Session, SessionError};
use torchfn_archive::mar::ModelArchive;

/// Largest `tokenizer.json` read.
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// Longest text accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

pub struct TextClassifier {
    tokenizer: Tokenizer,
    labels: Option<HashMap<String, String>>,
    pad_id: i64,
    /// Tokens kept per text (`handler.max_length` in the model-config YAML), if limited.
    max_length: Option<usize>,
    /// How the model takes its input: 0 not known yet, 1 ids only, 2 ids and mask.
    arity: AtomicU8,
}

impl TextClassifier {
    pub fn from_archive(archive: &ModelArchive) -> Result<Self, ServeError> {
        let invalid = |msg: String| ServeError::new(ErrorKind::InvalidModel, msg);
        let Some(json) = read_small_file(archive, "tokenizer.json", MAX_TOKENIZER_BYTES)? else {
            let why = if archive.has_file("source_vocab.pt") {
                "it ships a torchtext vocabulary (source_vocab.pt), which only Python's \
                 torchtext can read"
            } else {
                "it ships no tokenizer.json"
            };
            return Err(invalid(format!(
                "model {}: text_classifier needs the model's tokenizer as a Hugging Face \
                 tokenizer.json among the archive's extra files, and {why}. Save the \
                 tokenizer with `tokenizer.save(\"tokenizer.json\")` (tokenizers) or \
                 `AutoTokenizer.from_pretrained(...).backend_tokenizer.save(...)` and archive \
                 it with --extra-files tokenizer.json,index_to_name.json",
                archive.model_name()
            )));
        };
        let tokenizer = Tokenizer::from_bytes(&json)
            .map_err(|e| invalid(format!("tokenizer.json cannot be read: {e}")))?;
        Ok(Self::new(
            tokenizer,
            archive_labels(archive)?,
            max_length(archive),
        ))
    }

    /// A classifier around a tokenizer (tests and custom functions).
    pub fn new(
        tokenizer: Tokenizer,
        labels: Option<HashMap<String, String>>,
        max_length: Option<usize>,
    ) -> Self {
        let pad_id = tokenizer
            .get_padding()
            .map(|p| i64::from(p.pad_id))
            .or_else(|| tokenizer.token_to_id("[PAD]").map(i64::from))
            .or_else(|| tokenizer.token_to_id("<pad>").map(i64::from))
            .unwrap_or(0);
        Self {
            tokenizer,
            labels,
            pad_id,
            max_length,
            arity: AtomicU8::new(0),
        }
    }

    /// The token ids of one text, as the worker computes them.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, SessionError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| SessionError::Input(format!("the text cannot be tokenised: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(max) = self.max_length {
            ids.truncate(max);
        }
        Ok(ids)
    }
}

fn max_length(archive: &ModelArchive) -> Option<usize> {
    archive
        .config()
        .and_then(|c| c.backend.get("handler"))
        .and_then(|h| h.get("max_length"))
        .and_then(Value::as_u64)
        .map(|n| n as usize)
}

impl Handler for TextClassifier {
    fn name(&self) -> &'static str {
        "text_classifier"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        if let Some(bytes) = form_input(request)? {
            return one(text_instance(bytes, "data")?);
        }
        let looks_json = request
            .body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'));
        let json = match request.media_type() {
            _ if request.media_is(&["application/json"]) => Some(parse_json(request.body)?),
            None if looks_json => serde_json::from_slice::<Value>(request.body).ok(),
            _ => None,
        };
        let Some(json) = json else {
            return one(text_instance(request.body.to_vec(), "the body")?);
        };
        match &json {
            Value::Object(map) if map.contains_key("instances") => match &map["instances"] {
                Value::Array(items) => decode_list(items, "instances", text_from_json),
                other => Err(ServeError::bad_request(format!(
                    "\"instances\" must be an array, got {}",
                    kind_of(other)
                ))),
            },
            other => one(text_from_json(other, "body")?),
        }
    }

    fn decode_tensors(&self, inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        let [input] = <[TypedTensor; 1]>::try_from(inputs).map_err(|v| {
            ServeError::bad_request(format!(
                "this model takes one input (text), got {}",
                v.len()
            ))
        })?;
        let TensorData::Bytes(items) = input.data else {
            return Err(ServeError::bad_request(format!(
                "input \"{}\" must be BYTES (text) for this model",
                input.name
            )));
        };
        let instances = items
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| text_instance(bytes, &format!("{}[{i}]", input.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Decoded {
            instances,
            is_list: true,
        })
    }

    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        let ids = items
            .iter()
            .map(|item| match &item.input {
                Input::Text(text) => self.token_ids(text),
                _ => Err(SessionError::Input("this handler takes text".into())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let len = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(ids.len() * len);
        let mut mask = Vec::with_capacity(ids.len() * len);
        for row in &ids {
            flat.extend(row.iter().map(|&i| i64::from(i)));
            flat.extend(std::iter::repeat_n(self.pad_id, len - row.len()));
            mask.extend(std::iter::repeat_n(1i64, row.len()));
            mask.extend(std::iter::repeat_n(0i64, len - row.len()));
        }
        let shape = [ids.len() as i64, len as i64];
        let ids = to_device(Tensor::f_from_slice(&flat)?.f_view(shape)?, device)?;
        let mask = to_device(Tensor::f_from_slice(&mask)?.f_view(shape)?, device)?;
        Ok(vec![IValue::Tensor(ids), IValue::Tensor(mask)])
    }

    fn inference(&self, session: &Session, inputs: &[IValue]) -> Result<IValue, SessionError> {
        let ids_only = inputs
            .get(..1)
            .ok_or_else(|| SessionError::Shape("the text model got no input ids".into()))?;
        match self.arity.load(Ordering::Relaxed) {
            1 => session.run(ids_only),
            2 => session.run(inputs),
            _ => match session.run(inputs) {
                Ok(out) => {
                    self.arity.store(2, Ordering::Relaxed);
                    Ok(out)
                }
                // A forward that takes only the ids refuses a second argument.
                Err(e) if e.to_string().contains("argument") => {
                    let out = session.run(ids_only)?;
                    self.arity.store(1, Ordering::Relaxed);
                    tracing::info!("the text model takes input_ids only");
                    Ok(out)
                }
                Err(e) => Err(e),
            },
        }
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        let (flat, classes) = softmax_rows(&single_tensor(output)?, rows)?;
        Ok(flat
            .chunks(classes.max(1))
            .map(|row| {
                let map: Map<String, Value> = row
                    .iter()
                    .enumerate()
                    .map(|(k, p)| (label(&self.labels, k), super::f32_json(*p)))
                    .collect();
                Value::Object(map)
            })
            .collect())
    }
}

fn one(instance: Instance) -> Result<Decoded, ServeError> {
    Ok(Decoded {
        instances: vec![instance],
        is_list: false,
    })
}

fn text_from_json(value: &Value, at: &str) -> Result<Instance, ServeError> {
    match value {
        Value::String(s) => text_instance(s.clone().into_bytes(), at),
        Value::Object(map) => {
            let (key, inner) = ["data", "text", "body"]
                .iter()
                .find_map(|k| map.get(*k).map(|v| (*k, v)))
                .ok_or_else(|| {
                    ServeError::bad_request(format!(
                        "{at} is an object without \"data\": send {{\"data\": \"some text\"}}"
                    ))
                })?;
            match inner {
                Value::String(s) => text_instance(s.clone().into_bytes(), &format!("{at}.{key}")),
                other => Err(ServeError::bad_request(format!(
                    "{at}.{key} must be a string, got {}",
                    kind_of(other)
                ))),
            }
        }
        other => Err(ServeError::bad_request(format!(
            "{at} must be text, got {}",
            kind_of(other)
        ))),
    }
}

fn text_instance(bytes: Vec<u8>, at: &str) -> Result<Instance, ServeError> {
    if bytes.len() > MAX_TEXT_BYTES {
        return Err(ServeError::bad_request(format!(
            "{at} is {} bytes of text; the limit is {MAX_TEXT_BYTES}",
            bytes.len()
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        ServeError::bad_request(format!(
            "{at} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ServeError::bad_request(format!(
            "{at} is empty: send some text"
        )));
    }
    Ok(Instance::text(text))
}
