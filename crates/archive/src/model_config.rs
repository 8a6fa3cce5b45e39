//! The model-config YAML an archive may carry (`--config-file`, the manifest's `configFile`):
//! per-model worker, batching and timeout settings for the frontend, and backend parameters
//! for the handler.
//!
//! Parsing is as lenient as TorchServe's `ModelConfig.build`: a frontend key with the wrong
//! YAML type is ignored and noted in [`ModelConfig::warnings`], out-of-range values are
//! clamped or ignored as the spec (§6.4) says, and every key that is not a frontend key is
//! kept in [`ModelConfig::backend`]. Only YAML that does not parse, or whose top level is not
//! a mapping, is an error.

use serde_json::{Map, Number, Value};
use serde_yaml_ng::Value as Yaml;

use crate::error::MarError;

/// Where a model's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// `deviceType: cpu`.
    Cpu,
    /// `deviceType: gpu`; falls back to CPU on a host without a GPU.
    Gpu,
}

/// How a large model is split across devices (`parallelType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParallelType {
    /// Pipeline parallel.
    Pp,
    /// Tensor parallel.
    Tp,
    /// Both.
    PpTp,
    /// The handler decides.
    Custom,
}

/// The settings of one model-config YAML. `None` means "not given (or ignored)": the caller
/// applies its own default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfig {
    /// `minWorkers`; values below 1 are raised to 1.
    pub min_workers: Option<u32>,
    /// `maxWorkers`; negative values are ignored.
    pub max_workers: Option<u32>,
    /// `batchSize`; values below 1 are raised to 1.
    pub batch_size: Option<u32>,
    /// `maxBatchDelay` in milliseconds; negative values are ignored.
    pub max_batch_delay: Option<u64>,
    /// `responseTimeout` in seconds (TorchServe default 120); values below 1 are ignored.
    pub response_timeout: Option<u64>,
    /// `startupTimeout` in seconds (TorchServe default 120); values below 1 are ignored.
    pub startup_timeout: Option<u64>,
    /// `deviceType`: `cpu` or `gpu`.
    pub device_type: Option<DeviceType>,
    /// `deviceIds`: GPU ids to round-robin over; one bad id drops the whole list.
    pub device_ids: Option<Vec<u32>>,
    /// `parallelType`: `pp`, `tp`, `pptp` or `custom`.
    pub parallel_type: Option<ParallelType>,
    /// `parallelLevel`; values below 1 become 1.
    pub parallel_level: Option<u32>,
    /// `torchrun`: launcher settings (`nproc-per-node`, `nnodes`, ...), kept as given.
    pub torchrun: Option<Map<String, Value>>,
    /// `maxRetryTimeoutInSec` (TorchServe default 300); values below 1 are ignored.
    pub max_retry_timeout_in_sec: Option<u64>,
    /// `clientTimeoutInMills`; values below 1 are ignored (0 means "off" in TorchServe).
    pub client_timeout_in_mills: Option<u64>,
    /// `jobQueueSize`, overriding `job_queue_size`; values below 1 are ignored.
    pub job_queue_size: Option<u32>,
    /// `useJobTicket`: accept a request only when a worker is free.
    pub use_job_ticket: Option<bool>,
    /// `continuousBatching`.
    pub continuous_batching: Option<bool>,
    /// `sequenceBatching`.
    pub sequence_batching: Option<bool>,
    /// `asyncCommunication`.
    pub async_communication: Option<bool>,
    /// `sequenceMaxIdleMSec`; values below 1 are ignored.
    pub sequence_max_idle_msec: Option<u64>,
    /// `sequenceTimeoutMSec`; values below 1 are ignored.
    pub sequence_timeout_msec: Option<u64>,
    /// `maxSequenceJobQueueSize` (TorchServe default 1); values below 1 are ignored.
    pub max_sequence_job_queue_size: Option<u32>,
    /// `maxNumSequence` (TorchServe default 1); values below 1 are ignored.
    pub max_num_sequence: Option<u32>,
    /// `useVenv`.
    pub use_venv: Option<bool>,
    /// Every key that is not a frontend key (`handler`, `pt2`, `pippy`, ...): parameters only
    /// the handler reads, as TorchServe's `context.model_yaml_config`.
    pub backend: Map<String, Value>,
    /// What was ignored or adjusted, one line each, for the logs.
    pub warnings: Vec<String>,
}

impl ModelConfig {
    /// Parses the text of a model-config YAML. An empty file is an empty config.
    pub fn parse(text: &str) -> Result<ModelConfig, MarError> {
        let yaml: Yaml = serde_yaml_ng::from_str(text)
            .map_err(|e| MarError::InvalidConfig(format!("it is not valid YAML ({e})")))?;
        ModelConfig::from_yaml(&yaml)
    }

    /// Builds a config from an already parsed YAML document, which must be a mapping (or
    /// empty).
    pub fn from_yaml(yaml: &Yaml) -> Result<ModelConfig, MarError> {
        let mapping = match strip_tags(yaml) {
            Yaml::Null => return Ok(ModelConfig::default()),
            Yaml::Mapping(m) => m,
            other => {
                return Err(MarError::InvalidConfig(format!(
                    "its top level must be a mapping of keys such as `minWorkers: 1`, not {}",
                    yaml_kind(other)
                )))
            }
        };
        let mut c = ModelConfig::default();
        for (key, value) in mapping {
            let key = key_string(key);
            let value = strip_tags(value);
            c.apply(&key, value);
        }
        Ok(c)
    }

    fn apply(&mut self, key: &str, v: &Yaml) {
        match key {
            "minWorkers" => {
                self.min_workers = self.int(key, v).map(|n| self.at_least_one(key, n));
            }
            "maxWorkers" => {
                self.max_workers = self.int(key, v).and_then(|n| self.non_negative(key, n))
            }
            "batchSize" => {
                self.batch_size = self.int(key, v).map(|n| self.at_least_one(key, n));
            }
            "maxBatchDelay" => {
                self.max_batch_delay = self.int(key, v).and_then(|n| self.non_negative(key, n));
            }
            "responseTimeout" => {
                self.response_timeout = self.int(key, v).and_then(|n| self.positive(key, n))
            }
            "startupTimeout" => {
                self.startup_timeout = self.int(key, v).and_then(|n| self.positive(key, n))
            }
            "deviceType" => self.device_type = self.device_type(v),
            "deviceIds" => self.device_ids = self.device_ids(v),
            "parallelType" => self.parallel_type = self.parallel_type(v),
            "parallelLevel" => {
                self.parallel_level = self.int(key, v).map(|n| self.at_least_one(key, n));
            }
            "torchrun" => match v {
                Yaml::Mapping(_) => {
                    if let Value::Object(m) = yaml_to_json(v) {
                        self.torchrun = Some(m);
                    }
                }
                other => self.wrong_type(key, "a mapping of torchrun settings", other),
            },
            "maxRetryTimeoutInSec" => {
                self.max_retry_timeout_in_sec =
                    self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "clientTimeoutInMills" => {
                self.client_timeout_in_mills = self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "jobQueueSize" => {
                self.job_queue_size = self.int(key, v).and_then(|n| self.positive(key, n))
            }
            "useJobTicket" => self.use_job_ticket = self.boolean(key, v),
            "continuousBatching" => self.continuous_batching = self.boolean(key, v),
            "sequenceBatching" => self.sequence_batching = self.boolean(key, v),
            "asyncCommunication" => self.async_communication = self.boolean(key, v),
            "sequenceMaxIdleMSec" => {
                self.sequence_max_idle_msec = self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "sequenceTimeoutMSec" => {
                self.sequence_timeout_msec = self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "maxSequenceJobQueueSize" => {
                self.max_sequence_job_queue_size =
                    self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "maxNumSequence" => {
                self.max_num_sequence = self.int(key, v).and_then(|n| self.positive(key, n));
            }
            "useVenv" => self.use_venv = self.boolean(key, v),
            _ => {
                self.backend.insert(key.to_string(), yaml_to_json(v));
            }
        }
    }

    fn warn(&mut self, message: String) {
        self.warnings.push(message);
    }

    fn wrong_type(&mut self, key: &str, want: &str, got: &Yaml) {
        self.warn(format!(
            "model config: `{key}` should be {want}, found {}; ignored",
            yaml_kind(got)
        ));
    }

    /// A YAML integer. Like TorchServe (Java `int`), floats, strings and numbers beyond 32
    /// bits are the wrong type.
    fn int(&mut self, key: &str, v: &Yaml) -> Option<i64> {
        match v {
            Yaml::Number(n) if n.is_i64() || n.is_u64() => match n.as_i64() {
                Some(i) if i32::try_from(i).is_ok() => Some(i),
                _ => {
                    self.warn(format!(
                        "model config: `{key}` is {n}, beyond a 32-bit integer; ignored"
                    ));
                    None
                }
            },
            other => {
                self.wrong_type(key, "an integer", other);
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, v: &Yaml) -> Option<bool> {
        match v {
            Yaml::Bool(b) => Some(*b),
            other => {
                self.wrong_type(key, "true or false", other);
                None
            }
        }
    }

    /// Clamps to at least 1 (`minWorkers`, `batchSize`, `parallelLevel`).
    fn at_least_one<T: TryFrom<i64> + From<u8>>(&mut self, key: &str, n: i64) -> T {
        if n < 1 {
            self.warn(format!("model config: `{key}` is {n}; using 1"));
            return T::from(1);
        }
        T::try_from(n).unwrap_or_else(|_| T::from(1))
    }

    /// Keeps 0 and above; ignores negatives (`maxWorkers`, `maxBatchDelay`).
    fn non_negative<T: TryFrom<i64>>(&mut self, key: &str, n: i64) -> Option<T> {
        if n < 0 {
            self.warn(format!("model config: `{key}` is {n}, below 0; ignored"));
            return None;
        }
        T::try_from(n).ok()
    }

    /// Keeps 1 and above; ignores the rest (timeouts, queue sizes).
    fn positive<T: TryFrom<i64>>(&mut self, key: &str, n: i64) -> Option<T> {
        if n < 1 {
            self.warn(format!("model config: `{key}` is {n}, below 1; ignored"));
            return None;
        }
        T::try_from(n).ok()
    }

    fn device_type(&mut self, v: &Yaml) -> Option<DeviceType> {
        match v {
            Yaml::String(s) => match s.to_ascii_lowercase().as_str() {
                "cpu" => Some(DeviceType::Cpu),
                "gpu" => Some(DeviceType::Gpu),
                _ => {
                    self.warn(format!(
                        "model config: `deviceType` is {s:?}; it should be cpu or gpu; ignored"
                    ));
                    None
                }
            },
            other => {
                self.wrong_type("deviceType", "cpu or gpu", other);
                None
            }
        }
    }

    fn parallel_type(&mut self, v: &Yaml) -> Option<ParallelType> {
        match v {
            Yaml::String(s) => match s.to_ascii_lowercase().as_str() {
                "pp" => Some(ParallelType::Pp),
                "tp" => Some(ParallelType::Tp),
                "pptp" => Some(ParallelType::PpTp),
                "custom" => Some(ParallelType::Custom),
                _ => {
                    self.warn(format!(
                        "model config: `parallelType` is {s:?}; it should be pp, tp, pptp or \
                         custom; ignored"
                    ));
                    None
                }
            },
            other => {
                self.wrong_type("parallelType", "pp, tp, pptp or custom", other);
                None
            }
        }
    }

    fn device_ids(&mut self, v: &Yaml) -> Option<Vec<u32>> {
        let Yaml::Sequence(items) = v else {
            self.wrong_type("deviceIds", "a list of GPU ids", v);
            return None;
        };
        let mut ids = Vec::with_capacity(items.len());
        for item in items {
            let id = match strip_tags(item) {
                Yaml::Number(n) => n.as_u64().and_then(|i| u32::try_from(i).ok()),
                _ => None,
            };
            match id {
                Some(id) => ids.push(id),
                None => {
                    self.warn(format!(
                        "model config: `deviceIds` holds {}, which is not a GPU id; the whole \
                         list is ignored",
                        yaml_display(item)
                    ));
                    return None;
                }
            }
        }
        Some(ids)
    }
}

/// The value under a `!tag`, which TorchServe's SnakeYAML would not see either.
fn strip_tags(v: &Yaml) -> &Yaml {
    match v {
        Yaml::Tagged(t) => strip_tags(&t.value),
        other => other,
    }
}

fn key_string(k: &Yaml) -> String {
    match strip_tags(k) {
        Yaml::String(s) => s.clone(),
        other => yaml_display(other),
    }
}

fn yaml_kind(v: &Yaml) -> &'static str {
    match v {
        Yaml::Null => "nothing",
        Yaml::Bool(_) => "a boolean",
        Yaml::Number(n) if n.is_f64() => "a decimal number",
        Yaml::Number(_) => "an integer",
        Yaml::String(_) => "a string",
        Yaml::Sequence(_) => "a list",
        Yaml::Mapping(_) => "a mapping",
        Yaml::Tagged(t) => yaml_kind(&t.value),
    }
}

/// A short rendering of a scalar for messages.
fn yaml_display(v: &Yaml) -> String {
    match strip_tags(v) {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::String(s) => format!("{s:?}"),
        other => yaml_kind(other).into(),
    }
}

/// YAML to JSON for backend parameters: non-string keys become their text, tags are dropped,
/// and non-finite floats become null (JSON cannot hold them).
pub fn yaml_to_json(v: &Yaml) -> Value {
    match strip_tags(v) {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(*b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(Number::from_f64)
                    .map_or(Value::Null, Value::Number)
            }
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (key_string(k), yaml_to_json(v)))
                .collect(),
        ),
        // strip_tags never returns a tag; keep the match total without a panic.
        Yaml::Tagged(t) => yaml_to_json(&t.value),
    }
}
