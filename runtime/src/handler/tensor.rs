//! `tensor`: TorchServe's `base_handler` for TorchScript models. JSON numbers or nested
//! arrays in, the model's output row as nested arrays out.
//!
//! Request forms: a top-level number or (nested) array of numbers is one instance;
//! `{"data": x}` (or `{"features": x}`) is one instance; `{"instances": [...]}` and a
//! top-level array of objects are lists of instances.

use serde_json::Value;
use tch::Tensor;

use super::decode::{decode_list, parse_json, tensor_from_json, tensor_to_json, Decoded, Instance};
use super::Handler;
use crate::error::ApiError;
use crate::session::SessionError;

pub struct TensorHandler;

impl TensorHandler {
    fn instance(value: &Value, at: &str) -> Result<Instance, ApiError> {
        match value {
            Value::Object(map) => {
                let (key, inner) = ["data", "features", "input"]
                    .iter()
                    .find_map(|k| map.get(*k).map(|v| (*k, v)))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
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

    fn decode(&self, body: &[u8]) -> Result<Decoded, ApiError> {
        let json = parse_json(body)?;
        let list = match &json {
            Value::Object(map) if map.contains_key("instances") => match &map["instances"] {
                Value::Array(items) => Some((items.as_slice(), "instances")),
                other => {
                    return Err(ApiError::bad_request(format!(
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

    fn postprocess(&self, output: &Tensor, rows: usize) -> Result<Vec<Value>, SessionError> {
        match tensor_to_json(output)? {
            Value::Array(items) if items.len() == rows => Ok(items),
            Value::Array(items) => Err(SessionError::BatchMismatch {
                sent: rows,
                got: items.len(),
            }),
            _ => Err(SessionError::BatchMismatch { sent: rows, got: 0 }),
        }
    }
}
