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

use super::decode::{decode_list, flat_array, parse_json, tensor_from_json, Decoded, Instance};
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
        if let Some(instance) = flat_array(request.body) {
            return Ok(Decoded {
                instances: vec![instance],
                is_list: false,
            });
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A bare array of numbers read directly makes the instance the general path makes; every
    /// other body is left to the general path.
    #[test]
    fn the_direct_read_agrees_with_the_general_path() {
        let general =
            |body: &[u8]| TensorHandler::instance(&parse_json(body).unwrap(), "body").unwrap();
        for body in [
            &b"[0.1, 0.2, 0.3]"[..],
            b"[1, -2, 3.5e-3, 1e30, 18446744073709551615, -9223372036854775808]",
            b" [16777217] \n",
        ] {
            assert_eq!(flat_array(body), Some(general(body)), "{body:?}");
            let decoded = TensorHandler.decode(&Request::json(body)).unwrap();
            assert_eq!(decoded.instances, vec![general(body)]);
            assert!(!decoded.is_list);
        }
        for body in [
            &b"[[1, 2], [3, 4]]"[..],
            b"[]",
            b"[1e39]",
            b"[1, \"a\"]",
            b"[{\"data\": [1]}]",
            b"{\"data\": [1]}",
            b"3",
            b"[1] x",
            b"",
        ] {
            assert_eq!(flat_array(body), None, "{body:?}");
        }
    }
}
