//! The archive crate's error: what went wrong reading, checking or unpacking a model archive,
//! its `MANIFEST.json` or its model-config YAML.

use std::io;
use std::path::PathBuf;

/// Why a model archive could not be opened. Each message says what is wrong and, where it
/// helps, how to fix it; none names the server's unpack folders.
#[derive(Debug, thiserror::Error)]
pub enum MarError {
    /// The archive file or folder does not exist.
    #[error("model archive not found: {path}; check the path or URL and the model store")]
    NotFound {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// Reading the source or writing the unpacked files failed.
    #[error("could not {context}: {source}")]
    Io {
        /// What was being done, e.g. "create the unpack folder".
        context: String,
        #[source]
        source: io::Error,
    },
    /// Not a zip, tar.gz or folder, or damaged: bad CRC, truncated, unreadable headers.
    #[error(
        "model archive is corrupt or not a model archive: {0}. Rebuild it with \
         torch-model-archiver (formats default, zip-store, tgz or no-archive)"
    )]
    Corrupt(String),
    /// An entry that would write outside the unpack folder, a link, or a special file.
    #[error("model archive refused: entry {entry:?} {reason}")]
    Unsafe {
        /// The entry's name as stored in the archive.
        entry: String,
        /// What is unsafe about it.
        reason: String,
    },
    /// The archive unpacks to more bytes than [`Limits::max_unpacked_bytes`].
    #[error(
        "model archive refused: it unpacks to more than {limit} bytes, the limit for one \
         model archive (config.properties: torchfn_archive_max_bytes)"
    )]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The archive expands more than [`Limits::max_expansion_ratio`] times (a compression
    /// bomb).
    #[error(
        "model archive refused: it expands more than {limit} times ({written} bytes out of \
         {read} bytes of archive so far), like a compression bomb; the limit is \
         torchfn_archive_max_ratio in config.properties"
    )]
    Expands { limit: u64, written: u64, read: u64 },
    /// The unpack folder lacks the room an entry declares.
    #[error(
        "model archive refused: it needs {needed} more bytes and {dir} has {available} free; \
         free some space or point torchfn_unpack_dir (config.properties) at a larger folder"
    )]
    NoSpace {
        needed: u64,
        available: u64,
        dir: std::path::PathBuf,
    },
    /// The archive holds more entries than [`Limits::max_entries`].
    #[error(
        "model archive refused: it holds more than {limit} entries, the limit for one model \
         archive"
    )]
    TooManyEntries {
        /// The limit.
        limit: usize,
    },
    /// Two entries unpack to the same path (or a file and a folder collide).
    #[error(
        "model archive refused: entry {entry:?} appears more than once (or a file and a folder \
         share its path)"
    )]
    Duplicate {
        /// The entry's name.
        entry: String,
    },
    /// There is no `MAR-INF/MANIFEST.json`.
    #[error(
        "model archive has no MAR-INF/MANIFEST.json; build it with torch-model-archiver \
         (a zip or tar.gz of a folder must have MAR-INF at the folder's top)"
    )]
    MissingManifest,
    /// The manifest is not valid JSON or lacks a required entry.
    #[error("invalid MAR-INF/MANIFEST.json: {0}")]
    InvalidManifest(String),
    /// The manifest names a file that is not in the archive.
    #[error(
        "the manifest's {field} names {file:?}, which is not in the archive; rebuild the \
         archive so it includes that file"
    )]
    MissingFile {
        /// The manifest key, e.g. `serializedFile`.
        field: &'static str,
        /// The file it names.
        file: String,
    },
    /// The model-config YAML does not parse.
    #[error("invalid model config YAML: {0}")]
    InvalidConfig(String),
}

impl MarError {
    /// True when the archive itself does not exist (an HTTP layer answers 404 for this).
    pub fn is_not_found(&self) -> bool {
        matches!(self, MarError::NotFound { .. })
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> MarError {
        MarError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn unsafe_entry(entry: &str, reason: impl Into<String>) -> MarError {
        MarError::Unsafe {
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }
}
