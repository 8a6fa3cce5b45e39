//! Typed tensors that travel without JSON number parsing: `.npy` bodies
//! (`application/x-npy`), raw little-endian float32 bodies (`application/octet-stream`, with
//! an optional `X-Tensor-Shape` header), and the Open Inference Protocol (KServe v2) tensors
//! `{"name", "shape", "datatype", "data"}`, both ways.

use serde_json::{json, Map, Value};
use tch::Kind;

use super::decode::{kind_of, Decoded, Input, Instance};
use super::Request;
use crate::error::ServeError;

/// A named tensor with its element type, batch-first when it carries several instances.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// A tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Numbers: their kind and row-major little-endian bytes.
    Numeric { kind: Kind, bytes: Vec<u8> },
    /// The protocol's `BYTES`: one byte string per element (images, text).
    Bytes(Vec<Vec<u8>>),
}

/// The Open Inference Protocol's datatype names and their libtorch kinds.
const DATATYPES: &[(&str, Kind)] = &[
    ("BOOL", Kind::Bool),
    ("UINT8", Kind::Uint8),
    ("INT8", Kind::Int8),
    ("INT16", Kind::Int16),
    ("INT32", Kind::Int),
    ("INT64", Kind::Int64),
    ("FP16", Kind::Half),
    ("FP32", Kind::Float),
    ("FP64", Kind::Double),
];

fn datatype_name(kind: Kind) -> &'static str {
    DATATYPES
        .iter()
        .find(|(_, k)| *k == kind)
        .map_or("FP32", |(n, _)| n)
}

/// Instances from batch-first typed tensors: row `i` of each input is instance `i`; a
/// tensor of 0 dimensions is one instance. BYTES inputs are not tensors: handlers that take
/// images or text decode those themselves.
pub fn rows(inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
    let Some(first) = inputs.first() else {
        return Err(ServeError::bad_request("the request has no inputs"));
    };
    let n = first.shape.first().copied().unwrap_or(1);
    let scalar = first.shape.is_empty();
    let mut columns = Vec::with_capacity(inputs.len());
    for t in &inputs {
        let TensorData::Numeric { kind, bytes } = &t.data else {
            return Err(ServeError::bad_request(format!(
                "input \"{}\" is BYTES; this model's handler takes numeric tensors",
                t.name
            )));
        };
        if t.shape.is_empty() != scalar || t.shape.first().copied().unwrap_or(1) != n {
            return Err(ServeError::bad_request(format!(
                "input \"{}\" has shape {:?} where \"{}\" has {:?}: every input needs the same \
                 first (batch) dimension",
                t.name, t.shape, first.name, first.shape
            )));
        }
        if n <= 0 {
            return Err(ServeError::bad_request(format!(
                "input \"{}\" has no rows",
                t.name
            )));
        }
        let row_shape: Vec<i64> = if scalar {
            Vec::new()
        } else {
            t.shape[1..].to_vec()
        };
        let row_bytes = bytes.len() / n as usize;
        let column: Vec<Instance> = bytes
            .chunks(row_bytes.max(1))
            .map(|chunk| Instance {
                input: numeric_input(*kind, chunk),
                shape: row_shape.clone(),
            })
            .collect();
        columns.push(column);
    }
    let instances = if columns.len() == 1 {
        columns.pop().unwrap_or_default()
    } else {
        (0..n as usize)
            .map(|i| Instance {
                input: Input::Many(columns.iter().map(|c| c[i].clone()).collect()),
                shape: Vec::new(),
            })
            .collect()
    };
    Ok(Decoded {
        instances,
        is_list: !scalar,
    })
}

fn numeric_input(kind: Kind, bytes: &[u8]) -> Input {
    if kind == Kind::Float {
        Input::F32(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    } else {
        Input::Typed {
            kind,
            bytes: bytes.to_vec(),
        }
    }
}

/// A binary tensor body, if the request carries one: `.npy` (by media type or by its magic
/// string) or `application/octet-stream` float32. The body is one instance, as a JSON array
/// body is.
pub fn binary_body(request: &Request<'_>) -> Result<Option<Decoded>, ServeError> {
    let npy = request.body.starts_with(NPY_MAGIC)
        || request.media_is(&["application/x-npy", "application/npy"]);
    let tensor = if npy {
        parse_npy(request.body)?
    } else if request.media_is(&["application/octet-stream"]) {
        raw_f32(request.body, request.tensor_shape)?
    } else {
        return Ok(None);
    };
    let mut batched = tensor;
    batched.shape.insert(0, 1);
    let mut decoded = rows(vec![batched])?;
    decoded.is_list = false;
    Ok(Some(decoded))
}

fn raw_f32(body: &[u8], shape: Option<&str>) -> Result<TypedTensor, ServeError> {
    if body.is_empty() || !body.len().is_multiple_of(4) {
        return Err(ServeError::bad_request(format!(
            "an application/octet-stream body is little-endian float32 values: {} bytes is \
             not a whole number of them",
            body.len()
        )));
    }
    let n = (body.len() / 4) as i64;
    let shape = match shape {
        None => vec![n],
        Some(text) => {
            let dims = text
                .split(',')
                .map(|d| d.trim().parse::<i64>().ok().filter(|d| *d > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ServeError::bad_request(format!(
                        "X-Tensor-Shape \"{text}\" is not a list of positive sizes like 2,3"
                    ))
                })?;
            if dims.iter().try_fold(1i64, |a, d| a.checked_mul(*d)) != Some(n) {
                return Err(ServeError::bad_request(format!(
                    "X-Tensor-Shape {dims:?} holds a different number of values than the \
                     body's {n}"
                )));
            }
            dims
        }
    };
    Ok(TypedTensor {
        name: "body".into(),
        shape,
        data: TensorData::Numeric {
            kind: Kind::Float,
            bytes: body.to_vec(),
        },
    })
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Parses a `.npy` file (format versions 1 to 3): numbers of kinds bool, (u)int8, int16/32/64,
/// float16/32/64, either byte order, C or Fortran order.
pub fn parse_npy(body: &[u8]) -> Result<TypedTensor, ServeError> {
    let bad = |why: &str| ServeError::bad_request(format!("the .npy body is not valid: {why}"));
    if !body.starts_with(NPY_MAGIC) || body.len() < 10 {
        return Err(bad("it does not start with the \\x93NUMPY magic string"));
    }
    let (header_len, start): (usize, usize) = match body[6] {
        1 => (u16::from_le_bytes([body[8], body[9]]) as usize, 10),
        2 | 3 if body.len() >= 12 => (
            u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("format version {v} is not 1, 2 or 3"))),
    };
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= body.len())
        .ok_or_else(|| bad("its header runs past the end of the body"))?;
    let header =
        std::str::from_utf8(&body[start..end]).map_err(|_| bad("its header is not text"))?;
    let descr = header_field(header, "descr")
        .and_then(|v| v.strip_prefix('\'').and_then(|v| v.split('\'').next()))
        .ok_or_else(|| bad("its header has no 'descr'"))?;
    let fortran = match header_field(header, "fortran_order") {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => return Err(bad("its header has no 'fortran_order'")),
    };
    let shape_text = header_field(header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad("its header has no 'shape'"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<i64>()
                .map_err(|_| bad("its shape is not a tuple of sizes"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The first character is the byte order ('<', '>', '|', '='); a header is any UTF-8.
    let code = descr
        .char_indices()
        .nth(1)
        .map_or("", |(at, _)| &descr[at..]);
    let order = &descr[..descr.len() - code.len()];
    if !matches!(order, "<" | ">" | "|" | "=") {
        return Err(bad(&format!(
            "dtype '{descr}' does not start with a byte order ('<', '>', '|' or '=')"
        )));
    }
    let kind = match code {
        "b1" => Kind::Bool,
        "u1" => Kind::Uint8,
        "i1" => Kind::Int8,
        "i2" => Kind::Int16,
        "i4" => Kind::Int,
        "i8" => Kind::Int64,
        "f2" => Kind::Half,
        "f4" => Kind::Float,
        "f8" => Kind::Double,
        _ => {
            return Err(bad(&format!(
                "dtype '{descr}' is not a number type torchfn takes (bool, uint8, int8/16/32/64, \
                 float16/32/64)"
            )))
        }
    };
    let size = kind.elt_size_in_bytes();
    let count = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(usize::try_from(*d).ok()?))
        .ok_or_else(|| bad("its shape is too large"))?;
    let data = &body[end..];
    if Some(data.len()) != count.checked_mul(size) {
        return Err(bad(&format!(
            "its shape {shape:?} of '{descr}' needs {} bytes of data, the body has {}",
            count.saturating_mul(size),
            data.len()
        )));
    }
    let mut bytes = data.to_vec();
    if order == ">" && size > 1 {
        for chunk in bytes.chunks_exact_mut(size) {
            chunk.reverse();
        }
    }
    if fortran && shape.len() > 1 {
        bytes = fortran_to_c(&bytes, &shape, size);
    }
    Ok(TypedTensor {
        name: "body".into(),
        shape,
        data: TensorData::Numeric { kind, bytes },
    })
}

/// The text after `'key':` in a `.npy` header dict.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

/// Column-major elements → row-major.
fn fortran_to_c(bytes: &[u8], shape: &[i64], size: usize) -> Vec<u8> {
    let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
    let count: usize = dims.iter().product();
    let mut out = vec![0u8; bytes.len()];
    let mut index = vec![0usize; dims.len()];
    for c in 0..count {
        // Fortran offset of the row-major index `index`.
        let mut f = 0usize;
        for (i, d) in index.iter().zip(&dims).rev() {
            f = f * d + i;
        }
        out[c * size..(c + 1) * size].copy_from_slice(&bytes[f * size..(f + 1) * size]);
        for k in (0..dims.len()).rev() {
            index[k] += 1;
            if index[k] < dims[k] {
                break;
            }
            index[k] = 0;
        }
    }
    out
}

/// A `.npy` file (version 1, C order, little-endian) of numbers.
pub fn write_npy(kind: Kind, shape: &[i64], bytes: &[u8]) -> Vec<u8> {
    let descr = match kind {
        Kind::Bool => "|b1",
        Kind::Uint8 => "|u1",
        Kind::Int8 => "|i1",
        Kind::Int16 => "<i2",
        Kind::Int => "<i4",
        Kind::Int64 => "<i8",
        Kind::Half => "<f2",
        Kind::Double => "<f8",
        _ => "<f4",
    };
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so the data starts on a 64-byte boundary, ending the header with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + bytes.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A JSON value that is a number or a rectangular nested array of numbers, as a tensor:
/// int64 when every number is an integer, else float32. `None` for anything else.
pub fn json_to_tensor(value: &Value) -> Option<(Kind, Vec<i64>, Vec<u8>)> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len() as i64);
        probe = items.first()?;
    }
    let mut leaves = Vec::new();
    collect(value, &shape, &mut leaves)?;
    let ints = leaves.iter().all(|n| n.is_i64());
    let bytes = if ints {
        leaves
            .iter()
            .flat_map(|n| n.as_i64().unwrap_or(0).to_le_bytes())
            .collect()
    } else {
        leaves
            .iter()
            .flat_map(|n| (n.as_f64().unwrap_or(f64::NAN) as f32).to_le_bytes())
            .collect()
    };
    Some((if ints { Kind::Int64 } else { Kind::Float }, shape, bytes))
}

fn collect<'a>(
    value: &'a Value,
    shape: &[i64],
    out: &mut Vec<&'a serde_json::Number>,
) -> Option<()> {
    match (value, shape.split_first()) {
        (Value::Number(n), None) => {
            out.push(n);
            Some(())
        }
        (Value::Array(items), Some((&len, rest))) if items.len() as i64 == len => {
            items.iter().try_for_each(|v| collect(v, rest, out))
        }
        _ => None,
    }
}

/// Parses the Open Inference Protocol's `inputs` array.
pub fn parse_v2_inputs(body: &Value) -> Result<Vec<TypedTensor>, ServeError> {
    let inputs = body
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ServeError::bad_request(
                "the body must be an object with \"inputs\": [{\"name\", \"shape\", \
                 \"datatype\", \"data\"}, ...]",
            )
        })?;
    if inputs.is_empty() {
        return Err(ServeError::bad_request("\"inputs\" is an empty list"));
    }
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| parse_v2_input(input, i))
        .collect()
}

fn parse_v2_input(input: &Value, i: usize) -> Result<TypedTensor, ServeError> {
    let at = format!("inputs[{i}]");
    let field = |key: &str| {
        input
            .get(key)
            .ok_or_else(|| ServeError::bad_request(format!("{at} has no \"{key}\"")))
    };
    let name = field("name")?
        .as_str()
        .ok_or_else(|| ServeError::bad_request(format!("{at}.name must be a string")))?
        .to_string();
    let shape = field("shape")?
        .as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_i64().filter(|d| *d >= 0))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ServeError::bad_request(format!("{at}.shape must be a list of sizes (integers ≥ 0)"))
        })?;
    let datatype = field("datatype")?
        .as_str()
        .ok_or_else(|| ServeError::bad_request(format!("{at}.datatype must be a string")))?;
    let mut leaves = Vec::new();
    flatten(field("data")?, &mut leaves);
    let count = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d as usize))
        .ok_or_else(|| ServeError::bad_request(format!("{at}.shape is too large")))?;
    if leaves.len() != count {
        return Err(ServeError::bad_request(format!(
            "{at} (\"{name}\"): shape {shape:?} holds {count} elements, data has {}",
            leaves.len()
        )));
    }
    let data = if datatype == "BYTES" {
        TensorData::Bytes(
            leaves
                .iter()
                .enumerate()
                .map(|(j, v)| match v {
                    Value::String(s) => Ok(s.as_bytes().to_vec()),
                    other => Err(ServeError::bad_request(format!(
                        "{at}.data[{j}] must be a string for BYTES, got {}",
                        kind_of(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
        )
    } else {
        let kind = DATATYPES
            .iter()
            .find(|(n, _)| *n == datatype)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                ServeError::bad_request(format!(
                    "{at}.datatype \"{datatype}\" is not one of BOOL, UINT8, INT8, INT16, INT32, \
                     INT64, FP16, FP32, FP64, BYTES"
                ))
            })?;
        let mut bytes = Vec::with_capacity(count * kind.elt_size_in_bytes());
        for (j, v) in leaves.iter().enumerate() {
            push_element(&mut bytes, kind, v).map_err(|why| {
                ServeError::bad_request(format!("{at}.data[{j}]: {why} for {datatype}"))
            })?;
        }
        TensorData::Numeric { kind, bytes }
    };
    Ok(TypedTensor { name, shape, data })
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn push_element(out: &mut Vec<u8>, kind: Kind, v: &Value) -> Result<(), String> {
    let int = |lo: i64, hi: i64| -> Result<i64, String> {
        v.as_i64()
            .filter(|x| (lo..=hi).contains(x))
            .ok_or_else(|| format!("{v} is not an integer in {lo}..={hi}"))
    };
    match kind {
        Kind::Bool => out.push(u8::from(
            v.as_bool()
                .ok_or_else(|| format!("{v} is not true or false"))?,
        )),
        Kind::Uint8 => out.push(int(0, 255)? as u8),
        Kind::Int8 => out.push(int(-128, 127)? as i8 as u8),
        Kind::Int16 => out.extend_from_slice(&(int(-32768, 32767)? as i16).to_le_bytes()),
        Kind::Int => out.extend_from_slice(
            &(int(i64::from(i32::MIN), i64::from(i32::MAX))? as i32).to_le_bytes(),
        ),
        Kind::Int64 => out.extend_from_slice(&int(i64::MIN, i64::MAX)?.to_le_bytes()),
        Kind::Double => out.extend_from_slice(
            &v.as_f64()
                .ok_or_else(|| format!("{v} is not a number"))?
                .to_le_bytes(),
        ),
        Kind::Half => {
            let x = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
            out.extend_from_slice(&f32_to_f16_bits(x as f32).to_le_bytes())
        }
        _ => {
            let x = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
            let f = x as f32;
            if !f.is_finite() {
                return Err(format!("{v} is outside the float32 range"));
            }
            out.extend_from_slice(&f.to_le_bytes())
        }
    }
    Ok(())
}

/// IEEE half-precision bits of `x`, rounded to nearest even.
fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = (mant | 0x80_0000) >> (1 - e);
        let round = (m & 0x1fff) > 0x1000 || ((m & 0x1fff) == 0x1000 && (m & 0x2000) != 0);
        return sign | ((m >> 13) as u16 + u16::from(round));
    }
    let round = (mant & 0x1fff) > 0x1000 || ((mant & 0x1fff) == 0x1000 && (mant & 0x2000) != 0);
    let h = ((e as u32) << 10 | (mant >> 13)) + u32::from(round);
    sign | h as u16
}

/// Per-instance answers as the protocol's `outputs`: numeric answers of one shape become one
/// tensor `output-0` (`[instances, ...]`; INT64 when all integers, else FP32); with
/// `split_objects` (a model's own dict outputs, not a handler's label maps), answers that are
/// objects with the same keys of numbers become one output per key; anything else (label
/// maps, detections) is a BYTES output of one JSON text per instance.
pub fn v2_outputs(values: &[Value], split_objects: bool) -> Vec<Value> {
    if let Some(out) = numeric_output("output-0", values) {
        return vec![out];
    }
    if let Some(Value::Object(first)) = values.first().filter(|_| split_objects) {
        let keys: Vec<&String> = first.keys().collect();
        let same_keys = values.iter().all(|v| {
            v.as_object()
                .is_some_and(|o| o.len() == keys.len() && keys.iter().all(|k| o.contains_key(*k)))
        });
        if same_keys {
            let outputs: Option<Vec<Value>> = keys
                .iter()
                .map(|k| {
                    let column: Vec<Value> = values.iter().map(|v| v[k.as_str()].clone()).collect();
                    numeric_output(k, &column)
                })
                .collect();
            if let Some(outputs) = outputs {
                return outputs;
            }
        }
    }
    vec![json!({
        "name": "output-0",
        "shape": [values.len()],
        "datatype": "BYTES",
        "data": values.iter().map(|v| Value::String(v.to_string())).collect::<Vec<_>>(),
    })]
}

fn numeric_output(name: &str, values: &[Value]) -> Option<Value> {
    let (kind, shape, _) = json_to_tensor(&Value::Array(values.to_vec()))?;
    let mut data = Vec::new();
    flatten_numbers(values, &mut data);
    let mut out = Map::new();
    out.insert("name".into(), Value::from(name));
    out.insert("shape".into(), json!(shape));
    out.insert("datatype".into(), Value::from(datatype_name(kind)));
    out.insert("data".into(), Value::Array(data));
    Some(Value::Object(out))
}

fn flatten_numbers(values: &[Value], out: &mut Vec<Value>) {
    for v in values {
        match v {
            Value::Array(items) => flatten_numbers(items, out),
            other => out.push(other.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn npy_round_trip_and_orders() {
        let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let file = write_npy(Kind::Float, &[2, 3], &values);
        assert_eq!((file.len() - 24) % 64, 0);
        let t = parse_npy(&file).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(
            t.data,
            TensorData::Numeric {
                kind: Kind::Float,
                bytes: values.clone()
            }
        );
        // The same array stored column-major: 1 4 2 5 3 6.
        let f: Vec<u8> = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut fortran = write_npy(Kind::Float, &[2, 3], &f);
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        let t = parse_npy(&fortran).unwrap();
        assert_eq!(
            t.data,
            TensorData::Numeric {
                kind: Kind::Float,
                bytes: values
            }
        );
        assert!(parse_npy(b"\x93NUMPY\x01\x00\xff\xff").is_err());
        // Found by fuzzing: a dtype starting with a multi-byte character.
        let header = "{'descr': '\u{131}f4', 'fortran_order': False, 'shape': (1,), }\n";
        let mut odd = b"\x93NUMPY\x01\x00".to_vec();
        odd.extend_from_slice(&(header.len() as u16).to_le_bytes());
        odd.extend_from_slice(header.as_bytes());
        odd.extend_from_slice(&[0; 4]);
        let err = parse_npy(&odd).unwrap_err();
        assert!(format!("{err:?}").contains("byte order"), "{err:?}");
        assert!(parse_npy(&file[..file.len() - 1]).is_err());
    }

    #[test]
    fn v2_inputs_are_checked() {
        let ok = json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]});
        let t = parse_v2_inputs(&ok).unwrap();
        let d = rows(t).unwrap();
        assert_eq!(d.instances.len(), 2);
        assert_eq!(d.instances[0].shape, vec![2]);
        for (body, needle) in [
            (
                json!({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}),
                "holds 3 elements",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}),
                "not an integer in -128..=127",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]}),
                "is not one of",
            ),
            (
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}),
                "not a number",
            ),
            (json!({"inputs": []}), "empty"),
        ] {
            let e = parse_v2_inputs(&body).unwrap_err();
            assert!(e.message.contains(needle), "{}: {}", body, e.message);
        }
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.5), 0xc100);
    }

    #[test]
    fn outputs_take_the_protocol_shapes() {
        let out = v2_outputs(&[json!([1.5, 2.0]), json!([3.0, 4.0])], true);
        assert_eq!(out[0]["shape"], json!([2, 2]));
        assert_eq!(out[0]["datatype"], "FP32");
        let out = v2_outputs(
            &[json!({"a": [1], "b": 2}), json!({"a": [3], "b": 4})],
            true,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1]["name"], "b");
        assert_eq!(out[1]["datatype"], "INT64");
        let out = v2_outputs(&[json!({"cat": 0.9})], false);
        assert_eq!(out[0]["datatype"], "BYTES");
    }
}
