//! CloudWatch Embedded Metric Format: one JSON object a line on stdout, which Lambda's log
//! capture turns into metrics (no API call, no extra latency).

use std::io::Write;

use serde_json::{json, Map, Value};

/// One metric of a line: its name, unit (`Microseconds`, `Count`, …) and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric<'a> {
    pub name: &'a str,
    pub unit: &'a str,
    pub value: u64,
}

/// An EMF line: `namespace`'s `metrics`, with `dimensions` (name, value) as the one dimension
/// set, stamped `timestamp_ms` (milliseconds since the Unix epoch).
pub fn line(
    namespace: &str,
    dimensions: &[(&str, &str)],
    metrics: &[Metric<'_>],
    timestamp_ms: u64,
) -> String {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [dimensions.iter().map(|(name, _)| *name).collect::<Vec<_>>()],
                "Metrics": metrics
                    .iter()
                    .map(|m| json!({"Name": m.name, "Unit": m.unit}))
                    .collect::<Vec<_>>(),
            }]
        }),
    );
    for (name, value) in dimensions {
        root.insert((*name).into(), Value::from(*value));
    }
    for metric in metrics {
        root.insert(metric.name.into(), Value::from(metric.value));
    }
    Value::Object(root).to_string()
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `namespace`'s `metrics` with `dimensions`, stamped now, as one line on stdout. A
/// line that cannot be written is logged and dropped.
pub fn write(namespace: &str, dimensions: &[(&str, &str)], metrics: &[Metric<'_>]) {
    let text = line(namespace, dimensions, metrics, now_ms());
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        tracing::warn!(error = %e, "could not write an EMF metric line");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_line_declares_and_carries_its_metrics() {
        let text = line(
            "torchfn",
            &[("model", "m"), ("version", "1.0")],
            &[
                Metric {
                    name: "Latency",
                    unit: "Microseconds",
                    value: 1200,
                },
                Metric {
                    name: "BatchSize",
                    unit: "Count",
                    value: 4,
                },
            ],
            1_795_000_000_000,
        );
        assert!(!text.contains('\n'));
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({
                "_aws": {
                    "Timestamp": 1_795_000_000_000u64,
                    "CloudWatchMetrics": [{
                        "Namespace": "torchfn",
                        "Dimensions": [["model", "version"]],
                        "Metrics": [
                            {"Name": "Latency", "Unit": "Microseconds"},
                            {"Name": "BatchSize", "Unit": "Count"}
                        ]
                    }]
                },
                "model": "m",
                "version": "1.0",
                "Latency": 1200,
                "BatchSize": 4
            })
        );
    }
}
