//! The serverless half, against a local S3 server (moto_server from the project venv):
//!
//! - cold start of `torchfn-model` (process start → first answer) when its archive is in S3
//!   and found through the registry, as a deployed function finds it;
//! - fetching and unpacking a ~200 MB archive (parallel ranged GETs, SHA-256 checked, then
//!   unpacked), next to one plain GET of the same object measured in the same run, on two
//!   local S3 servers: s3s-fs (in this process, on threads of its own), which serves a range
//!   by seeking as S3 does, and moto_server, which reads the whole object for every ranged
//!   GET (so any ranged download is slower there than one GET, whatever the client does).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use serde::Serialize;
use torchfn_archive::mar::{self, Limits};
use torchfn_store::registrar::{self, ArchiveEvent, Outcome, RegistrarConfig};
use torchfn_store::registry::Registry;
use torchfn_store::store::{DownloadOptions, Expect, Location, ObjectStore};

use crate::load;
use crate::process::Spawned;
use crate::stats::median;
use crate::workload::Workload;

const BUCKET: &str = "torchfn-bench";

/// A moto_server on a free loopback port, stopped on drop.
pub struct S3Server {
    process: Spawned,
    pub endpoint: String,
}

impl S3Server {
    pub fn start(venv: &Path) -> anyhow::Result<Self> {
        let bin = venv.join("bin/moto_server");
        anyhow::ensure!(
            bin.is_file(),
            "{} missing: run scripts/setup",
            bin.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Spawned::spawn(cmd, |_| false, true)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if process.exited().is_some() || Instant::now() > deadline {
                bail!("moto_server did not start:\n{}", process.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

/// An s3s-fs S3 server over a folder, on its own threads and runtime, stopped on drop.
pub struct FsS3Server {
    pub endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl FsS3Server {
    pub fn start(scratch: &Path) -> anyhow::Result<Self> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let root = tempfile::Builder::new()
            .prefix("s3s-fs-")
            .tempdir_in(scratch)?;
        let fs =
            s3s_fs::FileSystem::new(root.path()).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single("testing", "testing"));
        let service = builder.build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3s-fs")
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                loop {
                    let socket = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((socket, _)) => socket,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => break,
                    };
                    let conn = http
                        .serve_connection(TokioIo::new(socket), service.clone())
                        .into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
        });
        Ok(Self {
            endpoint,
            stop: Some(stop),
            thread: Some(thread),
            _root: root,
        })
    }
}

impl Drop for FsS3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The AWS settings every S3 client here uses: the local server, static test credentials,
/// no profile files, no instance metadata. Set before any thread starts.
pub fn isolate_aws_environment() {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ] {
        std::env::set_var(k, v);
    }
    for k in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"] {
        std::env::remove_var(k);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FunctionColdStart {
    /// `Inference API bind to:` printed: the registry read, the archive downloaded, checked
    /// and unpacked, the model loaded (the function binds only once it can answer).
    pub ready_ms: f64,
    /// Process start → the first prediction's answer.
    pub total_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FetchRun {
    /// One GET of the whole object, streamed and dropped.
    pub raw_get_ms: f64,
    /// Ranged GETs to disk, SHA-256 checked, unpacked as the parts land (what a cold start
    /// does), until both are done.
    pub fetch_unpack_ms: f64,
    /// The download alone (ranged GETs, SHA-256).
    pub download_ms: f64,
}

/// The large archive's fetch on one S3 server.
#[derive(Clone, Debug, Serialize)]
pub struct FetchSeries {
    /// `s3s-fs` or `moto_server`.
    pub server: String,
    pub archive_bytes: u64,
    pub runs: Vec<FetchRun>,
    pub raw_get_mb_s: Option<f64>,
    pub fetch_unpack_mb_s: Option<f64>,
}

impl FetchSeries {
    pub fn new(server: &str, archive_bytes: u64, runs: Vec<FetchRun>) -> Self {
        let mb = archive_bytes as f64 / 1e6;
        let rate = |ms: Option<f64>| ms.map(|ms| mb / (ms / 1e3));
        Self {
            server: server.into(),
            archive_bytes,
            raw_get_mb_s: rate(median(runs.iter().map(|f| f.raw_get_ms).collect())),
            fetch_unpack_mb_s: rate(median(runs.iter().map(|f| f.fetch_unpack_ms).collect())),
            runs,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FunctionsResults {
    pub cold_start: Vec<FunctionColdStart>,
    pub cold_start_median_ms: Option<f64>,
    pub fetch: Vec<FetchSeries>,
}

impl FunctionsResults {
    pub fn new(cold_start: Vec<FunctionColdStart>, fetch: Vec<FetchSeries>) -> Self {
        Self {
            cold_start_median_ms: median(cold_start.iter().map(|c| c.total_ms).collect()),
            cold_start,
            fetch,
        }
    }

    /// The series the target is read from: s3s-fs, whose ranged GETs cost what S3's do.
    pub fn target_series(&self) -> Option<&FetchSeries> {
        self.fetch.iter().find(|f| f.server == "s3s-fs")
    }
}

/// Uploads `archive` to `archives/<name>` and registers it the way the registrar does.
async fn publish(store: &ObjectStore, registry: &Registry, archive: &Path) -> anyhow::Result<()> {
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .context("archive name")?;
    let key = format!("archives/{name}");
    let at: Location = format!("s3://{BUCKET}/{key}").parse()?;
    store.put(&at, std::fs::read(archive)?).await?;
    let config = RegistrarConfig {
        prefix: "archives/".into(),
        max_archive_bytes: 10 << 30,
    };
    let event = ArchiveEvent {
        created: true,
        bucket: BUCKET.into(),
        key,
    };
    match registrar::handle(registry, store, &config, &event).await? {
        Outcome::Registered { .. } | Outcome::AlreadyRegistered { .. } => Ok(()),
        other => bail!("{name} was not registered: {other:?}"),
    }
}

/// Creates the benchmark's bucket.
pub async fn create_bucket(store: &ObjectStore) -> anyhow::Result<()> {
    create_named_bucket(store, BUCKET).await
}

/// Creates bucket `name` on the store's S3 server.
pub async fn create_named_bucket(store: &ObjectStore, name: &str) -> anyhow::Result<()> {
    store
        .s3_client()
        .await?
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .with_context(|| format!("could not create the bucket {name}"))?;
    Ok(())
}

/// Creates the bucket and registers the seed archive.
pub async fn prepare(store: &ObjectStore, seed_archive: &Path) -> anyhow::Result<Registry> {
    create_bucket(store).await?;
    let registry = Registry::new(store.clone(), format!("s3://{BUCKET}/registry").parse()?);
    publish(store, &registry, seed_archive).await?;
    Ok(registry)
}

/// Starts `torchfn-model` following the registry's `model`, waits for it, sends one
/// prediction, and stops it.
pub fn cold_start(
    bin: &Path,
    endpoint: &str,
    workload: &Workload,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<FunctionColdStart> {
    let tmp = tempfile::Builder::new()
        .prefix("torchfn-bench-fn-")
        .tempdir()?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TORCHFN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("AWS_ENDPOINT_URL_S3", endpoint)
        .env("TORCHFN_REGISTRY", format!("s3://{BUCKET}/registry"))
        .env("TORCHFN_MODEL_NAME", workload.model)
        .env("TORCHFN_DEVICE", "cpu")
        .env("TORCHFN_HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "warn");
    if let Some(h) = workload.torchfn_handler {
        cmd.env("TORCHFN_HANDLER", h);
    }
    let mut process = Spawned::spawn(cmd, |l| l.contains("API bind to:"), false)?;
    let line = process
        .next_line(Duration::from_secs(60))
        .with_context(|| format!("torchfn-model did not start:\n{}", process.tail()))?;
    let addr: SocketAddr = line
        .text
        .rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .with_context(|| format!("no address in `{}`", line.text))?;
    let ready_ms = line.at.duration_since(process.started).as_secs_f64() * 1e3;
    let answer = rt.block_on(load::once(
        addr,
        Method::POST,
        &workload.path(),
        workload.body.clone(),
    ));
    let total_ms = process.started.elapsed().as_secs_f64() * 1e3;
    let (status, _, body) = answer.context("the first prediction failed")?;
    process.stop(Duration::from_secs(5));
    if status != StatusCode::OK {
        bail!(
            "the function's first prediction answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(FunctionColdStart { ready_ms, total_ms })
}

/// A TorchScript archive of about `mb` megabytes of random weights (as incompressible as
/// trained ones), made once with the venv's torch and torch-model-archiver.
pub fn large_archive(venv: &Path, dir: &Path, mb: usize) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!("large-{mb}mb"));
    let mar = out.join("large.mar");
    if mar.is_file() {
        return Ok(mar);
    }
    let work = dir.join(format!(".large-{mb}mb-work"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // A Linear layer n×n holds 4·n² bytes of float32 weights.
    let n = ((mb as f64 * 1e6 / 4.0).sqrt()) as usize;
    let script = format!(
        "import torch\n\
         torch.manual_seed(0)\n\
         m = torch.jit.script(torch.nn.Linear({n}, {n}).eval())\n\
         m.save('large.pt')\n"
    );
    let status = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .current_dir(&work)
        .status()?;
    anyhow::ensure!(status.success(), "could not make the large model");
    let status = Command::new(venv.join("bin/torch-model-archiver"))
        .args(["--model-name", "large", "--version", "1.0"])
        .args(["--serialized-file", "large.pt", "--handler", "base_handler"])
        .args(["--export-path", "."])
        .current_dir(&work)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "torch-model-archiver failed on the large model"
    );
    std::fs::create_dir_all(&out)?;
    std::fs::rename(work.join("large.mar"), &mar)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(mar)
}

/// Uploads `archive`, then alternates one plain GET of it with one fetch + unpack, `runs`
/// times each.
pub async fn fetch_vs_raw_get(
    store: &ObjectStore,
    archive: &Path,
    scratch: &Path,
    runs: usize,
) -> anyhow::Result<(u64, Vec<FetchRun>)> {
    let bytes = std::fs::read(archive)?;
    let size = bytes.len() as u64;
    let sha256 = {
        use sha2::Digest;
        let sum = sha2::Sha256::digest(&bytes);
        sum.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let at: Location = format!("s3://{BUCKET}/archives/large.mar").parse()?;
    store.put(&at, bytes).await?;
    let client = store.s3_client().await?;
    let mut out = Vec::new();
    for _ in 0..runs {
        // One GET, the body streamed and dropped: what the S3 server and this client can
        // move in one stream.
        let started = Instant::now();
        let mut body = client
            .get_object()
            .bucket(BUCKET)
            .key("archives/large.mar")
            .send()
            .await
            .context("raw GET")?
            .body;
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            got += chunk.context("raw GET body")?.len() as u64;
        }
        let raw_get_ms = started.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(got == size, "raw GET returned {got} of {size} bytes");

        // What a cold start does with it.
        let dir = tempfile::Builder::new()
            .prefix("fetch-")
            .tempdir_in(scratch)?;
        let dest = dir.path().join("large.mar");
        let started = Instant::now();
        let root = dir.path().to_path_buf();
        let (report, unpacked) = store
            .download_consuming(
                &at,
                &dest,
                Expect {
                    size: Some(size),
                    sha256: Some(sha256.clone()),
                },
                DownloadOptions::default(),
                move |reopen| {
                    mar::open_archive(Path::new("large.mar"), &*reopen, &root, &Limits::default())
                        .map(|a| a.dir().is_dir())
                },
            )
            .await?;
        let fetch_unpack_ms = started.elapsed().as_secs_f64() * 1e3;
        let download_ms = report.elapsed.as_secs_f64() * 1e3;
        let unpacked = unpacked?;
        anyhow::ensure!(
            report.bytes == size && unpacked,
            "the archive did not unpack"
        );
        out.push(FetchRun {
            raw_get_ms,
            fetch_unpack_ms,
            download_ms,
        });
    }
    Ok((size, out))
}
