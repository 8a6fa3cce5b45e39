//! `tensor`: TorchServe's `base_handler` for TorchScript models. JSON numbers or nested
//! arrays in, the model's output row as nested arrays out.
//!
//! Request forms: a top-level number or (nested) array of numbers is one instance;
//! `{"data": x}` (or `{"features": x}`) is one instance; `{"instances": [...]}` and a
//! top-level array of objects are lists of instances. A `.npy` body or a raw float32
//! `application/octet-stream` body is one instance too.
//!
//! Outputs: a tensor, or tuples, lists and dicts of tensors (see `output`).

use serde_json::Value;
use tch::IValue;

use super::decode::{decode_list, parse_json, tensor_from_json, Decoded, Instance};
use super::{batch_rows, tensors, Handler, Request};
use crate::error::ServeError;
use crate::session::SessionError;

pub struct TensorHandler;

impl TensorHandler {
    fn instance(value: &Value, at: &str) -> Result<Instance, ServeError> {
        match value {
            Value::Object(map) => {
                let (key, inner) = ["data", "features", "input"]
                    .iter()
                    .find_map(|k| map.get(*k).map(|v| (*k, v)))
                    .ok_or_else(|| {
                        ServeError::bad_request(format!(
                            "{at} is an object without a \"data\" key: send numbers as \
                             {{\"data\": [...]}} or as a bare array"
                        ))
                    })?;
                tensor_from_json(inner, &format!("{at}.{key}"))
            }
            other => tensor_from_json(other, at),
        }
    }
}

impl Handler for TensorHandler {
    fn name(&self) -> &'static str {
        "tensor"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        if let Some(decoded) = tensors::binary_body(request)? {
            return Ok(decoded);
        }
        let json = parse_json(request.body)?;
        let list = match &json {
            Value::Object(map) if map.contains_key("instances") => match &map["instances"] {
                Value::Array(items) => Some((items.as_slice(), "instances")),
                other => {
                    return Err(ServeError::bad_request(format!(
                        "\"instances\" must be an array, got {}",
                        super::decode::kind_of(other)
                    )))
                }
            },
            Value::Array(items) if items.first().is_some_and(Value::is_object) => {
                Some((items.as_slice(), "body"))
            }
            _ => None,
        };
        match list {
            Some((items, at)) => decode_list(items, at, Self::instance),
            None => Ok(Decoded {
                instances: vec![Self::instance(&json, "body")?],
                is_list: false,
            }),
        }
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        batch_rows(&output, rows)
    }
}
