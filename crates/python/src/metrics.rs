//! A handler's metrics as TorchServe's backend reports them: one `[METRICS]` line per update
//! on the worker's output (`ts/metrics/caching_metric.py`),
//! `[METRICS]Name.Unit:value|#Dim:val,Dim:val|#type:GAUGE|#hostname:host,timestamp[,request_id]`.

use std::sync::Arc;

/// One metric update from a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricLine {
    pub name: String,
    pub unit: String,
    pub value: f64,
    /// (name, value) in the order the handler gave them.
    pub dimensions: Vec<(String, String)>,
    /// `COUNTER`, `GAUGE` or `HISTOGRAM`, as written.
    pub kind: String,
    pub hostname: String,
    pub request_id: Option<String>,
}

impl MetricLine {
    /// The update a worker's output line carries, if it is one.
    pub fn parse(line: &str) -> Option<MetricLine> {
        let rest = line.trim_end().strip_prefix("[METRICS]")?;
        let mut parts = rest.split('|');
        let head = parts.next()?;
        let dims = parts.next()?.strip_prefix('#')?;
        let kind = parts.next()?.strip_prefix("#type:")?;
        let host = parts.next()?.strip_prefix("#hostname:")?;
        if parts.next().is_some() {
            return None;
        }
        let (name_unit, value) = head.rsplit_once(':')?;
        let (name, unit) = name_unit.rsplit_once('.').unwrap_or((name_unit, ""));
        if name.is_empty() {
            return None;
        }
        let value: f64 = value.trim().parse().ok()?;
        let dimensions = if dims.is_empty() {
            Vec::new()
        } else {
            dims.split(',')
                .map(|d| {
                    d.split_once(':')
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                })
                .collect::<Option<Vec<_>>>()?
        };
        let mut host = host.splitn(3, ',');
        let hostname = host.next()?.to_string();
        let _timestamp = host.next()?;
        let request_id = host.next().map(str::to_string).filter(|r| !r.is_empty());
        Some(MetricLine {
            name: name.to_string(),
            unit: unit.to_string(),
            value,
            dimensions,
            kind: kind.to_string(),
            hostname,
            request_id,
        })
    }
}

/// Where a pool's workers hand their metric updates.
#[derive(Clone)]
pub struct MetricSink(Arc<dyn Fn(MetricLine) + Send + Sync>);

impl MetricSink {
    pub fn new(f: impl Fn(MetricLine) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn send(&self, line: MetricLine) {
        (self.0)(line)
    }
}

impl std::fmt::Debug for MetricSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricSink")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_lines_torchserve_s_backend_writes_are_read() {
        let line = MetricLine::parse(
            "[METRICS]PredictionTime.ms:2.31|#ModelName:mnist,Level:Model|#type:GAUGE|#hostname:box,1733493000,7d1c-41",
        )
        .unwrap();
        assert_eq!(line.name, "PredictionTime");
        assert_eq!(line.unit, "ms");
        assert_eq!(line.value, 2.31);
        assert_eq!(
            line.dimensions,
            [
                ("ModelName".to_string(), "mnist".to_string()),
                ("Level".to_string(), "Model".to_string())
            ]
        );
        assert_eq!(line.kind, "GAUGE");
        assert_eq!(line.hostname, "box");
        assert_eq!(line.request_id.as_deref(), Some("7d1c-41"));

        let bare =
            MetricLine::parse("[METRICS]Loaded.Count:1|#|#type:COUNTER|#hostname:box,1733493000")
                .unwrap();
        assert!(bare.dimensions.is_empty());
        assert_eq!(bare.request_id, None);
    }

    #[test]
    fn other_lines_and_cut_ones_are_not_metrics() {
        for line in [
            "Backend received inference at: 1733493000",
            "[METRICS]Failed to update metric with name:X and dimensions:  with value: -1: bad",
            "[METRICS]X.ms:abc|#|#type:GAUGE|#hostname:box,1",
            "[METRICS]X.ms:1|#A|#type:GAUGE|#hostname:box,1",
            "[METRICS]X.ms:1|#|#type:GAUGE",
            "[METRICS].ms:1|#|#type:GAUGE|#hostname:box,1",
        ] {
            assert_eq!(MetricLine::parse(line), None, "{line}");
        }
    }
}
