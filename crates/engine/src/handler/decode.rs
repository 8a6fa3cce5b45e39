//! Request bodies → instances, and tensors → JSON, shared by the built-in handlers.

use serde_json::Value;
use tch::{Device, IValue, Kind, Tensor};

use crate::error::ServeError;
use crate::session::SessionError;

/// One input instance: what it carries and its shape (for tensors; empty otherwise).
/// Instances share a forward pass when they carry the same kind of input of the same shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub input: Input,
    pub shape: Vec<i64>,
}

/// What an instance carries into its forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Float32 values, row-major.
    F32(Vec<f32>),
    /// A tensor of another element kind, as row-major little-endian bytes (binary bodies
    /// and the Open Inference Protocol's datatypes).
    Typed { kind: Kind, bytes: Vec<u8> },
    /// An encoded file (an image), decoded on the model's worker thread.
    Bytes(Vec<u8>),
    /// Text, tokenised on the model's worker thread.
    Text(String),
    /// One value per positional argument of the model's forward.
    Many(Vec<Instance>),
}

impl Instance {
    /// Float32 values of `shape`.
    pub fn f32(values: Vec<f32>, shape: Vec<i64>) -> Self {
        Self {
            input: Input::F32(values),
            shape,
        }
    }

    /// Encoded bytes (an image file).
    pub fn bytes(bytes: Vec<u8>) -> Self {
        Self {
            input: Input::Bytes(bytes),
            shape: Vec::new(),
        }
    }

    /// Text.
    pub fn text(text: String) -> Self {
        Self {
            input: Input::Text(text),
            shape: Vec::new(),
        }
    }

    /// The float32 values, when the instance is a float tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.input {
            Input::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Whether the two can run in one forward pass: same kind of input, same shapes.
    pub fn batches_with(&self, other: &Instance) -> bool {
        if self.shape != other.shape {
            return false;
        }
        match (&self.input, &other.input) {
            (Input::F32(_), Input::F32(_))
            | (Input::Bytes(_), Input::Bytes(_))
            | (Input::Text(_), Input::Text(_)) => true,
            (Input::Typed { kind: a, .. }, Input::Typed { kind: b, .. }) => a == b,
            (Input::Many(a), Input::Many(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.batches_with(y))
            }
            _ => false,
        }
    }
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
    one: impl Fn(&Value, &str) -> Result<Instance, ServeError>,
) -> Result<Decoded, ServeError> {
    if items.is_empty() {
        return Err(ServeError::bad_request(format!("{at} is an empty list")));
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

/// The input TorchServe hands a handler from a form request (`multipart/form-data` or
/// `application/x-www-form-urlencoded`): the field named `data`, else `body` (when a name
/// repeats, the later part wins, as in TorchServe). `None` when the request is not a form.
pub fn form_input(request: &super::Request<'_>) -> Result<Option<Vec<u8>>, ServeError> {
    let fields = if request.media_is(&["multipart/form-data"]) {
        multipart_fields(request)?
    } else if request.media_is(&["application/x-www-form-urlencoded"]) {
        urlencoded_fields(request.body)?
    } else {
        return Ok(None);
    };
    let pick = |name: &str| {
        fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    pick("data")
        .or_else(|| pick("body"))
        .map(Some)
        .ok_or_else(|| {
            ServeError::bad_request(
                "the form has no field named \"data\" (or \"body\"): send the input as \
                 -F data=@file",
            )
        })
}

fn multipart_fields(request: &super::Request<'_>) -> Result<Vec<(String, Vec<u8>)>, ServeError> {
    let boundary = request
        .content_type
        .unwrap_or("")
        .split(';')
        .skip(1)
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
        .next()
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| ServeError::bad_request("multipart/form-data without a boundary"))?;
    let delimiter = format!("--{boundary}");
    let body = request.body;
    let mut fields = Vec::new();
    let mut starts = find_all(body, delimiter.as_bytes());
    if starts.is_empty() {
        return Err(ServeError::bad_request(
            "the multipart body does not contain its boundary",
        ));
    }
    starts.push(body.len());
    for pair in starts.windows(2) {
        let part = &body[pair[0] + delimiter.len()..pair[1]];
        if part.starts_with(b"--") {
            break;
        }
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let Some(split) = find_all(part, b"\r\n\r\n").first().copied() else {
            continue;
        };
        let headers = String::from_utf8_lossy(&part[..split]);
        let content = &part[split + 4..];
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        let name = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .and_then(|l| {
                l.split(';')
                    .filter_map(|p| p.trim().strip_prefix("name="))
                    .map(|n| n.trim_matches('"').to_string())
                    .next()
            });
        if let Some(name) = name {
            fields.push((name, content.to_vec()));
        }
    }
    Ok(fields)
}

/// Offsets where `needle` starts in `hay` (non-overlapping).
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            out.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    out
}

fn urlencoded_fields(body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ServeError> {
    body.split(|b| *b == b'&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let mut it = kv.splitn(2, |b| *b == b'=');
            let k = percent_decode(it.next().unwrap_or_default())?;
            let v = percent_decode(it.next().unwrap_or_default())?;
            Ok((String::from_utf8_lossy(&k).into_owned(), v))
        })
        .collect()
}

fn percent_decode(s: &[u8]) -> Result<Vec<u8>, ServeError> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ServeError::bad_request("the form body has a bad %-escape"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

/// Standard base64 (padded or not, or the URL-safe alphabet), ignoring line breaks.
pub fn base64_decode(text: &str, at: &str) -> Result<Vec<u8>, ServeError> {
    use base64::Engine;
    let cleaned: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(cleaned.as_bytes()).ok())
        .ok_or_else(|| ServeError::bad_request(format!("{at} is a string but not base64")))
}

/// Parses a body as JSON, with a client-facing message on failure.
pub fn parse_json(body: &[u8]) -> Result<Value, ServeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ServeError::bad_request(
            "request body is empty: send a JSON document, for example {\"features\": [0.1, 0.2]}",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ServeError::bad_request(format!("request body is not valid JSON: {e}")))
}

/// A number or nested array of numbers → an instance. `at` names the place for messages.
pub fn tensor_from_json(value: &Value, at: &str) -> Result<Instance, ServeError> {
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
        return Err(ServeError::bad_request(format!("{at} is an empty array")));
    }
    let mut values = Vec::with_capacity(shape.iter().product::<i64>().max(1) as usize);
    fill(value, &shape, at, &mut values)?;
    Ok(Instance::f32(values, shape))
}

fn fill(value: &Value, shape: &[i64], at: &str, out: &mut Vec<f32>) -> Result<(), ServeError> {
    match (value, shape.split_first()) {
        (Value::Number(n), None) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let v = x as f32;
            if !v.is_finite() {
                return Err(ServeError::bad_request(format!(
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
        (Value::Array(items), Some((&len, _))) => Err(ServeError::bad_request(format!(
            "{at} has {} elements where its siblings have {len}: arrays must be rectangular",
            items.len()
        ))),
        (Value::Array(_), None) => Err(ServeError::bad_request(format!(
            "{at} is an array where a number was expected: arrays must be rectangular"
        ))),
        (other, _) => Err(ServeError::bad_request(format!(
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

/// The model's positional inputs for a batch of tensor instances: one batch tensor, or one
/// per argument for instances that carry several ([`Input::Many`]).
pub fn stack_inputs(items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
    let Some(first) = items.first() else {
        return Err(SessionError::Shape("empty batch".into()));
    };
    match &first.input {
        Input::Many(parts) => (0..parts.len())
            .map(|arg| {
                let column = items
                    .iter()
                    .map(|item| match &item.input {
                        Input::Many(p) if p.len() == parts.len() => Ok(&p[arg]),
                        _ => Err(SessionError::Shape(
                            "instances with different numbers of inputs in one batch".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(IValue::Tensor(stack(&column, device)?))
            })
            .collect(),
        _ => Ok(vec![IValue::Tensor(stack(items, device)?)]),
    }
}

/// Stacks same-shape tensor instances into one `[n, shape...]` tensor on `device`.
pub fn stack(items: &[&Instance], device: Device) -> Result<Tensor, SessionError> {
    let Some(first) = items.first() else {
        return Err(SessionError::Shape("empty batch".into()));
    };
    for item in items {
        if !item.batches_with(first) {
            return Err(SessionError::Shape(format!(
                "cannot stack shapes {:?} and {:?}",
                first.shape, item.shape
            )));
        }
    }
    let mut dims = Vec::with_capacity(first.shape.len() + 1);
    dims.push(items.len() as i64);
    dims.extend_from_slice(&first.shape);
    let t = match &first.input {
        Input::F32(_) => {
            let mut data = Vec::with_capacity(
                first.shape.iter().product::<i64>().max(1) as usize * items.len(),
            );
            for item in items {
                data.extend_from_slice(item.as_f32().unwrap_or_default());
            }
            Tensor::f_from_slice(&data)?.f_view(dims.as_slice())?
        }
        Input::Typed { kind, .. } => {
            let mut data = Vec::new();
            for item in items {
                if let Input::Typed { bytes, .. } = &item.input {
                    data.extend_from_slice(bytes);
                }
            }
            Tensor::f_from_data_size(&data, &dims, *kind)?
        }
        other => {
            return Err(SessionError::Input(format!(
                "this handler takes tensors, got {}",
                match other {
                    Input::Bytes(_) => "an encoded file",
                    Input::Text(_) => "text",
                    _ => "several inputs",
                }
            )))
        }
    };
    to_device(t, device)
}

/// A host tensor on `device`: the batch is assembled on the host and crosses to the device
/// in one transfer, from pinned memory so the copy can run at full bus speed.
pub fn to_device(t: Tensor, device: Device) -> Result<Tensor, SessionError> {
    if device == Device::Cpu {
        Ok(t)
    } else {
        let kind = t.kind();
        Ok(t.f_pin_memory(device)?
            .f_to_device_(device, kind, true, false)?)
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
        assert_eq!(i.as_f32().unwrap(), &[1., 2., 3., 4., 5., 6.]);
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
    fn forms_give_their_data_field() {
        use super::super::Request;
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nno\r\n--XyZ\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\r\n\r\n--XyZ--\r\n";
        let r = Request {
            body,
            content_type: Some("multipart/form-data; boundary=XyZ"),
            tensor_shape: None,
        };
        assert_eq!(form_input(&r).unwrap().unwrap(), b"\x00\x01\r\n");
        let r = Request {
            body: b"a=1&data=h%C3%A9llo+there",
            content_type: Some("application/x-www-form-urlencoded"),
            tensor_shape: None,
        };
        assert_eq!(form_input(&r).unwrap().unwrap(), "héllo there".as_bytes());
        let r = Request {
            body: b"a=1",
            content_type: Some("application/x-www-form-urlencoded"),
            tensor_shape: None,
        };
        assert!(form_input(&r).is_err());
        assert_eq!(base64_decode("aGk=", "x").unwrap(), b"hi");
        assert!(base64_decode("!!", "x").is_err());
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
