//! Downloads: a local copy, or parallel ranged GETs of an S3 object written to their offsets
//! in a temporary file, hashed in order, checked, then renamed into place; optionally read by
//! a consumer while the parts land.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::checksum::hex;
use super::error::{io_error, Result};
use super::landing::{EndLanding, FileSender, Landing, LandingReader, Reopen};
use super::local::{file_copy, TempFile};
use super::s3::{backoff, http_status, s3_error};
use super::{
    blocking, joined, DownloadOptions, DownloadReport, Expect, Location, ObjectStore, StoreError,
};

/// Bytes gathered from a part's body before one positioned write (per concurrent part).
pub(super) const WRITE_CHUNK: usize = 1 << 20;
/// Attempts to finish one part after its body stream fails or ends early; each retry asks only
/// for the part's remaining range.
const PART_ATTEMPTS: u32 = 6;

impl ObjectStore {
    /// Downloads an object to `dest`, checked against `expect` (and, on S3, the object's own
    /// size and SHA-256 checksum when it has one).
    ///
    /// On S3 the object is fetched with parallel ranged GETs of `opts.part_size` bytes,
    /// `opts.concurrency` at a time, each streamed to its offset in a temporary file beside
    /// `dest` (memory: about 1 MiB per part in flight). All ranges carry `If-Match` with the
    /// ETag read first, so a replaced object fails instead of mixing versions. A part whose body
    /// stream breaks is re-requested from where it stopped. The SHA-256 is computed in file
    /// order by a reader thread that hashes each part as soon as every part before it has
    /// landed (from the page cache), overlapping hashing with the download. Only a download
    /// that passes every check is renamed to `dest`; otherwise no file is left. The file is
    /// not fsynced: a cache reusing it after a power loss must check it again.
    pub async fn download(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
    ) -> Result<DownloadReport> {
        self.download_inner(from, dest, expect, opts, None).await
    }

    /// Downloads as [`download`](Self::download) does while `consume` reads the file as it
    /// lands (on a blocking thread): its readers' reads wait for their bytes, and fail if the
    /// download stops first. On S3 the last part is fetched first, so a zip's directory is
    /// there at once. Returns the download's report and what `consume` returned; when the
    /// download fails (or fails its checks), that is the error and `consume`'s result is
    /// dropped, so it must not have been used for anything yet.
    pub async fn download_consuming<T, F>(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
        consume: F,
    ) -> Result<(DownloadReport, T)>
    where
        T: Send + 'static,
        F: FnOnce(Reopen) -> T + Send + 'static,
    {
        let landing = Arc::new(Landing::new());
        let (file_tx, file_rx) = tokio::sync::oneshot::channel::<(Arc<File>, u64)>();
        let consumer = {
            let landing = landing.clone();
            tokio::task::spawn_blocking(move || {
                let (file, size) = file_rx.blocking_recv().ok()?;
                let reopen: Reopen = Arc::new(move || {
                    Ok(Box::new(LandingReader {
                        file: file.clone(),
                        landing: landing.clone(),
                        size,
                        pos: 0,
                    })
                        as Box<dyn torchfn_archive::mar::ReadSeek>)
                });
                Some(consume(reopen))
            })
        };
        let report = self
            .download_inner(from, dest, expect, opts, Some((landing, file_tx)))
            .await;
        let consumed = consumer.await;
        let report = report?;
        match consumed {
            Ok(Some(value)) => Ok((report, value)),
            Ok(None) => Err(StoreError::Config(format!(
                "the download of {from} never started its reader"
            ))),
            Err(e) => Err(StoreError::Config(format!(
                "the reader of {from} stopped: {e}"
            ))),
        }
    }

    async fn download_inner(
        &self,
        from: &Location,
        dest: &Path,
        expect: Expect,
        opts: DownloadOptions,
        consumer: Option<(Arc<Landing>, FileSender)>,
    ) -> Result<DownloadReport> {
        let _end = EndLanding(consumer.as_ref().map(|(l, _)| l.clone()));
        let started = Instant::now();
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = parent.to_path_buf();
            blocking(move || {
                std::fs::create_dir_all(&parent).map_err(|e| io_error("create", &parent, e))
            })
            .await?;
        }
        let temp = TempFile::beside(dest);
        let (bytes, sha256, parts) = match from {
            Location::File(src) => {
                let src = src.clone();
                let loc = from.clone();
                let temp_path = temp.path.clone();
                let (bytes, sha256) = blocking(move || file_copy(&loc, &src, &temp_path)).await?;
                if let Some((landing, tx)) = consumer {
                    // A local copy is quick: its reader starts once it is complete.
                    let file =
                        File::open(&temp.path).map_err(|e| io_error("open", &temp.path, e))?;
                    landing.add(0..bytes);
                    let _ = tx.send((Arc::new(file), bytes));
                }
                (bytes, sha256, 1)
            }
            Location::S3 { bucket, key } => {
                let meta = self.head(from).await?;
                if let Some(expected) = expect.size {
                    if expected != meta.size {
                        return Err(StoreError::Truncated {
                            location: from.clone(),
                            expected,
                            actual: meta.size,
                        });
                    }
                }
                let client = self.s3_client().await?.clone();
                let file = create_file(&temp.path, meta.size)?;
                let landing = consumer.map(|(landing, tx)| {
                    let _ = tx.send((file.clone(), meta.size));
                    landing
                });
                let job = Arc::new(PartJob {
                    client,
                    location: from.clone(),
                    bucket: bucket.clone(),
                    key: key.clone(),
                    etag: meta.etag.clone(),
                    file,
                    path: temp.path.clone(),
                    landing,
                });
                let (sha256, parts) = fetch_parts(job, meta.size, opts).await?;
                if let Some(recorded) = &meta.sha256 {
                    if !recorded.eq_ignore_ascii_case(&sha256) {
                        return Err(StoreError::ChecksumMismatch {
                            location: from.clone(),
                            expected: recorded.clone(),
                            actual: sha256,
                            against: "checksum S3 recorded",
                        });
                    }
                }
                (meta.size, sha256, parts)
            }
        };
        if let Some(expected) = expect.size {
            if expected != bytes {
                return Err(StoreError::Truncated {
                    location: from.clone(),
                    expected,
                    actual: bytes,
                });
            }
        }
        if let Some(expected) = &expect.sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(StoreError::ChecksumMismatch {
                    location: from.clone(),
                    expected: expected.to_ascii_lowercase(),
                    actual: sha256,
                    against: "expected",
                });
            }
        }
        let dest_path = dest.to_path_buf();
        blocking(move || {
            std::fs::rename(&temp.path, &dest_path)
                .map_err(|e| io_error("rename into place", &dest_path, e))?;
            temp.keep();
            Ok(())
        })
        .await?;
        let elapsed = started.elapsed();
        let mb_per_s = bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9);
        tracing::debug!(
            location = %from,
            dest = %dest.display(),
            bytes,
            parts,
            part_size = opts.part_size,
            concurrency = opts.concurrency,
            elapsed_ms = elapsed.as_millis() as u64,
            mb_per_s = (mb_per_s * 10.0).round() / 10.0,
            "downloaded"
        );
        Ok(DownloadReport {
            bytes,
            sha256,
            elapsed,
            parts,
        })
    }
}

/// What one parallel download shares between its parts.
struct PartJob {
    client: Client,
    location: Location,
    bucket: String,
    key: String,
    etag: Option<String>,
    file: Arc<File>,
    path: PathBuf,
    /// Told of every range written, for a reader unpacking while the download runs.
    landing: Option<Arc<Landing>>,
}

fn create_file(path: &Path, size: u64) -> Result<Arc<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    file.set_len(size).map_err(|e| io_error("size", path, e))?;
    Ok(Arc::new(file))
}

/// Fetches every part with at most `opts.concurrency` in flight; returns the hex SHA-256 of
/// the file and the number of parts.
async fn fetch_parts(
    job: Arc<PartJob>,
    size: u64,
    opts: DownloadOptions,
) -> Result<(String, usize)> {
    let part_size = opts.part_size.max(1);
    let parts = usize::try_from(size.div_ceil(part_size)).unwrap_or(usize::MAX);
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let hasher = {
        let job = job.clone();
        tokio::task::spawn_blocking(move || hash_in_order(&job, size, part_size, parts, done_rx))
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..opts.concurrency.clamp(1, parts.max(1)) {
        let job = job.clone();
        let next = next.clone();
        let done_tx = done_tx.clone();
        workers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= parts {
                    return Ok(());
                }
                // The last part first: a zip's directory is at its end, so a reader
                // unpacking while the download runs can start at once.
                let index = if k == 0 { parts - 1 } else { k - 1 };
                let start = index as u64 * part_size;
                let end = (start + part_size).min(size);
                fetch_part(&job, start..end).await?;
                // The hasher may have stopped on a read error; it reports that itself.
                let _ = done_tx.send(index);
            }
        });
    }
    drop(done_tx);
    while let Some(outcome) = workers.join_next().await {
        // Returning drops `workers`, which aborts the other parts.
        joined(outcome)?;
    }
    let (sha256, hashed) = joined(hasher.await)?;
    if hashed != size {
        return Err(StoreError::Truncated {
            location: job.location.clone(),
            expected: size,
            actual: hashed,
        });
    }
    Ok((sha256, parts))
}

/// Hashes the file in order as parts land: part i is read back (from the page cache) once
/// parts 0..=i have all been written. Returns the hex digest and the bytes hashed.
fn hash_in_order(
    job: &PartJob,
    size: u64,
    part_size: u64,
    parts: usize,
    done: mpsc::Receiver<usize>,
) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut landed = vec![false; parts];
    let mut next = 0;
    let mut hashed = 0u64;
    let mut buf = vec![0u8; WRITE_CHUNK];
    while next < parts {
        let Ok(index) = done.recv() else { break };
        landed[index] = true;
        while next < parts && landed[next] {
            let start = next as u64 * part_size;
            let end = (start + part_size).min(size);
            let mut pos = start;
            while pos < end {
                let n = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                job.file
                    .read_exact_at(&mut buf[..n], pos)
                    .map_err(|e| io_error("read back", &job.path, e))?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            hashed += end - start;
            next += 1;
        }
    }
    Ok((hex(&hasher.finalize()), hashed))
}

/// Fetches `range` of the object into the same range of the file, re-requesting only what is
/// still missing when the body stream fails or ends early.
async fn fetch_part(job: &PartJob, range: Range<u64>) -> Result<()> {
    let mut written = range.start;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = job
            .client
            .get_object()
            .bucket(&job.bucket)
            .key(&job.key)
            .range(format!("bytes={}-{}", written, range.end - 1));
        if let Some(etag) = &job.etag {
            request = request.if_match(etag);
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if http_status(&e) == Some(412) => {
                return Err(StoreError::Modified {
                    location: job.location.clone(),
                })
            }
            // The SDK has already retried what is transient.
            Err(e) => return Err(s3_error("GetObject", &job.location, e)),
        };
        let mut body = out.body;
        let mut buf: Vec<u8> = Vec::with_capacity(
            WRITE_CHUNK.min(usize::try_from(range.end - written).unwrap_or(usize::MAX)),
        );
        let failure = loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    if written + (buf.len() + chunk.len()) as u64 > range.end {
                        return Err(StoreError::S3 {
                            operation: "GetObject",
                            location: job.location.clone(),
                            message: format!(
                                "the server sent more than the {} bytes asked for (range {}..{})",
                                range.end - written,
                                written,
                                range.end
                            ),
                        });
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= WRITE_CHUNK {
                        buf = write_at(job, buf, written).await?;
                        written += buf.len() as u64;
                        buf.clear();
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(DisplayErrorContext(e).to_string()),
            }
        };
        // What arrived before a failure is good: keep it and ask only for the rest.
        if !buf.is_empty() {
            let buf = write_at(job, buf, written).await?;
            written += buf.len() as u64;
        }
        if written == range.end {
            return Ok(());
        }
        if attempt >= PART_ATTEMPTS {
            tracing::warn!(location = %job.location, attempt, ?failure, "giving up on a part");
            return Err(match failure {
                // The server keeps ending this range early: the object is shorter than its
                // HEAD said.
                None => StoreError::Truncated {
                    location: job.location.clone(),
                    expected: range.end,
                    actual: written,
                },
                Some(reason) => StoreError::S3 {
                    operation: "GetObject",
                    location: job.location.clone(),
                    message: format!(
                        "bytes {written}..{} did not arrive after {attempt} attempts: {reason}",
                        range.end
                    ),
                },
            });
        }
        tracing::debug!(
            location = %job.location,
            attempt,
            from = written,
            to = range.end,
            reason = failure.as_deref().unwrap_or("the body ended early"),
            "re-requesting the rest of a part"
        );
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Writes `buf` at `offset` on a blocking thread and hands the buffer back for reuse.
async fn write_at(job: &PartJob, buf: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
    let file = job.file.clone();
    let path = job.path.clone();
    let landing = job.landing.clone();
    blocking(move || {
        file.write_all_at(&buf, offset)
            .map_err(|e| io_error("write", &path, e))?;
        if let Some(landing) = landing {
            landing.add(offset..offset + buf.len() as u64);
        }
        Ok(buf)
    })
    .await
}
