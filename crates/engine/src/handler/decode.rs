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
    let Some(fields) = form_fields(request)? else {
        return Ok(None);
    };
    let pick = |name: &str| {
        fields
            .iter()
            .rev()
            .find(|f| f.name == name)
            .map(|f| f.value.clone())
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

/// One field of a form body.
#[derive(Debug, Clone, PartialEq)]
pub struct FormField {
    pub name: String,
    /// A multipart part's own `Content-Type`, if it has one.
    pub content_type: Option<String>,
    pub value: Vec<u8>,
}

/// A form request's fields in order (`multipart/form-data` or
/// `application/x-www-form-urlencoded`); `None` when the request is not a form.
pub fn form_fields(request: &super::Request<'_>) -> Result<Option<Vec<FormField>>, ServeError> {
    if request.media_is(&["multipart/form-data"]) {
        multipart_fields(request).map(Some)
    } else if request.media_is(&["application/x-www-form-urlencoded"]) {
        urlencoded_fields(request.body).map(Some)
    } else {
        Ok(None)
    }
}

/// The longest multipart boundary taken (RFC 2046 allows 70 characters).
const MAX_BOUNDARY: usize = 200;

/// A `multipart/form-data` body's named fields, parsed by `multer`.
///
/// `multer` is asynchronous, and decoding runs on the server's async worker, so it must not
/// block. The body is already in memory: it is handed over as one ready chunk of a stream, and
/// the parse is polled once with a waker that does nothing ([`ready_now`]). Every step of it
/// then completes without waiting; should `multer` ever answer "pending" (it does so, without
/// arranging a wake-up, on input it cannot continue), that is the client's malformed body,
/// never a wait.
fn multipart_fields(request: &super::Request<'_>) -> Result<Vec<FormField>, ServeError> {
    let boundary = multer::parse_boundary(request.content_type.unwrap_or(""))
        .ok()
        .filter(|b| !b.is_empty() && b.len() <= MAX_BOUNDARY)
        .ok_or_else(|| ServeError::bad_request("multipart/form-data without a boundary"))?;
    let chunk: Result<Vec<u8>, std::convert::Infallible> = Ok(request.body.to_vec());
    let mut multipart = multer::Multipart::new(futures_util::stream::iter([chunk]), boundary);
    let parse = async move {
        let mut fields = Vec::new();
        while let Some(field) = multipart.next_field().await? {
            let name = field.name().map(str::to_owned);
            let content_type = field.content_type().map(ToString::to_string);
            let content = field.bytes().await?;
            if let Some(name) = name {
                fields.push(FormField {
                    name,
                    content_type,
                    value: content.to_vec(),
                });
            }
        }
        Ok::<_, multer::Error>(fields)
    };
    match ready_now(parse) {
        Some(Ok(fields)) => Ok(fields),
        Some(Err(e)) => Err(ServeError::bad_request(format!(
            "the multipart/form-data body is not valid: {e}"
        ))),
        None => Err(ServeError::bad_request(
            "the multipart/form-data body is not valid: it cannot be read to its end",
        )),
    }
}

/// The output of a future whose every step is ready (it does no I/O and waits on nothing),
/// from polling it once; `None` if it is not finished then. Never blocks.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// An `application/x-www-form-urlencoded` body's fields. Values stay bytes: TorchServe hands a
/// handler the raw bytes of a field, and a binary value must arrive intact. `form_urlencoded`
/// decodes values into UTF-8 strings (replacing invalid sequences), which would corrupt binary
/// payloads, so values are decoded with `percent-encoding` (after `+` → space, which it leaves
/// alone). A `%` not followed by two hex digits is the client's error, as in TorchServe.
fn urlencoded_fields(body: &[u8]) -> Result<Vec<FormField>, ServeError> {
    body.split(|b| *b == b'&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = match kv.iter().position(|b| *b == b'=') {
                Some(at) => (&kv[..at], &kv[at + 1..]),
                None => (kv, &[][..]),
            };
            let k = form_decode(k)?;
            let v = form_decode(v)?;
            Ok(FormField {
                name: String::from_utf8_lossy(&k).into_owned(),
                content_type: None,
                value: v,
            })
        })
        .collect()
}

/// One urlencoded name or value as bytes.
fn form_decode(s: &[u8]) -> Result<Vec<u8>, ServeError> {
    let escapes_ok = s.split(|b| *b == b'%').skip(1).all(|after| {
        after
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err(ServeError::bad_request("the form body has a bad %-escape"));
    }
    let spaced: Vec<u8> = s
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    Ok(percent_encoding::percent_decode(&spaced).collect())
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

/// A body that is a flat JSON array of numbers (`[0.1, 2, ...]`), read straight into f32s:
/// the instance [`tensor_from_json`] makes of it, without a JSON tree first. `None` for
/// anything else (nested or empty arrays, other values, a number no f32 holds, invalid
/// JSON), which the general path then reads or turns into its error.
pub fn flat_array(body: &[u8]) -> Option<Instance> {
    flat_instance(serde_json::from_slice(body).ok()?)
}

/// Numbers read as f64 into an instance of shape `[n]`, converted as [`tensor_from_json`]
/// converts them (f64, then f32, which must be finite); `None` when empty or not finite.
pub(crate) fn flat_instance(numbers: Vec<f64>) -> Option<Instance> {
    if numbers.is_empty() {
        return None;
    }
    let values: Vec<f32> = numbers.iter().map(|&x| x as f32).collect();
    if !values.iter().all(|x| x.is_finite()) {
        return None;
    }
    let len = values.len() as i64;
    Some(Instance::f32(values, vec![len]))
}

/// The most values reserved ahead of reading them from a JSON array.
const MAX_CAPACITY_HINT: usize = 1 << 16;

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
    // The shape comes from the first elements only: a small body can claim a huge product
    // (its other elements then fail the check), so the capacity is only a hint, bounded.
    let hint = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(usize::try_from(*d).ok()?))
        .unwrap_or(0)
        .min(MAX_CAPACITY_HINT);
    let mut values = Vec::with_capacity(hint);
    fill(value, &shape, at, &mut values)?;
    Ok(Instance::f32(values, shape))
}

fn fill(value: &Value, shape: &[i64], at: &str, out: &mut Vec<f32>) -> Result<(), ServeError> {
    // The indices down to the failing element; its name (`at[2][0]`) is only made for an
    // error message, never for every number.
    let mut path = Vec::with_capacity(shape.len());
    fill_at(value, shape, &mut path, out).map_err(|why| {
        let mut name = at.to_string();
        for i in &path {
            name.push_str(&format!("[{i}]"));
        }
        ServeError::bad_request(why.message(&name))
    })
}

/// Why an element could not be read as a float32.
enum FillError {
    OutOfRange(serde_json::Number),
    Ragged { got: usize, want: i64 },
    ArrayForNumber,
    NumberForArray,
    Kind(&'static str),
}

impl FillError {
    fn message(&self, at: &str) -> String {
        match self {
            FillError::OutOfRange(n) => format!("{at}: {n} is outside the float32 range"),
            FillError::Ragged { got, want } => format!(
                "{at} has {got} elements where its siblings have {want}: arrays must be rectangular"
            ),
            FillError::ArrayForNumber => {
                format!("{at} is an array where a number was expected: arrays must be rectangular")
            }
            FillError::NumberForArray => {
                format!("{at} is a number where an array was expected: arrays must be rectangular")
            }
            FillError::Kind(kind) => format!("{at} must be a number, got {kind}"),
        }
    }
}

fn fill_at(
    value: &Value,
    shape: &[i64],
    path: &mut Vec<usize>,
    out: &mut Vec<f32>,
) -> Result<(), FillError> {
    match (value, shape.split_first()) {
        (Value::Number(n), None) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let v = x as f32;
            if !v.is_finite() {
                return Err(FillError::OutOfRange(n.clone()));
            }
            out.push(v);
            Ok(())
        }
        (Value::Array(items), Some((&len, rest))) if items.len() as i64 == len => {
            for (i, item) in items.iter().enumerate() {
                path.push(i);
                fill_at(item, rest, path, out)?;
                path.pop();
            }
            Ok(())
        }
        (Value::Array(items), Some((&len, _))) => Err(FillError::Ragged {
            got: items.len(),
            want: len,
        }),
        (Value::Array(_), None) => Err(FillError::ArrayForNumber),
        (Value::Number(_), Some(_)) => Err(FillError::NumberForArray),
        (other, _) => Err(FillError::Kind(kind_of(other))),
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
    let kind = match &first.input {
        Input::F32(_) => Kind::Float,
        Input::Typed { kind, .. } => *kind,
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
    // Every item is of the first's kind (checked above): its elements as bytes.
    fn bytes_of(item: &Instance) -> &[u8] {
        match &item.input {
            Input::F32(values) => bytemuck::cast_slice(values),
            Input::Typed { bytes, .. } => bytes,
            _ => &[],
        }
    }
    let mut data = Vec::with_capacity(items.iter().map(|item| bytes_of(item).len()).sum());
    for item in items {
        data.extend_from_slice(bytes_of(item));
    }
    let t = host_tensor(&data, &dims, kind)?;
    to_device(t, device)
}

/// A host tensor of shape `dims` copied from `data`, in one libtorch call (a flat tensor and a
/// view of it cost two). `data` must hold exactly that many elements of `kind`.
fn host_tensor(data: &[u8], dims: &[i64], kind: Kind) -> Result<Tensor, SessionError> {
    crate::libtorch::host_tensor(data, dims, kind).map_err(|e| match e {
        tch::TchError::Shape(m) => SessionError::Shape(m),
        e => e.into(),
    })
}

/// A host tensor on `device`: the batch is assembled on the host and crosses to the device
/// in one transfer. (Not through pinned memory: tch's `pin_memory` always passes a device,
/// which libtorch 2.11+ warns about on every call, one log line per batch; at the batch
/// sizes served, a pageable copy costs microseconds.)
pub fn to_device(t: Tensor, device: Device) -> Result<Tensor, SessionError> {
    if device == Device::Cpu {
        Ok(t)
    } else {
        let kind = t.f_kind()?;
        Ok(t.f_to_device_(device, kind, false, false)?)
    }
}

/// Converts a tensor (any float or integer kind, any device) to nested JSON arrays.
pub fn tensor_to_json(t: &Tensor) -> Result<Value, SessionError> {
    // tch's `size`, `numel` and `device` panic where libtorch fails (an undefined tensor, a
    // nested tensor's sizes): only their fallible forms are used here.
    if !t.defined() {
        return Err(SessionError::Output("an undefined tensor"));
    }
    let t = if t.device() == Device::Cpu {
        t.shallow_clone()
    } else {
        t.f_to_device(Device::Cpu)?
    };
    let shape = shape_of(&t)?;
    let t = t.f_contiguous()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(usize::try_from(*d).ok()?))
        .ok_or_else(|| SessionError::Shape(format!("a tensor of shape {shape:?}")))?;
    let leaves: Vec<Value> = match t.f_kind()? {
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

/// A defined tensor's sizes, through libtorch's fallible `_shape_as_tensor`: tch's `size` has
/// no fallible form and panics where libtorch cannot give sizes (a nested tensor's).
fn shape_of(t: &Tensor) -> Result<Vec<i64>, SessionError> {
    let sizes = t.f_internal_shape_as_tensor()?;
    let n = t.dim();
    let mut shape = vec![0i64; n];
    sizes.f_copy_data(&mut shape, n)?;
    Ok(shape)
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
    f32_shortest(x)
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Writes `x` as JSON, the same bytes as printing [`f32_json`]`(x)` with serde_json.
///
/// serde_json prints an f64 with the shortest digits that read back as it; the f64 here is
/// the one `x`'s own shortest (f32) digits denote, so both have the same digits and only
/// their layout can differ: ryu's f32 printer and serde_json's f64 printer place the decimal
/// point the same way for every f32 from 1e-5 up to 1e13, and zero (checked on all 2^32 bit
/// patterns; a test checks those ranges' edges and samples every binary exponent). There the
/// f32's digits are written directly, without the round trip through text and an f64
/// (about 700 instructions a number, most of a classifier row's printing); elsewhere the
/// f64 is printed as before.
pub fn write_f32_json(out: &mut Vec<u8>, x: f32) {
    let magnitude = x.abs();
    if magnitude == 0.0 || (1e-5..1e13).contains(&magnitude) {
        out.extend_from_slice(ryu::Buffer::new().format_finite(x).as_bytes());
        return;
    }
    match f32_shortest(x) {
        Some(d) => {
            let _ = serde_json::to_writer(&mut *out, &d);
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// The f64 that `x`'s shortest decimal form denotes (so it prints as that form), or `None`
/// where `x` is not finite.
pub fn f32_shortest(x: f32) -> Option<f64> {
    if !x.is_finite() {
        return None;
    }
    // Formatted on the stack (no allocation) and read back as the f64 it denotes.
    let mut buffer = ryu::Buffer::new();
    Some(buffer.format_finite(x).parse().unwrap_or(f64::from(x)))
}

fn f64_json(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// `write_f32_json` writes what serde_json prints for `f32_json`: at both edges of its
    /// direct range (a thousand f32s either side of each), and for 97 mantissas, both signs,
    /// of every binary exponent (subnormals, zeros, infinities and NaN included).
    #[test]
    fn f32s_write_as_serde_json_prints_them() {
        let check = |x: f32| {
            let mut out = Vec::new();
            write_f32_json(&mut out, x);
            let want = serde_json::to_string(&f32_json(x)).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), want, "{x:e}");
        };
        for edge in [1e-5f32, 1e13] {
            let bits = edge.to_bits();
            for b in bits - 1000..bits + 1000 {
                check(f32::from_bits(b));
                check(-f32::from_bits(b));
            }
        }
        for exponent in 0u32..=255 {
            for k in 0u32..97 {
                let mantissa = k.wrapping_mul(0x9E37_79B9) >> 9;
                let mantissa = if k == 96 { 0x7F_FFFF } else { mantissa };
                let x = f32::from_bits(exponent << 23 | mantissa);
                check(x);
                check(-x);
            }
        }
    }

    /// Every f32 that `write_f32_json` writes from its own digits, against serde_json's
    /// printing: about a billion values, two minutes in a release build
    /// (`cargo test --release -p torchfn-engine --lib -- --ignored every_f32`).
    #[test]
    #[ignore = "exhaustive: run by hand in a release build"]
    fn every_f32_in_the_direct_range_writes_as_serde_json_prints_it() {
        let mut checked = 0u64;
        for bits in 0..=u32::MAX {
            let x = f32::from_bits(bits);
            let magnitude = x.abs();
            if !(magnitude == 0.0 || (1e-5..1e13).contains(&magnitude)) {
                continue;
            }
            let mut out = Vec::new();
            write_f32_json(&mut out, x);
            let want = serde_json::to_string(&f32_shortest(x).unwrap()).unwrap();
            assert_eq!(out, want.as_bytes(), "{x:e}");
            checked += 1;
        }
        assert!(checked > 1_000_000_000, "{checked}");
    }

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

    fn form(body: &[u8], content_type: &str) -> Result<Option<Vec<u8>>, ServeError> {
        form_input(&super::super::Request {
            body,
            content_type: Some(content_type),
            tensor_shape: None,
        })
    }

    #[test]
    fn multipart_bodies_through_multer() {
        let mp = "multipart/form-data; boundary=XyZ";
        // Binary content, even holding the boundary text not at a line start, stays intact; a
        // repeated name: the later part wins; a part without a name is skipped.
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nfirst\r\n--XyZ\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n\xff\x00--XyZ\xfe\r\n--XyZ--\r\n";
        assert_eq!(form(body, mp).unwrap().unwrap(), b"\xff\x00--XyZ\xfe");
        // A quoted boundary, and "body" when there is no "data".
        let body =
            b"--a b\r\nContent-Disposition: form-data; name=\"body\"\r\n\r\nhi\r\n--a b--\r\n";
        assert_eq!(
            form(body, "multipart/form-data; boundary=\"a b\"")
                .unwrap()
                .unwrap(),
            b"hi"
        );
        // Malformed bodies are the client's error, and never wait: no boundary in the type, none
        // in the body, a body cut short inside a part or its headers, an empty body.
        for (body, ct) in [
            (&b"--XyZ\r\n\r\nx\r\n--XyZ--"[..], "multipart/form-data"),
            (
                b"--XyZ\r\n\r\nx\r\n--XyZ--",
                "multipart/form-data; boundary=",
            ),
            (b"no boundary here", mp),
            (
                b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nx",
                mp,
            ),
            (
                b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"",
                mp,
            ),
            (
                b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nx\r\n--XyZ",
                mp,
            ),
            (b"", mp),
        ] {
            let e = form(body, ct).unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::BadRequest, "{e:?}");
        }
        let long = format!("multipart/form-data; boundary={}", "b".repeat(201));
        assert!(form(b"", &long).is_err());
        // Only data and body count.
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XyZ--\r\n";
        assert!(form(body, mp)
            .unwrap_err()
            .message
            .contains("no field named"));
    }

    #[test]
    fn urlencoded_values_stay_bytes() {
        let ue = "application/x-www-form-urlencoded";
        // Bytes that are not UTF-8 arrive as sent (no replacement characters).
        assert_eq!(
            form(b"data=%FF%00%80", ue).unwrap().unwrap(),
            b"\xff\x00\x80"
        );
        assert_eq!(form(b"data=a+b%2Bc%20d", ue).unwrap().unwrap(), b"a b+c d");
        assert_eq!(form(b"body=x&data", ue).unwrap().unwrap(), b"");
        assert_eq!(form(b"data=1=2&&", ue).unwrap().unwrap(), b"1=2");
        assert_eq!(form(b"d%61ta=k", ue).unwrap().unwrap(), b"k");
        for bad in [
            &b"data=%"[..],
            b"data=%4",
            b"data=%zz",
            b"data=%%41",
            b"%g0=1",
        ] {
            let e = form(bad, ue).unwrap_err();
            assert!(e.message.contains("%-escape"), "{e:?}");
        }
        assert_eq!(form(b"x", "text/plain").unwrap(), None);
    }

    #[test]
    fn hostile_json_shapes_do_not_allocate_or_overflow() {
        // Seven levels whose first elements claim 1000 each: a product of 10^21 values from a
        // body of a few kilobytes. It is refused (the rest is not rectangular) without
        // reserving for the claim.
        let mut v = json!(vec![0; 1000]);
        for _ in 0..6 {
            let mut level = vec![json!(0); 1000];
            level[0] = v;
            v = Value::Array(level);
        }
        let e = tensor_from_json(&v, "body").unwrap_err();
        assert!(
            e.message.contains("arrays must be rectangular"),
            "{}",
            e.message
        );
    }

    #[test]
    fn tensors_libtorch_cannot_describe_are_errors() {
        assert!(tensor_to_json(&Tensor::new()).is_err());
        // A nested tensor has no sizes: tch's `size` would panic.
        let padded = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let shapes = Tensor::from_slice(&[2i64, 3]).view([2, 1]);
        if let Ok(nested) = Tensor::f_internal_nested_from_padded(&padded, &shapes, false) {
            assert!(tensor_to_json(&nested).is_err());
        }
        let t = Tensor::from_slice(&[1i64, 2, 3, 4]).view([2, 1, 2]);
        assert_eq!(tensor_to_json(&t).unwrap(), json!([[[1, 2]], [[3, 4]]]));
        let t = Tensor::from_slice(&[1.5f64]).view([1]);
        assert_eq!(tensor_to_json(&t).unwrap(), json!([1.5]));
        let t = Tensor::from_slice(&[0.5f32])
            .view([1])
            .to_kind(Kind::BFloat16);
        assert_eq!(tensor_to_json(&t).unwrap(), json!([0.5]));
        let empty = Tensor::zeros([0, 2], (Kind::Float, Device::Cpu));
        assert_eq!(tensor_to_json(&empty).unwrap(), json!([]));
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

    /// Typed instances stack into their kind; an instance whose bytes do not fill its shape
    /// is refused before libtorch reads them.
    #[test]
    fn typed_instances_stack_and_short_bytes_are_refused() {
        let typed = |values: &[i64], shape: Vec<i64>| Instance {
            input: Input::Typed {
                kind: Kind::Int64,
                bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
            shape,
        };
        let (a, b) = (typed(&[1, 2], vec![2]), typed(&[3, 4], vec![2]));
        let t = stack(&[&a, &b], Device::Cpu).unwrap();
        assert_eq!(t.kind(), Kind::Int64);
        assert_eq!(t.size(), vec![2, 2]);
        assert_eq!(
            Vec::<i64>::try_from(t.flatten(0, -1)).unwrap(),
            vec![1, 2, 3, 4]
        );
        let short = typed(&[5], vec![2]);
        let err = stack(&[&a, &short], Device::Cpu).unwrap_err();
        assert!(matches!(err, SessionError::Shape(_)), "{err}");
        let float = Instance::f32(vec![1.0], vec![2]);
        assert!(matches!(
            stack(&[&float], Device::Cpu).unwrap_err(),
            SessionError::Shape(_)
        ));
    }
}
