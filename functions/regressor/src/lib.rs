//! `house_price`: a custom handler written in Rust, and the template for writing your own.
//!
//! The model is a TorchScript regression model: a `[N, 3]` float32 batch of normalised
//! features in, a `[N, 1]` batch of prices out. This handler gives it a JSON API the built-in
//! handlers cannot:
//!
//! - request `{"rooms": 3, "area_m2": 84.5, "year_built": 1998}`, or several as
//!   `{"instances": [{...}, {...}]}` (the KServe v1 route's body is the same list);
//! - validated field by field, answered with TorchServe's error body on a 400
//!   (`{"code": 400, "type": "BadRequestException", "message": "rooms must be from 1 to 20,
//!   got 25"}`): a missing field, a wrong type, a value out of range (`rooms` a whole number
//!   from 1 to 20, `area_m2` from 5 to 2000, `year_built` a whole number from 1800 to 2030)
//!   and an unknown field are each refused with a message naming the field;
//! - features normalised with the means and standard deviations in the archive's
//!   `features.json` (shipped with `torch-model-archiver --extra-files features.json`), so
//!   the statistics travel with the weights they were trained with;
//! - response `{"price": 301234.56, "currency": "EUR"}` (`currency` from `features.json`,
//!   `EUR` when it names none), one per instance.
//!
//! # Writing your own handler, step by step
//!
//! 1. **Make a crate in `functions/`** by copying this one (`functions/regressor`): its
//!    `Cargo.toml` (depend on `torchfn-model`, `torchfn-archive`, `torchfn-engine` and `tch`, and on
//!    `torch-sys` so that `build.rs` learns where libtorch is), its `build.rs` (bakes
//!    libtorch's folder into the binary as an rpath), and add the crate to the workspace's
//!    `members`.
//! 2. **Implement [`Handler`]** (`torchfn_engine::handler::Handler`) for a type of yours.
//!    The methods run in this order for every request:
//!    - [`Handler::decode`] (on the async side, once per request): parse and validate the
//!      body into [`Instance`]s. Return `ServeError::bad_request(..)` for anything the client
//!      got wrong: it is answered 400 in TorchServe's error shape. Keep it cheap; heavy work
//!      (image decoding, tokenising) belongs in `preprocess`. Set `is_list` when the client
//!      sent a list, so it gets a list back.
//!    - [`Handler::preprocess`] (on a model worker thread, once per batch): turn the
//!      instances of a batch (several requests' worth, batched by the micro-batcher) into the
//!      model's positional inputs on `device`. The default stacks same-shape `f32` instances
//!      into one `[N, ...]` tensor; this handler overrides it to normalise as it stacks.
//!    - [`Handler::inference`]: runs the model; the default (`session.run`) fits almost
//!      every model.
//!    - [`Handler::postprocess`]: one JSON value per batch row, in order. Check that the
//!      model returned `rows` rows and return [`SessionError::BatchMismatch`] when it did
//!      not: the batch's requests then fail cleanly instead of getting each other's answers.
//!    - [`Handler::decode_tensors`] (the Open Inference Protocol route): the default turns
//!      typed tensors into instances; override it when your `decode` validates (as here).
//! 3. **Read what the handler needs from the archive when it is made**: the factory given
//!    to `register` receives the loaded [`ModelArchive`]; `archive.has_file(name)` and
//!    `archive.path_of(name)` reach the files packaged with `--extra-files` (see
//!    [`HousePrice::from_archive`]). A problem there is the archive's
//!    (`ErrorKind::InvalidModel`): the model does not load, and the function does not start.
//! 4. **Register it and run the model function** in `src/main.rs`:
//!    `torchfn_model::main_with(|| register("my_handler", factory))`. Registration happens
//!    before anything else; from then on an archive whose manifest says
//!    `"handler": "my_handler"` (`torch-model-archiver --handler my_handler`), or any archive
//!    when the function runs with `TORCHFN_HANDLER=my_handler`, is served by it. Everything
//!    else (the environment, the routes, Lambda and plain-HTTP modes, batching, metrics) is
//!    `torchfn-model`'s.
//! 5. **Test it**: unit tests for `decode` and `postprocess` (below), and an end-to-end test
//!    that packages a tiny model with the real `torch-model-archiver` and talks to the
//!    binary over HTTP (`tests/house_price.rs`).

use std::sync::Arc;

use serde_json::{json, Value};
use tch::{Device, IValue, Kind, Tensor};
use torchfn_archive::mar::ModelArchive;
use torchfn_engine::error::{ErrorKind, ServeError};
use torchfn_engine::handler::{
    decode_list, kind_of, parse_json, single_tensor, to_device, Decoded, Handler, Instance,
    Request, TypedTensor,
};
use torchfn_engine::session::SessionError;

/// The name archives and `TORCHFN_HANDLER` use for this handler.
pub const NAME: &str = "house_price";

/// The archive file holding the feature statistics.
pub const FEATURES_FILE: &str = "features.json";

/// Largest `features.json` read: it holds a few numbers.
const MAX_FEATURES_BYTES: u64 = 64 * 1024;

/// One input field: its name, its range, and whether it must be a whole number.
struct Field {
    name: &'static str,
    min: f64,
    max: f64,
    integer: bool,
}

/// The request schema, in the order the model takes the features.
const FIELDS: [Field; 3] = [
    Field {
        name: "rooms",
        min: 1.0,
        max: 20.0,
        integer: true,
    },
    Field {
        name: "area_m2",
        min: 5.0,
        max: 2000.0,
        integer: false,
    },
    Field {
        name: "year_built",
        min: 1800.0,
        max: 2030.0,
        integer: true,
    },
];

const EXAMPLE: &str = r#"{"rooms": 3, "area_m2": 84.5, "year_built": 1998}"#;

impl Field {
    /// What the field takes, for messages: "a whole number from 1 to 20".
    fn takes(&self) -> String {
        let kind = if self.integer {
            "a whole number"
        } else {
            "a number"
        };
        format!("{kind} from {} to {}", self.min, self.max)
    }

    /// Checks one value of this field; the message names the field by `path`.
    fn check(&self, value: Option<&Value>, path: &str) -> Result<f32, String> {
        let Some(value) = value else {
            return Err(format!("{path} is missing: it takes {}", self.takes()));
        };
        let Some(x) = value.as_f64() else {
            return Err(format!(
                "{path} must be {}, got {}",
                self.takes(),
                kind_of(value)
            ));
        };
        if self.integer && x.fract() != 0.0 {
            return Err(format!("{path} must be a whole number, got {x}"));
        }
        if !(self.min..=self.max).contains(&x) {
            return Err(format!(
                "{path} must be from {} to {}, got {value}",
                self.min, self.max
            ));
        }
        Ok(x as f32)
    }
}

/// The `house_price` handler: validation, normalisation and the price response.
#[derive(Debug, Clone, PartialEq)]
pub struct HousePrice {
    /// Per feature, in [`FIELDS`] order.
    mean: [f32; 3],
    std: [f32; 3],
    currency: String,
}

impl HousePrice {
    /// Reads `features.json` from the archive: the model cannot be served without it.
    pub fn from_archive(archive: &ModelArchive) -> Result<Self, ServeError> {
        let text = read_archive_file(archive, FEATURES_FILE, MAX_FEATURES_BYTES)?;
        Self::from_features_json(&text)
            .map_err(|msg| invalid_model(format!("{FEATURES_FILE}: {msg}")))
    }

    /// Parses `features.json`:
    ///
    /// ```json
    /// {
    ///   "features": {
    ///     "rooms":      {"mean": 3.2,    "std": 1.4},
    ///     "area_m2":    {"mean": 92.0,   "std": 38.5},
    ///     "year_built": {"mean": 1978.0, "std": 27.0}
    ///   },
    ///   "currency": "EUR"
    /// }
    /// ```
    pub fn from_features_json(text: &[u8]) -> Result<Self, String> {
        let json: Value =
            serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let features = json
            .get("features")
            .and_then(Value::as_object)
            .ok_or("needs a \"features\" object with the mean and std of each feature")?;
        if let Some(extra) = features
            .keys()
            .find(|k| !FIELDS.iter().any(|f| f.name == k.as_str()))
        {
            return Err(format!(
                "describes the feature \"{extra}\", which this handler does not take (it takes \
                 {})",
                field_names()
            ));
        }
        let (mut mean, mut std) = ([0f32; 3], [0f32; 3]);
        for (i, field) in FIELDS.iter().enumerate() {
            let stat = |key: &str| -> Result<f32, String> {
                features
                    .get(field.name)
                    .and_then(|f| f.get(key))
                    .and_then(Value::as_f64)
                    .map(|x| x as f32)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("features.{}.{key} must be a number", field.name))
            };
            mean[i] = stat("mean")?;
            std[i] = stat("std")?;
            if std[i] <= 0.0 {
                return Err(format!(
                    "features.{}.std must be above 0, got {}",
                    field.name, std[i]
                ));
            }
        }
        let currency = match json.get("currency") {
            None => "EUR".to_string(),
            Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
            Some(other) => {
                return Err(format!(
                    "\"currency\" must be a currency code like \"EUR\", got {other}"
                ))
            }
        };
        Ok(Self {
            mean,
            std,
            currency,
        })
    }

    /// One house: an object with exactly the three fields, each valid. Every problem of the
    /// instance is reported in one message, each naming its field (`area_m2`, or
    /// `instances[1].area_m2` inside a list).
    fn instance(value: &Value, at: &str) -> Result<Instance, ServeError> {
        let Value::Object(map) = value else {
            return Err(ServeError::bad_request(format!(
                "{at} must be an object like {EXAMPLE}, got {}",
                kind_of(value)
            )));
        };
        let path = |key: &str| {
            if at == "body" {
                key.to_string()
            } else {
                format!("{at}.{key}")
            }
        };
        let mut problems: Vec<String> = map
            .keys()
            .filter(|k| !FIELDS.iter().any(|f| f.name == k.as_str()))
            .map(|k| {
                format!(
                    "{} is not a field of this model (it takes {})",
                    path(k),
                    field_names()
                )
            })
            .collect();
        let mut values = Vec::with_capacity(FIELDS.len());
        for field in &FIELDS {
            match field.check(map.get(field.name), &path(field.name)) {
                Ok(x) => values.push(x),
                Err(problem) => problems.push(problem),
            }
        }
        if !problems.is_empty() {
            return Err(ServeError::bad_request(problems.join("; ")));
        }
        Ok(Instance::f32(values, vec![FIELDS.len() as i64]))
    }
}

impl Handler for HousePrice {
    fn name(&self) -> &'static str {
        NAME
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        let json = parse_json(request.body)?;
        if let Value::Object(map) = &json {
            if let Some(list) = map.get("instances") {
                if let Some(extra) = map.keys().find(|k| k.as_str() != "instances") {
                    return Err(ServeError::bad_request(format!(
                        "{extra} is not a field of a list request: send {{\"instances\": \
                         [{EXAMPLE}, ...]}}"
                    )));
                }
                let Value::Array(items) = list else {
                    return Err(ServeError::bad_request(format!(
                        "instances must be an array of houses, got {}",
                        kind_of(list)
                    )));
                };
                return decode_list(items, "instances", Self::instance);
            }
        }
        Ok(Decoded {
            instances: vec![Self::instance(&json, "body")?],
            is_list: false,
        })
    }

    /// Tensors would skip the schema and its validation: the Open Inference Protocol route
    /// is refused with a pointer to the JSON form.
    fn decode_tensors(&self, _inputs: Vec<TypedTensor>) -> Result<Decoded, ServeError> {
        Err(ServeError::bad_request(format!(
            "the {NAME} handler takes JSON houses ({EXAMPLE}, or {{\"instances\": [...]}}) on \
             /predictions or the KServe v1 route, not Open Inference Protocol tensors"
        )))
    }

    /// Stacks the batch into one `[N, 3]` float32 tensor, each feature normalised as
    /// `(x - mean) / std` with the statistics from `features.json`.
    fn preprocess(&self, items: &[&Instance], device: Device) -> Result<Vec<IValue>, SessionError> {
        let mut data = Vec::with_capacity(items.len() * FIELDS.len());
        for item in items {
            let values = item
                .as_f32()
                .filter(|v| v.len() == FIELDS.len())
                .ok_or_else(|| {
                    SessionError::Input(format!("{NAME} takes {EXAMPLE}, one object per house"))
                })?;
            for (i, x) in values.iter().enumerate() {
                data.push((x - self.mean[i]) / self.std[i]);
            }
        }
        let batch =
            Tensor::f_from_slice(&data)?.f_view([items.len() as i64, FIELDS.len() as i64])?;
        Ok(vec![IValue::Tensor(to_device(batch, device)?)])
    }

    /// `[N, 1]` (or `[N]`) prices → `{"price": ..., "currency": ...}` per row, rounded to
    /// cents.
    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        let output = single_tensor(output)?;
        let size = output.size();
        let got = size.first().copied().unwrap_or(0).max(0) as usize;
        if size.is_empty() || got != rows {
            return Err(SessionError::BatchMismatch { sent: rows, got });
        }
        if size.len() > 2 || size.get(1).is_some_and(|&d| d != 1) {
            return Err(SessionError::OutputForm(format!(
                "the {NAME} handler needs one price per house (an output of shape [{rows}, 1]); \
                 the model returned shape {size:?}"
            )));
        }
        let prices = output
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Double)?
            .f_contiguous()?;
        let mut values = vec![0f64; rows];
        prices.f_copy_data(&mut values, rows)?;
        values
            .into_iter()
            .map(|price| {
                if !price.is_finite() {
                    return Err(SessionError::OutputForm(format!(
                        "the model returned the price {price}"
                    )));
                }
                let cents = (price * 100.0).round() / 100.0;
                Ok(json!({"price": cents, "currency": self.currency}))
            })
            .collect()
    }
}

/// Registers the handler as [`NAME`] for this process (what `main` does before serving).
pub fn register() {
    torchfn_engine::handler::register(NAME, |archive| {
        Ok(Arc::new(HousePrice::from_archive(archive)?) as Arc<dyn Handler>)
    });
}

fn field_names() -> String {
    FIELDS.map(|f| f.name).join(", ")
}

fn invalid_model(message: String) -> ServeError {
    ServeError::new(ErrorKind::InvalidModel, message)
}

/// A small file packaged in the archive (`--extra-files`), refusing one over `limit` bytes.
fn read_archive_file(
    archive: &ModelArchive,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, ServeError> {
    if !archive.has_file(name) {
        return Err(invalid_model(format!(
            "the {NAME} handler needs {name} in the archive: package it with \
             torch-model-archiver --extra-files {name}"
        )));
    }
    let path = archive
        .path_of(name)
        .map_err(|e| invalid_model(e.to_string()))?;
    let cannot = |e: std::io::Error| invalid_model(format!("cannot read {name}: {e}"));
    let len = std::fs::metadata(&path).map_err(cannot)?.len();
    if len > limit {
        return Err(invalid_model(format!(
            "{name} is {len} bytes; the limit is {limit}"
        )));
    }
    std::fs::read(&path).map_err(cannot)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FEATURES: &str = r#"{
        "features": {
            "rooms": {"mean": 3.0, "std": 1.5},
            "area_m2": {"mean": 90.0, "std": 40.0},
            "year_built": {"mean": 1980.0, "std": 25.0}
        },
        "currency": "EUR"
    }"#;

    fn handler() -> HousePrice {
        HousePrice::from_features_json(FEATURES.as_bytes()).unwrap()
    }

    fn decode(body: &str) -> Result<Decoded, ServeError> {
        handler().decode(&Request::json(body.as_bytes()))
    }

    #[test]
    fn decodes_one_house_and_a_list() {
        let one = decode(r#"{"rooms": 3, "area_m2": 84.5, "year_built": 1998}"#).unwrap();
        assert!(!one.is_list);
        assert_eq!(
            one.instances,
            vec![Instance::f32(vec![3.0, 84.5, 1998.0], vec![3])]
        );
        // Whole numbers may be written as 3.0; the field order does not matter.
        let list = decode(
            r#"{"instances": [{"year_built": 1950, "rooms": 2.0, "area_m2": 40},
                              {"rooms": 20, "area_m2": 2000, "year_built": 2030}]}"#,
        )
        .unwrap();
        assert!(list.is_list);
        assert_eq!(list.instances.len(), 2);
        assert_eq!(list.instances[0].as_f32(), Some(&[2.0, 40.0, 1950.0][..]));
        assert_eq!(
            list.instances[1].as_f32(),
            Some(&[20.0, 2000.0, 2030.0][..])
        );
    }

    #[test]
    fn refuses_bad_houses_naming_the_field() {
        let house = |rooms: &str, area: &str, year: &str| {
            format!(r#"{{"rooms": {rooms}, "area_m2": {area}, "year_built": {year}}}"#)
        };
        let cases = [
            // Missing fields.
            (
                r#"{"area_m2": 84.5, "year_built": 1998}"#.to_string(),
                "rooms is missing: it takes a whole number from 1 to 20",
            ),
            (
                r#"{"rooms": 3, "year_built": 1998}"#.to_string(),
                "area_m2 is missing: it takes a number from 5 to 2000",
            ),
            (
                r#"{"rooms": 3, "area_m2": 84.5}"#.to_string(),
                "year_built is missing",
            ),
            // Wrong types.
            (
                house("\"3\"", "84.5", "1998"),
                "rooms must be a whole number from 1 to 20, got a string",
            ),
            (
                house("3", "null", "1998"),
                "area_m2 must be a number from 5 to 2000, got null",
            ),
            (
                house("3", "84.5", "[1998]"),
                "year_built must be a whole number from 1800 to 2030, got an array",
            ),
            (
                house("true", "84.5", "1998"),
                "rooms must be a whole number",
            ),
            (
                house("3.5", "84.5", "1998"),
                "rooms must be a whole number, got 3.5",
            ),
            (
                house("3", "84.5", "1998.5"),
                "year_built must be a whole number, got 1998.5",
            ),
            // Out of range, at both ends.
            (
                house("0", "84.5", "1998"),
                "rooms must be from 1 to 20, got 0",
            ),
            (
                house("21", "84.5", "1998"),
                "rooms must be from 1 to 20, got 21",
            ),
            (
                house("3", "4.99", "1998"),
                "area_m2 must be from 5 to 2000, got 4.99",
            ),
            (
                house("3", "2000.5", "1998"),
                "area_m2 must be from 5 to 2000, got 2000.5",
            ),
            (
                house("3", "84.5", "1799"),
                "year_built must be from 1800 to 2030, got 1799",
            ),
            (
                house("3", "84.5", "2031"),
                "year_built must be from 1800 to 2030, got 2031",
            ),
            // Unknown fields.
            (
                r#"{"rooms": 3, "area_m2": 84.5, "year_built": 1998, "garage": true}"#.to_string(),
                "garage is not a field of this model (it takes rooms, area_m2, year_built)",
            ),
            (
                r#"{"instances": [], "model": "x"}"#.to_string(),
                "model is not a field of a list request",
            ),
            // The place of an instance in a list.
            (
                format!(
                    r#"{{"instances": [{}, {}]}}"#,
                    house("3", "84.5", "1998"),
                    house("3", "1", "1998")
                ),
                "instances[1].area_m2 must be from 5 to 2000, got 1",
            ),
            (
                r#"{"instances": [{"rooms": 3, "area_m2": 84.5, "year_built": 1998, "x": 1}]}"#
                    .to_string(),
                "instances[0].x is not a field",
            ),
            // The body's own shape.
            (
                r#"{"instances": {}}"#.to_string(),
                "instances must be an array of houses, got an object",
            ),
            (
                r#"{"instances": []}"#.to_string(),
                "instances is an empty list",
            ),
            ("[3, 84.5, 1998]".to_string(), "body must be an object like"),
            ("".to_string(), "request body is empty"),
            ("{\"rooms\": 3,".to_string(), "not valid JSON"),
        ];
        for (body, needle) in cases {
            let e = decode(&body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{body}");
            assert!(
                e.message.contains(needle),
                "{body}: wanted {needle:?} in {:?}",
                e.message
            );
        }
        // Several problems in one house are reported together.
        let e = decode(r#"{"rooms": 0, "area_m2": "big", "floors": 2}"#).unwrap_err();
        for needle in [
            "floors is not a field",
            "rooms must be from 1 to 20",
            "area_m2 must be",
            "year_built is missing",
        ] {
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        // The client sees TorchServe's error body for it.
        let body = torchfn_http::error::HttpError::from(e).body();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], 400);
        assert_eq!(body["type"], "BadRequestException");
    }

    #[test]
    fn refuses_open_inference_protocol_tensors() {
        let e = handler().decode_tensors(Vec::new()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("not Open Inference Protocol tensors"));
    }

    #[test]
    fn preprocess_normalises_and_stacks() {
        let h = handler();
        let a = Instance::f32(vec![3.0, 90.0, 1980.0], vec![3]);
        let b = Instance::f32(vec![6.0, 50.0, 2030.0], vec![3]);
        let inputs = h.preprocess(&[&a, &b], Device::Cpu).unwrap();
        assert_eq!(inputs.len(), 1);
        let IValue::Tensor(t) = &inputs[0] else {
            panic!("not a tensor")
        };
        assert_eq!(t.size(), vec![2, 3]);
        let mut got = vec![0f32; 6];
        t.copy_data(&mut got, 6);
        assert_eq!(got, vec![0.0, 0.0, 0.0, 2.0, -1.0, 2.0]);
        let text = Instance::text("a house".into());
        assert!(matches!(
            h.preprocess(&[&text], Device::Cpu),
            Err(SessionError::Input(_))
        ));
    }

    #[test]
    fn postprocess_answers_a_price_per_row() {
        let h = handler();
        let out = Tensor::from_slice(&[301234.75f32, 1234.567]).view([2, 1]);
        let v = h
            .postprocess(IValue::Tensor(out.shallow_clone()), 2)
            .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["currency"], "EUR");
        assert_eq!(
            v[0].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["price", "currency"]
        );
        let p0 = v[0]["price"].as_f64().unwrap();
        assert!((p0 - 301234.75).abs() < 1e-6, "{p0}");
        assert!((v[1]["price"].as_f64().unwrap() - 1234.57).abs() < 1e-6);
        // A flat [N] output is one price per row too.
        let flat = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(h.postprocess(IValue::Tensor(flat), 3).unwrap().len(), 3);
        // Fewer or more rows than were sent: the batch fails as a mismatch.
        assert!(matches!(
            h.postprocess(IValue::Tensor(out.shallow_clone()), 3),
            Err(SessionError::BatchMismatch { sent: 3, got: 2 })
        ));
        assert!(matches!(
            h.postprocess(IValue::Tensor(Tensor::from(5.0f32)), 1),
            Err(SessionError::BatchMismatch { sent: 1, got: 0 })
        ));
        // Two values per row is not a price.
        let wide = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        assert!(matches!(
            h.postprocess(IValue::Tensor(wide), 2),
            Err(SessionError::OutputForm(_))
        ));
        let nan = Tensor::from_slice(&[f32::NAN]).view([1, 1]);
        assert!(matches!(
            h.postprocess(IValue::Tensor(nan), 1),
            Err(SessionError::OutputForm(_))
        ));
        // Not a tensor.
        assert!(h
            .postprocess(IValue::Tuple(vec![IValue::Tensor(out)]), 2)
            .is_err());
    }

    #[test]
    fn features_json_is_checked() {
        let h = handler();
        assert_eq!(h.mean, [3.0, 90.0, 1980.0]);
        assert_eq!(h.std, [1.5, 40.0, 25.0]);
        let no_currency = FEATURES.replace(r#""currency": "EUR""#, r#""version": 1"#);
        assert_eq!(
            HousePrice::from_features_json(no_currency.as_bytes())
                .unwrap()
                .currency,
            "EUR"
        );
        let usd = FEATURES.replace("EUR", "USD");
        assert_eq!(
            HousePrice::from_features_json(usd.as_bytes())
                .unwrap()
                .currency,
            "USD"
        );
        for (text, needle) in [
            ("[]".to_string(), "needs a \"features\" object"),
            ("{".to_string(), "not valid JSON"),
            (
                FEATURES.replace("\"std\": 40.0", "\"std\": 0"),
                "features.area_m2.std must be above 0",
            ),
            (
                FEATURES.replace("\"mean\": 3.0, ", ""),
                "features.rooms.mean must be a number",
            ),
            (
                FEATURES.replace("\"rooms\"", "\"bedrooms\""),
                "the feature \"bedrooms\"",
            ),
            (FEATURES.replace("\"EUR\"", "7"), "\"currency\" must be"),
        ] {
            let e = HousePrice::from_features_json(text.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
