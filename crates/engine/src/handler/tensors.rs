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
        // Every row holds at least one element and the bytes are exactly `n` rows: so the
        // column has `n` instances, and `n` is bounded by the body.
        let row_bytes = row_shape.iter().try_fold(kind.elt_size_in_bytes(), |a, d| {
            a.checked_mul(usize::try_from(*d).ok()?)
        });
        let rows = usize::try_from(n).unwrap_or(0);
        let row_bytes = match row_bytes {
            Some(0) => {
                return Err(ServeError::bad_request(format!(
                    "input \"{}\" has shape {:?}: it holds no elements",
                    t.name, t.shape
                )))
            }
            Some(r) if r.checked_mul(rows) == Some(bytes.len()) => r,
            _ => {
                return Err(ServeError::bad_request(format!(
                    "input \"{}\" has shape {:?} but {} bytes of data",
                    t.name,
                    t.shape,
                    bytes.len()
                )))
            }
        };
        let column: Vec<Instance> = bytes
            .chunks_exact(row_bytes)
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
        // Every column has `n` instances (checked above): row `i` takes the `i`th of each.
        let mut columns: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
        (0..n)
            .map(|_| Instance {
                input: Input::Many(columns.iter_mut().filter_map(Iterator::next).collect()),
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

/// The most header bytes a `.npy` body may have: NumPy's own reading limit
/// (`max_header_size`). A real header is one short dict literal.
const NPY_MAX_HEADER: usize = 10_000;

/// The deepest bracket nesting a `.npy` header may have. A header of a plain dtype nests two
/// deep (`{... 'shape': (2, 3)}`); the literal parser recurses once per level.
const NPY_MAX_NESTING: usize = 8;

/// The most dimensions a `.npy` array may have: NumPy's limit.
const NPY_MAX_DIMS: usize = 64;

/// Parses a `.npy` file (format versions 1 to 3) with `npyz`: numbers of kinds bool, (u)int8,
/// int16/32/64, float16/32/64, either byte order, C or Fortran order.
///
/// What a hostile header could make expensive is checked before `npyz` reads it: the header's
/// length (at most `NPY_MAX_HEADER` bytes, inside the body), its bracket nesting, and its
/// shape (at most `NPY_MAX_DIMS` dimensions, none 0, whose element count the body's data
/// can hold), so no count or allocation can outgrow the body.
pub fn parse_npy(body: &[u8]) -> Result<TypedTensor, ServeError> {
    let bad = |why: &str| ServeError::bad_request(format!("the .npy body is not valid: {why}"));
    let (header, data_len) = npy_header(body).map_err(|why| bad(&why))?;
    check_npy_header(header, data_len).map_err(|why| bad(&why))?;
    let file = npyz::NpyFile::new(body).map_err(|e| bad(&e.to_string()))?;
    let npyz::DType::Plain(dtype) = file.dtype() else {
        return Err(bad(&format!(
            "dtype {} is not a number type torchfn takes (bool, uint8, int8/16/32/64, \
             float16/32/64)",
            file.dtype().descr()
        )));
    };
    let kind = npy_kind(&dtype).ok_or_else(|| {
        bad(&format!(
            "dtype '{dtype}' is not a number type torchfn takes (bool, uint8, int8/16/32/64, \
             float16/32/64)"
        ))
    })?;
    let size = kind.elt_size_in_bytes();
    // The shape was checked against the data's length above: every size fits.
    let shape = file
        .shape()
        .iter()
        .map(|d| i64::try_from(*d).map_err(|_| bad("its shape is too large")))
        .collect::<Result<Vec<_>, _>>()?;
    let count = usize::try_from(file.len()).map_err(|_| bad("its shape is too large"))?;
    if Some(data_len) != count.checked_mul(size) {
        return Err(bad(&format!(
            "its shape {shape:?} of '{dtype}' needs {} bytes of data, the body has {data_len}",
            count.saturating_mul(size)
        )));
    }
    let fortran = file.order() == npyz::Order::Fortran;
    let read = |e: std::io::Error| bad(&e.to_string());
    // Elements in storage order, converted from the file's byte order to little-endian.
    let mut bytes = match kind {
        Kind::Bool => npy_elements(file, data_len, |x: bool| [u8::from(x)]).map_err(read)?,
        Kind::Uint8 => npy_elements(file, data_len, |x: u8| [x]).map_err(read)?,
        Kind::Int8 => npy_elements(file, data_len, i8::to_le_bytes).map_err(read)?,
        Kind::Int16 => npy_elements(file, data_len, i16::to_le_bytes).map_err(read)?,
        Kind::Int => npy_elements(file, data_len, i32::to_le_bytes).map_err(read)?,
        Kind::Int64 => npy_elements(file, data_len, i64::to_le_bytes).map_err(read)?,
        Kind::Half => npy_elements(file, data_len, half::f16::to_le_bytes).map_err(read)?,
        Kind::Double => npy_elements(file, data_len, f64::to_le_bytes).map_err(read)?,
        _ => npy_elements(file, data_len, f32::to_le_bytes).map_err(read)?,
    };
    if fortran && shape.len() > 1 {
        bytes = fortran_to_c(&bytes, &shape, size);
    }
    Ok(TypedTensor {
        name: "body".into(),
        shape,
        data: TensorData::Numeric { kind, bytes },
    })
}

/// The header text of a `.npy` body and the length of the data after it, from the fixed
/// preamble (magic string, version, header length): what `npyz` would allocate for the header
/// is checked here first.
fn npy_header(body: &[u8]) -> Result<(&[u8], usize), String> {
    if !body.starts_with(NPY_MAGIC) || body.len() < 10 {
        return Err("it does not start with the \\x93NUMPY magic string".into());
    }
    let (header_len, start): (usize, usize) = match (body[6], body.get(8..12)) {
        (1, _) => (usize::from(u16::from_le_bytes([body[8], body[9]])), 10),
        (2 | 3, Some(&[a, b, c, d])) => (
            usize::try_from(u32::from_le_bytes([a, b, c, d])).unwrap_or(usize::MAX),
            12,
        ),
        (v, _) => return Err(format!("format version {v} is not 1, 2 or 3")),
    };
    if header_len > NPY_MAX_HEADER {
        return Err(format!(
            "its header is {header_len} bytes, more than the {NPY_MAX_HEADER} torchfn reads"
        ));
    }
    let end = start
        .checked_add(header_len)
        .filter(|e| *e <= body.len())
        .ok_or("its header runs past the end of the body")?;
    Ok((&body[start..end], body.len() - end))
}

/// Checks a `.npy` header before `npyz` interprets it: bracket nesting at most
/// [`NPY_MAX_NESTING`] deep, and every `'shape'` a tuple of at most [`NPY_MAX_DIMS`] sizes of
/// at least 1 whose product is at most `data_len` (each element takes at least one byte), so
/// the element count and the strides `npyz` computes cannot overflow and what it reads is
/// bounded by the body. A plain dtype must start with its byte order.
fn check_npy_header(header: &[u8], data_len: usize) -> Result<(), String> {
    let mut depth = 0usize;
    for b in header {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > NPY_MAX_NESTING {
                    return Err(format!(
                        "its header nests deeper than {NPY_MAX_NESTING} brackets"
                    ));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let text = std::str::from_utf8(header).map_err(|_| "its header is not text".to_string())?;
    let literal: py_literal::Value = text
        .trim_end()
        .parse()
        .map_err(|e| format!("its header is not a Python literal: {e}"))?;
    let py_literal::Value::Dict(entries) = literal else {
        return Err("its header is not a dict".into());
    };
    for (_, descr) in entries
        .iter()
        .filter(|(k, _)| matches!(k, py_literal::Value::String(k) if k == "descr"))
    {
        if let py_literal::Value::String(descr) = descr {
            if !descr.starts_with(['<', '>', '|']) {
                return Err(format!(
                    "dtype '{descr}' does not start with a byte order ('<', '>' or '|')"
                ));
            }
        }
    }
    let shapes = entries
        .iter()
        .filter(|(k, _)| matches!(k, py_literal::Value::String(k) if k == "shape"))
        .map(|(_, v)| v);
    for shape in shapes {
        let dims = match shape {
            py_literal::Value::Tuple(dims) | py_literal::Value::List(dims) => dims,
            _ => return Err("its shape is not a tuple of sizes".into()),
        };
        if dims.len() > NPY_MAX_DIMS {
            return Err(format!(
                "its shape has {} dimensions, more than {NPY_MAX_DIMS}",
                dims.len()
            ));
        }
        let mut count = 1usize;
        for d in dims {
            let py_literal::Value::Integer(d) = d else {
                return Err("its shape is not a tuple of sizes".into());
            };
            let d = usize::try_from(d)
                .map_err(|_| format!("its shape has the size {d}, not a count of elements"))?;
            if d == 0 {
                return Err("its shape has a size of 0: the array holds no elements".into());
            }
            count = count
                .checked_mul(d)
                .filter(|c| *c <= data_len)
                .ok_or_else(|| {
                    format!(
                        "its shape holds more elements than the body's {data_len} bytes of \
                         data can"
                    )
                })?;
        }
    }
    Ok(())
}

/// The libtorch kind of a `.npy` dtype torchfn takes.
fn npy_kind(dtype: &npyz::TypeStr) -> Option<Kind> {
    use npyz::TypeChar;
    if dtype.time_units().is_some() {
        return None;
    }
    Some(match (dtype.type_char(), dtype.size_field()) {
        (TypeChar::Bool, 1) => Kind::Bool,
        (TypeChar::Uint, 1) => Kind::Uint8,
        (TypeChar::Int, 1) => Kind::Int8,
        (TypeChar::Int, 2) => Kind::Int16,
        (TypeChar::Int, 4) => Kind::Int,
        (TypeChar::Int, 8) => Kind::Int64,
        (TypeChar::Float, 2) => Kind::Half,
        (TypeChar::Float, 4) => Kind::Float,
        (TypeChar::Float, 8) => Kind::Double,
        _ => return None,
    })
}

/// A `.npy` file's elements, read by `npyz` (which applies the file's byte order), as
/// little-endian bytes. `data_len` is the data's length, checked against the shape.
fn npy_elements<T: npyz::Deserialize, const N: usize>(
    file: npyz::NpyFile<&[u8]>,
    data_len: usize,
    le: impl Fn(T) -> [u8; N],
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data_len);
    let elements = file
        .data::<T>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    for x in elements {
        out.extend_from_slice(&le(x?));
    }
    Ok(out)
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
            out.extend_from_slice(&half::f16::from_f32(x as f32).to_le_bytes())
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

    /// A `.npy` file of any header text (version 1, or 2 when `v2`) and data.
    fn npy(header: &str, data: &[u8], v2: bool) -> Vec<u8> {
        let mut out = NPY_MAGIC.to_vec();
        if v2 {
            out.extend_from_slice(&[2, 0]);
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn npy_error(file: &[u8]) -> String {
        let e = parse_npy(file).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
        assert!(
            e.message.starts_with("the .npy body is not valid: "),
            "{e:?}"
        );
        e.message
    }

    #[test]
    fn npy_kinds_and_byte_orders() {
        let h = |descr: &str, shape: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n")
        };
        let numeric = |t: TypedTensor| match t.data {
            TensorData::Numeric { kind, bytes } => (kind, t.shape, bytes),
            other => panic!("{other:?}"),
        };
        // Big-endian float32 and int16 come out little-endian.
        let be: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        let (kind, shape, bytes) = numeric(parse_npy(&npy(&h(">f4", "(2,)"), &be, false)).unwrap());
        assert_eq!((kind, shape), (Kind::Float, vec![2]));
        assert_eq!(
            bytes,
            [1.0f32, -0.5]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let (kind, _, bytes) =
            numeric(parse_npy(&npy(&h(">i2", "(2,)"), &[0x01, 0x02, 0xff, 0xfe], true)).unwrap());
        assert_eq!((kind, bytes), (Kind::Int16, vec![0x02, 0x01, 0xfe, 0xff]));
        // float16 (through `half`), bool, uint8, int8, int32/64, float64.
        let (kind, _, bytes) =
            numeric(parse_npy(&npy(&h("<f2", "(1, 1)"), &[0x00, 0x3c], false)).unwrap());
        assert_eq!((kind, bytes), (Kind::Half, vec![0x00, 0x3c]));
        for (descr, data, want) in [
            ("|b1", vec![1u8, 0], Kind::Bool),
            ("|u1", vec![7, 255], Kind::Uint8),
            ("|i1", vec![7, 255], Kind::Int8),
            ("<i4", vec![1; 8], Kind::Int),
            ("<i8", vec![1; 16], Kind::Int64),
            ("<f8", vec![0; 16], Kind::Double),
        ] {
            let (kind, shape, bytes) =
                numeric(parse_npy(&npy(&h(descr, "(2,)"), &data, false)).unwrap());
            assert_eq!((kind, shape, bytes), (want, vec![2], data), "{descr}");
        }
        // Kinds torchfn does not take, and a bool byte that is neither 0 nor 1.
        for descr in ["<u2", "<c8", "|S4", "<M8[s]", "|O"] {
            let m = npy_error(&npy(&h(descr, "(1,)"), &[0; 8], false));
            assert!(
                m.contains("not a number type") || m.contains("needs"),
                "{descr}: {m}"
            );
        }
        let m = npy_error(&npy(
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
            &[0; 4],
            false,
        ));
        assert!(m.contains("not a number type"), "{m}");
        npy_error(&npy(&h("|b1", "(1,)"), &[2], false));
        // '=' (native order) is not a byte order a .npy file carries.
        let m = npy_error(&npy(&h("=f4", "(1,)"), &[0; 4], false));
        assert!(m.contains("byte order"), "{m}");
        // Data longer or shorter than the shape needs.
        let m = npy_error(&npy(&h("<f4", "(2,)"), &[0; 12], false));
        assert!(m.contains("needs 8 bytes of data, the body has 12"), "{m}");
        npy_error(&npy(&h("<f4", "(2,)"), &[0; 4], false));
    }

    #[test]
    fn hostile_npy_headers_are_refused_cheaply() {
        let h = |shape: &str| {
            format!("{{'descr': '<f4', 'fortran_order': True, 'shape': {shape}, }}\n")
        };
        // A header length of 4 GiB, and one past the body: refused before any allocation.
        let mut huge = NPY_MAGIC.to_vec();
        huge.extend_from_slice(&[2, 0, 0xff, 0xff, 0xff, 0xff]);
        huge.extend_from_slice(b"{}");
        assert!(npy_error(&huge).contains("more than the 10000"));
        let mut short = NPY_MAGIC.to_vec();
        short.extend_from_slice(&[1, 0, 0x00, 0x10, b'{']);
        assert!(npy_error(&short).contains("runs past the end"));
        npy_error(b"\x93NUMPY\x02\x00\x01");
        npy_error(b"\x93NUMPY\x07\x00\x00\x00");
        // Deep nesting, which the literal parser would recurse into.
        let deep = format!("{}{}", "(".repeat(4000), ")".repeat(4000));
        assert!(npy_error(&npy(&h(&deep), &[], false)).contains("nests deeper"));
        // Shapes whose element count overflows, or outgrows the data, or has no elements.
        for shape in [
            "(1099511627776, 1099511627776)",
            "(4294967296, 4294967296, 4294967296, 0)",
            "(18446744073709551616,)",
            "(1000000,)",
            "(0,)",
            "(2, 0)",
            "(-1,)",
            "(1.5,)",
            "'x'",
        ] {
            let m = npy_error(&npy(&h(shape), &[0; 4], false));
            assert!(m.contains("shape"), "{shape}: {m}");
        }
        let many = format!("({})", vec!["1"; 65].join(", "));
        assert!(npy_error(&npy(&h(&many), &[0; 4], false)).contains("65 dimensions"));
        // Not a dict literal, and text that is not UTF-8.
        npy_error(&npy("[1, 2]", &[], false));
        npy_error(&npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)",
            &[0; 4],
            false,
        ));
        let mut latin = npy(&h("(1,)"), &[0; 4], false);
        latin[12] = 0xff;
        npy_error(&latin);
        // A duplicate 'shape' key cannot slip a huge shape past the check.
        let dup = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'shape': (4294967296, 4294967296)}";
        npy_error(&npy(dup, &[0; 4], false));
    }

    #[test]
    fn rows_need_elements_and_matching_bytes() {
        let t = |name: &str, shape: Vec<i64>, bytes: Vec<u8>| TypedTensor {
            name: name.into(),
            shape,
            data: TensorData::Numeric {
                kind: Kind::Float,
                bytes,
            },
        };
        // An input with no elements next to one with some: a client error, not a panic.
        let e = rows(vec![
            t("a", vec![2, 0], vec![]),
            t("b", vec![2, 1], vec![0; 8]),
        ])
        .unwrap_err();
        assert!(e.message.contains("holds no elements"), "{}", e.message);
        // A huge batch of empty rows is refused without making its instances.
        let e = rows(vec![t("a", vec![1 << 40, 0], vec![])]).unwrap_err();
        assert!(e.message.contains("holds no elements"), "{}", e.message);
        // Bytes that do not fill the shape.
        let e = rows(vec![t("a", vec![2, 2], vec![0; 12])]).unwrap_err();
        assert!(e.message.contains("12 bytes"), "{}", e.message);
        let e = rows(vec![t("a", vec![2, i64::MAX], vec![0; 8])]).unwrap_err();
        assert!(e.message.contains("8 bytes"), "{}", e.message);
        // Two inputs: instance i takes row i of each.
        let d = rows(vec![
            t("a", vec![2, 1], vec![0; 8]),
            t("b", vec![2], vec![1; 8]),
        ])
        .unwrap();
        assert_eq!(d.instances.len(), 2);
        assert!(matches!(&d.instances[1].input, Input::Many(p) if p.len() == 2));
        let d = parse_v2_inputs(
            &json!({"inputs": [{"name": "x", "shape": [2, 0], "datatype": "FP32", "data": []}]}),
        )
        .and_then(rows);
        assert!(d.is_err());
    }

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
        // FP16 values are IEEE half precision, little-endian.
        let half = json!({"inputs": [{"name": "h", "shape": [3], "datatype": "FP16", "data": [1.0, -2.5, 1e6]}]});
        let t = parse_v2_inputs(&half).unwrap();
        assert_eq!(
            t[0].data,
            TensorData::Numeric {
                kind: Kind::Half,
                bytes: [0x3c00u16, 0xc100, 0x7c00]
                    .iter()
                    .flat_map(|b| b.to_le_bytes())
                    .collect()
            }
        );
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
