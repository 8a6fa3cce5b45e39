//! `torchfn-bench`: how fast torchfn serves, measured in one run on one machine, next to
//! its floors and to its peers, TorchServe and LitServe.
//!
//! Run (builds everything, then runs the full benchmark, about 3 minutes):
//!     scripts/bench
//! or, with `target/release/torchfn-local` built:
//!     cargo run --release -p torchfn-bench -- [--quick] [--no-torchserve] [--no-litserve]
//! It prints progress on stderr, then a table on stdout: the libtorch floor, the HTTP floor,
//! torchfn over HTTP at concurrency 1/16/64 with batching off and on for two models, cold
//! start phases, peak RSS, TorchServe on the same archives and load, LitServe on the same
//! TorchScript files and load, the cold start of two real-size models (module `large`), and
//! each target of issues 3, 4 and 18 with PASS or MISS. The same figures go to
//! `target/bench/results.json`. `--only-large` runs the real-size models alone.

mod answer;
mod floor;
mod functions;
mod http_floor;
mod large;
mod litserve;
mod load;
mod machine;
mod phases;
mod pip;
mod process;
mod report;
mod stats;
mod torchfn;
mod torchserve;
mod turns;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use torchfn_archive::settings::{DevicePreference, Precision};

use crate::litserve::LitServe;
use crate::load::{Load, Target};
use crate::report::{Point, Results, Settings};
use crate::torchfn::{Batching, Torchfn};
use crate::torchserve::TorchServe;
use crate::workload::Workload;

/// Every flag can also be set in the environment (TORCHFN_BENCH_*).
#[derive(Parser, Debug)]
#[command(
    name = "torchfn-bench",
    about = "torchfn's benchmark: floors, torchfn end to end, cold start, RSS, TorchServe and LitServe"
)]
struct Args {
    /// A short run for tests and CI: 0.3 s per point, concurrency 1 and 16, one cold
    /// start, no TorchServe, no LitServe (unless --litserve). Its figures are for checking
    /// the machinery, not for reading.
    #[arg(long, env = "TORCHFN_BENCH_QUICK")]
    quick: bool,

    /// Measuring window of each load point, in ms (default 3000; 300 with --quick).
    #[arg(long, env = "TORCHFN_BENCH_DURATION_MS")]
    duration_ms: Option<u64>,

    /// Warm-up before each window, in ms; its answers are not counted (default 1000; 100
    /// with --quick).
    #[arg(long, env = "TORCHFN_BENCH_WARMUP_MS")]
    warmup_ms: Option<u64>,

    /// Closed-loop concurrencies (default 1,16,64; 1,16 with --quick).
    #[arg(long, value_delimiter = ',', env = "TORCHFN_BENCH_CONCURRENCY")]
    concurrency: Vec<usize>,

    /// `batch_size` of the batching-on runs (batching off is batch_size=1).
    #[arg(long, default_value_t = 32, env = "TORCHFN_BENCH_BATCH_SIZE")]
    batch_size: usize,

    /// `max_batch_delay` of the batching-on runs, in ms (TorchServe gets the same).
    #[arg(long, default_value_t = 5, env = "TORCHFN_BENCH_MAX_BATCH_DELAY_MS")]
    max_batch_delay_ms: u64,

    /// Models to run: seed (the getting-started classifier), wide (the 256 → 4096 → 4096 →
    /// 10 MLP). Cold start and RSS are measured on seed.
    #[arg(long, value_delimiter = ',', default_values = ["seed", "wide"], env = "TORCHFN_BENCH_MODELS")]
    models: Vec<String>,

    /// Cold starts to time (the median is reported; default 5; 1 with --quick).
    #[arg(long, env = "TORCHFN_BENCH_COLD_STARTS")]
    cold_starts: Option<usize>,

    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 1, env = "TORCHFN_BENCH_CLIENT_THREADS")]
    client_threads: usize,

    /// Run TorchServe, installing torchserve==0.12.0 into the venv with pip if missing.
    /// The default when Java is on PATH and not --quick.
    #[arg(long, conflicts_with = "no_torchserve")]
    torchserve: bool,

    /// Do not run TorchServe.
    #[arg(long, env = "TORCHFN_BENCH_NO_TORCHSERVE")]
    no_torchserve: bool,

    /// Run LitServe, installing litserve==0.2.19 into the venv with pip if missing (the
    /// default when not --quick). Where it cannot be installed or started, it is reported
    /// as skipped with the reason and the run goes on.
    #[arg(long, conflicts_with = "no_litserve")]
    litserve: bool,

    /// Do not run LitServe.
    #[arg(long, env = "TORCHFN_BENCH_NO_LITSERVE")]
    no_litserve: bool,

    /// The torchfn-local binary (default: beside this one, e.g. target/release/).
    #[arg(long, env = "TORCHFN_BENCH_TORCHFN_LOCAL")]
    torchfn_local: Option<PathBuf>,

    /// Another torchfn-local build to compare this one with: for each model with batching
    /// on, both serve at once and take turns in short windows (12 rounds of 0.5 s at each
    /// concurrency; 3 of 0.2 s with --quick), and the other's throughput over this one's is
    /// printed, median and range.
    /// For changes worth a few percent, which the machine's drift between points hides.
    #[arg(long, env = "TORCHFN_BENCH_AGAINST")]
    against: Option<PathBuf>,

    /// Skip the throughput targets' floors taking turns with torchfn (the targets are then
    /// judged on the points measured one after the other).
    #[arg(long, env = "TORCHFN_BENCH_NO_FLOOR_TURNS")]
    no_floor_turns: bool,

    /// The torchfn-model binary for the functions' figures (default: beside this one).
    #[arg(long, env = "TORCHFN_BENCH_TORCHFN_MODEL")]
    torchfn_model: Option<PathBuf>,

    /// Size of the archive fetched from the local S3 server, in MB (default 200; 20 with
    /// --quick).
    #[arg(long, env = "TORCHFN_BENCH_LARGE_ARCHIVE_MB")]
    large_archive_mb: Option<usize>,

    /// Skip the functions' figures (S3 cold start, archive fetch).
    #[arg(long, env = "TORCHFN_BENCH_NO_FUNCTIONS")]
    no_functions: bool,

    /// The real-size models whose cold start is measured (issue 18): resnet18 (~47 MB),
    /// encoder (~438 MB). Default both; none with --quick unless named here.
    #[arg(long, value_delimiter = ',', env = "TORCHFN_BENCH_LARGE_MODELS")]
    large_models: Vec<String>,

    /// Cold starts of each real-size model per server (default 3; 1 with --quick).
    #[arg(long, env = "TORCHFN_BENCH_LARGE_RUNS")]
    large_runs: Option<usize>,

    /// Skip the real-size models.
    #[arg(long, env = "TORCHFN_BENCH_NO_LARGE", conflicts_with = "only_large")]
    no_large: bool,

    /// Run only the real-size models' cold starts (and print only their section).
    #[arg(long, env = "TORCHFN_BENCH_ONLY_LARGE")]
    only_large: bool,

    /// The project's venv (default: what scripts/setup prints).
    #[arg(long, env = "TORCHFN_BENCH_VENV")]
    venv: Option<PathBuf>,

    /// Where the models run: `cpu`, or `cuda` / `cuda:N` for a GPU (the libtorch floor, the
    /// servers and their cold starts; fp16 and bf16 floor rows are added on a GPU). On a
    /// machine without a usable GPU, `--device cuda` says "no GPU" and exits 0.
    #[arg(long, default_value = "cpu", env = "TORCHFN_BENCH_DEVICE")]
    device: String,

    /// Fixtures already made by tests/fixtures/make_fixtures.py (default: made once into
    /// <target>/bench-fixtures-<hash> with the venv's Python).
    #[arg(long, env = "TORCHFN_BENCH_FIXTURES")]
    fixtures: Option<PathBuf>,

    /// Where the JSON results go (default: <target>/bench/results.json).
    #[arg(long, env = "TORCHFN_BENCH_OUT")]
    out: Option<PathBuf>,
}

/// The repository: the first folder at or above the working directory that holds
/// `scripts/setup` (scripts/bench and the tests run the benchmark from inside the clone), else
/// the one it was built from. Not only the build-time path: `scripts/test` reuses builds made
/// in other clones of the repository.
fn repo_root() -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            cwd.ancestors()
                .find(|d| d.join("scripts/setup").exists())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
}

fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
}

// The same allocator as torchfn-local, so the in-process HTTP floor runs the same stack.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = match args.device.parse::<DevicePreference>() {
        Ok(DevicePreference::Cpu) => tch::Device::Cpu,
        Ok(DevicePreference::Cuda(i)) => {
            if !torchfn_engine::session::cuda_available() {
                println!("torchfn-bench --device {}: no GPU (no NVIDIA device that libtorch's CUDA backend can use); nothing measured", args.device);
                return Ok(());
            }
            anyhow::ensure!(
                (i as i64) < tch::Cuda::device_count(),
                "--device {}: this machine has {} CUDA device(s)",
                args.device,
                tch::Cuda::device_count()
            );
            tch::Device::Cuda(i)
        }
        _ => anyhow::bail!("--device takes cpu, cuda or cuda:N, not `{}`", args.device),
    };
    let device_arg = floor::device_name(device);
    // Every S3 client of this run talks to the local S3 server only (before any thread).
    functions::isolate_aws_environment();
    let repo = repo_root();
    let target = target_dir(&repo);
    let quick = args.quick;
    let settings = Settings {
        mode: if quick { "quick" } else { "full" }.into(),
        duration_s: args.duration_ms.unwrap_or(if quick { 300 } else { 3000 }) as f64 / 1e3,
        warmup_s: args.warmup_ms.unwrap_or(if quick { 100 } else { 1000 }) as f64 / 1e3,
        concurrency: if args.concurrency.is_empty() {
            if quick {
                vec![1, 16]
            } else {
                vec![1, 16, 64]
            }
        } else {
            args.concurrency.clone()
        },
        batch_size: args.batch_size,
        max_batch_delay_ms: args.max_batch_delay_ms,
        workers_per_model: 1,
        job_queue_size: 100,
        cold_starts: args.cold_starts.unwrap_or(if quick { 1 } else { 5 }).max(1),
        client_threads: args.client_threads.max(1),
    };
    let source = match &args.torchfn_local {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no folder")?
            .join("torchfn-local"),
    };
    anyhow::ensure!(
        source.is_file(),
        "{} not found: build it (cargo build --release -p torchfn-local) or pass --torchfn-local",
        source.display()
    );
    // The emulator under test, pinned for the whole run: a build that replaces
    // target/*/torchfn-local meanwhile must not swap the binary between points.
    let pinned = tempfile::Builder::new()
        .prefix("torchfn-local-")
        .tempdir_in({
            std::fs::create_dir_all(target.join("bench"))?;
            target.join("bench")
        })?;
    let pin = |source: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let p = pinned.path().join(name);
        if std::fs::hard_link(source, &p).is_err() {
            std::fs::copy(source, &p)
                .with_context(|| format!("could not copy {}", source.display()))?;
        }
        Ok(p)
    };
    let torchfn_local = pin(&source, "torchfn-local")?;
    // The build compared with (--against), checked and pinned now, not when its turn comes.
    let against = match &args.against {
        Some(other) => {
            anyhow::ensure!(
                other.is_file(),
                "{} (--against) not found: give the path of another torchfn-local build",
                other.display()
            );
            let dir = pinned.path().join("against");
            std::fs::create_dir_all(&dir)?;
            Some((pin(other, "against/torchfn-local")?, other.clone()))
        }
        None => None,
    };
    // The model function, pinned the same way when it is there.
    let torchfn_model = {
        let source = match &args.torchfn_model {
            Some(p) => p.clone(),
            None => source.with_file_name("torchfn-model"),
        };
        let p = pinned.path().join("torchfn-model");
        if !source.is_file() || args.no_functions {
            None
        } else if std::fs::hard_link(&source, &p).is_ok() || std::fs::copy(&source, &p).is_ok() {
            Some(p)
        } else {
            None
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench/results.json"));

    let machine = machine::describe(device);
    if let Some(busy) = machine.cpu_busy_before_pct.filter(|b| *b > 15.0) {
        eprintln!("bench: warning: the CPUs are {busy:.0}% busy before the run; other work skews every figure");
    }
    let venv = workload::venv(&repo, args.venv.clone())?;
    let fixtures = match &args.fixtures {
        Some(dir) => dir.clone(),
        None => workload::fixtures(&repo, &target, &venv)?,
    };
    anyhow::ensure!(
        settings.concurrency.iter().all(|&c| c >= 1),
        "--concurrency takes numbers of connections, each at least 1"
    );
    let mut workloads = workload::workloads(&fixtures)?;
    for m in &args.models {
        anyhow::ensure!(
            workloads.iter().any(|w| w.label == m),
            "--models takes seed and wide, not `{m}`"
        );
    }
    workloads.retain(|w| args.models.iter().any(|m| m == w.label));
    let store = fixtures.join("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .enable_all()
        .build()?;
    let load = |c: usize| Load {
        concurrency: c,
        warmup: Duration::from_secs_f64(settings.warmup_s),
        duration: Duration::from_secs_f64(settings.duration_s),
        max_requests: 4_000_000,
    };
    let off = Batching {
        batch_size: 1,
        max_batch_delay_ms: settings.max_batch_delay_ms,
    };
    let on = Batching {
        batch_size: settings.batch_size,
        max_batch_delay_ms: settings.max_batch_delay_ms,
    };
    let mut results = Results::new(machine, settings.clone(), source.clone());
    results.only_large = args.only_large;
    if args.only_large {
        run_large(
            &args,
            &mut results,
            &pinned,
            &torchfn_local,
            torchfn_model.as_deref(),
            &repo,
            &target,
            &venv,
            &rt,
        )?;
        return finish(results, &out);
    }

    // 1. The libtorch floor, in this process.
    let budget = Duration::from_millis(if quick { 100 } else { 1000 });
    // On a GPU, also the batch-size pass in each reduced precision torchfn offers.
    let precisions: &[Precision] = if device.is_cuda() {
        &[Precision::Fp16, Precision::Bf16]
    } else {
        &[]
    };
    for w in &workloads {
        let path = fixtures.join("models").join(w.torchscript);
        let runs = [(1, Precision::Fp32), (settings.batch_size, Precision::Fp32)]
            .into_iter()
            .chain(precisions.iter().map(|&p| (settings.batch_size, p)));
        for (batch, precision) in runs {
            eprintln!(
                "bench: libtorch floor, {} batch {batch} in {precision:?}",
                w.label
            );
            results.floor.push(floor::measure(
                w.label, &path, w.features, batch, budget, device, precision,
            )?);
        }
    }

    // 2. The HTTP floors: torchfn's own listener and middleware with a no-op handler (the
    // like-for-like floor the targets use), and bare axum as a second reference.
    for stack in [http_floor::Stack::Torchfn, http_floor::Stack::BareAxum] {
        let noop = http_floor::NoopServer::start(stack)?;
        for w in &workloads {
            let target = Target {
                addr: noop.addr,
                path: w.path(),
                body: w.body.clone(),
            };
            for &c in &settings.concurrency {
                eprintln!(
                    "bench: HTTP floor ({}), {} body, concurrency {c}",
                    stack.name(),
                    w.label
                );
                let r = load::run_with_cpu(&rt, &target, load(c), None);
                results
                    .http_floor
                    .push(Point::new(stack.name(), w.label, None, r));
            }
        }
    }

    // 3. torchfn end to end, one server per model and batching setting. Its answer to each
    // workload's body (batching off) is what the peers' answers are checked against.
    let mut torchfn_answers = std::collections::HashMap::new();
    for w in &workloads {
        for batching in [off, on] {
            let name = report::batching_name(batching);
            eprintln!("bench: torchfn, {} batching {name}: starting", w.label);
            let server = Torchfn::start(&torchfn_local, &store, w, batching, &device_arg, &rt)?;
            if batching.batch_size == 1 {
                match answer::fetch(server.inference, w, &rt) {
                    Ok(v) => {
                        torchfn_answers.insert(w.label, v);
                    }
                    Err(e) => eprintln!("bench: torchfn's answer to the {} body: {e:#}", w.label),
                }
            }
            let target = Target {
                addr: server.inference,
                path: w.path(),
                body: w.body.clone(),
            };
            for &c in &settings.concurrency {
                eprintln!(
                    "bench: torchfn, {} batching {name}, concurrency {c}",
                    w.label
                );
                let r = measure(&rt, &target, load(c), &server);
                results
                    .torchfn
                    .push(Point::new("torchfn", w.label, Some(batching), r));
            }
            if let (Some(other), true) = (&against, batching.batch_size > 1) {
                compare(
                    &rt,
                    &mut results,
                    other,
                    (&store, w, batching, &device_arg),
                    &target,
                    &settings.concurrency,
                    turns::Schedule::new(quick),
                );
            }
            if batching.batch_size > 1 && !args.no_floor_turns {
                floor_turns(
                    &rt,
                    &mut results,
                    w,
                    (&fixtures.join("models"), device),
                    &target,
                    &settings.concurrency,
                    turns::Schedule::floors(quick),
                );
            }
            // Where the time goes, from torchfn's Server-Timing, at concurrency 1 and 16.
            let (warm, count) = match (quick, w.label) {
                (true, _) => (50, 200),
                (false, "seed") => (500, 4000),
                (false, _) => (50, 400),
            };
            for c in [1, 16] {
                eprintln!(
                    "bench: torchfn, {} batching {name}, phases at concurrency {c}",
                    w.label
                );
                match rt.block_on(phases::breakdown(&target, w.label, name, c, warm, count)) {
                    Ok(b) => results.breakdown.push(b),
                    Err(e) => eprintln!("bench: the phase breakdown failed: {e:#}"),
                }
            }
            results.torchfn_rss.push(report::Rss {
                model: w.label.into(),
                batching: name.into(),
                peak_rss_kib: server.peak_rss_kib(),
            });
            server.stop();
        }
    }

    // 3a. The libtorch floor at the batch size the wide model actually ran at c64 with
    // batching on, when the floor above did not time that size.
    if let Some(w) = workloads.iter().find(|w| w.label == "wide") {
        let ran = report::find(&results.torchfn, "wide", "on", 64)
            .and_then(|p| p.mean_batch_size)
            .map(|b| b.round().max(1.0) as usize);
        if let Some(batch) = ran.filter(|&b| {
            !results
                .floor
                .iter()
                .any(|f| f.model == "wide" && f.batch == b && f.precision == "fp32")
        }) {
            eprintln!("bench: libtorch floor, wide batch {batch} (the size it ran at c64)");
            let path = fixtures.join("models").join(w.torchscript);
            results.floor.push(floor::measure(
                w.label,
                &path,
                w.features,
                batch,
                budget,
                device,
                Precision::Fp32,
            )?);
        }
    }

    // 3b. The seed archive through the Python backend: its own handler.py in TorchServe's
    // worker, as an archive with no built-in mapping is served (batching on).
    if let Some(seed) = workloads.iter().find(|w| w.label == "seed") {
        let python = Workload {
            torchfn_handler: None,
            ..seed.clone()
        };
        eprintln!("bench: torchfn, seed through the Python backend: starting");
        let server = Torchfn::start(&torchfn_local, &store, &python, on, &device_arg, &rt)?;
        let target = Target {
            addr: server.inference,
            path: python.path(),
            body: python.body.clone(),
        };
        for &c in &settings.concurrency {
            eprintln!("bench: torchfn, seed through the Python backend, concurrency {c}");
            let r = measure(&rt, &target, load(c), &server);
            results
                .python_backend
                .push(Point::new("torchfn-python", python.label, Some(on), r));
        }
        server.stop();
    }

    // 4. Cold start of the seed classifier from the local model store.
    if let Some(seed) = workloads.iter().find(|w| w.label == "seed") {
        for i in 0..results.settings.cold_starts {
            eprintln!("bench: torchfn cold start {}", i + 1);
            results.cold_start.push(torchfn::cold_start(
                &torchfn_local,
                &store,
                seed,
                on,
                &device_arg,
                &rt,
            )?);
        }
    }

    // 5. The functions: cold start with the archive in S3, fetch + unpack of a large one.
    match (&torchfn_model, workloads.iter().find(|w| w.label == "seed")) {
        (Some(bin), Some(seed)) => {
            let mb = args
                .large_archive_mb
                .unwrap_or(if quick { 20 } else { 200 });
            let runs = if quick { 1 } else { 3 };
            results.functions = Some(run_functions(
                bin,
                &venv,
                &target,
                &store.join(seed.mar),
                seed,
                results.settings.cold_starts,
                mb,
                runs,
                &rt,
            )?);
        }
        _ => {
            results.functions_skipped = Some(if args.no_functions {
                "--no-functions".into()
            } else if torchfn_model.is_none() {
                "no torchfn-model binary beside this one (cargo build --release -p torchfn-model)"
                    .into()
            } else {
                "the seed model is not in this run".into()
            });
        }
    }

    // 6. TorchServe on the same archives and load.
    let want_torchserve = !args.no_torchserve && (args.torchserve || !quick);
    if want_torchserve {
        match torchserve::locate(&venv, true)? {
            Ok(bin) => run_torchserve(
                &mut results,
                &bin,
                &repo,
                &fixtures,
                &venv,
                &workloads,
                [off, on],
                &rt,
                &load,
            )
            .unwrap_or_else(|e| {
                // TorchServe is the comparison, not the subject: report its failure and
                // still print torchfn's figures.
                eprintln!("bench: TorchServe failed: {e:#}");
                results.torchserve_skipped = Some(format!("it failed: {e:#}"));
            }),
            Err(why) => results.torchserve_skipped = Some(why),
        }
    } else {
        results.torchserve_skipped = Some(if quick {
            "--quick".into()
        } else {
            "--no-torchserve".into()
        });
    }

    // 7. LitServe on the same TorchScript files and load.
    let want_litserve = !args.no_litserve && (args.litserve || !quick);
    if want_litserve {
        match litserve::locate(&venv) {
            Ok(python) => {
                let launch = litserve::Launch {
                    python: &python,
                    repo: &repo,
                    fixtures: &fixtures,
                    device: &device_arg,
                };
                run_litserve(
                    &mut results,
                    &launch,
                    &workloads,
                    &torchfn_answers,
                    [off, on],
                    &rt,
                    &load,
                )
                .unwrap_or_else(|e| {
                    // Like TorchServe: the comparison, not the subject.
                    eprintln!("bench: LitServe failed: {e:#}");
                    results.litserve_skipped = Some(format!("it failed: {e:#}"));
                })
            }
            Err(why) => {
                eprintln!("bench: LitServe skipped: {why}");
                results.litserve_skipped = Some(why);
            }
        }
    } else {
        results.litserve_skipped = Some(if args.no_litserve {
            "--no-litserve".into()
        } else {
            "--quick (add --litserve to run it)".into()
        });
    }

    // 8. Cold start of the real-size models (issue 18).
    if args.no_large {
        results.large_skipped = Some("--no-large".into());
    } else {
        run_large(
            &args,
            &mut results,
            &pinned,
            &torchfn_local,
            torchfn_model.as_deref(),
            &repo,
            &target,
            &venv,
            &rt,
        )?;
    }
    finish(results, &out)
}

/// The figures summed up, the table printed and the JSON written.
fn finish(mut results: Results, out: &Path) -> anyhow::Result<()> {
    results.cpu_busy_after_pct = machine::cpu_busy_pct(Duration::from_millis(500));
    results.finish();
    print!("{}", report::table(&results));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("could not write {}", out.display()))?;
    println!("\nJSON: {}", out.display());
    Ok(())
}

/// Section 7: the real-size models (made once with the venv's torch and torchvision), cold
/// started through the model function from S3 and through the emulator from a local store,
/// next to their floors.
#[allow(clippy::too_many_arguments)]
fn run_large(
    args: &Args,
    results: &mut Results,
    pinned: &tempfile::TempDir,
    torchfn_local: &Path,
    torchfn_model: Option<&Path>,
    repo: &Path,
    target: &Path,
    venv: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let quick = args.quick;
    // --quick (what the bench crate's test runs) makes and loads no real-size model unless
    // asked to by name.
    if quick && args.large_models.is_empty() && !args.only_large {
        results.large_skipped = Some("--quick (name them with --large-models)".into());
        return Ok(());
    }
    let labels: Vec<String> = if args.large_models.is_empty() {
        vec!["resnet18".into(), "encoder".into()]
    } else {
        args.large_models.clone()
    };
    let floor = {
        let source = std::env::current_exe()?.with_file_name("torchfn-load-floor");
        let p = pinned.path().join("torchfn-load-floor");
        if !source.is_file() {
            results.large_skipped = Some(format!(
                "{} not found (cargo build --release -p torchfn-bench)",
                source.display()
            ));
            return Ok(());
        }
        if std::fs::hard_link(&source, &p).is_err() {
            std::fs::copy(&source, &p)?;
        }
        p
    };
    let fixtures = workload::made_by(repo, target, venv, "make_large_fixtures.py", "bench-large")?;
    // An older set (the script changed since) is half a gigabyte: remove it.
    if let Ok(entries) = std::fs::read_dir(target) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("bench-large-") && e.path() != fixtures {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let models = large::models(&fixtures, &labels)?;
    let runs = args.large_runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let bins = large::Bins {
        model: torchfn_model,
        local: torchfn_local,
        floor: &floor,
    };
    results.large = Some(large::run(
        &bins,
        &models,
        &fixtures,
        &target.join("bench/large"),
        runs,
        rt,
    )?);
    Ok(())
}

/// Starts `other` (another torchfn-local build: its pinned copy, and the path it was given
/// as) beside the server behind `this` and has them take turns at each concurrency
/// ([`turns`]); a failure is reported and the run goes on.
fn compare(
    rt: &tokio::runtime::Runtime,
    results: &mut Results,
    (other, given): &(PathBuf, PathBuf),
    (store, w, batching, device): (&Path, &Workload, Batching, &str),
    this: &Target,
    concurrency: &[usize],
    schedule: turns::Schedule,
) {
    eprintln!(
        "bench: {} batching on, against {}: starting",
        w.label,
        given.display()
    );
    let server = match Torchfn::start(other, store, w, batching, device, rt) {
        Ok(s) => s,
        Err(e) => return eprintln!("bench: {} did not start: {e:#}", given.display()),
    };
    let that = Target {
        addr: server.inference,
        path: w.path(),
        body: w.body.clone(),
    };
    for &c in concurrency {
        eprintln!(
            "bench: {} batching on, taking turns, concurrency {c}",
            w.label
        );
        let window = |t: &Target| turn_window(rt, t, c, schedule);
        match turns::take(schedule.rounds, || window(this), || window(&that)) {
            Ok(rounds) => results.against.push(turns::Turns {
                model: w.label.into(),
                concurrency: c,
                other: given.display().to_string(),
                schedule,
                rounds,
            }),
            Err(e) => eprintln!("bench: taking turns failed: {e:#}\n{}", server.tail()),
        }
    }
    server.stop();
}

/// One side's turn: the throughput of a window at concurrency `c` after its warm-up, on new
/// connections; any error fails it.
fn turn_window(
    rt: &tokio::runtime::Runtime,
    t: &Target,
    c: usize,
    schedule: turns::Schedule,
) -> anyhow::Result<f64> {
    let load = Load {
        concurrency: c,
        warmup: schedule.warmup(),
        duration: schedule.window(),
        max_requests: 4_000_000,
    };
    let r = rt.block_on(load::run(t, load));
    anyhow::ensure!(
        r.errors == 0,
        "{} errors, the first: {}",
        r.errors,
        r.first_error.unwrap_or_default()
    );
    Ok(r.throughput_rps)
}

/// The throughput targets' floors taking turns with torchfn (batching on, the server behind
/// `this`), as `--against` has two builds take turns: the seed model at concurrency 16 and
/// 64 against the like-for-like HTTP floor, the wide model at 64 against the libtorch floor
/// at the batch size torchfn ran there. Measured one after the other, a floor and a server
/// point can land on a fast and a slow stretch of a shared VM (10–20% apart); taken in
/// turns, the drift falls on both sides. A failure is reported and the run goes on.
fn floor_turns(
    rt: &tokio::runtime::Runtime,
    results: &mut Results,
    w: &Workload,
    (models, device): (&Path, tch::Device),
    this: &Target,
    concurrency: &[usize],
    schedule: turns::Schedule,
) {
    let wide_batch = results.wide_c64().map(|(_, batch)| batch);
    let mut take = |c: usize, other: String, floor: &mut dyn FnMut() -> anyhow::Result<f64>| {
        eprintln!(
            "bench: {} batching on, taking turns with the {other}, concurrency {c}",
            w.label
        );
        match turns::take(
            schedule.rounds,
            || turn_window(rt, this, c, schedule),
            &mut *floor,
        ) {
            Ok(rounds) => results.floor_turns.push(turns::Turns {
                model: w.label.into(),
                concurrency: c,
                other,
                schedule,
                rounds,
            }),
            Err(e) => eprintln!("bench: taking turns with the {other} failed: {e:#}"),
        }
    };
    match w.label {
        "seed" => {
            let noop = match http_floor::NoopServer::start(http_floor::Stack::Torchfn) {
                Ok(n) => n,
                Err(e) => return eprintln!("bench: the HTTP floor did not start: {e:#}"),
            };
            let floor = Target {
                addr: noop.addr,
                path: w.path(),
                body: w.body.clone(),
            };
            for c in [16, 64].into_iter().filter(|c| concurrency.contains(c)) {
                take(c, report::HTTP_FLOOR_TURNS.into(), &mut || {
                    turn_window(rt, &floor, c, schedule)
                });
            }
        }
        "wide" if concurrency.contains(&64) => {
            let Some(batch) = wide_batch else {
                return;
            };
            let path = models.join(w.torchscript);
            let passes =
                match floor::Passes::load(&path, w.features, batch, device, Precision::Fp32) {
                    Ok(p) => p,
                    Err(e) => return eprintln!("bench: the libtorch floor did not load: {e:#}"),
                };
            take(64, report::libtorch_floor_turns(batch), &mut || {
                passes.window(schedule.warmup(), schedule.window())
            });
        }
        _ => {}
    }
}

/// One load point against a torchfn server; errors are shown with the server's last output.
fn measure(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    settings: load::Load,
    server: &Torchfn,
) -> load::LoadResult {
    let r = load::run_with_cpu(rt, target, settings, Some(server.pid()));
    if r.errors > 0 {
        eprintln!(
            "bench: {} errors, first: {}; server's last output:\n{}",
            r.errors,
            r.first_error.as_deref().unwrap_or(""),
            server.tail()
        );
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn run_torchserve(
    results: &mut Results,
    bin: &Path,
    repo: &Path,
    fixtures: &Path,
    venv: &Path,
    workloads: &[Workload],
    batchings: [Batching; 2],
    rt: &tokio::runtime::Runtime,
    load: &dyn Fn(usize) -> Load,
) -> anyhow::Result<()> {
    let store = torchserve::store(repo, fixtures, venv)?;
    let mut ts = report::TorchServeResults {
        version: torchserve::VERSION.into(),
        wide: "served with bench/torchserve/wide_handler.py (TorchServe's base_handler cannot read JSON), archived by the benchmark".into(),
        ..Default::default()
    };
    for w in workloads {
        for batching in batchings {
            let name = report::batching_name(batching);
            eprintln!("bench: TorchServe, {} batching {name}: starting", w.label);
            let server = TorchServe::start(bin, &store, w, batching, rt)?;
            let described = server.described_batch_size(w.model, rt);
            ts.batch_size_check.push(report::BatchCheck {
                model: w.label.into(),
                requested: batching.batch_size,
                described,
            });
            let target = Target {
                addr: server.inference,
                path: w.path(),
                body: w.body.clone(),
            };
            for &c in &results.settings.concurrency {
                eprintln!(
                    "bench: TorchServe, {} batching {name}, concurrency {c}",
                    w.label
                );
                let r = rt.block_on(load::run(&target, load(c)));
                ts.points
                    .push(Point::new("torchserve", w.label, Some(batching), r));
            }
            if w.label == "seed" && batching.batch_size == 1 {
                ts.rss = server.peak_rss();
            }
            server.stop();
        }
    }
    let seed = &workloads[0];
    for i in 0..results.settings.cold_starts.min(3) {
        eprintln!("bench: TorchServe cold start {}", i + 1);
        ts.cold_start
            .push(torchserve::cold_start(bin, &store, seed, batchings[1], rt)?);
    }
    results.torchserve = Some(ts);
    Ok(())
}

/// LitServe at every load point, one server per model and batching setting, each checked
/// first to answer what torchfn answers.
fn run_litserve(
    results: &mut Results,
    launch: &litserve::Launch,
    workloads: &[Workload],
    torchfn_answers: &std::collections::HashMap<&str, serde_json::Value>,
    batchings: [Batching; 2],
    rt: &tokio::runtime::Runtime,
    load: &dyn Fn(usize) -> Load,
) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    let s = &results.settings;
    let mut ls = report::LitServeResults {
        version: litserve::VERSION.into(),
        setup: format!(
            "bench/litserve/server.py: a LitAPI on the same TorchScript file, answering torchfn's JSON; \
             1 inference worker, 1 API server (uvicorn), LitServe's default queue, log level warning; \
             batching on = max_batch_size {}, batch_timeout {} ms; off = max_batch_size 1; device {}",
            s.batch_size, s.max_batch_delay_ms, launch.device
        ),
        ..Default::default()
    };
    let concurrency = s.concurrency.clone();
    for w in workloads {
        for batching in batchings {
            let name = report::batching_name(batching);
            eprintln!("bench: LitServe, {} batching {name}: starting", w.label);
            let server = LitServe::start(launch, w, batching, rt)?;
            ls.torch_threads = ls.torch_threads.or(server.startup.torch_threads);
            ls.startup.push(server.startup.clone());
            let compared = match (torchfn_answers.get(w.label), server.answer(w, rt)) {
                (Some(expected), Ok(got)) => answer::compare(expected, &got),
                (None, _) => Err("torchfn gave no answer to compare with".into()),
                (_, Err(e)) => Err(format!("{e:#}")),
            };
            let check = answer::AnswerCheck {
                model: w.label.into(),
                batching: name.into(),
                same: compared.is_ok(),
                detail: answer::describe(&compared),
            };
            eprintln!(
                "bench: LitServe, {} batching {name}: answer {}",
                w.label, check.detail
            );
            let same = check.same;
            ls.answer_checks.push(check);
            if !same {
                // Not the same service: its figures would not compare.
                server.stop();
                continue;
            }
            let target = Target {
                addr: server.inference,
                path: w.path(),
                body: w.body.clone(),
            };
            for &c in &concurrency {
                eprintln!(
                    "bench: LitServe, {} batching {name}, concurrency {c}",
                    w.label
                );
                let r = rt.block_on(load::run(&target, load(c)));
                if r.errors > 0 {
                    eprintln!(
                        "bench: {} errors, first: {}; LitServe's last output:\n{}",
                        r.errors,
                        r.first_error.as_deref().unwrap_or(""),
                        server.tail()
                    );
                }
                ls.points
                    .push(Point::new("litserve", w.label, Some(batching), r));
            }
            if w.label == "seed" && batching.batch_size == 1 {
                ls.rss = server.peak_rss();
            }
            server.stop();
        }
    }
    ls.elapsed_s = began.elapsed().as_secs_f64();
    results.litserve = Some(ls);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_functions(
    bin: &Path,
    venv: &Path,
    target: &Path,
    seed_archive: &Path,
    seed: &Workload,
    cold_starts: usize,
    large_mb: usize,
    runs: usize,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<functions::FunctionsResults> {
    eprintln!("bench: functions: starting the local S3 server");
    let s3 = functions::S3Server::start(venv)?;
    let store = torchfn_store::store::ObjectStore::with_s3_endpoint(s3.endpoint.clone());
    rt.block_on(functions::prepare(&store, seed_archive))?;
    let mut cold = Vec::new();
    for i in 0..cold_starts {
        eprintln!("bench: torchfn-model cold start from S3 {}", i + 1);
        cold.push(functions::cold_start(bin, &s3.endpoint, seed, rt)?);
    }
    eprintln!("bench: functions: a {large_mb} MB archive (made once, then cached)");
    let dir = target.join("bench");
    let large = functions::large_archive(venv, &dir, large_mb)?;
    let mut fetch = Vec::new();
    {
        let fs = functions::FsS3Server::start(&dir)?;
        let fs_store = torchfn_store::store::ObjectStore::with_s3_endpoint(fs.endpoint.clone());
        rt.block_on(functions::create_bucket(&fs_store))?;
        eprintln!("bench: functions: fetch + unpack vs one GET on s3s-fs, {runs} runs");
        let (bytes, r) = rt.block_on(functions::fetch_vs_raw_get(&fs_store, &large, &dir, runs))?;
        fetch.push(functions::FetchSeries::new("s3s-fs", bytes, r));
    }
    eprintln!("bench: functions: fetch + unpack vs one GET on moto_server, {runs} runs");
    let (bytes, r) = rt.block_on(functions::fetch_vs_raw_get(&store, &large, &dir, runs))?;
    fetch.push(functions::FetchSeries::new("moto_server", bytes, r));
    Ok(functions::FunctionsResults::new(cold, fetch))
}
