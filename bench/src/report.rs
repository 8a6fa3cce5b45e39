//! The results of one run: what goes to the JSON file, the targets of issues 3, 4 and 18
//! checked against them, and the table printed at the end.

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::answer::AnswerCheck;
use crate::floor::FloorResult;
use crate::litserve;
use crate::load::LoadResult;
use crate::machine::Machine;
use crate::stats::median;
use crate::torchfn::{Batching, ColdStart};
use crate::torchserve::{self, ProcessRss};

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub mode: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub concurrency: Vec<usize>,
    pub batch_size: usize,
    pub max_batch_delay_ms: u64,
    pub workers_per_model: usize,
    pub job_queue_size: usize,
    pub cold_starts: usize,
    pub client_threads: usize,
}

/// One closed-loop point against one server.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// `http-floor` (torchfn's listener and middleware, no model), `axum-floor` (bare axum),
    /// `torchfn`, `torchfn-python`, `torchserve` or `litserve`.
    pub server: String,
    /// `seed` or `wide` (for the HTTP floor: which body was sent).
    pub model: String,
    /// `off`, `on`, or `-` for the HTTP floor.
    pub batching: String,
    pub batch_size: usize,
    #[serde(flatten)]
    pub result: LoadResult,
}

impl Point {
    pub fn new(server: &str, model: &str, batching: Option<Batching>, result: LoadResult) -> Self {
        Self {
            server: server.into(),
            model: model.into(),
            batching: batching.map_or("-", batching_name).into(),
            batch_size: batching.map_or(0, |b| b.batch_size),
            result,
        }
    }
}

pub fn batching_name(b: Batching) -> &'static str {
    if b.batch_size > 1 {
        "on"
    } else {
        "off"
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Rss {
    pub model: String,
    pub batching: String,
    pub peak_rss_kib: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchCheck {
    pub model: String,
    pub requested: usize,
    /// `batchSize` in TorchServe's describe answer.
    pub described: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TorchServeResults {
    pub version: String,
    /// How the wide model is served under TorchServe.
    pub wide: String,
    pub points: Vec<Point>,
    pub batch_size_check: Vec<BatchCheck>,
    pub cold_start: Vec<torchserve::Startup>,
    pub cold_start_median_ms: Option<f64>,
    /// Peak RSS of each process under the CLI (frontend and worker), seed classifier,
    /// batching off, after its load.
    pub rss: Vec<ProcessRss>,
    pub rss_total_kib: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LitServeResults {
    pub version: String,
    /// How it is served: server file, workers, queue, batching, device.
    pub setup: String,
    /// Each server's answer to the workload's body against torchfn's, checked before its
    /// load: a server whose answer differs is not measured.
    pub answer_checks: Vec<AnswerCheck>,
    pub points: Vec<Point>,
    /// Each server's start: spawn → model loaded → `/health` 200.
    pub startup: Vec<litserve::Startup>,
    /// torch's intra-op threads in LitServe's inference worker (torch's default).
    pub torch_threads: Option<u32>,
    /// Peak RSS of each of its processes (launcher, API server, inference worker,
    /// multiprocessing helpers), seed classifier, batching off, after its load.
    pub rss: Vec<ProcessRss>,
    pub rss_total_kib: u64,
    /// Wall time of LitServe's part of the run (its install excluded), in s.
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub what: String,
    pub torchfn: f64,
    pub torchserve: f64,
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when it could not be measured in this run.
    pub pass: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdStartMedian {
    pub spawn_to_bind_ms: f64,
    pub bind_to_model_loaded_ms: f64,
    pub model_loaded_to_healthy_ms: f64,
    pub healthy_to_first_answer_ms: f64,
    pub total_ms: f64,
    /// Medians of the `model loaded` event's `*_ms` fields.
    pub model_loaded_fields: std::collections::BTreeMap<String, f64>,
    pub torchscript_load_ms: Option<f64>,
    pub first_inference_us: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub settings: Settings,
    pub torchfn_local: PathBuf,
    pub floor: Vec<FloorResult>,
    pub http_floor: Vec<Point>,
    pub torchfn: Vec<Point>,
    /// Where a request's time goes in torchfn (Server-Timing means) at concurrency 1 and 16.
    pub breakdown: Vec<crate::phases::Breakdown>,
    /// `--against`: another torchfn-local build taking turns with this one.
    pub against: Vec<crate::turns::Turns>,
    /// The throughput targets' floors taking turns with torchfn (batching on): "this" side
    /// is torchfn, the other the floor named in `other`.
    pub floor_turns: Vec<crate::turns::Turns>,
    /// The seed archive served with its own handler.py through the Python backend (no
    /// built-in mapping), batching on.
    pub python_backend: Vec<Point>,
    /// Peak RSS (VmHWM) of each torchfn-local after its load runs.
    pub torchfn_rss: Vec<Rss>,
    pub cold_start: Vec<ColdStart>,
    pub cold_start_median: Option<ColdStartMedian>,
    pub torchserve: Option<TorchServeResults>,
    pub torchserve_skipped: Option<String>,
    pub litserve: Option<LitServeResults>,
    pub litserve_skipped: Option<String>,
    /// The model function's cold start from S3 and the large-archive fetch.
    pub functions: Option<crate::functions::FunctionsResults>,
    pub functions_skipped: Option<String>,
    /// Cold start of the real-size models (issue 18).
    pub large: Option<crate::large::LargeResults>,
    pub large_skipped: Option<String>,
    /// `--only-large`: nothing else was run.
    pub only_large: bool,
    /// Share of all CPUs busy during half a second after the run (every server stopped).
    pub cpu_busy_after_pct: Option<f64>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<TargetCheck>,
}

pub fn find<'a>(
    points: &'a [Point],
    model: &str,
    batching: &str,
    c: usize,
) -> Option<&'a LoadResult> {
    points
        .iter()
        .find(|p| p.model == model && p.batching == batching && p.result.concurrency == c)
        .map(|p| &p.result)
}

impl Results {
    pub fn new(machine: Machine, settings: Settings, torchfn_local: PathBuf) -> Self {
        Self {
            machine,
            settings,
            torchfn_local,
            floor: Vec::new(),
            http_floor: Vec::new(),
            torchfn: Vec::new(),
            breakdown: Vec::new(),
            against: Vec::new(),
            floor_turns: Vec::new(),
            python_backend: Vec::new(),
            torchfn_rss: Vec::new(),
            cold_start: Vec::new(),
            cold_start_median: None,
            torchserve: None,
            torchserve_skipped: None,
            litserve: None,
            litserve_skipped: None,
            functions: None,
            functions_skipped: None,
            large: None,
            large_skipped: None,
            only_large: false,
            cpu_busy_after_pct: None,
            ratios: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// The wide model's c64 batching-on point and the batch size it ran (the mean, rounded).
    pub fn wide_c64(&self) -> Option<(&LoadResult, usize)> {
        let t = find(&self.torchfn, "wide", "on", 64)?;
        Some((t, t.mean_batch_size?.round().max(1.0) as usize))
    }

    /// The wide model's c64 batching-on point, the batch size it ran (the mean, rounded) and
    /// the libtorch floor's instances per second at that batch size.
    pub fn wide_vs_floor(&self) -> Option<(&LoadResult, usize, f64)> {
        let (t, batch) = self.wide_c64()?;
        let f = self
            .floor
            .iter()
            .find(|f| f.model == "wide" && f.batch == batch && f.precision == "fp32")?;
        Some((t, batch, batch as f64 / f.median_us * 1e6))
    }

    /// A throughput target judged on torchfn's share of its floor: the median of the rounds
    /// taking turns when they ran (`apart`, the share measured one after the other, shown
    /// beside it), else `apart_share`.
    fn judged(
        &self,
        target: String,
        model: &str,
        c: usize,
        apart_share: f64,
        apart: String,
        at_least: f64,
    ) -> TargetCheck {
        let turns = self
            .floor_turns
            .iter()
            .find(|t| t.model == model && t.concurrency == c)
            .and_then(|t| Some((t.rounds.len(), t.share_summary()?)));
        match turns {
            Some((n, (median, lo, hi))) => TargetCheck {
                target,
                measured: format!(
                    "{:.0}% taking turns (median of {n} rounds, {:.0}–{:.0}%); one after the \
                     other {apart}",
                    median * 100.0,
                    lo * 100.0,
                    hi * 100.0
                ),
                pass: Some(median >= at_least),
            },
            None => TargetCheck {
                target,
                measured: apart,
                pass: Some(apart_share >= at_least),
            },
        }
    }

    /// The like-for-like HTTP floor (torchfn's own listener and middleware, no model) with
    /// the seed's body at concurrency `c`.
    fn seed_http_floor(&self, c: usize) -> Option<&LoadResult> {
        self.http_floor
            .iter()
            .find(|p| p.server == "http-floor" && p.model == "seed" && p.result.concurrency == c)
            .map(|p| &p.result)
    }

    fn seed_rss_kib(&self) -> Option<u64> {
        self.torchfn_rss
            .iter()
            .find(|r| r.model == "seed" && r.batching == "off")
            .and_then(|r| r.peak_rss_kib)
    }

    /// Medians, ratios against TorchServe and the targets.
    pub fn finish(&mut self) {
        let runs = &self.cold_start;
        if !runs.is_empty() {
            let m = |f: fn(&ColdStart) -> f64| median(runs.iter().map(f).collect()).unwrap_or(0.0);
            let mut keys: Vec<String> = runs
                .iter()
                .flat_map(|r| r.model_loaded_fields.keys().cloned())
                .collect();
            keys.sort();
            keys.dedup();
            let fields = keys
                .into_iter()
                .filter_map(|k| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.model_loaded_fields.get(&k).copied())
                        .collect();
                    median(v).map(|v| (k, v))
                })
                .collect();
            self.cold_start_median = Some(ColdStartMedian {
                spawn_to_bind_ms: m(|r| r.spawn_to_bind_ms),
                bind_to_model_loaded_ms: m(|r| r.bind_to_model_loaded_ms),
                model_loaded_to_healthy_ms: m(|r| r.model_loaded_to_healthy_ms),
                healthy_to_first_answer_ms: m(|r| r.healthy_to_first_answer_ms),
                total_ms: m(|r| r.total_ms),
                model_loaded_fields: fields,
                torchscript_load_ms: median(
                    runs.iter().filter_map(|r| r.torchscript_load_ms).collect(),
                ),
                first_inference_us: median(
                    runs.iter().filter_map(|r| r.first_inference_us).collect(),
                ),
            });
        }
        if let Some(ts) = &mut self.torchserve {
            ts.cold_start_median_ms =
                median(ts.cold_start.iter().map(|s| s.first_answer_ms).collect());
            ts.rss_total_kib = ts.rss.iter().map(|p| p.peak_rss_kib).sum();
        }
        if let Some(ls) = &mut self.litserve {
            ls.rss_total_kib = ls.rss.iter().map(|p| p.peak_rss_kib).sum();
        }
        self.ratios = self.compute_ratios();
        self.targets = self.check_targets();
    }

    fn compute_ratios(&self) -> Vec<Ratio> {
        let Some(ts) = &self.torchserve else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in &self.torchfn {
            let Some(t) = find(&ts.points, &p.model, &p.batching, p.result.concurrency) else {
                continue;
            };
            let name = format!(
                "{} batching {} c{}",
                p.model, p.batching, p.result.concurrency
            );
            out.push(Ratio {
                what: format!("{name} throughput (req/s)"),
                torchfn: p.result.throughput_rps,
                torchserve: t.throughput_rps,
                ratio: p.result.throughput_rps / t.throughput_rps,
            });
            out.push(Ratio {
                what: format!("{name} p50 (µs)"),
                torchfn: p.result.p50_us,
                torchserve: t.p50_us,
                ratio: p.result.p50_us / t.p50_us,
            });
        }
        if let (Some(c), Some(t)) = (&self.cold_start_median, ts.cold_start_median_ms) {
            out.push(Ratio {
                what: "cold start (ms)".into(),
                torchfn: c.total_ms,
                torchserve: t,
                ratio: c.total_ms / t,
            });
        }
        if let Some(r) = self.seed_rss_kib() {
            out.push(Ratio {
                what: "peak RSS, seed classifier (KiB)".into(),
                torchfn: r as f64,
                torchserve: ts.rss_total_kib as f64,
                ratio: r as f64 / ts.rss_total_kib as f64,
            });
        }
        out
    }

    /// The peers' seed results at one point, by name, and why a peer has none.
    fn peer_points(
        &self,
        batching: &str,
        c: usize,
    ) -> (Vec<(&'static str, &LoadResult)>, Vec<String>) {
        let mut found = Vec::new();
        let mut absent = Vec::new();
        // A LitServe server whose answer differed from torchfn's was not measured.
        let differs = self.litserve.as_ref().and_then(|l| {
            l.answer_checks
                .iter()
                .find(|a| a.model == "seed" && a.batching == batching && !a.same)
        });
        for (name, points, skipped) in [
            (
                "TorchServe",
                self.torchserve.as_ref().map(|t| &t.points),
                &self.torchserve_skipped,
            ),
            (
                "LitServe",
                self.litserve.as_ref().map(|l| &l.points),
                &self.litserve_skipped,
            ),
        ] {
            match (points.and_then(|p| find(p, "seed", batching, c)), skipped) {
                (Some(r), _) if r.requests > 0 => found.push((name, r)),
                (_, Some(why)) => absent.push(format!("{name} not run: {why}")),
                _ => match differs.filter(|_| name == "LitServe") {
                    Some(a) => absent.push(format!("{name} not measured, its answer {}", a.detail)),
                    None => absent.push(format!("{name} not measured at this point")),
                },
            }
        }
        (found, absent)
    }

    /// Issue 18's targets: torchfn against the better of TorchServe and LitServe.
    fn check_peer_targets(&self, out: &mut Vec<TargetCheck>) {
        out.push(self.peer_target(
            "seed batching on c16: torchfn ≥ 30× the better peer's throughput",
            "on",
            16,
            PeerFigure::Throughput,
            30.0,
        ));
        out.push(self.peer_target(
            "seed c1 batching off: torchfn p50 ≥ 15× lower than the better peer's",
            "off",
            1,
            PeerFigure::P50,
            15.0,
        ));
    }

    /// One target against the better peer at one point of the seed model: torchfn's figure
    /// over the best peer's (throughput) or the peer's over torchfn's (p50), at least `times`.
    fn peer_target(
        &self,
        name: &str,
        batching: &str,
        c: usize,
        figure: PeerFigure,
        times: f64,
    ) -> TargetCheck {
        let name = name.to_string();
        let (peers, absent) = self.peer_points(batching, c);
        let note = if absent.is_empty() {
            String::new()
        } else {
            format!("; {}", absent.join("; "))
        };
        let best = match figure {
            PeerFigure::Throughput => peers
                .iter()
                .max_by(|a, b| a.1.throughput_rps.total_cmp(&b.1.throughput_rps)),
            PeerFigure::P50 => peers
                .iter()
                .min_by(|a, b| a.1.p50_us.total_cmp(&b.1.p50_us)),
        };
        match (find(&self.torchfn, "seed", batching, c), best) {
            (Some(t), Some((peer, p))) => {
                let (r, measured) = match figure {
                    PeerFigure::Throughput => {
                        let r = t.throughput_rps / p.throughput_rps;
                        let m = format!(
                            "{r:.1}× ({:.0} vs {:.0} req/s, better peer {peer}{note})",
                            t.throughput_rps, p.throughput_rps
                        );
                        (r, m)
                    }
                    PeerFigure::P50 => {
                        let r = p.p50_us / t.p50_us;
                        let m = format!(
                            "{r:.1}× lower ({:.0} vs {:.0} µs, better peer {peer}{note})",
                            t.p50_us, p.p50_us
                        );
                        (r, m)
                    }
                };
                TargetCheck {
                    target: name,
                    measured,
                    pass: Some(r >= times),
                }
            }
            (_, None) => TargetCheck {
                target: name,
                measured: format!("not checked: no peer measured ({})", absent.join("; ")),
                pass: None,
            },
            _ => missing(name),
        }
    }

    fn check_targets(&self) -> Vec<TargetCheck> {
        if self.only_large {
            return self.large_targets();
        }
        let mut out = self.small_targets();
        out.extend(self.large_targets());
        out
    }

    /// Issue 18's targets 5 and 6, per real-size model.
    fn large_targets(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let Some(large) = &self.large else {
            return out;
        };
        for m in &large.models {
            for s in m.series.iter().filter(|s| s.targeted) {
                let name = format!(
                    "{} ({:.0} MB) {}: first answer ≤ {}× floor",
                    m.model,
                    m.archive_bytes as f64 / 1e6,
                    s.server,
                    crate::large::TARGET_RATIO
                );
                out.push(match (s.median_ms, s.floor_ms, s.ratio) {
                    (Some(ms), Some(floor), Some(r)) => TargetCheck {
                        target: name,
                        measured: format!("{r:.2}× ({ms:.0} vs {floor:.0} ms)"),
                        pass: Some(r <= crate::large::TARGET_RATIO),
                    },
                    _ => missing(name),
                });
            }
            // The floor process holds libtorch and the weights; a server holding the model
            // file once more while libtorch reads it (and nothing else twice) stays within
            // one model file and a serving runtime (HTTP, S3 client, download buffers: 128
            // MiB) of it. A second copy of the archive would not.
            if let Some(floor) = m.floor_peak_rss_kib {
                for s in &m.series {
                    let name = format!(
                        "{} {}: peak memory ≤ floor's + 1 model file + 128 MiB",
                        m.model, s.server
                    );
                    let peak = s
                        .runs
                        .iter()
                        .map(|r| r.peaks.peak_rss_and_memfd_kib)
                        .max()
                        .unwrap_or(0);
                    let allowed = floor + m.torchscript_bytes / 1024 + 128 * 1024;
                    out.push(TargetCheck {
                        target: name,
                        measured: format!(
                            "{:.0} MiB (RSS + memfd, worst run) vs {:.0} MiB allowed (floor {:.0})",
                            peak as f64 / 1024.0,
                            allowed as f64 / 1024.0,
                            floor as f64 / 1024.0
                        ),
                        pass: Some(peak <= allowed),
                    });
                }
            }
            for s in &m.series {
                let peak = s
                    .runs
                    .iter()
                    .map(|r| r.peaks.peak_tmp_bytes)
                    .max()
                    .unwrap_or(0);
                out.push(TargetCheck {
                    target: format!("{} {}: /tmp use ≤ Lambda's 512 MiB", m.model, s.server),
                    measured: format!("{:.0} MB at peak (worst run)", peak as f64 / 1e6),
                    pass: Some(peak <= crate::large::LAMBDA_TMP_BYTES),
                });
            }
        }
        out
    }

    fn small_targets(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let floor = |c| self.seed_http_floor(c);
        for c in [16, 64] {
            let name = format!("seed c{c} throughput ≥ 80% of the HTTP floor (batching on)");
            out.push(match (find(&self.torchfn, "seed", "on", c), floor(c)) {
                (Some(t), Some(f)) => {
                    let r = t.throughput_rps / f.throughput_rps;
                    let apart = format!(
                        "{:.0}% ({:.0} of {:.0} req/s)",
                        r * 100.0,
                        t.throughput_rps,
                        f.throughput_rps
                    );
                    self.judged(name, "seed", c, r, apart, 0.8)
                }
                _ => missing(name),
            });
        }
        for batching in ["off", "on"] {
            let name = format!("seed c1 p50 ≤ HTTP-floor p50 + 50 µs (batching {batching})");
            out.push(match (find(&self.torchfn, "seed", batching, 1), floor(1)) {
                (Some(t), Some(f)) => {
                    let d = t.p50_us - f.p50_us;
                    TargetCheck {
                        target: name,
                        measured: format!("{d:+.0} µs ({:.0} vs {:.0} µs)", t.p50_us, f.p50_us),
                        pass: Some(d <= 50.0),
                    }
                }
                _ => missing(name),
            });
        }
        let name = "wide c64 batching on ≥ 90% of the libtorch floor at its batch size".to_string();
        out.push(match self.wide_vs_floor() {
            Some((t, batch, floor_rps)) => {
                let r = t.throughput_rps / floor_rps;
                let apart = format!(
                    "{:.0}% ({:.0} vs {:.0} instances/s at batch {batch})",
                    r * 100.0,
                    t.throughput_rps,
                    floor_rps
                );
                self.judged(name, "wide", 64, r, apart, 0.9)
            }
            None => missing(name),
        });
        let name = "wide c16: batching on ≥ 3× off throughput, p99 no worse".to_string();
        out.push(
            match (
                find(&self.torchfn, "wide", "on", 16),
                find(&self.torchfn, "wide", "off", 16),
            ) {
                (Some(on), Some(off)) => {
                    let r = on.throughput_rps / off.throughput_rps;
                    TargetCheck {
                        target: name,
                        measured: format!(
                            "{r:.2}× ({:.0} vs {:.0} req/s); p99 {:.1} vs {:.1} ms",
                            on.throughput_rps,
                            off.throughput_rps,
                            on.p99_us / 1e3,
                            off.p99_us / 1e3
                        ),
                        pass: Some(r >= 3.0 && on.p99_us <= off.p99_us),
                    }
                }
                _ => missing(name),
            },
        );
        let name = "cold start to first answer ≤ 1 s (seed, median)".to_string();
        out.push(match &self.cold_start_median {
            Some(c) => TargetCheck {
                target: name,
                measured: format!("{:.0} ms", c.total_ms),
                pass: Some(c.total_ms <= 1000.0),
            },
            None => missing(name),
        });
        let name = "torchfn-model cold start, archive in local S3 ≤ 1 s (seed, median)".to_string();
        out.push(
            match self.functions.as_ref().and_then(|f| f.cold_start_median_ms) {
                Some(ms) => TargetCheck {
                    target: name,
                    measured: format!("{ms:.0} ms"),
                    pass: Some(ms <= 1000.0),
                },
                None => missing(name),
            },
        );
        let name = "large archive fetch + unpack ≥ 80% of one raw GET's throughput".to_string();
        out.push(
            match self.functions.as_ref().and_then(|f| {
                let s = f.target_series()?;
                Some((s.fetch_unpack_mb_s?, s.raw_get_mb_s?, s.archive_bytes))
            }) {
                Some((fetch, raw, bytes)) => TargetCheck {
                    target: name,
                    measured: format!(
                        "{:.0}% ({fetch:.0} vs {raw:.0} MB/s, {:.0} MB, s3s-fs)",
                        fetch / raw * 100.0,
                        bytes as f64 / 1e6
                    ),
                    pass: Some(fetch >= 0.8 * raw),
                },
                None => missing(name),
            },
        );
        let name = "peak RSS serving the seed ≤ 1/3 of TorchServe (frontend + worker)".to_string();
        out.push(
            match (
                self.seed_rss_kib(),
                self.torchserve.as_ref().map(|t| t.rss_total_kib),
            ) {
                (Some(r), Some(t)) if t > 0 => TargetCheck {
                    target: name,
                    measured: format!(
                        "{:.2} ({:.0} vs {:.0} MiB)",
                        r as f64 / t as f64,
                        r as f64 / 1024.0,
                        t as f64 / 1024.0
                    ),
                    pass: Some(r as f64 <= t as f64 / 3.0),
                },
                (Some(r), _) => TargetCheck {
                    target: name,
                    measured: format!("{:.0} MiB; TorchServe not run", r as f64 / 1024.0),
                    pass: None,
                },
                _ => missing(name),
            },
        );
        self.check_peer_targets(&mut out);
        out
    }
}

/// Which figure a peer target compares.
#[derive(Clone, Copy)]
enum PeerFigure {
    Throughput,
    P50,
}

fn missing(target: String) -> TargetCheck {
    TargetCheck {
        target,
        measured: "not measured".into(),
        pass: None,
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn load_row(out: &mut String, name: &str, r: &LoadResult) {
    let _ = writeln!(
        out,
        "  {name:<34} {:>4} {:>9.0} {:>9.0} {:>9.0} {:>6} {:>6} {:>8} {:>7} {:>7}",
        r.concurrency,
        r.throughput_rps,
        r.p50_us,
        r.p99_us,
        r.errors,
        opt(r.mean_batch_size, 1),
        opt(r.mean_inference_us, 0),
        opt(r.server_cpu_us_per_request, 1),
        opt(r.bench_cpu_us_per_request, 1),
    );
}

/// The table printed at the end of a run.
pub fn table(r: &Results) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let s = &r.settings;
    let _ = writeln!(
        out,
        "\ntorchfn-bench ({} run) — device: {}; machine: {} CPUs (nproc), {}, {:.0} GiB, Linux {}",
        s.mode, m.device, m.nproc, m.cpu_model, m.memory_gib, m.kernel
    );
    if !r.only_large {
        small_sections(&mut out, r);
    }
    match (&r.large, &r.large_skipped) {
        (Some(l), _) => large_section(&mut out, l),
        (None, Some(why)) => {
            let _ = writeln!(out, "\nreal-size models: not run ({why})");
        }
        (None, None) => {}
    }

    let _ = writeln!(
        out,
        "\ntargets (issues {})",
        if r.only_large { "18" } else { "3, 4 and 18" }
    );
    for t in &r.targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a",
        };
        let _ = writeln!(out, "  {verdict:<4}  {:<70} {}", t.target, t.measured);
    }
    let bounds = cpu_bounds(r);
    if !bounds.is_empty() {
        let _ = writeln!(
            out,
            "\nwhat the CPUs allow (CPU µs per answer, the server's and the load generator's, from \
             the srvCPU and bchCPU columns)"
        );
        for line in bounds {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// The floor the seed model's throughput targets take turns with.
pub const HTTP_FLOOR_TURNS: &str = "HTTP floor (torchfn stack)";

/// The floor the wide model's throughput target takes turns with.
pub fn libtorch_floor_turns(batch: usize) -> String {
    format!("libtorch floor at batch {batch}")
}

/// The throughput targets' floors taking turns with torchfn: torchfn's share of each.
fn floor_turns_table(out: &mut String, turns: &[crate::turns::Turns]) {
    let Some(first) = turns.first() else {
        return;
    };
    let _ = writeln!(
        out,
        "\nthe throughput targets' floors taking turns with torchfn (batching on; {} rounds of \
         {:.1} s each after {:.1} s warm-up; torchfn's throughput over the floor's)",
        first.schedule.rounds, first.schedule.window_s, first.schedule.warmup_s
    );
    for t in turns {
        let Some((median, lo, hi)) = t.share_summary() else {
            continue;
        };
        let (this, floor) = t.means();
        let _ = writeln!(
            out,
            "  {} c{:<3} against the {}: median {median:.3} (rounds {lo:.3}–{hi:.3}); means \
             {this:.0} torchfn, {floor:.0} floor",
            t.model, t.concurrency, t.other
        );
    }
}

/// `--against`: the other build's throughput over this one's, taking turns.
fn against_table(out: &mut String, against: &[crate::turns::Turns]) {
    let Some(first) = against.first() else {
        return;
    };
    let _ = writeln!(
        out,
        "\nagainst {} (both serving, batching on, taking turns: {} rounds of {:.1} s each after \
         {:.1} s warm-up; its throughput over this build's)",
        first.other, first.schedule.rounds, first.schedule.window_s, first.schedule.warmup_s
    );
    for t in against {
        let ratios = t.ratios();
        let (Some(median), Some(lo), Some(hi)) = (
            crate::stats::median(ratios.clone()),
            ratios.first(),
            ratios.last(),
        ) else {
            continue;
        };
        let (this, other) = t.means();
        let _ = writeln!(
            out,
            "  {} c{:<3} median {median:.3} (rounds {lo:.3}–{hi:.3}); means {this:.0} here, {other:.0} there",
            t.model, t.concurrency
        );
    }
}

/// CPU µs per answer of everything on the machine that serves one: the server process and
/// the load generator (for the in-process HTTP floor, one figure holds both).
fn cpu_per_answer(r: &LoadResult) -> Option<f64> {
    Some(r.server_cpu_us_per_request.unwrap_or(0.0) + r.bench_cpu_us_per_request?)
}

/// For the throughput targets, the ratio the measured CPU cost per answer allows: the seed
/// model against the HTTP floor if torchfn kept the CPUs as busy as the floor did, and at
/// most, with every CPU busy; the wide model against the libtorch floor with every CPU busy.
/// A target above the "at most" needs less CPU per answer, not better scheduling.
fn cpu_bounds(r: &Results) -> Vec<String> {
    let cpus = r.machine.nproc as f64;
    let mut out = Vec::new();
    for c in [16, 64] {
        let (Some(t), Some(f)) = (find(&r.torchfn, "seed", "on", c), r.seed_http_floor(c)) else {
            continue;
        };
        let (Some(t_cpu), Some(f_cpu), Some(server)) = (
            cpu_per_answer(t),
            cpu_per_answer(f),
            t.server_cpu_us_per_request,
        ) else {
            continue;
        };
        let floor_use = f_cpu * f.throughput_rps / 1e6;
        out.push(format!(
            "seed c{c} batching on: {t_cpu:.1} µs (torchfn {server:.1}) against the HTTP floor's \
             {f_cpu:.1} → {:.0}% of its throughput at the floor's CPU use ({floor_use:.2} of \
             {cpus:.0} CPUs), at most {:.0}% with every CPU busy (measured {:.0}%)",
            100.0 * f_cpu / t_cpu,
            100.0 * cpus * 1e6 / t_cpu / f.throughput_rps,
            100.0 * t.throughput_rps / f.throughput_rps,
        ));
    }
    if let Some((t, batch, floor_rps)) = r.wide_vs_floor() {
        if let (Some(t_cpu), Some(server)) = (cpu_per_answer(t), t.server_cpu_us_per_request) {
            let most = cpus * 1e6 / t_cpu;
            out.push(format!(
                "wide c64 batching on: {t_cpu:.0} µs (torchfn {server:.0}): with every CPU busy at \
                 most {most:.0} answers/s, {:.0}% of the libtorch floor at batch {batch} \
                 (measured {:.0}%)",
                100.0 * most / floor_rps,
                100.0 * t.throughput_rps / floor_rps,
            ));
        }
    }
    out
}

/// The tables of issues 3 and 4: floors, load points, cold start, RSS, TorchServe, functions.
fn small_sections(out: &mut String, r: &Results) {
    let m = &r.machine;
    let s = &r.settings;
    let _ = writeln!(
        *out,
        "The load generator ({} thread), the servers and their model threads share these {} CPUs. \
         CPU busy with other work: {}% before the run, {}% after.",
        s.client_threads,
        m.nproc,
        opt(m.cpu_busy_before_pct, 0),
        opt(r.cpu_busy_after_pct, 0)
    );
    let async_workers = server_async_workers();
    let _ = writeln!(
        *out,
        "Each point: {:.1} s closed loop after {:.1} s warm-up, keep-alive HTTP/1.1 on loopback. \
         Batching on = batch_size {}, max_batch_delay {} ms; off = batch_size 1. \
         1 worker per model (libtorch threads chosen at warm-up by timing a batch at 1 and \
         at {}, the fair share; torchfn's log says which), job_queue_size {}. The servers' \
         model workers poll their queue for 300 µs after a pass while their requests come \
         alone. torchfn-local serves HTTP on {} async worker(s) ({}), the HTTP floors on {} \
         (torchfn-local's runtime).",
        s.duration_s,
        s.warmup_s,
        s.batch_size,
        s.max_batch_delay_ms,
        m.torch_threads,
        s.job_queue_size,
        async_workers.0,
        async_workers.1,
        torchfn_http::serve::runtime_workers()
    );

    let _ = writeln!(
        *out,
        "\nlibtorch floor (Session::forward in-process)  first µs  median µs    p99 µs  µs/instance"
    );
    for f in &r.floor {
        let _ = writeln!(
            out,
            "  {:<42} {:>9.0} {:>9.1} {:>9.1} {:>12.1}",
            if f.precision == "fp32" {
                format!("{} batch {}", f.model, f.batch)
            } else {
                format!("{} batch {} {}", f.model, f.batch, f.precision)
            },
            f.first_forward_us,
            f.median_us,
            f.p99_us,
            f.per_instance_us
        );
    }

    let _ = writeln!(
        *out,
        "\nover HTTP                             conc     req/s    p50 µs    p99 µs errors  batch  infer µs  srvCPU  bchCPU"
    );
    for p in &r.http_floor {
        let stack = if p.server == "http-floor" {
            "torchfn stack"
        } else {
            "bare axum"
        };
        load_row(
            out,
            &format!("HTTP floor ({stack}), {} body", p.model),
            &p.result,
        );
    }
    for p in &r.torchfn {
        load_row(
            out,
            &format!("torchfn {}, batching {}", p.model, p.batching),
            &p.result,
        );
    }
    for p in &r.python_backend {
        load_row(
            out,
            &format!("torchfn {} via Python, batching {}", p.model, p.batching),
            &p.result,
        );
    }
    if let Some(ts) = &r.torchserve {
        for p in &ts.points {
            load_row(
                out,
                &format!("TorchServe {}, batching {}", p.model, p.batching),
                &p.result,
            );
        }
    }
    if let Some(ls) = &r.litserve {
        for p in &ls.points {
            load_row(
                out,
                &format!("LitServe {}, batching {}", p.model, p.batching),
                &p.result,
            );
        }
        for c in ls.answer_checks.iter().filter(|c| !c.same) {
            let _ = writeln!(
                out,
                "  LitServe {}, batching {}: NOT MEASURED, its answer {}",
                c.model, c.batching, c.detail
            );
        }
    }
    let _ = writeln!(
        *out,
        "  (batch, infer µs: means of torchfn's x-torchfn-batch-size and x-torchfn-inference-us headers; \
         srvCPU, bchCPU: CPU µs per answer over the window of the server process and of the \
         benchmark process — the load generator, and for the HTTP floors the server too)"
    );
    floor_turns_table(out, &r.floor_turns);
    against_table(out, &r.against);
    breakdown_table(out, &r.breakdown);

    if let Some(c) = &r.cold_start_median {
        let _ = writeln!(
            out,
            "\ncold start, seed classifier, local store (median of {})",
            r.cold_start.len()
        );
        let _ = writeln!(
            out,
            "  spawn → bind printed (process start, libtorch loaded)   {:>7.1} ms",
            c.spawn_to_bind_ms
        );
        let fields = c
            .model_loaded_fields
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  bind → model loaded (unpack, TorchScript, workers)      {:>7.1} ms   [log: {fields}; TorchScript load_ms {}]",
            c.bind_to_model_loaded_ms,
            opt(c.torchscript_load_ms, 1)
        );
        let _ = writeln!(
            out,
            "  model loaded → /ping Healthy                           {:>7.1} ms",
            c.model_loaded_to_healthy_ms
        );
        let _ = writeln!(
            out,
            "  Healthy → first prediction answered                    {:>7.1} ms   [first forward {} µs]",
            c.healthy_to_first_answer_ms,
            opt(c.first_inference_us, 0)
        );
        let _ = writeln!(
            out,
            "  total                                                  {:>7.1} ms   (phases are medians each)",
            c.total_ms
        );
    }

    let _ = writeln!(out, "\npeak RSS (VmHWM) after the load runs");
    for x in &r.torchfn_rss {
        let _ = writeln!(
            out,
            "  torchfn-local, {} batching {}{:>23} MiB",
            x.model,
            x.batching,
            opt(x.peak_rss_kib.map(|k| k as f64 / 1024.0), 1)
        );
    }

    match (&r.torchserve, &r.torchserve_skipped) {
        (Some(ts), _) => {
            let parts = ts
                .rss
                .iter()
                .map(|p| format!("{} {:.1}", p.command, p.peak_rss_kib as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" + ");
            let _ = writeln!(
                out,
                "  TorchServe {}, seed batching off: {} = {:.1} MiB",
                ts.version,
                parts,
                ts.rss_total_kib as f64 / 1024.0
            );
            let _ = writeln!(out, "\nTorchServe {}", ts.version);
            let _ = writeln!(out, "  wide model: {}", ts.wide);
            for c in &ts.batch_size_check {
                let _ = writeln!(
                    out,
                    "  {} batchSize requested {}, describe reports {}",
                    c.model,
                    c.requested,
                    c.described.map_or("-".into(), |v| v.to_string())
                );
            }
            let phases = ts
                .cold_start
                .iter()
                .map(|s| {
                    format!(
                        "bind {} ms, worker loaded {} ms, answer {:.0} ms",
                        opt(s.bind_ms, 0),
                        opt(s.worker_loaded_ms, 0),
                        s.first_answer_ms
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            let _ = writeln!(
                out,
                "  cold start to first answer: median {} ms ({phases})",
                opt(ts.cold_start_median_ms, 0)
            );
            let _ = writeln!(
                out,
                "\ntorchfn / TorchServe                                     torchfn  TorchServe     ratio"
            );
            for x in &r.ratios {
                let _ = writeln!(
                    out,
                    "  {:<52} {:>9.0} {:>11.0} {:>8.2}",
                    x.what, x.torchfn, x.torchserve, x.ratio
                );
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "\nTorchServe: not run ({why})");
        }
        (None, None) => {}
    }

    match (&r.litserve, &r.litserve_skipped) {
        (Some(ls), _) => litserve_section(out, ls),
        (None, Some(why)) => {
            let _ = writeln!(out, "\nLitServe: not run ({why})");
        }
        (None, None) => {}
    }

    match (&r.functions, &r.functions_skipped) {
        (Some(f), _) => {
            let _ = writeln!(out, "\nfunctions, with a local S3 server (moto_server)");
            let runs = f
                .cold_start
                .iter()
                .map(|c| format!("ready {:.0} ms, answer {:.0} ms", c.ready_ms, c.total_ms))
                .collect::<Vec<_>>()
                .join("; ");
            let _ = writeln!(
                out,
                "  torchfn-model cold start (registry → archive → model → first answer): median {} ms ({runs})",
                opt(f.cold_start_median_ms, 0)
            );
            for series in &f.fetch {
                let _ = writeln!(
                    out,
                    "  {:.0} MB archive from {}: one GET {} MB/s, ranged GETs + SHA-256 + unpack {} MB/s (medians)",
                    series.archive_bytes as f64 / 1e6,
                    series.server,
                    opt(series.raw_get_mb_s, 0),
                    opt(series.fetch_unpack_mb_s, 0),
                );
                for x in &series.runs {
                    let _ = writeln!(
                        out,
                        "    one GET {:.0} ms; ranged GETs + SHA-256 {:.0} ms; with the unpack overlapped {:.0} ms",
                        x.raw_get_ms, x.download_ms, x.fetch_unpack_ms
                    );
                }
            }
            let _ = writeln!(
                out,
                "  (moto_server reads the whole object for each ranged GET, so ranged downloads \
                 lose to one GET there; s3s-fs seeks, as S3 does, and is the target's server)"
            );
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "\nfunctions: not run ({why})");
        }
        (None, None) => {}
    }
}

/// Issue 18: cold start of the real-size models, phases, floors, memory and /tmp.
fn large_section(out: &mut String, l: &crate::large::LargeResults) {
    let _ = writeln!(
        out,
        "\nreal-size models, cold start to the first correct answer (medians of {} runs; S3 server: {})",
        l.runs, l.s3_server
    );
    for m in &l.models {
        let _ = writeln!(
            out,
            "\n  {}: archive {:.1} MB, TorchScript file {:.1} MB",
            m.model,
            m.archive_bytes as f64 / 1e6,
            m.torchscript_bytes as f64 / 1e6
        );
        let fp = |f: fn(&crate::large::FloorProcess) -> Option<f64>| {
            median(m.floor_process.iter().filter_map(f).collect())
        };
        let _ = writeln!(
            out,
            "    floor process (fresh process: libtorch loads the file, one forward): {} ms \
             [load {} ms, forward {} ms, peak RSS {} MiB]",
            opt(m.floor_process_median_ms, 0),
            opt(fp(|f| f.load_ms), 0),
            opt(fp(|f| f.forward_ms), 0),
            opt(m.floor_peak_rss_kib.map(|k| k as f64 / 1024.0), 0)
        );
        for s in &m.series {
            let p = crate::large::phase_medians(&s.runs);
            let g = |k: &str| opt(p.get(k).copied(), 0);
            let _ = writeln!(out, "    {}", s.server);
            let _ = writeln!(
                out,
                "      phases after spawn (ms): first log {}, download done {} (download {}), model file ready {}, \
                 TorchScript loaded {} (load {}), model loaded {}, ready {}, first answer {} (forward {})",
                g("first_log_ms"),
                g("fetched_ms"),
                g("download_ms"),
                g("model_file_ms"),
                g("torchscript_ms"),
                g("torchscript_load_ms"),
                g("model_loaded_ms"),
                g("ready_ms"),
                g("answer_ms"),
                g("first_forward_ms"),
            );
            let head = format!(
                "      first answer {} ms; floor {} ms = {} {} ms + floor process {} ms; ratio {}",
                opt(s.median_ms, 0),
                opt(s.floor_ms, 0),
                s.fetch_floor,
                opt(s.fetch_floor_ms, 0),
                opt(m.floor_process_median_ms, 0),
                opt(s.ratio, 2),
            );
            // The note starts with a space: tests/docs.rs reads the strings with ≤ that do not
            // as the targets' names.
            let note = if s.targeted {
                format!(" (target ≤ {})", crate::large::TARGET_RATIO)
            } else {
                " (no target: the floor reads the model file uncompressed; the server first \
                 inflates it out of the deflated archive)"
                    .to_string()
            };
            let _ = writeln!(out, "{head}{note}");
            let _ = writeln!(
                out,
                "      memory: peak RSS {} MiB, peak RSS + memfd {} MiB (memfd peak {} MB); /tmp: peak {} MB, after the load {} MB",
                g("peak_rss_mib"),
                g("peak_rss_and_memfd_mib"),
                opt(
                    median(s.runs.iter().map(|r| r.peaks.peak_memfd_bytes as f64 / 1e6).collect()),
                    0
                ),
                g("peak_tmp_mb"),
                g("tmp_after_mb"),
            );
            let runs = s
                .runs
                .iter()
                .map(|r| format!("{:.0}", r.answer_ms))
                .collect::<Vec<_>>()
                .join(", ");
            let checks = s.runs.first().map_or(String::new(), |r| r.check.clone());
            let _ = writeln!(out, "      runs: {runs} ms; answer: {checks}");
        }
    }
}

/// Where a request's time goes: torchfn's Server-Timing phases (means, µs), its total, what the
/// client measured, and the difference (the HTTP layer's parsing and writing, loopback, client).
fn breakdown_table(out: &mut String, rows: &[crate::phases::Breakdown]) {
    let Some(first) = rows.first() else {
        return;
    };
    let _ = writeln!(
        out,
        "\nwhere a request's time goes (torchfn's Server-Timing, mean µs per request)"
    );
    let mut head = format!("  {:<22}", "");
    for (name, _) in &first.phases_us {
        let _ = write!(head, " {name:>7}");
    }
    let _ = writeln!(out, "{head}  client  outside");
    for b in rows {
        let mut line = format!(
            "  {:<22}",
            format!("{} {} c{}", b.model, b.batching, b.concurrency)
        );
        for (_, us) in &b.phases_us {
            let _ = write!(line, " {us:>7.1}");
        }
        let _ = writeln!(
            out,
            "{line} {:>7.1}  {:>7.1}",
            b.client_mean_us, b.outside_us
        );
    }
    let _ = writeln!(
        out,
        "  (route: HTTP layer → handler; wake: worker's answer → request task; encode: answer → \
         response; total: inside torchfn; outside: client mean − total = HTTP parsing and \
         writing, loopback, client; batching on/off as in the rows above)"
    );
}

/// LitServe's part of the table: how it was served, its answers against torchfn's, its
/// start-up and its memory.
fn litserve_section(out: &mut String, ls: &LitServeResults) {
    let _ = writeln!(out, "\nLitServe {}", ls.version);
    let _ = writeln!(out, "  {}", ls.setup);
    let _ = writeln!(
        out,
        "  torch intra-op threads in its inference worker: {} (torch's default)",
        ls.torch_threads.map_or("-".into(), |n| n.to_string())
    );
    for c in &ls.answer_checks {
        let _ = writeln!(
            out,
            "  {} batching {}: answer {}",
            c.model, c.batching, c.detail
        );
    }
    let starts = ls
        .startup
        .iter()
        .map(|s| {
            format!(
                "{} {} {:.0} ms (model loaded {} ms)",
                s.model,
                s.batching,
                s.ready_ms,
                opt(s.model_loaded_ms, 0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(out, "  spawn → /health 200: {starts}");
    if !ls.rss.is_empty() {
        let parts = ls
            .rss
            .iter()
            .map(|p| format!("{} {:.1}", p.command, p.peak_rss_kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" + ");
        let _ = writeln!(
            out,
            "  peak RSS (VmHWM), seed batching off: {parts} = {:.1} MiB (pages the forked API server shares are counted twice)",
            ls.rss_total_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        out,
        "  LitServe's part of this run took {:.0} s",
        ls.elapsed_s
    );
}

/// The async workers of the `torchfn-local` servers under test, and why: `TOKIO_WORKER_THREADS`
/// when `TORCHFN_BENCH_SERVER_ENV` sets it, else the runtime's own choice.
fn server_async_workers() -> (usize, &'static str) {
    crate::torchfn::server_env()
        .into_iter()
        .find_map(|(k, v)| (k == "TOKIO_WORKER_THREADS").then(|| v.parse().ok())?)
        .map(|n| (n, "TOKIO_WORKER_THREADS"))
        .unwrap_or_else(|| {
            (
                torchfn_http::serve::async_workers(),
                "one per core less one",
            )
        })
}
