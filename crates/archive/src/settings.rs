//! Server settings: TorchServe's `config.properties` keys that shape serving, resolved into
//! one struct. Front ends (the emulator's flags, later the functions' environment) fill it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::properties::Properties;

/// A setting that cannot be used as given.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePreference {
    /// CUDA device 0 when libtorch sees a GPU, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DevicePreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Numeric precision of forward passes. Only CUDA uses reduced precision; on the CPU every
/// model runs in float32 whatever is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    /// CUDA autocast (float16 where libtorch deems it safe).
    Fp16,
    /// Weights and inputs cast to bfloat16.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float32" => Ok(Self::Fp32),
            "fp16" | "float16" | "half" => Ok(Self::Fp16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("`{s}` is not a precision: use fp32, fp16 or bf16")),
        }
    }
}

/// Per-model, per-version settings from the `models` JSON of config.properties
/// (`{"name": {"1.0": {...}}}`), plus torchfn's `handler` key naming a built-in handler.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelOverrides {
    pub min_workers: Option<usize>,
    pub max_workers: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_batch_delay: Option<u64>,
    pub response_timeout: Option<u64>,
    pub startup_timeout: Option<u64>,
    pub default_version: Option<bool>,
    pub mar_name: Option<String>,
    pub runtime: Option<String>,
    /// torchfn: the built-in handler that serves this model (see `handler::builtin`).
    pub handler: Option<String>,
}

/// Everything the server needs to know, with TorchServe's defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub inference_address: SocketAddr,
    pub management_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub model_store: Option<PathBuf>,
    /// `load_models` / `--models` entries: `all`, `file.mar` or `name=file.mar`.
    pub load_models: Vec<String>,
    /// `default_workers_per_model`: workers per model. `None` (unset, or 0) means 1 for the
    /// models loaded at start-up and 0 for a REST registration without `initial_workers`, as
    /// TorchServe registers (torchfn-engine's `Manager::model_settings`).
    pub default_workers_per_model: Option<usize>,
    pub job_queue_size: usize,
    pub max_request_size: usize,
    pub max_response_size: usize,
    /// Server-wide batching defaults (`batch_size`, `max_batch_delay` ms); a model's YAML
    /// and the `models` JSON override them.
    pub batch_size: usize,
    pub max_batch_delay: Duration,
    pub response_timeout: Duration,
    /// Most instances one request may carry (a longer list gets 400).
    pub max_instances_per_request: usize,
    /// Numeric precision of forward passes on CUDA (`fp32`, `fp16` autocast, `bf16`).
    pub precision: Precision,
    /// Built-in handler for archives whose manifest names a Python handler file.
    pub default_service_handler: Option<String>,
    pub models: BTreeMap<String, BTreeMap<String, ModelOverrides>>,
    /// Built-in handler per model name (`--handler NAME=BUILTIN`); wins over the above.
    pub handlers: BTreeMap<String, String>,
    pub device: DevicePreference,
    /// Folder where archives are unpacked (a fresh subfolder per model version).
    pub unpack_dir: Option<PathBuf>,
    /// `enable_model_api`: whether register and unregister are served at all. Unset, they
    /// are (see `api::security` for who may call them).
    pub enable_model_api: Option<bool>,
    /// `disable_token_authorization`: no token even where the management API is reachable
    /// from the network.
    pub disable_token_authorization: bool,
    /// `token_expiration_min`: how long a generated key is valid (default 60).
    pub token_expiration_min: u64,
    /// `cors_allowed_origin`, `cors_allowed_methods`, `cors_allowed_headers`: sent as the
    /// `Access-Control-Allow-*` headers of every response when set (TorchServe's CORS).
    pub cors: [Option<String>; 3],
    /// `torchfn_registry`: an object-store registry (`s3://bucket/prefix` or a folder) whose
    /// versions the server loads, follows and unloads as the registrar records them.
    pub registry: Option<String>,
    /// `torchfn_registry_poll_seconds`: how often the registry is read (default 5).
    pub registry_poll: Duration,
    /// Regular expressions (each matching a whole URL) an archive registered by URL must
    /// match; absolute paths are matched as `file://` URLs.
    pub allowed_urls: Vec<String>,
    /// Keys torchfn does not know; reported once at start-up.
    pub unknown_keys: Vec<String>,
    /// TorchServe keys that have no effect in torchfn; reported once at start-up.
    pub inert_keys: Vec<String>,
    /// The Python backend: the interpreter (with TorchServe's `ts` package) its workers run
    /// (`torchfn_python`, `--python`, `TORCHFN_PYTHON`; else the project venv's, else `python3`).
    pub python: Option<PathBuf>,
    /// `install_py_dep_per_model`: pip-install an archive's `requirements.txt` into its folder
    /// before its Python workers start.
    pub install_py_dep_per_model: bool,
    /// `default_startup_timeout`, seconds: how long a Python worker may take to load.
    pub default_startup_timeout: u64,
    /// `service_envelope`, handed to Python workers (`json`, `kserve`, `kservev2`).
    pub service_envelope: Option<String>,
    /// `limit_max_image_pixels`, handed to Python workers.
    pub limit_max_image_pixels: bool,
    /// `decode_input_request`: whether Python workers decode JSON and text inputs.
    pub decode_input_request: bool,
    /// `metrics_config`: TorchServe's metrics YAML, whose `model_metrics` a handler's
    /// `[METRICS]` lines update (None: TorchServe's default declarations). Also handed to
    /// Python workers.
    pub metrics_config: Option<PathBuf>,
    /// `model_metrics_auto_detect`: a handler's metrics that no configuration declares are
    /// added as they first arrive (otherwise they are dropped, as in TorchServe).
    pub model_metrics_auto_detect: bool,
    /// What one archive may unpack to (`torchfn_archive_max_bytes`,
    /// `torchfn_archive_max_ratio`).
    pub archive_limits: crate::mar::Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            inference_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            management_address: SocketAddr::from(([127, 0, 0, 1], 8081)),
            metrics_address: SocketAddr::from(([127, 0, 0, 1], 8082)),
            model_store: None,
            load_models: Vec::new(),
            default_workers_per_model: None,
            job_queue_size: 100,
            max_request_size: 6_553_500,
            max_response_size: 6_553_500,
            batch_size: 1,
            max_batch_delay: Duration::from_millis(100),
            response_timeout: Duration::from_secs(120),
            max_instances_per_request: 1000,
            precision: Precision::Fp32,
            default_service_handler: None,
            models: BTreeMap::new(),
            handlers: BTreeMap::new(),
            device: DevicePreference::Auto,
            unpack_dir: None,
            cors: [None, None, None],
            registry: None,
            registry_poll: Duration::from_secs(5),
            enable_model_api: None,
            disable_token_authorization: false,
            token_expiration_min: 60,
            // TorchServe's default, and S3 objects.
            allowed_urls: vec!["file://.*|http(s)?://.*|s3://.*".to_string()],
            unknown_keys: Vec::new(),
            inert_keys: Vec::new(),
            python: None,
            metrics_config: None,
            model_metrics_auto_detect: false,
            install_py_dep_per_model: false,
            default_startup_timeout: 120,
            service_envelope: None,
            limit_max_image_pixels: true,
            decode_input_request: true,
            archive_limits: crate::mar::Limits::default(),
        }
    }
}

/// Keys `apply_properties` acts on.
const HANDLED_KEYS: &[&str] = &[
    "inference_address",
    "management_address",
    "metrics_address",
    "model_store",
    "load_models",
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "batch_size",
    "max_batch_delay",
    "default_response_timeout",
    "enable_batch",
    "number_of_gpu",
    "default_service_handler",
    "models",
    "max_instances_per_request",
    "torchfn_precision",
    "torchfn_device",
    "torchfn_unpack_dir",
    "enable_model_api",
    "disable_token_authorization",
    "token_expiration_min",
    "allowed_urls",
    "torchfn_registry",
    "torchfn_registry_poll_seconds",
    "cors_allowed_origin",
    "cors_allowed_methods",
    "cors_allowed_headers",
    "torchfn_python",
    "install_py_dep_per_model",
    "default_startup_timeout",
    "service_envelope",
    "limit_max_image_pixels",
    "decode_input_request",
    "torchfn_archive_max_bytes",
    "torchfn_archive_max_ratio",
    "metrics_config",
    "model_metrics_auto_detect",
];

/// TorchServe keys accepted for compatibility that change nothing in torchfn (JVM, Netty,
/// Python-backend and logging knobs). Anything neither here nor handled is "unknown".
const INERT_KEYS: &[&str] = &[
    "async_logging",
    "number_of_netty_threads",
    "netty_client_threads",
    "vmargs",
    "initial_worker_port",
    "prefer_direct_buffer",
    "unregister_model_timeout",
    "metrics_mode",
    "metric_time_interval",
    "enable_metrics_api",
    "disable_system_metrics",
    "workflow_store",
    "enable_envvars_config",
    "use_native_io",
    "io_ratio",
    "grpc_inference_address",
    "grpc_management_address",
    "grpc_inference_port",
    "grpc_management_port",
    "enable_grpc_ssl",
    "model_snapshot",
    "ts_open_inference_protocol",
    // Read by `env_overrides`.
    "use_env_allowed_urls",
    // Accepted so configs load, not honoured.
    "blacklist_env_vars",
];

impl Settings {
    /// Applies config.properties keys over the defaults.
    pub fn apply_properties(&mut self, props: &Properties) -> Result<(), SettingsError> {
        for (key, value) in props {
            let v = value.trim();
            match key.as_str() {
                "inference_address" => self.inference_address = parse_address(key, v)?,
                "management_address" => self.management_address = parse_address(key, v)?,
                "metrics_address" => self.metrics_address = parse_address(key, v)?,
                "model_store" => self.model_store = Some(PathBuf::from(v)),
                "load_models" => self.load_models = split_list(v),
                "default_workers_per_model" => {
                    let n: usize = parse_num(key, v)?;
                    self.default_workers_per_model = (n > 0).then_some(n);
                }
                "job_queue_size" => self.job_queue_size = parse_num::<usize>(key, v)?.max(1),
                "max_request_size" => self.max_request_size = parse_num(key, v)?,
                "max_response_size" => self.max_response_size = parse_num(key, v)?,
                "batch_size" => self.batch_size = parse_num::<usize>(key, v)?.max(1),
                "max_batch_delay" => {
                    self.max_batch_delay = Duration::from_millis(parse_num(key, v)?)
                }
                "default_response_timeout" => {
                    self.response_timeout = Duration::from_secs(parse_num(key, v)?)
                }
                // `enable_batch=false` turns batching off whatever batch_size says.
                "enable_batch" => {
                    if v.eq_ignore_ascii_case("false") {
                        self.batch_size = 1;
                    }
                }
                "number_of_gpu" => {
                    if parse_num::<usize>(key, v)? == 0 {
                        self.device = DevicePreference::Cpu;
                    }
                }
                "default_service_handler" => self.default_service_handler = Some(v.to_string()),
                "models" => {
                    self.models = serde_json::from_str(v).map_err(|e| {
                        bad(
                            key,
                            format!("expected {{\"name\": {{\"version\": {{...}}}}}}: {e}"),
                        )
                    })?
                }
                "max_instances_per_request" => {
                    self.max_instances_per_request = parse_num::<usize>(key, v)?.max(1)
                }
                "torchfn_precision" => {
                    self.precision = v.parse().map_err(|e: String| bad(key, e))?
                }
                "torchfn_device" => self.device = v.parse().map_err(|e: String| bad(key, e))?,
                "torchfn_unpack_dir" => self.unpack_dir = Some(PathBuf::from(v)),
                "torchfn_registry" => self.registry = Some(v.to_string()),
                "torchfn_python" => self.python = Some(PathBuf::from(v)),
                "install_py_dep_per_model" => self.install_py_dep_per_model = parse_bool(key, v)?,
                "metrics_config" => {
                    self.metrics_config = Some(PathBuf::from(v)).filter(|_| !v.is_empty())
                }
                "model_metrics_auto_detect" => self.model_metrics_auto_detect = parse_bool(key, v)?,
                "default_startup_timeout" => self.default_startup_timeout = parse_num(key, v)?,
                "service_envelope" => {
                    self.service_envelope = Some(v.to_string()).filter(|v| !v.is_empty())
                }
                "limit_max_image_pixels" => self.limit_max_image_pixels = parse_bool(key, v)?,
                "decode_input_request" => self.decode_input_request = parse_bool(key, v)?,
                "torchfn_archive_max_bytes" => {
                    self.archive_limits.max_unpacked_bytes = parse_num(key, v)?
                }
                "torchfn_archive_max_ratio" => {
                    self.archive_limits.max_expansion_ratio = parse_num::<u64>(key, v)?.max(1)
                }
                "cors_allowed_origin" => self.cors[0] = Some(v.to_string()),
                "cors_allowed_methods" => self.cors[1] = Some(v.to_string()),
                "cors_allowed_headers" => self.cors[2] = Some(v.to_string()),
                "torchfn_registry_poll_seconds" => {
                    self.registry_poll = Duration::from_secs(parse_num::<u64>(key, v)?.max(1));
                }
                "enable_model_api" => self.enable_model_api = Some(parse_bool(key, v)?),
                "disable_token_authorization" => {
                    self.disable_token_authorization = parse_bool(key, v)?;
                }
                "token_expiration_min" => {
                    self.token_expiration_min = parse_num::<u64>(key, v)?.max(1);
                }
                "allowed_urls" => {
                    let patterns = split_list(v);
                    for p in &patterns {
                        regex_lite::Regex::new(p).map_err(|e| {
                            bad(key, format!("`{p}` is not a regular expression: {e}"))
                        })?;
                    }
                    self.allowed_urls = patterns;
                }
                k if INERT_KEYS.contains(&k) => self.inert_keys.push(k.to_string()),
                k => self.unknown_keys.push(k.to_string()),
            }
        }
        // `enable_batch=false` must win over a batch_size that comes later in key order.
        if props
            .get("enable_batch")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
        {
            self.batch_size = 1;
        }
        Ok(())
    }

    /// TorchServe's `TS_*` environment overrides, applied to `props` when it (the config
    /// file) says `enable_envvars_config=true`: `TS_INFERENCE_ADDRESS` sets
    /// `inference_address`, and so on for every key, except those TorchServe gives no
    /// variable (`models`, `enable_envvars_config`, ...); `TS_ALLOWED_URLS` counts only with
    /// `use_env_allowed_urls=true`. Returns the keys set this way, and the `TS_*` variables
    /// that name no key.
    pub fn env_overrides(
        props: &mut crate::properties::Properties,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Vec<String>, Vec<String>) {
        const NO_VARIABLE: &[&str] = &[
            "enable_envvars_config",
            "models",
            "model_snapshot",
            "metric_time_interval",
            "use_native_io",
            "io_ratio",
            "system_metrics_cmd",
            "vmargs",
        ];
        let on = |props: &crate::properties::Properties, key: &str| {
            props
                .get(key)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        };
        if !on(props, "enable_envvars_config") {
            return (Vec::new(), Vec::new());
        }
        let env_urls = on(props, "use_env_allowed_urls");
        let (mut set, mut unknown) = (Vec::new(), Vec::new());
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TS_") && k != "TS_CONFIG_FILE")
            .collect();
        vars.sort();
        for (var, value) in vars {
            let key = var["TS_".len()..].to_ascii_lowercase();
            let known = HANDLED_KEYS.contains(&key.as_str()) || INERT_KEYS.contains(&key.as_str());
            if !known || NO_VARIABLE.contains(&key.as_str()) {
                unknown.push(var);
                continue;
            }
            if key == "allowed_urls" && !env_urls {
                continue;
            }
            props.insert(key.clone(), value);
            set.push(key);
        }
        (set, unknown)
    }

    /// Whether `url` (a `file://`, `s3://` or http(s) URL) matches one of `allowed_urls` as a
    /// whole.
    pub fn url_allowed(&self, url: &str) -> bool {
        self.allowed_urls
            .iter()
            .any(|p| regex_lite::Regex::new(&format!("^(?:{p})$")).is_ok_and(|re| re.is_match(url)))
    }

    /// The handler named for a model version, if any: `--handler`, then the `models` JSON.
    /// (`default_service_handler` is not one: it applies only to archives whose manifest
    /// names a Python handler file.)
    pub fn handler_for(&self, model: &str, version: &str) -> Option<&str> {
        self.handlers
            .get(model)
            .map(String::as_str)
            .or_else(|| self.overrides(model, version)?.handler.as_deref())
    }

    /// The `models` JSON entry of a model version.
    pub fn overrides(&self, model: &str, version: &str) -> Option<&ModelOverrides> {
        self.models.get(model)?.get(version)
    }
}

/// `http://host:port` → a socket address. Port 0 asks the OS for a free port.
pub fn parse_address(key: &str, value: &str) -> Result<SocketAddr, SettingsError> {
    if value.starts_with("https://") {
        return Err(bad(key, "https listeners are not supported yet; terminate TLS in front of torchfn and use http://"));
    }
    if value.starts_with("unix:") {
        return Err(bad(
            key,
            "unix socket listeners are not supported; use http://host:port",
        ));
    }
    let rest = value.strip_prefix("http://").unwrap_or(value);
    let rest = rest.trim_end_matches('/');
    let with_port = if rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !rest.ends_with(']')
    {
        rest.to_string()
    } else {
        format!("{rest}:80")
    };
    let host_port = with_port.replace("localhost:", "127.0.0.1:");
    host_port.parse().map_err(|_| {
        bad(
            key,
            format!("`{value}` is not an address like http://127.0.0.1:8080"),
        )
    })
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, SettingsError> {
    v.parse()
        .map_err(|_| bad(key, format!("`{v}` is not a non-negative whole number")))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, SettingsError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(bad(key, format!("`{other}` is not true or false"))),
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn props(text: &str) -> Properties {
        crate::properties::parse(text, "t", |_| None).unwrap()
    }

    #[test]
    fn seed_config_applies() {
        let mut s = Settings::default();
        s.apply_properties(&props(
            "inference_address=http://0.0.0.0:8080\nmanagement_address=http://127.0.0.1:0\n\
             load_models=all\nnumber_of_netty_threads=4\njob_queue_size=100\n\
             default_workers_per_model=1\nenable_batch=true\nbatch_size=32\nmax_batch_delay=100\n\
             number_of_gpu=1\nasync_logging=true\nmystery_key=1\n",
        ))
        .unwrap();
        assert_eq!(s.inference_address, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.management_address.port(), 0);
        assert_eq!(s.load_models, vec!["all"]);
        assert_eq!(s.batch_size, 32);
        assert_eq!(s.max_batch_delay, Duration::from_millis(100));
        assert_eq!(s.default_workers_per_model, Some(1));
        assert_eq!(s.unknown_keys, vec!["mystery_key"]);
        assert!(s.inert_keys.contains(&"async_logging".to_string()));
    }

    #[test]
    fn enable_batch_false_wins() {
        let mut s = Settings::default();
        s.apply_properties(&props("enable_batch=false\nbatch_size=32\n"))
            .unwrap();
        assert_eq!(s.batch_size, 1);
    }

    #[test]
    fn handler_precedence() {
        let mut s = Settings::default();
        s.apply_properties(&props(
            "default_service_handler=tensor\nmodels={\"a\": {\"1.0\": {\"handler\": \"classifier\", \"batchSize\": 4}}}\n",
        ))
        .unwrap();
        assert_eq!(s.handler_for("a", "1.0"), Some("classifier"));
        assert_eq!(s.handler_for("a", "2.0"), None);
        assert_eq!(s.default_service_handler.as_deref(), Some("tensor"));
        assert_eq!(s.overrides("a", "1.0").unwrap().batch_size, Some(4));
        s.handlers.insert("a".into(), "tensor".into());
        assert_eq!(s.handler_for("a", "1.0"), Some("tensor"));
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address("k", "http://localhost:9").unwrap().port(), 9);
        assert!(parse_address("k", "https://x:1").is_err());
        assert!(parse_address("k", "http://not an addr").is_err());
        assert_eq!(parse_address("k", "http://[::1]:7").unwrap().port(), 7);
    }
}

#[cfg(test)]
mod env_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::properties::Properties;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ts_variables_override_the_file_only_when_enabled() {
        let vars = env(&[
            ("TS_INFERENCE_ADDRESS", "http://127.0.0.1:9999"),
            ("TS_JOB_QUEUE_SIZE", "7"),
            ("TS_MODELS", "{}"),
            ("TS_NO_SUCH_KEY", "1"),
            ("TS_ALLOWED_URLS", "s3://.*"),
            ("TS_CONFIG_FILE", "/x"),
            ("PATH", "/bin"),
        ]);
        let mut props = Properties::new();
        props.insert("job_queue_size".into(), "50".into());
        assert_eq!(
            Settings::env_overrides(&mut props, vars.clone()),
            (vec![], vec![])
        );
        assert_eq!(props["job_queue_size"], "50");

        props.insert("enable_envvars_config".into(), "true".into());
        let (set, unknown) = Settings::env_overrides(&mut props, vars.clone());
        assert_eq!(set, ["inference_address", "job_queue_size"]);
        assert_eq!(unknown, ["TS_MODELS", "TS_NO_SUCH_KEY"]);
        let mut s = Settings::default();
        s.apply_properties(&props).unwrap();
        assert_eq!(s.job_queue_size, 7);
        assert_eq!(s.inference_address.port(), 9999);
        // TS_ALLOWED_URLS was not applied: the default patterns stand.
        assert!(s.url_allowed("file:///srv/models/x.mar"));

        // TS_ALLOWED_URLS only with use_env_allowed_urls=true.
        props.insert("use_env_allowed_urls".into(), "true".into());
        let (set, _) = Settings::env_overrides(&mut props, vars);
        assert!(set.contains(&"allowed_urls".to_string()));
        let mut s = Settings::default();
        s.apply_properties(&props).unwrap();
        assert!(s.url_allowed("s3://b/k.mar"));
        assert!(!s.url_allowed("file:///etc/passwd"));
    }
}
