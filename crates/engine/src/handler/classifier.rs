//! `classifier`: the custom `ClassifierHandler` of TorchServe's getting-started guide, built
//! in. Input `{"features": [...]}`; softmax over the model's output; response
//! `{"predicted_class", "confidence", "probabilities", "class_name"}`, `class_name` taken from
//! the archive's `index_to_name.json` when it has one (TorchServe's label format: a string,
//! or a list whose last element is the name).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{Device, IValue, Kind, Tensor};

use super::decode::{
    decode_list, f32_shortest, flat_instance, parse_json, tensor_from_json, write_f32_json,
    Decoded, Instance,
};
use super::output::{device_of, shape_of};
use super::{single_tensor, tensors, Answer, Handler, Request};
use crate::error::{ErrorKind, ServeError};
use crate::session::SessionError;
use torchfn_archive::mar::ModelArchive;

/// Largest `index_to_name.json` read; a label map is small.
const MAX_LABELS_BYTES: u64 = 16 << 20;

pub struct ClassifierHandler {
    labels: Option<HashMap<String, String>>,
}

impl ClassifierHandler {
    /// A classifier without class names.
    pub fn without_labels() -> Self {
        Self { labels: None }
    }

    /// Reads `index_to_name.json` from the archive when present.
    pub fn from_archive(archive: &ModelArchive) -> Result<Self, ServeError> {
        Ok(Self {
            labels: archive_labels(archive)?,
        })
    }

    /// Parses TorchServe's label map: `{"0": "cat"}` or `{"0": ["n01", "tench"]}`.
    pub fn from_labels_json(text: &[u8]) -> Result<Self, String> {
        Ok(Self {
            labels: Some(parse_labels(text)?),
        })
    }

    fn instance(value: &Value, at: &str) -> Result<Instance, ServeError> {
        let Value::Object(map) = value else {
            return Err(ServeError::bad_request(format!(
                "{at} must be an object like {{\"features\": [0.1, 0.2, ...]}}, got {}",
                super::decode::kind_of(value)
            )));
        };
        let features = map.get("features").ok_or_else(|| {
            ServeError::bad_request(format!(
                "{at} has no \"features\": send {{\"features\": [0.1, 0.2, ...]}}"
            ))
        })?;
        let at = if at == "body" {
            "features".to_string()
        } else {
            format!("{at}.features")
        };
        let inst = tensor_from_json(features, &at)?;
        if inst.shape.is_empty() {
            return Err(ServeError::bad_request(format!(
                "{at} must be an array of numbers, got a single number"
            )));
        }
        Ok(inst)
    }
}

impl Handler for ClassifierHandler {
    fn name(&self) -> &'static str {
        "classifier"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        if let Some(decoded) = tensors::binary_body(request)? {
            return Ok(decoded);
        }
        if let Some(instance) = flat_features(request.body) {
            return Ok(Decoded {
                instances: vec![instance],
                is_list: false,
            });
        }
        let json = parse_json(request.body)?;
        let (items, at) = match &json {
            Value::Array(items) => (items.as_slice(), "body"),
            Value::Object(map) if map.contains_key("instances") => match &map["instances"] {
                Value::Array(items) => (items.as_slice(), "instances"),
                _ => return Err(ServeError::bad_request("\"instances\" must be an array")),
            },
            other => {
                return Ok(Decoded {
                    instances: vec![Self::instance(other, "body")?],
                    is_list: false,
                })
            }
        };
        decode_list(items, at, Self::instance)
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        self.rows(output, rows, |row| {
            serde_json::to_value(row).map_err(unprintable)
        })
    }

    /// The rows printed directly: the same JSON as `postprocess`'s values, without a map of
    /// owned keys per row to build here and print again on the async side.
    fn answers(&self, output: IValue, rows: usize) -> Result<Vec<Answer>, SessionError> {
        self.rows(output, rows, |row| Ok(Answer::Pretty(row.pretty())))
    }
}

/// The guide's request, `{"features": [numbers]}`, read straight into floats: the instance
/// the general path (`parse_json`, then `tensor_from_json`) makes of it, without a JSON
/// tree first. `None` for anything else (a list, `"instances"`, nested or empty features,
/// a duplicate key, a number no f32 holds, invalid JSON), which the general path then reads
/// or turns into its error.
fn flat_features(body: &[u8]) -> Option<Instance> {
    #[derive(Deserialize)]
    struct Flat {
        features: Vec<f64>,
        /// Whether the body has `"instances"` (with any value, `null` too): a list request.
        #[serde(default, deserialize_with = "present")]
        instances: bool,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| true)
    }
    let flat: Flat = serde_json::from_slice(body).ok()?;
    if flat.instances {
        return None;
    }
    flat_instance(flat.features)
}

fn unprintable(e: serde_json::Error) -> SessionError {
    SessionError::OutputForm(format!("cannot print the answer as JSON: {e}"))
}

/// One row's answer, in the guide's handler's key order. Its numbers print as
/// [`super::f32_json`] prints them (shortest form; null where not finite).
#[derive(Serialize)]
struct Row<'a> {
    predicted_class: usize,
    #[serde(serialize_with = "shortest")]
    confidence: f32,
    #[serde(serialize_with = "all_shortest")]
    probabilities: Vec<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class_name: Option<&'a str>,
}

fn shortest<S: serde::Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    f32_shortest(*x).serialize(s)
}

fn all_shortest<S: serde::Serializer>(xs: &[f32], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(xs.iter().map(|&x| f32_shortest(x)))
}

impl Row<'_> {
    /// The row as `serde_json::to_string_pretty` prints it, written directly: through serde's
    /// pretty map printer a seed-model row cost 5.9k instructions, written here 4.0k, and
    /// 1.xk with its numbers written by [`write_f32_json`] (callgrind, concurrency 16). The
    /// class name is printed by serde_json itself, so it reads the same.
    fn pretty(&self) -> String {
        // Room for the response's closing newline too (the route moves a lone row in).
        let names = self.class_name.map_or(0, str::len);
        let mut out = Vec::with_capacity(97 + 24 * self.probabilities.len() + names);
        out.extend_from_slice(b"{\n  \"predicted_class\": ");
        let _ = serde_json::to_writer(&mut out, &self.predicted_class);
        out.extend_from_slice(b",\n  \"confidence\": ");
        write_f32_json(&mut out, self.confidence);
        out.extend_from_slice(b",\n  \"probabilities\": [");
        for (i, &p) in self.probabilities.iter().enumerate() {
            out.extend_from_slice(if i == 0 { b"\n    " } else { b",\n    " });
            write_f32_json(&mut out, p);
        }
        if !self.probabilities.is_empty() {
            out.extend_from_slice(b"\n  ");
        }
        out.push(b']');
        if let Some(name) = self.class_name {
            out.extend_from_slice(b",\n  \"class_name\": ");
            // A string always prints (escaped as serde_json escapes it).
            let _ = serde_json::to_writer(&mut out, name);
        }
        out.extend_from_slice(b"\n}");
        // Only ASCII punctuation was written around serde_json's own (UTF-8) output.
        String::from_utf8(out).unwrap_or_default()
    }
}

impl ClassifierHandler {
    /// Each row of the output's softmax as a [`Row`], given to `each`.
    fn rows<T>(
        &self,
        output: IValue,
        rows: usize,
        each: impl Fn(&Row<'_>) -> Result<T, SessionError>,
    ) -> Result<Vec<T>, SessionError> {
        let (flat, classes) = softmax_rows(&single_tensor(output)?, rows)?;
        flat.chunks(classes.max(1))
            .map(|p| {
                let (k, conf) =
                    p.iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                            if x > best.1 {
                                (i, x)
                            } else {
                                best
                            }
                        });
                each(&Row {
                    predicted_class: k,
                    confidence: conf,
                    probabilities: p.to_vec(),
                    class_name: self.labels.as_ref().map(|labels| {
                        // Keyed by the class index as text, printed on the stack.
                        let mut index = itoa::Buffer::new();
                        labels
                            .get(index.format(k))
                            .map_or("unknown", String::as_str)
                    }),
                })
            })
            .collect()
    }
}

/// The softmax of each row of a `[rows, classes]` output, flat, and the class count. One
/// copy of the logits to the host; the softmax over a row of class scores is cheaper here
/// than as further libtorch calls.
pub(super) fn softmax_rows(
    output: &Tensor,
    rows: usize,
) -> Result<(Vec<f32>, usize), SessionError> {
    let size = shape_of(output)?;
    let (got, classes) = match size.as_slice() {
        &[got, classes] => (usize::try_from(got).ok(), usize::try_from(classes).ok()),
        other => (other.first().and_then(|&n| usize::try_from(n).ok()), None),
    };
    let (Some(classes), true) = (classes, got == Some(rows)) else {
        return Err(SessionError::BatchMismatch {
            sent: rows,
            got: got.unwrap_or(0),
        });
    };
    let len = rows.checked_mul(classes).ok_or_else(|| {
        SessionError::OutputForm(format!("the model returned a tensor of shape {size:?}"))
    })?;
    let logits = if device_of(output)? == Device::Cpu && output.f_kind()? == Kind::Float {
        output.f_contiguous()?
    } else {
        output
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
    };
    let mut flat = vec![0f32; len];
    logits.f_copy_data(&mut flat, len)?;
    for row in flat.chunks_mut(classes.max(1)) {
        softmax(row);
    }
    Ok((flat, classes))
}

/// Class `k`'s name from a label map, else the index itself (TorchServe's rule).
pub(super) fn label(labels: &Option<HashMap<String, String>>, k: usize) -> String {
    let key = k.to_string();
    labels
        .as_ref()
        .and_then(|l| l.get(&key).cloned())
        .unwrap_or(key)
}

/// The archive's `index_to_name.json` (class index → name), when it has one.
pub(super) fn archive_labels(
    archive: &ModelArchive,
) -> Result<Option<HashMap<String, String>>, ServeError> {
    let Some(text) = read_small_file(archive, "index_to_name.json", MAX_LABELS_BYTES)? else {
        return Ok(None);
    };
    parse_labels(&text)
        .map(Some)
        .map_err(|msg| ServeError::new(ErrorKind::InvalidModel, msg))
}

/// An archive file of at most `limit` bytes, if the archive has it.
pub(super) fn read_small_file(
    archive: &ModelArchive,
    name: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, ServeError> {
    if !archive.has_file(name) {
        return Ok(None);
    }
    let invalid = |msg: String| ServeError::new(ErrorKind::InvalidModel, msg);
    let path = archive.path_of(name).map_err(|e| invalid(e.to_string()))?;
    let len = std::fs::metadata(&path)
        .map_err(|e| invalid(format!("cannot read {name}: {e}")))?
        .len();
    if len > limit {
        return Err(invalid(format!(
            "{name} is {len} bytes; the limit is {limit}"
        )));
    }
    std::fs::read(&path)
        .map(Some)
        .map_err(|e| invalid(format!("cannot read {name}: {e}")))
}

/// TorchServe's label map: `{"0": "cat"}` or `{"0": ["n01", "tench"]}` (the last element).
fn parse_labels(text: &[u8]) -> Result<HashMap<String, String>, String> {
    let map: Map<String, Value> = serde_json::from_slice(text)
        .map_err(|e| format!("index_to_name.json is not a JSON object: {e}"))?;
    let mut labels = HashMap::with_capacity(map.len());
    for (k, v) in map {
        let name = match &v {
            Value::String(s) => s.clone(),
            Value::Array(items) => match items.last() {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(format!("index_to_name.json: label {k} is not a name")),
            },
            _ => return Err(format!("index_to_name.json: label {k} is not a name")),
        };
        labels.insert(k, name);
    }
    Ok(labels)
}

/// In-place softmax of one row, computed in f64 and stored as f32.
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = row.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    for (x, e) in row.iter_mut().zip(exps) {
        *x = (e / sum) as f32;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rows_print_as_serde_json_prints_them() {
        let names = ["cat", "", "a \"quoted\" \\ name\n\u{1F600}\u{7}", "ünï"];
        let probabilities: [&[f32]; 5] = [
            &[0.34569085, 0.3338879, 0.32042125],
            &[],
            &[f32::NAN, 1.0, 0.0, -0.0, f32::INFINITY],
            &[
                1e-7,
                3.4028235e38,
                f32::MIN_POSITIVE,
                123456.79,
                1e-5,
                9.99999e-6,
            ],
            &[0.5],
        ];
        for (i, p) in probabilities.iter().enumerate() {
            for class_name in [None, Some(names[i % names.len()])] {
                let row = Row {
                    predicted_class: i * 1000,
                    confidence: p.first().copied().unwrap_or(f32::NEG_INFINITY),
                    probabilities: p.to_vec(),
                    class_name,
                };
                assert_eq!(row.pretty(), serde_json::to_string_pretty(&row).unwrap());
            }
        }
        // Every f32 the softmax gives, as the rows print them.
        let mut x = 1e-30f32;
        while x < 1.0 {
            let row = Row {
                predicted_class: 0,
                confidence: x,
                probabilities: vec![x, 1.0 - x],
                class_name: None,
            };
            assert_eq!(row.pretty(), serde_json::to_string_pretty(&row).unwrap());
            x *= 1.37;
        }
    }

    #[test]
    fn decodes_the_seed_forms() {
        let h = ClassifierHandler { labels: None };
        let one = h
            .decode(&Request::json(br#"{"features": [0.1, 0.2, 0.3]}"#))
            .unwrap();
        assert!(!one.is_list);
        assert_eq!(one.instances[0].shape, vec![3]);
        let two = h
            .decode(&Request::json(
                br#"[{"features": [1, 2]}, {"features": [3, 4]}]"#,
            ))
            .unwrap();
        assert!(two.is_list);
        assert_eq!(two.instances.len(), 2);
        let inst = h
            .decode(&Request::json(br#"{"instances": [{"features": [1]}]}"#))
            .unwrap();
        assert!(inst.is_list);
        for (body, needle) in [
            (&b"{\"feature\": [1]}"[..], "has no \"features\""),
            (
                b"{\"features\": [1, \"a\"]}",
                "features[1] must be a number",
            ),
            (b"[1, 2]", "body[0] must be an object"),
            (b"", "empty"),
            (b"{\"features\": [1,", "not valid JSON"),
            (b"[]", "empty list"),
        ] {
            let e = h.decode(&Request::json(body)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

    #[test]
    fn labels_accept_strings_and_lists() {
        let h =
            ClassifierHandler::from_labels_json(br#"{"0": "cat", "1": ["n01", "tench"]}"#).unwrap();
        let labels = h.labels.unwrap();
        assert_eq!(labels["0"], "cat");
        assert_eq!(labels["1"], "tench");
        assert!(ClassifierHandler::from_labels_json(b"[1]").is_err());
    }

    #[test]
    fn postprocess_softmaxes_and_labels() {
        let h = ClassifierHandler::from_labels_json(br#"{"0": "a", "1": "b"}"#).unwrap();
        let out = Tensor::from_slice(&[0f32, 1.0, 2.0, 0.0]).view([2, 2]);
        let v = h
            .postprocess(IValue::Tensor(out.shallow_clone()), 2)
            .unwrap();
        assert_eq!(v[0]["predicted_class"], 1);
        assert_eq!(v[0]["class_name"], "b");
        assert_eq!(v[1]["class_name"], "a");
        let p0 = v[0]["probabilities"][0].as_f64().unwrap();
        assert!((p0 - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-6);
        assert!(h.postprocess(IValue::Tensor(out), 3).is_err());
    }

    /// The printed answers are the values `postprocess` gives, printed as the API prints them.
    #[test]
    fn printed_answers_are_the_values_printed() {
        let out = Tensor::from_slice(&[0f32, 1.0, 2.0, 0.0, f32::NAN, 3.0]).view([3, 2]);
        for h in [
            ClassifierHandler::without_labels(),
            ClassifierHandler::from_labels_json(br#"{"0": "a\"b", "1": "c"}"#).unwrap(),
        ] {
            let values = h
                .postprocess(IValue::Tensor(out.shallow_clone()), 3)
                .unwrap();
            let printed = h.answers(IValue::Tensor(out.shallow_clone()), 3).unwrap();
            assert_eq!(values.len(), 3);
            for (v, a) in values.iter().zip(&printed) {
                assert_eq!(a, &Answer::Pretty(serde_json::to_string_pretty(v).unwrap()));
                assert_eq!(a.clone().into_value().unwrap(), *v);
            }
            assert!(values[2]["confidence"].is_null() || values[2]["probabilities"][0].is_null());
            assert!(h.answers(IValue::Tensor(out.shallow_clone()), 2).is_err());
        }
    }

    /// The direct read of `{"features": [...]}` makes the instance the general path makes,
    /// and leaves every other body to it.
    #[test]
    fn the_direct_read_agrees_with_the_general_path() {
        let general = |body: &[u8]| {
            let json = parse_json(body).unwrap();
            tensor_from_json(&json["features"], "features").unwrap()
        };
        for body in [
            &br#"{"features": [0.1, 0.2, 0.3]}"#[..],
            br#"{"features": [1, -2, 3.5e-3, 1e30, 18446744073709551615, -9223372036854775808]}"#,
            br#"{"other": {"x": [1]}, "features": [0.3333333333333333]}"#,
            b" {\"features\":[16777217]} \n",
        ] {
            assert_eq!(flat_features(body), Some(general(body)), "{body:?}");
        }
        for body in [
            &br#"{"features": [1], "instances": null}"#[..],
            br#"{"instances": [{"features": [1]}], "features": [1]}"#,
            br#"{"features": [[1, 2]]}"#,
            br#"{"features": []}"#,
            br#"{"features": [1e39]}"#,
            br#"{"features": [1], "features": [2]}"#,
            br#"{"features": [1, "a"]}"#,
            br#"[{"features": [1]}]"#,
            br#"{"features": [1]} x"#,
            b"",
        ] {
            assert_eq!(flat_features(body), None, "{body:?}");
        }
    }
}
