//! Prometheus metrics under TorchServe's names, plus the histograms the getting-started
//! guide's PromQL asks for (`ts_inference_latency_ms_bucket`, `ts_queue_latency_ms_bucket`)
//! and torchfn's batch-size histogram.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
        };
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

    /// Counts one response by its status class, on any port.
    pub fn count_response(&self, status: u16) {
        let i = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.requests[i].inc();
    }

    /// The Prometheus text exposition, optionally only the families named in `names`. The
    /// GPU gauge holds what [`Metrics::refresh_gpu_memory`] last read.
    pub fn render(&self, names: &[String]) -> String {
        let mut families = self.registry.gather();
        if !names.is_empty() {
            families.retain(|f| names.iter().any(|n| n == f.name()));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
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
        assert!(text.contains("Requests2XX{Hostname="), "{text}");
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap()
                .to_string()
        };
        assert_eq!(value("Requests2XX"), "2");
        assert_eq!(value("Requests4XX"), "2");
        assert_eq!(value("Requests5XX"), "3");
        assert!(!text.contains("ts_gpu_memory_used_bytes"));
    }
}
