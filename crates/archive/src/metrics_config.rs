//! TorchServe's metrics configuration (`metrics_config`, by default `ts/configs/metrics.yaml`):
//! the model metrics it declares, which a handler's `[METRICS]` lines update. Only the
//! `model_metrics` section matters here; torchfn's frontend metrics are its own.

use serde::Deserialize;

/// How a metric's values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Each value is added.
    Counter,
    /// Each value replaces the last.
    Gauge,
    /// Each value is observed.
    Histogram,
}

impl MetricKind {
    /// The name TorchServe's handlers write after `#type:` (`COUNTER`, `GAUGE`, `HISTOGRAM`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_uppercase().as_str() {
            "COUNTER" => Some(Self::Counter),
            "GAUGE" => Some(Self::Gauge),
            "HISTOGRAM" => Some(Self::Histogram),
            _ => None,
        }
    }

    /// Prometheus' name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One declared model metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetricSpec {
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    /// Dimension names in declared order (the frontend adds `Hostname` after them).
    pub dimensions: Vec<String>,
}

/// TorchServe's default declarations (its `ts/configs/metrics.yaml`): the times every
/// handler based on its `BaseHandler` reports.
pub fn default_model_metrics() -> Vec<ModelMetricSpec> {
    ["HandlerTime", "PredictionTime"]
        .into_iter()
        .map(|name| ModelMetricSpec {
            name: name.into(),
            unit: "ms".into(),
            kind: MetricKind::Gauge,
            dimensions: vec!["ModelName".into(), "Level".into()],
        })
        .collect()
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    model_metrics: Option<Section>,
}

#[derive(Deserialize, Default)]
struct Section {
    #[serde(default)]
    counter: Option<Vec<Entry>>,
    #[serde(default)]
    gauge: Option<Vec<Entry>>,
    #[serde(default)]
    histogram: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    dimensions: Option<Vec<String>>,
}

/// The `model_metrics` a metrics configuration declares (anchors and aliases resolved, as
/// TorchServe's own file uses them).
pub fn parse_model_metrics(yaml: &str) -> Result<Vec<ModelMetricSpec>, String> {
    let file: File = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
    let section = file.model_metrics.unwrap_or_default();
    let mut specs = Vec::new();
    for (kind, entries) in [
        (MetricKind::Counter, section.counter),
        (MetricKind::Gauge, section.gauge),
        (MetricKind::Histogram, section.histogram),
    ] {
        for e in entries.unwrap_or_default() {
            if e.name.trim().is_empty() {
                return Err("a model metric has an empty name".into());
            }
            specs.push(ModelMetricSpec {
                name: e.name,
                unit: e.unit.unwrap_or_default(),
                kind,
                dimensions: e.dimensions.unwrap_or_default(),
            });
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn torchserve_s_own_file_declares_its_two_model_gauges() {
        let yaml = r#"
dimensions:
  - &model_name "ModelName"
  - &worker_name "WorkerName"
  - &level "Level"
  - &device_id "DeviceId"
  - &hostname "Hostname"

ts_metrics:
  counter:
    - name: Requests2XX
      unit: Count
      dimensions: [*level, *hostname]

model_metrics:
  # Dimension "Hostname" is automatically added for model metrics in the backend
  gauge:
    - name: HandlerTime
      unit: ms
      dimensions: [*model_name, *level]
    - name: PredictionTime
      unit: ms
      dimensions: [*model_name, *level]
"#;
        assert_eq!(parse_model_metrics(yaml).unwrap(), default_model_metrics());
    }

    #[test]
    fn custom_declarations_keep_their_kind_unit_and_dimension_order() {
        let yaml = "model_metrics:\n  counter:\n    - name: InferenceRequestCount\n      unit: count\n      dimensions: [Level, ModelName]\n  histogram:\n    - name: SizeOfImage\n      unit: kB\n      dimensions: []\n";
        let specs = parse_model_metrics(yaml).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].kind, MetricKind::Counter);
        assert_eq!(specs[0].dimensions, ["Level", "ModelName"]);
        assert_eq!(specs[1].kind, MetricKind::Histogram);
        assert_eq!(specs[1].unit, "kB");
        assert!(parse_model_metrics("model_metrics: [").is_err());
        assert!(parse_model_metrics("ts_metrics: {}\n").unwrap().is_empty());
    }
}
