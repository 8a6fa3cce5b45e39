//! `MAR-INF/MANIFEST.json`, the description torch-model-archiver writes into every model
//! archive: which files hold the model, its handler, its config YAML and its name and version.
//!
//! Parsing follows the TorchServe frontend (`Manifest.java`, `ModelArchive.validate`): the
//! same required entries with the same messages, `modelVersion` defaulting to `"1.0"`, and
//! keys we do not know kept as they are so nothing in a manifest is lost.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::MarError;

/// The model version the frontend assumes when the manifest gives none.
pub const DEFAULT_MODEL_VERSION: &str = "1.0";

/// The whole `MANIFEST.json` of a model archive (torch-model-archiver 0.12 layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// When the archive was made, `DD/MM/YYYY HH:MM:SS` local time.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub created_on: Option<String>,
    /// The runtime the archive targets; TorchServe knows `python`, `python3` and `LSP`.
    pub runtime: Runtime,
    /// The torch-model-archiver version that made the archive.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub archiver_version: Option<String>,
    /// A free-text description of the archive.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
    /// The `model` entry: what to load and how.
    pub model: ModelSection,
    /// Top-level keys this version does not know, kept so nothing is lost.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The runtimes a manifest may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// `"python"`, what torch-model-archiver writes by default.
    #[serde(rename = "python")]
    Python,
    /// `"python3"`.
    #[serde(rename = "python3")]
    Python3,
    /// `"LSP"`, the large-model (torchrun) runtime.
    #[serde(rename = "LSP")]
    Lsp,
}

impl Runtime {
    /// The manifest spelling of this runtime.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Python3 => "python3",
            Runtime::Lsp => "LSP",
        }
    }

    fn from_manifest(s: &str) -> Option<Runtime> {
        match s {
            "python" => Some(Runtime::Python),
            "python3" => Some(Runtime::Python3),
            "LSP" => Some(Runtime::Lsp),
            _ => None,
        }
    }
}

/// The manifest's `model` entry. Every file it names sits at the archive root under its
/// basename (the archiver copies them there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSection {
    /// The model's name, used in URLs (`/predictions/{modelName}`).
    #[serde(deserialize_with = "required_lenient_string")]
    pub model_name: String,
    /// The model's version; `"1.0"` when the manifest gives none.
    #[serde(
        default = "default_model_version",
        deserialize_with = "required_lenient_string"
    )]
    pub model_version: String,
    /// The weights: a TorchScript file, or a state_dict for an eager `modelFile`.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub serialized_file: Option<String>,
    /// A built-in handler name (`image_classifier`) or a custom one (`handler.py`,
    /// `my_handler:handle`).
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub handler: Option<String>,
    /// The Python file defining an eager model class.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub model_file: Option<String>,
    /// A pip requirements file.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub requirements_file: Option<String>,
    /// The model-config YAML (`--config-file`).
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub config_file: Option<String>,
    /// Extension modules (legacy archiver option).
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub extensions: Option<String>,
    /// The request envelope (`json`, `body`, `kserve`, ...); the archiver does not write it.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub envelope: Option<String>,
    /// A free-text description of the model.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
    /// A legacy version string some older archives carry beside `modelVersion`.
    #[serde(
        default,
        deserialize_with = "lenient_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    /// Keys of the `model` entry this version does not know, kept so nothing is lost.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_model_version() -> String {
    DEFAULT_MODEL_VERSION.to_string()
}

impl Manifest {
    /// Parses the bytes of a `MANIFEST.json`, with the frontend's checks and messages.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, MarError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| MarError::InvalidManifest(format!("it is not valid JSON ({e})")))?;
        let Value::Object(top) = &value else {
            return Err(MarError::InvalidManifest(
                "it must be a JSON object, like the one torch-model-archiver writes".into(),
            ));
        };

        match top.get("model") {
            None | Some(Value::Null) => {
                return Err(MarError::InvalidManifest(
                    "Missing Model entry in manifest file.".into(),
                ))
            }
            Some(Value::Object(model)) => {
                let name_given = match model.get("modelName") {
                    None | Some(Value::Null) => false,
                    Some(Value::String(s)) => !s.trim().is_empty(),
                    Some(_) => true,
                };
                if !name_given {
                    return Err(MarError::InvalidManifest(
                        "Model name is not defined.".into(),
                    ));
                }
            }
            Some(_) => {
                return Err(MarError::InvalidManifest(
                    "the `model` entry must be a JSON object".into(),
                ))
            }
        }

        let runtime_ok = top
            .get("runtime")
            .and_then(Value::as_str)
            .and_then(Runtime::from_manifest)
            .is_some();
        if !runtime_ok {
            return Err(MarError::InvalidManifest(
                "Runtime is not defined or invalid. It must be one of python, python3, LSP.".into(),
            ));
        }

        let mut manifest: Manifest =
            serde_json::from_value(value).map_err(|e| MarError::InvalidManifest(e.to_string()))?;
        if manifest.model.model_version.trim().is_empty() {
            manifest.model.model_version = default_model_version();
        }
        Ok(manifest)
    }

    /// The model's name.
    pub fn model_name(&self) -> &str {
        &self.model.model_name
    }

    /// The model's version (`"1.0"` when the manifest gives none).
    pub fn model_version(&self) -> &str {
        &self.model.model_version
    }
}

/// Accepts a JSON string, number or boolean as a string, as TorchServe's Gson does; null is
/// "not given". Hand-written manifests often say `"modelVersion": 2.0`.
fn lenient_string<'de, D>(de: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    use serde::de::Error;
    match Value::deserialize(de)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        other => Err(D::Error::custom(format!(
            "expected a string, found {}",
            json_kind(&other)
        ))),
    }
}

/// Like [`lenient_string`] for a key that must have a value when present.
fn required_lenient_string<'de, D>(de: D) -> Result<String, D::Error>
where
    D: Deserializer<'de>,
{
    use serde::de::Error;
    lenient_string(de)?.ok_or_else(|| D::Error::custom("expected a string, found null"))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
