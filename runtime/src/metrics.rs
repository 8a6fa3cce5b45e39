//! Prometheus metrics under TorchServe's names, plus the histograms the getting-started
//! guide's PromQL asks for (`ts_inference_latency_ms_bucket`, `ts_queue_latency_ms_bucket`)
//! and torchfn's batch-size histogram.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    pub gpu_memory_used_bytes: GaugeVec,
}

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
            gpu_memory_used_bytes: GaugeVec::new(
                Opts::new("ts_gpu_memory_used_bytes", help("gauge", "Bytes")),
                &["device_id"],
            )?,
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
        for c in &m.requests {
            m.registry.register(Box::new(c.clone()))?;
        }
        Ok(m)
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Starts reporting `ts_gpu_memory_used_bytes` (only when a model runs on a GPU).
    pub fn enable_gpu_metrics(&self) {
        // Registering twice is harmless: the second attempt is refused and ignored.
        let _ = self
            .registry
            .register(Box::new(self.gpu_memory_used_bytes.clone()));
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

    /// The Prometheus text exposition, optionally only the families named in `names`.
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
