//! Archives registered by `http://` or `https://` URL, downloaded into the model store as
//! TorchServe does: the file keeps the URL's last path segment, an existing file is never
//! overwritten ("Model file already exists"), and redirects are followed only to URLs that
//! `allowed_urls` accepts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Most redirects followed for one download.
const MAX_REDIRECTS: usize = 10;

/// Why a URL was not downloaded.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The model store already holds a file of that name (TorchServe's 500).
    #[error("Model file already exists {0}")]
    Exists(String),
    /// The URL's path names no file.
    #[error("the URL names no file to download")]
    NoFileName,
    /// The server answered, but not with the file.
    #[error("{0}")]
    Failed(String),
}

/// The file a URL names: its path's last segment (without query or fragment).
pub fn file_name(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split(['?', '#']).next().unwrap_or("");
    let (_, path) = path.split_once('/')?;
    let name = path.rsplit('/').next().unwrap_or("");
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// Downloads `url` into `store` under its file name, at most `max_bytes`, following only
/// redirects whose target `allowed` accepts. Written to a hidden temporary file and moved
/// into place only when complete, never over an existing file.
pub async fn download(
    url: &str,
    store: &Path,
    allowed: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    max_bytes: u64,
) -> Result<PathBuf, FetchError> {
    let name = file_name(url).ok_or(FetchError::NoFileName)?;
    let dest = store.join(&name);
    if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
        return Err(FetchError::Exists(name));
    }
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if allowed(attempt.url().as_str()) {
            attempt.follow()
        } else {
            let to = attempt.url().to_string();
            attempt.error(format!(
                "a redirect to {to}, which allowed_urls does not match"
            ))
        }
    });
    let client = reqwest::Client::builder()
        .redirect(policy)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| FetchError::Failed(e.to_string()))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| FetchError::Failed(error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(FetchError::Failed(format!(
            "the server answered {}",
            resp.status()
        )));
    }
    let (store_dir, tmp_name) = (store.to_path_buf(), name.clone());
    let tmp = tokio::task::spawn_blocking(move || {
        tempfile::Builder::new()
            .prefix(&format!(".download-{tmp_name}-"))
            .tempfile_in(store_dir)
    })
    .await
    .map_err(|e| FetchError::Failed(e.to_string()))?
    .map_err(|e| FetchError::Failed(format!("cannot write into the model store: {e}")))?;
    let file = tmp
        .reopen()
        .map_err(|e| FetchError::Failed(format!("cannot write into the model store: {e}")))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut total = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| FetchError::Failed(error_chain(&e)))?
    {
        total += chunk.len() as u64;
        if total > max_bytes {
            return Err(FetchError::Failed(format!(
                "the archive is larger than {max_bytes} bytes (torchfn_archive_max_bytes)"
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| FetchError::Failed(format!("cannot write into the model store: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| FetchError::Failed(format!("cannot write into the model store: {e}")))?;
    drop(file);
    let target = dest.clone();
    tokio::task::spawn_blocking(move || tmp.persist_noclobber(&target))
        .await
        .map_err(|e| FetchError::Failed(e.to_string()))?
        .map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                FetchError::Exists(name.clone())
            } else {
                FetchError::Failed(format!("cannot write into the model store: {}", e.error))
            }
        })?;
    tracing::info!(url, file = %dest.display(), bytes = total, "archive downloaded into the model store");
    Ok(dest)
}

/// An error with its causes, one after another (reqwest's own message is only the outermost).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_file_is_the_urls_last_segment() {
        assert_eq!(
            file_name("https://host/mar_files/squeezenet1_1.mar?x=1#y").as_deref(),
            Some("squeezenet1_1.mar")
        );
        assert_eq!(file_name("http://host/").as_deref(), None);
        assert_eq!(file_name("http://host").as_deref(), None);
        assert_eq!(file_name("http://host/a/..").as_deref(), None);
    }
}
