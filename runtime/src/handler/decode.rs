//! JSON request bodies → float instances, shared by the built-in handlers.

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::ApiError;
use crate::session::SessionError;

/// One input instance: row-major float values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub values: Vec<f32>,
    pub shape: Vec<i64>,
}

/// A decoded request: its instances, and whether the client sent a list (and so gets a
/// list back) or a single instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub instances: Vec<Instance>,
    pub is_list: bool,
}

/// A list request: each element decoded by `one` (given the element and its place for
/// messages). An empty list is the client's error.
pub fn decode_list(
    items: &[Value],
    at: &str,
    one: impl Fn(&Value, &str) -> Result<Instance, ApiError>,
) -> Result<Decoded, ApiError> {
    if items.is_empty() {
        return Err(ApiError::bad_request(format!("{at} is an empty list")));
    }
    let instances = items
        .iter()
        .enumerate()
        .map(|(i, v)| one(v, &format!("{at}[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Decoded {
        instances,
        is_list: true,
    })
}

/// Parses a body as JSON, with a client-facing message on failure.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty: send a JSON document, for example {\"features\": [0.1, 0.2]}",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
}

/// A number or nested array of numbers → an instance. `at` names the place for messages.
pub fn tensor_from_json(value: &Value, at: &str) -> Result<Instance, ApiError> {
    let mut shape = Vec::new();
    // Walk the first elements to learn the shape, then fill and check every element.
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len() as i64);
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    if shape.contains(&0) {
        return Err(ApiError::bad_request(format!("{at} is an empty array")));
    }
    let mut values = Vec::with_capacity(shape.iter().product::<i64>().max(1) as usize);
    fill(value, &shape, at, &mut values)?;
    Ok(Instance { values, shape })
}

fn fill(value: &Value, shape: &[i64], at: &str, out: &mut Vec<f32>) -> Result<(), ApiError> {
    match (value, shape.split_first()) {
        (Value::Number(n), None) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let v = x as f32;
            if !v.is_finite() {
                return Err(ApiError::bad_request(format!(
                    "{at}: {n} is outside the float32 range"
                )));
            }
            out.push(v);
            Ok(())
        }
        (Value::Array(items), Some((&len, rest))) if items.len() as i64 == len => {
            for (i, item) in items.iter().enumerate() {
                fill(item, rest, &format!("{at}[{i}]"), out)?;
            }
            Ok(())
        }
        (Value::Array(items), Some((&len, _))) => Err(ApiError::bad_request(format!(
            "{at} has {} elements where its siblings have {len}: arrays must be rectangular",
            items.len()
        ))),
        (Value::Array(_), None) => Err(ApiError::bad_request(format!(
            "{at} is an array where a number was expected: arrays must be rectangular"
        ))),
        (other, _) => Err(ApiError::bad_request(format!(
            "{at} must be a number, got {}",
            kind_of(other)
        ))),
    }
}

/// A short name for a JSON value's type, for messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Stacks same-shape instances into one `[n, shape...]` float tensor on `device`.
pub fn stack(items: &[&Instance], device: Device) -> Result<Tensor, SessionError> {
    let Some(first) = items.first() else {
        return Err(SessionError::Shape("empty batch".into()));
    };
    let mut data = Vec::with_capacity(first.values.len() * items.len());
    for item in items {
        if item.shape != first.shape {
            return Err(SessionError::Shape(format!(
                "cannot stack shapes {:?} and {:?}",
                first.shape, item.shape
            )));
        }
        data.extend_from_slice(&item.values);
    }
    let mut dims = Vec::with_capacity(first.shape.len() + 1);
    dims.push(items.len() as i64);
    dims.extend_from_slice(&first.shape);
    // The batch is assembled on the host and crosses to the device in one transfer, from
    // pinned memory so the copy can run at full bus speed.
    let t = Tensor::f_from_slice(&data)?.f_view(dims.as_slice())?;
    if device == Device::Cpu {
        Ok(t)
    } else {
        Ok(t.f_pin_memory(device)?
            .f_to_device_(device, Kind::Float, true, false)?)
    }
}

/// Converts a tensor (any float or integer kind, any device) to nested JSON arrays.
pub fn tensor_to_json(t: &Tensor) -> Result<Value, SessionError> {
    let t = if t.device() == Device::Cpu {
        t.shallow_clone()
    } else {
        t.f_to_device(Device::Cpu)?
    };
    let shape = t.size();
    let t = t.f_contiguous()?;
    let n = t.numel();
    let leaves: Vec<Value> = match t.kind() {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 | Kind::Bool => {
            let t = t.f_to_kind(Kind::Int64)?;
            let mut v = vec![0i64; n];
            t.f_copy_data(&mut v, n)?;
            v.into_iter().map(Value::from).collect()
        }
        Kind::Double => {
            let mut v = vec![0f64; n];
            t.f_copy_data(&mut v, n)?;
            v.into_iter().map(f64_json).collect()
        }
        _ => {
            let t = t.f_to_kind(Kind::Float)?;
            let mut v = vec![0f32; n];
            t.f_copy_data(&mut v, n)?;
            v.into_iter().map(f32_json).collect()
        }
    };
    Ok(nest(&mut leaves.into_iter(), &shape))
}

fn nest(leaves: &mut impl Iterator<Item = Value>, shape: &[i64]) -> Value {
    match shape.split_first() {
        None => leaves.next().unwrap_or(Value::Null),
        Some((&n, rest)) => Value::Array((0..n).map(|_| nest(leaves, rest)).collect()),
    }
}

/// A float32 as JSON, printed with its shortest round-trip form (0.1, not
/// 0.10000000149011612). Non-finite values (JSON has none) become null.
pub fn f32_json(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let shortest: f64 = x.to_string().parse().unwrap_or(f64::from(x));
    serde_json::Number::from_f64(shortest).map_or(Value::Null, Value::Number)
}

fn f64_json(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_arrays_and_errors() {
        let i = tensor_from_json(&json!([[1, 2, 3], [4, 5, 6]]), "body").unwrap();
        assert_eq!(i.shape, vec![2, 3]);
        assert_eq!(i.values, vec![1., 2., 3., 4., 5., 6.]);
        let s = tensor_from_json(&json!(2.5), "body").unwrap();
        assert!(s.shape.is_empty());
        let e = tensor_from_json(&json!([[1, 2], [3]]), "body").unwrap_err();
        assert!(
            e.message.contains("body[1] has 1 elements"),
            "{}",
            e.message
        );
        let e = tensor_from_json(&json!([1, "x"]), "features").unwrap_err();
        assert!(e
            .message
            .contains("features[1] must be a number, got a string"));
        let e = tensor_from_json(&json!([1e300]), "f").unwrap_err();
        assert!(e.message.contains("float32 range"));
        assert!(tensor_from_json(&json!([]), "f").is_err());
    }

    #[test]
    fn round_trip_through_a_tensor() {
        let a = tensor_from_json(&json!([0.1, 0.2]), "a").unwrap();
        let b = tensor_from_json(&json!([0.3, 0.4]), "b").unwrap();
        let t = stack(&[&a, &b], Device::Cpu).unwrap();
        assert_eq!(t.size(), vec![2, 2]);
        assert_eq!(tensor_to_json(&t).unwrap(), json!([[0.1, 0.2], [0.3, 0.4]]));
        let c = tensor_from_json(&json!([1, 2, 3]), "c").unwrap();
        assert!(stack(&[&a, &c], Device::Cpu).is_err());
    }
}
