//! TorchServe's vision handlers: `image_classifier`, `image_segmenter`, `object_detector`.
//!
//! Requests (TorchServe's `vision_handler`): the body is an encoded image (JPEG, PNG, GIF,
//! BMP, WebP); or a form whose `data` (else `body`) field is one; or JSON: a base64 string,
//! `{"data": "<base64>"}`, a nested list of numbers (an already-preprocessed tensor), or
//! `{"instances": [...]}` of those (also KServe's `{"b64": ...}` and
//! `{"image_bytes": {"b64": ...}}`). The async side only checks the image's header (format,
//! dimensions); decoding, resizing and normalising run on the model's worker thread, over the
//! whole batch.
//!
//! Preprocessing reproduces torchvision on PIL images: `Resize(256)` (Pillow's bilinear
//! resampling with its fixed-point arithmetic, ported here, so a PNG gives the same bytes as
//! Pillow), `CenterCrop(224)`, `ToTensor`, `Normalize` with ImageNet's mean and std. Images
//! that are not RGB (grayscale, with alpha, palette) are converted to RGB first, where
//! TorchServe would fail. The detector gets `ToTensor` only, at the image's own size.

use std::collections::HashMap;

use serde_json::{Map, Value};
use tch::{Device, IValue, Kind, Tensor};

use super::classifier::{archive_labels, label, softmax_rows};
use super::decode::{
    base64_decode, decode_list, form_input, kind_of, parse_json, tensor_from_json, to_device,
    Decoded, Input, Instance,
};
use super::output::{numel_of, shape_of};
use super::tensors::{TensorData, TypedTensor};
use super::{single_tensor, Handler, Request};
use crate::error::ServeError;
use crate::session::SessionError;
use torchfn_archive::mar::ModelArchive;

/// Largest image accepted, in pixels (about 8192 × 8192).
pub const MAX_PIXELS: u64 = 1 << 26;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const RESIZE: u32 = 256;
const CROP: u32 = 224;

/// `image_classifier`: softmax over the model's logits, the top 5 as `{label: probability}`
/// in descending order (labels from `index_to_name.json`, else the class index).
pub struct ImageClassifier {
    labels: Option<HashMap<String, String>>,
    topk: usize,
}

impl ImageClassifier {
    /// A classifier without class names (answers use class indices).
    pub fn without_labels() -> Self {
        Self {
            labels: None,
            topk: 5,
        }
    }

    pub fn from_archive(archive: &ModelArchive) -> Result<Self, ServeError> {
        Ok(Self {
            labels: archive_labels(archive)?,
            ..Self::without_labels()
        })
    }
}

impl Handler for ImageClassifier {
    fn name(&self) -> &'static str {
        "image_classifier"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        decode_images(request)
    }

    fn decode_tensors(&self, inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        images_from_tensors(inputs)
    }

    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        Ok(vec![IValue::Tensor(normalized_batch(items, device)?)])
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        let (probs, classes) = softmax_rows(&single_tensor(output)?, rows)?;
        Ok(probs
            .chunks(classes.max(1))
            .map(|p| {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|a, b| p[*b].total_cmp(&p[*a]).then(a.cmp(b)));
                let map: Map<String, Value> = order
                    .into_iter()
                    .take(self.topk)
                    .map(|k| (label(&self.labels, k), super::f32_json(p[k])))
                    .collect();
                Value::Object(map)
            })
            .collect())
    }
}

/// `image_segmenter`: the model returns `{"out": [N, K, H, W]}` (or that tensor); each
/// instance gets an `H × W` grid of `[class, probability]` (softmax over `K`, then its max).
pub struct ImageSegmenter;

impl Handler for ImageSegmenter {
    fn name(&self) -> &'static str {
        "image_segmenter"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        decode_images(request)
    }

    fn decode_tensors(&self, inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        images_from_tensors(inputs)
    }

    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        Ok(vec![IValue::Tensor(normalized_batch(items, device)?)])
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        let out = match output {
            IValue::GenericDict(entries) => entries
                .into_iter()
                .find_map(|(k, v)| match (k, v) {
                    (IValue::String(k), IValue::Tensor(t)) if k == "out" => Some(t),
                    _ => None,
                })
                .ok_or_else(|| {
                    SessionError::OutputForm(
                        "the segmenter returned a dict without an \"out\" tensor".into(),
                    )
                })?,
            other => single_tensor(other)?,
        };
        let size = shape_of(&out)?;
        let &[n, _, _, _] = size.as_slice() else {
            return Err(SessionError::OutputForm(format!(
                "the segmenter's output has shape {size:?}; image_segmenter needs [N, classes, H, W]"
            )));
        };
        if usize::try_from(n).ok() != Some(rows) {
            return Err(SessionError::BatchMismatch {
                sent: rows,
                got: usize::try_from(n).unwrap_or(0),
            });
        }
        let probs = out.f_to_kind(Kind::Float)?.f_softmax(1, Kind::Float)?;
        let (values, indices) = probs.f_max_dim(1, false)?;
        let grid = Tensor::f_stack(&[indices.f_to_kind(Kind::Float)?, values], 3)?;
        super::batch_rows(&IValue::Tensor(grid), rows)
    }
}

/// `object_detector`: the model takes a list of `[3, H, W]` images (values in 0..1) and
/// returns, per image, `{"boxes", "labels", "scores"}` (torchvision's detectors; scripted,
/// they return `(losses, detections)`, and the detections are used). Each instance gets the
/// detections scoring at least the threshold (0.5, or `handler.threshold` in the model-config
/// YAML) as `{"<label>": [x1, y1, x2, y2], "score": s}`.
pub struct ObjectDetector {
    labels: Option<HashMap<String, String>>,
    threshold: f64,
}

impl ObjectDetector {
    pub fn from_archive(archive: &ModelArchive) -> Result<Self, ServeError> {
        let threshold = archive
            .config()
            .and_then(|c| c.backend.get("handler"))
            .and_then(|h| h.get("threshold"))
            .and_then(Value::as_f64)
            .unwrap_or(0.5);
        Ok(Self {
            labels: archive_labels(archive)?,
            threshold,
        })
    }
}

impl Handler for ObjectDetector {
    fn name(&self) -> &'static str {
        "object_detector"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        decode_images(request)
    }

    fn decode_tensors(&self, inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        images_from_tensors(inputs)
    }

    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        let images = items
            .iter()
            .map(|item| {
                let t = match &item.input {
                    Input::Bytes(bytes) => {
                        let rgb = decode_rgb(bytes)?;
                        chw_tensor(&rgb, None)?
                    }
                    Input::F32(values) => {
                        Tensor::f_from_slice(values)?.f_view(item.shape.as_slice())?
                    }
                    _ => return Err(SessionError::Input("this handler takes images".into())),
                };
                to_device(t, device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(vec![IValue::TensorList(images)])
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        let detections = match output {
            IValue::Tuple(mut items) if items.len() == 2 => items.pop().unwrap_or(IValue::None),
            other => other,
        };
        let per_image = match detections {
            IValue::GenericList(items) => items,
            other => {
                return Err(SessionError::OutputForm(format!(
                    "the detector returned {}; object_detector needs a list of dicts with \
                     \"boxes\", \"labels\" and \"scores\" (or torchvision's scripted \
                     (losses, detections))",
                    super::output::describe(&other)
                )))
            }
        };
        if per_image.len() != rows {
            return Err(SessionError::BatchMismatch {
                sent: rows,
                got: per_image.len(),
            });
        }
        per_image.into_iter().map(|d| self.detections(d)).collect()
    }
}

impl ObjectDetector {
    fn detections(&self, dict: IValue) -> Result<Value, SessionError> {
        let IValue::GenericDict(entries) = dict else {
            return Err(SessionError::OutputForm(
                "a detection is not a dict of \"boxes\", \"labels\", \"scores\"".into(),
            ));
        };
        let get = |key: &str| {
            entries
                .iter()
                .find_map(|(k, v)| match (k, v) {
                    (IValue::String(k), IValue::Tensor(t)) if k == key => Some(t.shallow_clone()),
                    _ => None,
                })
                .ok_or_else(|| {
                    SessionError::OutputForm(format!("a detection has no \"{key}\" tensor"))
                })
        };
        let cpu = |t: Tensor, kind: Kind| -> Result<Tensor, SessionError> {
            Ok(t.f_to_device(Device::Cpu)?
                .f_to_kind(kind)?
                .f_contiguous()?)
        };
        let boxes = cpu(get("boxes")?, Kind::Double)?;
        let labels = cpu(get("labels")?, Kind::Int64)?;
        let scores = cpu(get("scores")?, Kind::Double)?;
        let n = numel_of(&scores)?;
        let (n_boxes, n_labels) = (numel_of(&boxes)?, numel_of(&labels)?);
        if n_labels != n || Some(n_boxes) != n.checked_mul(4) {
            return Err(SessionError::OutputForm(format!(
                "a detection has {n_boxes} boxes values, {n_labels} labels and {n} scores; it \
                 needs [K, 4], [K] and [K]"
            )));
        }
        let mut b = vec![0f64; n * 4];
        let mut l = vec![0i64; n];
        let mut s = vec![0f64; n];
        boxes.f_copy_data(&mut b, n * 4)?;
        labels.f_copy_data(&mut l, n)?;
        scores.f_copy_data(&mut s, n)?;
        let kept = (0..n)
            // As torch compares a float32 score tensor with a Python float: in float32.
            .filter(|&i| s[i] as f32 >= self.threshold as f32)
            .map(|i| {
                let mut m = Map::new();
                let name = label(&self.labels, l[i] as usize);
                let name = if l[i] < 0 { l[i].to_string() } else { name };
                m.insert(
                    name,
                    Value::Array(b[i * 4..i * 4 + 4].iter().map(|x| json_f64(*x)).collect()),
                );
                m.insert("score".into(), json_f64(s[i]));
                Value::Object(m)
            })
            .collect();
        Ok(Value::Array(kept))
    }
}

/// A float32 value held as f64 (what `tolist()` gives) as JSON.
fn json_f64(x: f64) -> Value {
    super::f32_json(x as f32)
}

// ---- requests ----

/// A vision request's instances (see the module docs).
pub fn decode_images(request: &Request<'_>) -> Result<Decoded, ServeError> {
    if let Some(bytes) = form_input(request)? {
        return match std::str::from_utf8(&bytes) {
            // A text field holds base64; a file part holds the image itself.
            Ok(text) if !request.media_is(&["multipart/form-data"]) => {
                one(image_instance(base64_decode(text, "data")?, "data")?)
            }
            _ => one(image_instance(bytes, "data")?),
        };
    }
    let json = request.media_is(&["application/json"])
        || (request.content_type.is_none()
            && request
                .body
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| matches!(b, b'{' | b'[' | b'"')));
    if !json {
        return one(image_instance(request.body.to_vec(), "the body")?);
    }
    let value = parse_json(request.body)?;
    match &value {
        Value::Object(map) if map.contains_key("instances") => match &map["instances"] {
            Value::Array(items) => decode_list(items, "instances", image_from_json),
            other => Err(ServeError::bad_request(format!(
                "\"instances\" must be an array, got {}",
                kind_of(other)
            ))),
        },
        other => one(image_from_json(other, "body")?),
    }
}

fn one(instance: Instance) -> Result<Decoded, ServeError> {
    Ok(Decoded {
        instances: vec![instance],
        is_list: false,
    })
}

/// One image from JSON: base64 text, `{"data"|"body"|"b64": ...}`, `{"image_bytes": {"b64"}}`,
/// or numbers (an already-preprocessed `[3, H, W]` tensor).
fn image_from_json(value: &Value, at: &str) -> Result<Instance, ServeError> {
    match value {
        Value::String(text) => image_instance(base64_decode(text, at)?, at),
        Value::Array(_) => tensor_from_json(value, at),
        Value::Object(map) => {
            if let Some(inner) = map.get("image_bytes") {
                return image_from_json(inner, &format!("{at}.image_bytes"));
            }
            let (key, inner) = ["data", "body", "b64"]
                .iter()
                .find_map(|k| map.get(*k).map(|v| (*k, v)))
                .ok_or_else(|| {
                    ServeError::bad_request(format!(
                        "{at} is an object without \"data\": send {{\"data\": \"<base64 image>\"}}"
                    ))
                })?;
            image_from_json(inner, &format!("{at}.{key}"))
        }
        other => Err(ServeError::bad_request(format!(
            "{at} must be a base64 image, got {}",
            kind_of(other)
        ))),
    }
}

/// The protocol's BYTES inputs as images (each element an image file, or its base64).
fn images_from_tensors(inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
    let [input] = <[TypedTensor; 1]>::try_from(inputs).map_err(|v| {
        ServeError::bad_request(format!(
            "this model takes one input (images), got {}",
            v.len()
        ))
    })?;
    match input.data {
        TensorData::Bytes(items) => {
            let instances = items
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| {
                    let at = format!("{}[{i}]", input.name);
                    let bytes = if image::guess_format(&bytes).is_ok() {
                        bytes
                    } else {
                        base64_decode(&String::from_utf8_lossy(&bytes), &at)?
                    };
                    image_instance(bytes, &at)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Decoded {
                instances,
                is_list: true,
            })
        }
        TensorData::Numeric { .. } => super::tensors::rows(vec![input]),
    }
}

/// An encoded image, after checking its header: a known format, sane dimensions.
fn image_instance(bytes: Vec<u8>, at: &str) -> Result<Instance, ServeError> {
    if bytes.is_empty() {
        return Err(ServeError::bad_request(format!(
            "{at} is empty: send an image"
        )));
    }
    let format = image::guess_format(&bytes).map_err(|_| {
        ServeError::bad_request(format!(
            "{at} is not an image torchfn can read (JPEG, PNG, GIF, BMP, WebP)"
        ))
    })?;
    let reader = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format);
    let (w, h) = reader.into_dimensions().map_err(|e| {
        ServeError::bad_request(format!("{at} is not a readable {format:?} image: {e}"))
    })?;
    check_dimensions(w, h).map_err(|why| ServeError::bad_request(format!("{at}: {why}")))?;
    Ok(Instance::bytes(bytes))
}

fn check_dimensions(w: u32, h: u32) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("the image is {w} × {h} pixels"));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!(
            "the image is {w} × {h} pixels; the limit is {MAX_PIXELS} pixels"
        ));
    }
    Ok(())
}

// ---- worker-side preprocessing ----

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes an image file to RGB (dropping alpha, expanding gray and palettes).
pub fn decode_rgb(bytes: &[u8]) -> Result<Rgb, SessionError> {
    let bad = |e: String| SessionError::Input(format!("the image cannot be decoded: {e}"));
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(1 << 16);
    limits.max_image_height = Some(1 << 16);
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    // A JPEG cut short still decodes (the missing rows come out gray); Pillow refuses it
    // ("image file is truncated"), and so does torchfn: its scan must end with the EOI marker.
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_has_end(bytes) {
        return Err(bad(
            "the JPEG data is truncated (no end-of-image marker)".into()
        ));
    }
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    check_dimensions(img.width(), img.height()).map_err(SessionError::Input)?;
    let rgb = img.to_rgb8();
    Ok(Rgb {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// Whether a JPEG's last start-of-scan is followed by an end-of-image marker.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((sos, eoi), (Some(s), Some(e)) if e > s)
}

/// torchvision's `Resize(256)` then `CenterCrop(224)` on an RGB image.
pub fn resize_and_crop(rgb: &Rgb) -> Rgb {
    let (w, h) = (rgb.width, rgb.height);
    let size = RESIZE as usize;
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size * long) as f64 / short as f64;
    let new_long = new_long as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let resized = if (nw, nh) == (w, h) {
        Rgb {
            width: w,
            height: h,
            data: rgb.data.clone(),
        }
    } else {
        pil_bilinear(rgb, nw, nh)
    };
    center_crop(&resized, CROP as usize)
}

/// torchvision's `CenterCrop` (offsets rounded half to even, as Python's `round`). Images
/// smaller than the crop are padded with zeros, as torchvision does.
fn center_crop(img: &Rgb, size: usize) -> Rgb {
    let offset = |full: usize| -> i64 { round_half_even((full as f64 - size as f64) / 2.0) };
    let (top, left) = (offset(img.height), offset(img.width));
    let mut data = vec![0u8; size * size * 3];
    for y in 0..size {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..size {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            let d = (y * size + x) * 3;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Rgb {
        width: size,
        height: size,
        data,
    }
}

fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// `ToTensor` (and `Normalize` with ImageNet's mean and std when `normalize`): a `[3, H, W]`
/// float tensor.
fn chw_tensor(img: &Rgb, normalize: Option<()>) -> Result<Tensor, SessionError> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; plane * 3];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = f32::from(px[c]) / 255.0;
            out[c * plane + i] = match normalize {
                Some(()) => (v - MEAN[c]) / STD[c],
                None => v,
            };
        }
    }
    Ok(Tensor::f_from_slice(&out)?.f_view([3, img.height as i64, img.width as i64])?)
}

/// The `[N, 3, 224, 224]` batch of the classifier and segmenter: images resized, cropped and
/// normalised; tensor instances (already preprocessed) stacked as they are.
fn normalized_batch(items: &[&Instance], device: Device) -> Result<Tensor, SessionError> {
    let tensors = items
        .iter()
        .map(|item| match &item.input {
            Input::Bytes(bytes) => {
                let rgb = decode_rgb(bytes)?;
                chw_tensor(&resize_and_crop(&rgb), Some(()))
            }
            Input::F32(values) => Ok(Tensor::f_from_slice(values)?.f_view(item.shape.as_slice())?),
            _ => Err(SessionError::Input("this handler takes images".into())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    to_device(Tensor::f_stack(&tensors, 0)?, device)
}

// ---- Pillow's bilinear resampling (libImaging/Resample.c), 8 bits per channel ----

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel, how many follow, and their fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    // The bilinear (triangle) filter's support is 1.
    let support = filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let w = (1.0 - t.abs()).max(0.0);
            *slot = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), Image.BILINEAR)` of an RGB image: a horizontal pass then a
/// vertical one, each rounding to 8 bits.
pub fn pil_bilinear(img: &Rgb, out_w: usize, out_h: usize) -> Rgb {
    let horizontal = out_w != img.width;
    let vertical = out_h != img.height;
    let cx = coefficients(img.width, out_w);
    let cy = coefficients(img.height, out_h);
    let round = 1i64 << (PRECISION_BITS - 1);
    let (mut src, mut sw) = (std::borrow::Cow::Borrowed(&img.data), img.width);
    if horizontal {
        let mut tmp = vec![0u8; out_w * img.height * 3];
        for y in 0..img.height {
            let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
            for (xx, &(xmin, n)) in cx.bounds.iter().enumerate() {
                let k = &cx.weights[xx * cx.ksize..xx * cx.ksize + n];
                for c in 0..3 {
                    let mut ss = round;
                    for (x, w) in k.iter().enumerate() {
                        ss += i64::from(row[(xmin + x) * 3 + c]) * i64::from(*w);
                    }
                    tmp[(y * out_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        src = std::borrow::Cow::Owned(tmp);
        sw = out_w;
    }
    if !vertical {
        return Rgb {
            width: sw,
            height: img.height,
            data: src.into_owned(),
        };
    }
    let mut out = vec![0u8; sw * out_h * 3];
    for (yy, &(ymin, n)) in cy.bounds.iter().enumerate() {
        let k = &cy.weights[yy * cy.ksize..yy * cy.ksize + n];
        for x in 0..sw {
            for c in 0..3 {
                let mut ss = round;
                for (y, w) in k.iter().enumerate() {
                    ss += i64::from(src[((ymin + y) * sw + x) * 3 + c]) * i64::from(*w);
                }
                out[(yy * sw + x) * 3 + c] = clip8(ss);
            }
        }
    }
    Rgb {
        width: sw,
        height: out_h,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn crop_offsets_round_half_to_even() {
        assert_eq!(round_half_even(58.5), 58);
        assert_eq!(round_half_even(59.5), 60);
        assert_eq!(round_half_even(16.0), 16);
        assert_eq!(round_half_even(0.5), 0);
    }

    #[test]
    fn resize_keeps_flat_images_flat_and_sizes_follow_torchvision() {
        let img = Rgb {
            width: 500,
            height: 375,
            data: [10u8, 200, 30].repeat(500 * 375),
        };
        let r = pil_bilinear(&img, 341, 256);
        assert_eq!((r.width, r.height), (341, 256));
        assert!(r.data.chunks(3).all(|p| p == [10, 200, 30]));
        let c = resize_and_crop(&img);
        assert_eq!((c.width, c.height), (224, 224));
        // Upscaling a 2 × 1 image interpolates between its pixels.
        let tiny = Rgb {
            width: 2,
            height: 1,
            data: vec![0, 0, 0, 255, 255, 255],
        };
        let up = pil_bilinear(&tiny, 4, 1);
        assert_eq!(
            up.data.chunks(3).map(|p| p[0]).collect::<Vec<_>>(),
            vec![0, 64, 191, 255]
        );
    }

    #[test]
    fn detections_keep_scores_at_the_threshold_with_label_names() {
        let labels: HashMap<String, String> = [("1".to_string(), "cat".to_string())].into();
        let d = ObjectDetector {
            labels: Some(labels),
            threshold: 0.7,
        };
        let dict = IValue::GenericDict(vec![
            (
                IValue::String("boxes".into()),
                IValue::Tensor(
                    Tensor::from_slice(&[0f32, 0., 10., 10., 1., 1., 5., 5.]).view([2, 4]),
                ),
            ),
            (
                IValue::String("labels".into()),
                IValue::Tensor(Tensor::from_slice(&[1i64, 2])),
            ),
            (
                IValue::String("scores".into()),
                IValue::Tensor(Tensor::from_slice(&[0.7f32, 0.69])),
            ),
        ]);
        let out = d
            .postprocess(
                IValue::Tuple(vec![
                    IValue::GenericDict(vec![]),
                    IValue::GenericList(vec![dict]),
                ]),
                1,
            )
            .unwrap();
        assert_eq!(
            out[0],
            serde_json::json!([{"cat": [0.0, 0.0, 10.0, 10.0], "score": 0.7}])
        );
        assert!(d.postprocess(IValue::GenericList(vec![]), 1).is_err());
    }

    #[test]
    fn requests_are_checked_before_queueing() {
        let r = Request {
            body: b"not an image",
            content_type: Some("image/jpeg"),
            tensor_shape: None,
        };
        assert!(decode_images(&r)
            .unwrap_err()
            .message
            .contains("not an image"));
        let r = Request {
            body: b"",
            content_type: None,
            tensor_shape: None,
        };
        assert!(decode_images(&r).unwrap_err().message.contains("empty"));
        let r = Request::json(br#"{"instances": [{"data": "!!"}]}"#);
        assert!(decode_images(&r)
            .unwrap_err()
            .message
            .contains("not base64"));
        let r = Request::json(br#"{"data": [[[0.5]]]}"#);
        let d = decode_images(&r).unwrap();
        assert_eq!(d.instances[0].shape, vec![1, 1, 1]);
    }
}
