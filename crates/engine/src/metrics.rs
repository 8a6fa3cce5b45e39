//! Prometheus metrics under TorchServe's names, plus the histograms the getting-started
//! guide's PromQL asks for (`ts_inference_latency_ms_bucket`, `ts_queue_latency_ms_bucket`)
//! and torchfn's batch-size histogram.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::{MetricFamily, MetricType};
use torchfn_archive::metrics_config::{MetricKind, ModelMetricSpec};
use torchfn_python::MetricLine;

use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry,
};

/// The per-request metrics of one model version under one `model_version` label (the
/// version, or `default` when the URL names none), resolved once so the request path does
/// no label lookups.
#[derive(Clone)]
pub struct RequestMetrics {
    pub requests_total: prometheus::IntCounter,
    pub inference_latency_us: prometheus::Counter,
    pub queue_latency_us: prometheus::Counter,
    pub inference_latency_ms: prometheus::Histogram,
    pub queue_latency_ms: prometheus::Histogram,
}

/// All of the server's metrics, in one registry.
pub struct Metrics {
    registry: Registry,
    hostname: String,
    /// Requests2XX, Requests4XX, Requests5XX.
    requests: [IntCounter; 3],
    pub inference_requests_total: IntCounterVec,
    pub inference_latency_us: CounterVec,
    pub queue_latency_us: CounterVec,
    pub inference_latency_ms: HistogramVec,
    pub queue_latency_ms: HistogramVec,
    pub batch_size: HistogramVec,
    pub model_workers: IntGaugeVec,
    pub queue_length: IntGaugeVec,
    pub abandoned_requests: IntCounterVec,
    pub stuck_workers: IntCounterVec,
    pub gpu_memory_used_bytes: GaugeVec,
    gpu_enabled: AtomicBool,
    /// An nvidia-smi query is running (on a blocking thread).
    gpu_query_running: Arc<AtomicBool>,
    /// Every family as declared, in registration order: its help, type and label order,
    /// which the exposition keeps (and prints, HELP and TYPE only, while it has no samples).
    /// Model metrics join it as they are declared.
    declared: RwLock<Vec<Declared>>,
    /// The handlers' metrics (TorchServe's `model_metrics`), by name.
    model: Mutex<HashMap<String, ModelFamily>>,
    /// `model_metrics_auto_detect`: undeclared handler metrics are added when they arrive.
    auto_detect: AtomicBool,
}

/// One handler metric family: its dimension names (then `Hostname`) and its collector.
struct ModelFamily {
    dimensions: Vec<String>,
    collector: ModelCollector,
}

enum ModelCollector {
    Counter(CounterVec),
    Gauge(GaugeVec),
    Histogram(HistogramVec),
}

/// A family's declaration, for the exposition.
#[derive(Debug, Clone)]
struct Declared {
    name: String,
    help: String,
    kind: MetricType,
    /// Label names in declared order (constant labels first, as written).
    labels: Vec<String>,
}

/// How long a scrape waits for nvidia-smi.
pub const GPU_QUERY_WAIT: Duration = Duration::from_secs(2);

fn help(kind: &str, unit: &str) -> String {
    format!("Torchserve prometheus {kind} metric with unit: {unit}")
}

const MS_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let hostname = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let model = &["model_name", "model_version", "hostname"];
        let model_only = &["model_name", "model_version"];
        // TorchServe keeps one family per status class, named Requests2XX, -4XX, -5XX.
        let class_counter = |class: &str| {
            IntCounter::with_opts(
                Opts::new(format!("Requests{class}"), help("counter", "Count"))
                    .const_label("Level", "Host")
                    .const_label("Hostname", &hostname),
            )
        };
        let requests = [
            class_counter("2XX")?,
            class_counter("4XX")?,
            class_counter("5XX")?,
        ];
        let m = Self {
            inference_requests_total: IntCounterVec::new(
                Opts::new("ts_inference_requests_total", help("counter", "Count")),
                model,
            )?,
            inference_latency_us: CounterVec::new(
                Opts::new(
                    "ts_inference_latency_microseconds",
                    help("counter", "Microseconds"),
                ),
                model,
            )?,
            queue_latency_us: CounterVec::new(
                Opts::new(
                    "ts_queue_latency_microseconds",
                    help("counter", "Microseconds"),
                ),
                model,
            )?,
            inference_latency_ms: HistogramVec::new(
                HistogramOpts::new("ts_inference_latency_ms", help("histogram", "Milliseconds"))
                    .buckets(MS_BUCKETS.to_vec()),
                model_only,
            )?,
            queue_latency_ms: HistogramVec::new(
                HistogramOpts::new("ts_queue_latency_ms", help("histogram", "Milliseconds"))
                    .buckets(MS_BUCKETS.to_vec()),
                model_only,
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("torchfn_batch_size", "Instances per forward pass")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                model_only,
            )?,
            model_workers: IntGaugeVec::new(
                Opts::new("ts_model_workers", help("gauge", "Count")),
                model_only,
            )?,
            queue_length: IntGaugeVec::new(
                Opts::new(
                    "torchfn_queue_length",
                    "Requests waiting for a model worker",
                ),
                model_only,
            )?,
            abandoned_requests: IntCounterVec::new(
                Opts::new(
                    "torchfn_requests_abandoned_total",
                    "Requests dropped from the queue because their caller went away",
                ),
                model_only,
            )?,
            stuck_workers: IntCounterVec::new(
                Opts::new(
                    "torchfn_stuck_workers_total",
                    "Workers replaced because a forward pass ran past the response timeout",
                ),
                model_only,
            )?,
            gpu_memory_used_bytes: GaugeVec::new(
                Opts::new("ts_gpu_memory_used_bytes", help("gauge", "Bytes")),
                &["device_id"],
            )?,
            gpu_enabled: AtomicBool::new(false),
            gpu_query_running: Arc::new(AtomicBool::new(false)),
            requests,
            registry,
            hostname,
            declared: RwLock::new(Vec::new()),
            model: Mutex::new(HashMap::new()),
            auto_detect: AtomicBool::new(false),
        };
        let mut m = m;
        use MetricType::{COUNTER, GAUGE, HISTOGRAM};
        let collectors: [(&dyn Collector, MetricType); 10] = [
            (&m.inference_requests_total, COUNTER),
            (&m.inference_latency_us, COUNTER),
            (&m.queue_latency_us, COUNTER),
            (&m.inference_latency_ms, HISTOGRAM),
            (&m.queue_latency_ms, HISTOGRAM),
            (&m.batch_size, HISTOGRAM),
            (&m.model_workers, GAUGE),
            (&m.queue_length, GAUGE),
            (&m.abandoned_requests, COUNTER),
            (&m.stuck_workers, COUNTER),
        ];
        let mut declared: Vec<Declared> = collectors
            .iter()
            .flat_map(|(c, kind)| declare(*c, *kind, &[]))
            .collect();
        for c in &m.requests {
            // TorchServe writes Level before Hostname.
            declared.extend(declare(c, COUNTER, &["Level", "Hostname"]));
        }
        declared.extend(declare(&m.gpu_memory_used_bytes, GAUGE, &[]));
        m.declared = RwLock::new(declared);
        m.registry
            .register(Box::new(m.inference_requests_total.clone()))?;
        m.registry
            .register(Box::new(m.inference_latency_us.clone()))?;
        m.registry.register(Box::new(m.queue_latency_us.clone()))?;
        m.registry
            .register(Box::new(m.inference_latency_ms.clone()))?;
        m.registry.register(Box::new(m.queue_latency_ms.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.model_workers.clone()))?;
        m.registry.register(Box::new(m.queue_length.clone()))?;
        m.registry
            .register(Box::new(m.abandoned_requests.clone()))?;
        m.registry.register(Box::new(m.stuck_workers.clone()))?;
        for c in &m.requests {
            m.registry.register(Box::new(c.clone()))?;
        }
        Ok(m)
    }

    /// Handles for requests to `model`/`version` that name `version_label` in their URL.
    pub fn for_requests(&self, model: &str, version: &str, version_label: &str) -> RequestMetrics {
        let labels = [model, version_label, self.hostname.as_str()];
        let model_labels = [model, version];
        RequestMetrics {
            requests_total: self.inference_requests_total.with_label_values(&labels),
            inference_latency_us: self.inference_latency_us.with_label_values(&labels),
            queue_latency_us: self.queue_latency_us.with_label_values(&labels),
            inference_latency_ms: self.inference_latency_ms.with_label_values(&model_labels),
            queue_latency_ms: self.queue_latency_ms.with_label_values(&model_labels),
        }
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Starts reporting `ts_gpu_memory_used_bytes` (only when a model runs on a GPU).
    pub fn enable_gpu_metrics(&self) {
        if !self.gpu_enabled.swap(true, Ordering::AcqRel) {
            let _ = self
                .registry
                .register(Box::new(self.gpu_memory_used_bytes.clone()));
        }
    }

    /// Refreshes `ts_gpu_memory_used_bytes` from `nvidia-smi` (libtorch has no API for GPU
    /// memory in use) when a model runs on a GPU; call it before [`Metrics::render`] at scrape
    /// time. nvidia-smi runs on a blocking thread, never on an async worker. A scrape waits
    /// for it at most [`GPU_QUERY_WAIT`], and one query runs at a time (a scrape that finds
    /// one running does not start another); either way the gauge keeps its last values, as
    /// it does without nvidia-smi.
    pub async fn refresh_gpu_memory(&self) {
        if !self.gpu_enabled.load(Ordering::Acquire)
            || self.gpu_query_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let gauge = self.gpu_memory_used_bytes.clone();
        let running = self.gpu_query_running.clone();
        let query = tokio::task::spawn_blocking(move || {
            query_gpu_memory(&gauge);
            running.store(false, Ordering::Release);
        });
        if tokio::time::timeout(GPU_QUERY_WAIT, query).await.is_err() {
            tracing::warn!(
                wait_s = GPU_QUERY_WAIT.as_secs_f64(),
                "nvidia-smi has not answered; ts_gpu_memory_used_bytes keeps its last values"
            );
        }
    }

    /// Declares the handlers' metrics (TorchServe's `model_metrics`): each family prints from
    /// now on, with its dimensions then `Hostname` as labels. With `auto_detect`, metrics
    /// that arrive undeclared are declared as they come; otherwise they are dropped.
    pub fn declare_model_metrics(
        &self,
        specs: &[ModelMetricSpec],
        auto_detect: bool,
    ) -> Result<(), prometheus::Error> {
        self.auto_detect.store(auto_detect, Ordering::Release);
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        for spec in specs {
            if !model.contains_key(&spec.name) {
                let family = self.model_family(spec)?;
                model.insert(spec.name.clone(), family);
            }
        }
        Ok(())
    }

    /// A new handler metric family, registered and declared.
    fn model_family(&self, spec: &ModelMetricSpec) -> Result<ModelFamily, prometheus::Error> {
        let mut labels: Vec<&str> = spec.dimensions.iter().map(String::as_str).collect();
        labels.push("Hostname");
        let help = help(spec.kind.as_str(), &spec.unit);
        let (collector, kind) = match spec.kind {
            MetricKind::Counter => (
                ModelCollector::Counter(CounterVec::new(Opts::new(&spec.name, help), &labels)?),
                MetricType::COUNTER,
            ),
            MetricKind::Gauge => (
                ModelCollector::Gauge(GaugeVec::new(Opts::new(&spec.name, help), &labels)?),
                MetricType::GAUGE,
            ),
            MetricKind::Histogram => (
                ModelCollector::Histogram(HistogramVec::new(
                    HistogramOpts::new(&spec.name, help),
                    &labels,
                )?),
                MetricType::HISTOGRAM,
            ),
        };
        let c: Box<dyn Collector> = match &collector {
            ModelCollector::Counter(c) => Box::new(c.clone()),
            ModelCollector::Gauge(c) => Box::new(c.clone()),
            ModelCollector::Histogram(c) => Box::new(c.clone()),
        };
        let declared = declare(c.as_ref(), kind, &[]);
        self.registry.register(c)?;
        self.declared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(declared);
        Ok(ModelFamily {
            dimensions: spec.dimensions.clone(),
            collector,
        })
    }

    /// One update from a handler (a worker's `[METRICS]` line), applied as TorchServe's
    /// frontend applies it: a counter adds, a gauge sets, a histogram observes. An update of
    /// an undeclared metric (without auto-detection), of another kind than declared or
    /// without the declared dimensions is dropped and logged.
    pub fn record_model_metric(&self, line: &MetricLine) {
        let Some(kind) = MetricKind::parse(&line.kind) else {
            tracing::warn!(metric = %line.name, kind = %line.kind, "a handler metric of unknown type");
            return;
        };
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        if !model.contains_key(&line.name) {
            if !self.auto_detect.load(Ordering::Acquire) {
                tracing::debug!(metric = %line.name,
                    "a handler metric that metrics_config does not declare (model_metrics_auto_detect is off)");
                return;
            }
            let spec = ModelMetricSpec {
                name: line.name.clone(),
                unit: line.unit.clone(),
                kind,
                dimensions: line.dimensions.iter().map(|(n, _)| n.clone()).collect(),
            };
            match self.model_family(&spec) {
                Ok(family) => {
                    model.insert(line.name.clone(), family);
                }
                Err(e) => {
                    tracing::warn!(metric = %line.name, error = %e, "cannot add a handler metric");
                    return;
                }
            }
        }
        let Some(family) = model.get(&line.name) else {
            return;
        };
        let mut values: Vec<&str> = Vec::with_capacity(family.dimensions.len() + 1);
        for name in &family.dimensions {
            match line.dimensions.iter().find(|(n, _)| n == name) {
                Some((_, v)) => values.push(v.as_str()),
                None => {
                    tracing::warn!(metric = %line.name, missing = %name,
                        "a handler metric without a declared dimension");
                    return;
                }
            }
        }
        values.push(line.hostname.as_str());
        match (&family.collector, kind) {
            (ModelCollector::Counter(c), MetricKind::Counter) if line.value >= 0.0 => {
                c.with_label_values(&values).inc_by(line.value)
            }
            (ModelCollector::Gauge(g), MetricKind::Gauge) => {
                g.with_label_values(&values).set(line.value)
            }
            (ModelCollector::Histogram(h), MetricKind::Histogram) => {
                h.with_label_values(&values).observe(line.value)
            }
            _ => tracing::warn!(metric = %line.name, kind = %line.kind, value = line.value,
                "a handler metric update that does not fit its declaration"),
        }
    }

    /// Counts one response by its status class, on any port.
    pub fn count_response(&self, status: u16) {
        let i = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.requests[i].inc();
    }

    /// The Prometheus text exposition in TorchServe's form, optionally only the families
    /// named in `names`. The GPU gauge holds what [`Metrics::refresh_gpu_memory`] last read.
    pub fn render(&self, names: &[String]) -> String {
        let families = self.registry.gather();
        let gpu = self.gpu_enabled.load(Ordering::Acquire);
        let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
        let mut out = String::new();
        let declared = self.declared.read().unwrap_or_else(|e| e.into_inner());
        for d in declared.iter() {
            if !wanted(&d.name) || (d.name == "ts_gpu_memory_used_bytes" && !gpu) {
                continue;
            }
            let family = families.iter().find(|f| f.name() == d.name);
            write_family(&mut out, d, family);
        }
        out
    }
}

/// Reads GPU memory in use from `nvidia-smi` into `gauge`. Blocking: it runs a process.
fn query_gpu_memory(gauge: &GaugeVec) {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            for (id, bytes) in parse_nvidia_smi_memory(&String::from_utf8_lossy(&out.stdout)) {
                gauge.with_label_values(&[id.as_str()]).set(bytes);
            }
        }
        _ => tracing::debug!("nvidia-smi unavailable; ts_gpu_memory_used_bytes not refreshed"),
    }
}

/// `nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits` lines
/// (`0, 1234` in MiB) → (device id, bytes).
fn parse_nvidia_smi_memory(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let (id, mib) = line.split_once(',')?;
            let mib: f64 = mib.trim().parse().ok()?;
            Some((id.trim().to_string(), mib * 1024.0 * 1024.0))
        })
        .collect()
}

/// A collector's families as declared; `order` gives the label order when the declaration's
/// own (constant labels sorted by name) is not TorchServe's.
fn declare(c: &dyn Collector, kind: MetricType, order: &[&str]) -> Vec<Declared> {
    c.desc()
        .into_iter()
        .map(|d| Declared {
            name: d.fq_name.clone(),
            help: d.help.clone(),
            kind,
            labels: if order.is_empty() {
                d.const_label_pairs
                    .iter()
                    .map(|l| l.name().to_string())
                    .chain(d.variable_labels.iter().cloned())
                    .collect()
            } else {
                order.iter().map(|s| s.to_string()).collect()
            },
        })
        .collect()
}

/// One family as TorchServe's Prometheus client writes it: HELP and TYPE, then each sample
/// with its labels in declared order and a comma after the last, values as Java doubles.
fn write_family(out: &mut String, d: &Declared, family: Option<&MetricFamily>) {
    use std::fmt::Write;
    let kind = match d.kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
    };
    let _ = writeln!(out, "# HELP {} {}", d.name, escape_help(&d.help));
    let _ = writeln!(out, "# TYPE {} {kind}", d.name);
    let Some(family) = family else { return };
    for metric in family.get_metric() {
        let pairs = metric.get_label();
        let mut labels: Vec<(&str, &str)> = d
            .labels
            .iter()
            .filter_map(|n| {
                pairs
                    .iter()
                    .find(|p| p.name() == n)
                    .map(|p| (p.name(), p.value()))
            })
            .collect();
        // Labels the declaration does not name (none today) go last, as given.
        for p in pairs {
            if !d.labels.iter().any(|n| n == p.name()) {
                labels.push((p.name(), p.value()));
            }
        }
        match d.kind {
            MetricType::HISTOGRAM => {
                let h = metric.get_histogram();
                for b in h.get_bucket() {
                    let le = go_double(b.upper_bound());
                    sample(
                        out,
                        &format!("{}_bucket", d.name),
                        &labels,
                        Some(("le", &le)),
                        b.cumulative_count() as f64,
                    );
                }
                let count = h.get_sample_count() as f64;
                sample(
                    out,
                    &format!("{}_bucket", d.name),
                    &labels,
                    Some(("le", "+Inf")),
                    count,
                );
                sample(out, &format!("{}_count", d.name), &labels, None, count);
                sample(
                    out,
                    &format!("{}_sum", d.name),
                    &labels,
                    None,
                    h.get_sample_sum(),
                );
            }
            MetricType::GAUGE => {
                sample(out, &d.name, &labels, None, metric.get_gauge().get_value())
            }
            _ => sample(
                out,
                &d.name,
                &labels,
                None,
                metric.get_counter().get_value(),
            ),
        }
    }
}

fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        for (k, v) in labels.iter().copied().chain(extra) {
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&escape_label(v));
            out.push_str("\",");
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&go_double(value));
    out.push('\n');
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

/// A value as TorchServe's Prometheus client prints it: `+Inf`, `-Inf`, `NaN`, else Java's
/// `Double.toString` (`76.0`, `0.25`, `1.0E7`, `1.5E-4`).
pub fn go_double(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let a = x.abs();
    if a == 0.0 || (1e-3..1e7).contains(&a) {
        let mut t = format!("{x}");
        if !t.contains('.') {
            t.push_str(".0");
        }
        return t;
    }
    let t = format!("{x:e}");
    let (mantissa, exponent) = t.split_once('e').unwrap_or((&t, "0"));
    let mantissa = if mantissa.contains('.') {
        mantissa.to_string()
    } else {
        format!("{mantissa}.0")
    };
    format!("{mantissa}E{exponent}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nvidia_smi_lines() {
        let got = parse_nvidia_smi_memory("0, 1024\n1, 3\nbad line\n");
        assert_eq!(
            got,
            vec![
                ("0".into(), 1024.0 * 1048576.0),
                ("1".into(), 3.0 * 1048576.0)
            ]
        );
    }

    #[test]
    fn request_counters_by_class() {
        let m = Metrics::new().unwrap();
        for s in [200, 201, 404, 400, 500, 503, 507] {
            m.count_response(s);
        }
        let text = m.render(&[]);
        // TorchServe's form, which its own test suite matches with a regular expression.
        let line = text
            .lines()
            .find(|l| l.starts_with("Requests2XX{"))
            .unwrap();
        let host = m.hostname();
        assert_eq!(
            line,
            format!("Requests2XX{{Level=\"Host\",Hostname=\"{host}\",}} 2.0")
        );
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap()
                .to_string()
        };
        assert_eq!(value("Requests2XX"), "2.0");
        assert_eq!(value("Requests4XX"), "2.0");
        assert_eq!(value("Requests5XX"), "3.0");
        assert!(!text.contains("ts_gpu_memory_used_bytes"));
        // Families without samples still print HELP and TYPE, as TorchServe's do.
        assert!(text.contains("# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count\n# TYPE ts_inference_requests_total counter\n"), "{text}");
    }

    #[test]
    fn model_samples_keep_the_declared_label_order() {
        let m = Metrics::new().unwrap();
        let r = m.for_requests("mnist", "1.0", "default");
        r.requests_total.inc_by(3);
        r.inference_latency_ms.observe(0.3);
        let text = m.render(&[
            "ts_inference_requests_total".into(),
            "ts_inference_latency_ms".into(),
        ]);
        let host = m.hostname();
        assert!(text.contains(&format!(
            "ts_inference_requests_total{{model_name=\"mnist\",model_version=\"default\",hostname=\"{host}\",}} 3.0\n"
        )), "{text}");
        assert!(text.contains("ts_inference_latency_ms_bucket{model_name=\"mnist\",model_version=\"1.0\",le=\"0.25\",} 0.0\n"), "{text}");
        assert!(text.contains("ts_inference_latency_ms_bucket{model_name=\"mnist\",model_version=\"1.0\",le=\"0.5\",} 1.0\n"), "{text}");
        assert!(text.contains("ts_inference_latency_ms_bucket{model_name=\"mnist\",model_version=\"1.0\",le=\"+Inf\",} 1.0\n"), "{text}");
        assert!(
            text.contains(
                "ts_inference_latency_ms_count{model_name=\"mnist\",model_version=\"1.0\",} 1.0\n"
            ),
            "{text}"
        );
        assert!(!text.contains("Requests2XX"));
    }

    #[test]
    fn values_print_as_java_doubles() {
        for (x, want) in [
            (76.0, "76.0"),
            (0.0, "0.0"),
            (0.25, "0.25"),
            (1234567.5, "1234567.5"),
            (1e7, "1.0E7"),
            (12345678.0, "1.2345678E7"),
            (0.00015, "1.5E-4"),
            (-2.0, "-2.0"),
            (f64::INFINITY, "+Inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(go_double(x), want, "{x}");
        }
    }
}
