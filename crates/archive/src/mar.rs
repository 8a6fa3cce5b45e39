//! Opening TorchServe model archives (`.mar`) safely.
//!
//! [`open`] takes any of torch-model-archiver 0.12's formats — a zip (`default`, deflated, or
//! `zip-store`), a `tgz` (every entry under `<model-name>/`, which is stripped as TorchServe
//! does) or a `no-archive` directory (used in place) — checks its `MAR-INF/MANIFEST.json`,
//! its model-config YAML and that every file the manifest names is there, and hands back a
//! [`ModelArchive`] that owns the unpacked folder.
//!
//! Archives come from users, so unpacking trusts nothing in them: paths that escape the
//! target, links, device files and duplicate entries are refused; entry count and unpacked
//! bytes are capped by [`Limits`], counting the bytes actually written rather than the sizes
//! the archive declares; and whatever fails, nothing is left under the unpack root.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use tracing::{debug, warn};

use crate::manifest::Manifest;
use crate::model_config::ModelConfig;

/// Where the manifest sits inside every archive.
pub const MANIFEST_PATH: &str = "MAR-INF/MANIFEST.json";

/// The most bytes read from a manifest or model-config YAML.
const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;

/// The most tar metadata (headers, GNU long names, PAX records) allowed before one entry. The
/// tar reader holds long names and PAX records in memory, so they need a cap of their own.
const MAX_TAR_ENTRY_METADATA: u64 = 1024 * 1024;

/// How much of a gzip stream past the tar end-of-archive marker is read to check its CRC.
const MAX_TGZ_TRAILER: u64 = 16 * 1024 * 1024;

/// Caps on what unpacking an archive may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes all files together may unpack to, counted as they are written.
    pub max_unpacked_bytes: u64,
    /// The most entries (files and directories) an archive may hold.
    pub max_entries: usize,
    /// The most bytes written per byte of archive read, checked once more than
    /// [`EXPANSION_FLOOR`] bytes are written (model weights barely compress; a bomb of zeros
    /// expands about 1000 times).
    pub max_expansion_ratio: u64,
}

/// Bytes an archive may unpack to before its expansion ratio is checked (small archives of
/// text compress well and are no danger).
pub const EXPANSION_FLOOR: u64 = 64 * 1024 * 1024;

impl Default for Limits {
    /// 4 GiB, 10,000 entries and 100 times expansion: room for large models, not for a zip
    /// bomb.
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 4 * 1024 * 1024 * 1024,
            max_entries: 10_000,
            max_expansion_ratio: 100,
        }
    }
}

/// How a model archive was stored, detected from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A zip, deflated (`default`) or stored (`zip-store`).
    Zip,
    /// A gzip-compressed tar whose entries sit under `<model-name>/` (`tgz`).
    Tgz,
    /// An unpacked folder (`no-archive`), used in place.
    Directory,
}

impl ArchiveFormat {
    /// The format's name in torchfn's messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveFormat::Zip => "zip",
            ArchiveFormat::Tgz => "tar.gz",
            ArchiveFormat::Directory => "directory",
        }
    }
}

pub use crate::error::MarError;

/// An opened model archive: its manifest, its model config and the folder holding its files.
///
/// The unpacked folder of a zip or tar.gz belongs to this value and is deleted when it is
/// dropped, so unloading a model frees its disk; a `no-archive` folder is never deleted.
#[derive(Debug)]
pub struct ModelArchive {
    dir: PathBuf,
    manifest: Manifest,
    config: Option<ModelConfig>,
    format: ArchiveFormat,
    source: PathBuf,
    /// Whether `dir` was made by [`open`] and must be removed on drop.
    owns_dir: bool,
    /// The model file, when unpacking kept it in memory instead of `dir` (see
    /// [`open_with`]).
    held: std::sync::Mutex<Option<HeldFile>>,
}

/// An archive entry kept in memory rather than written to the unpack folder: the model file
/// (the manifest's `serializedFile`), streamed out of the archive into an anonymous memory
/// file (Linux `memfd`), from which libtorch reads it by its `/proc/self/fd` path. The
/// model's bytes are then in memory once (not on disk, not read back), and only until the
/// model is loaded: dropping this frees them.
#[derive(Debug)]
pub struct HeldFile {
    file: File,
    /// The entry's path relative to the archive root, cleaned.
    rel: PathBuf,
    len: u64,
}

impl HeldFile {
    /// A new, empty memory file; `None` where the system has none (not Linux, or
    /// `memfd_create` refused), and the entry is then unpacked to disk as any other.
    fn create() -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            let fd = rustix::fs::memfd_create("torchfn-model", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| debug!(error = %e, "no memory file; the model file goes to disk"))
                .ok()?;
            Some(HeldFile {
                file: File::from(fd),
                rel: PathBuf::new(),
                len: 0,
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// A path that opens this file while it lives (`/proc/self/fd/N`); `None` where `/proc`
    /// is not mounted.
    pub fn path(&self) -> Option<PathBuf> {
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
        path.exists().then_some(path)
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry's path relative to the archive root.
    pub fn name(&self) -> &Path {
        &self.rel
    }

    /// Writes the bytes to a new file at `dest`.
    fn write_to(&self, dest: &Path) -> Result<(), MarError> {
        let what = || format!("write {}", self.rel.display());
        let mut from = &self.file;
        from.seek(SeekFrom::Start(0))
            .map_err(|e| MarError::io(what(), e))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(|e| MarError::io(what(), e))?;
        io::copy(&mut from, &mut out).map_err(|e| MarError::io(what(), e))?;
        Ok(())
    }
}

impl ModelArchive {
    /// The folder holding the archive's files (`MAR-INF/`, the model file, ...).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `MAR-INF/MANIFEST.json`.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The parsed model-config YAML, when the manifest names one.
    pub fn config(&self) -> Option<&ModelConfig> {
        self.config.as_ref()
    }

    /// How the archive was stored.
    pub fn format(&self) -> ArchiveFormat {
        self.format
    }

    /// The archive file or folder it was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The model's name from the manifest.
    pub fn model_name(&self) -> &str {
        self.manifest.model_name()
    }

    /// The model's version from the manifest (`"1.0"` when it gives none).
    pub fn model_version(&self) -> &str {
        self.manifest.model_version()
    }

    /// The path of a file named relative to the archive root (as the manifest names files).
    /// Refuses names that are absolute or climb out with `..`. A model file kept in memory
    /// is written into the folder first, so the path always names a file on disk.
    pub fn path_of(&self, rel: &str) -> Result<PathBuf, MarError> {
        let rel_path = relative_path(rel)?;
        if rel_path.as_os_str().is_empty() {
            return Err(MarError::unsafe_entry(rel, "does not name a file"));
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref().is_some_and(|h| h.rel == rel_path) {
            if let Some(h) = held.take() {
                h.write_to(&self.dir.join(&rel_path))?;
            }
        }
        Ok(self.dir.join(rel_path))
    }

    /// Whether the archive holds a regular file at `name` (relative to its root), on disk or
    /// kept in memory.
    pub fn has_file(&self, name: &str) -> bool {
        let held = relative_path(name).is_ok_and(|rel| {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|h| h.rel == rel)
        });
        held || self.path_of(name).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Where libtorch can read the model file `rel` from: its copy in memory when the archive
    /// kept it there (handed over with it: keep it until the file has been read, then drop it
    /// to free the memory; the file is then neither in memory nor in [`dir`](Self::dir)),
    /// else its path in the folder.
    pub fn model_source(&self, rel: &str) -> Result<(PathBuf, Option<HeldFile>), MarError> {
        let rel_path = relative_path(rel)?;
        let taken = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.as_ref() {
                Some(h) if h.rel == rel_path => held.take(),
                _ => None,
            }
        };
        if let Some(h) = taken {
            match h.path() {
                Some(path) => return Ok((path, Some(h))),
                // No /proc to open it by: on disk after all.
                None => h.write_to(&self.dir.join(&rel_path))?,
            }
        }
        Ok((self.path_of(rel)?, None))
    }

    /// Writes a model file kept in memory into the folder, for code that reads the folder
    /// itself (the Python backend's workers).
    pub fn materialize(&self) -> Result<(), MarError> {
        let taken = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            Some(h) => h.write_to(&self.dir.join(&h.rel)),
            None => Ok(()),
        }
    }
}

impl Drop for ModelArchive {
    fn drop(&mut self) {
        if !self.owns_dir {
            return;
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => debug!(dir = %self.dir.display(), "removed unpacked model archive"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                dir = %self.dir.display(),
                error = %e,
                "could not remove unpacked model archive"
            ),
        }
    }
}

/// Opens a model archive: a zip or tar.gz is unpacked into a new folder under `unpack_root`
/// (created if missing), a directory is used in place. On any error nothing is left under
/// `unpack_root`.
pub fn open(source: &Path, unpack_root: &Path, limits: &Limits) -> Result<ModelArchive, MarError> {
    open_with(source, unpack_root, limits, false)
}

/// [`open`], keeping the model file (the manifest's `serializedFile`) of a zip archive in
/// memory instead of the unpack folder when `hold_model` is set (see [`HeldFile`]; read it
/// with [`ModelArchive::model_source`]). The other files, and every file of a tar.gz, are
/// unpacked to disk as [`open`] unpacks them.
pub fn open_with(
    source: &Path,
    unpack_root: &Path,
    limits: &Limits,
    hold_model: bool,
) -> Result<ModelArchive, MarError> {
    let meta = match fs::metadata(source) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MarError::NotFound {
                path: source.to_path_buf(),
            })
        }
        Err(e) => return Err(MarError::io("read the model archive", e)),
    };

    if meta.is_dir() {
        // An absolute path keeps working for the archive's users whatever the working
        // directory later is.
        let source = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let source = source.as_path();
        let (manifest, config) = read_and_check(source, None)?;
        debug!(
            source = %source.display(),
            model = manifest.model_name(),
            "opened no-archive model folder"
        );
        return Ok(ModelArchive {
            dir: source.to_path_buf(),
            manifest,
            config,
            format: ArchiveFormat::Directory,
            source: source.to_path_buf(),
            owns_dir: false,
            held: Default::default(),
        });
    }

    let reopen = || -> io::Result<Box<dyn ReadSeek>> { Ok(Box::new(File::open(source)?)) };
    open_archive_with(source, &reopen, unpack_root, limits, hold_model)
}

/// Something an archive can be read from.
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// Opens the archive file `reopen` gives a fresh reader of each time it is called (a file,
/// or a download still landing whose reads wait for their bytes). `source` names it in
/// messages. Unpacked as [`open`] unpacks a file.
pub fn open_archive(
    source: &Path,
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
    unpack_root: &Path,
    limits: &Limits,
) -> Result<ModelArchive, MarError> {
    open_archive_with(source, reopen, unpack_root, limits, false)
}

/// [`open_archive`], keeping a zip's model file in memory when `hold_model` is set (see
/// [`open_with`]).
pub fn open_archive_with(
    source: &Path,
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
    unpack_root: &Path,
    limits: &Limits,
    hold_model: bool,
) -> Result<ModelArchive, MarError> {
    let format = detect_format(reopen)?;
    fs::create_dir_all(unpack_root).map_err(|e| MarError::io("create the unpack folder", e))?;
    // Unpack under a hidden name and rename only on success, so a failure (or a crash)
    // never leaves something that looks like a model folder. Dropping `tmp` removes it.
    let tmp = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(unpack_root)
        .map_err(|e| MarError::io("create the unpack folder", e))?;

    let started = Instant::now();
    let mut budget = Budget::new(limits, tmp.path());
    let held = match format {
        ArchiveFormat::Zip => unpack_zip(reopen, tmp.path(), &mut budget, hold_model)?,
        ArchiveFormat::Tgz => {
            unpack_tgz(reopen, tmp.path(), &mut budget)?;
            None
        }
        ArchiveFormat::Directory => None,
    };
    debug!(
        source = %source.display(),
        format = format.as_str(),
        entries = budget.entries,
        bytes = budget.bytes,
        in_memory = held.as_ref().map_or(0, |h| h.len),
        ms = started.elapsed().as_millis() as u64,
        "unpacked model archive"
    );

    let (manifest, config) = read_and_check(tmp.path(), held.as_ref().map(|h| h.rel.as_path()))?;
    let dir = persist(tmp, unpack_root, manifest.model_name())?;
    Ok(ModelArchive {
        dir,
        manifest,
        config,
        format,
        source: source.to_path_buf(),
        owns_dir: true,
        held: std::sync::Mutex::new(held),
    })
}

/// Tells zip from gzip by their magic bytes (the extension is not trusted).
fn detect_format(
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
) -> Result<ArchiveFormat, MarError> {
    let mut head = [0u8; 4];
    let mut file = reopen().map_err(|e| MarError::io("read the model archive", e))?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MarError::io("read the model archive", e)),
        }
    }
    crate::inspect::format_of(&head[..got])
}

/// Moves a fully unpacked and checked temporary folder to its final, unique name
/// `<model-name>-<random>` under `root`.
fn persist(tmp: tempfile::TempDir, root: &Path, model_name: &str) -> Result<PathBuf, MarError> {
    let stem = folder_stem(model_name);
    let suffix = tmp
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(".unpacking-"))
        .unwrap_or("x")
        .to_string();
    for attempt in 0..100u32 {
        let name = if attempt == 0 {
            format!("{stem}-{suffix}")
        } else {
            format!("{stem}-{suffix}-{attempt}")
        };
        let target = root.join(name);
        if target.exists() {
            continue;
        }
        match fs::rename(tmp.path(), &target) {
            Ok(()) => {
                // The folder has moved; stop the guard from deleting it.
                let _ = tmp.keep();
                return Ok(target);
            }
            Err(e) if target.exists() => {
                debug!(error = %e, "unpack folder name taken; trying another");
            }
            Err(e) => return Err(MarError::io("move the unpacked archive into place", e)),
        }
    }
    Err(MarError::io(
        "move the unpacked archive into place",
        io::Error::new(io::ErrorKind::AlreadyExists, "no free folder name"),
    ))
}

/// A model name made safe as a folder name.
fn folder_stem(model_name: &str) -> String {
    let stem: String = model_name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = stem.trim_start_matches('.');
    if stem.is_empty() {
        "model".to_string()
    } else {
        stem.to_string()
    }
}

/// Reads the manifest and config YAML under `dir` and checks the files the manifest names.
fn read_and_check(
    dir: &Path,
    held: Option<&Path>,
) -> Result<(Manifest, Option<ModelConfig>), MarError> {
    let manifest_path = dir.join(MANIFEST_PATH);
    if !manifest_path.is_file() {
        return Err(MarError::MissingManifest);
    }
    let bytes = read_capped(&manifest_path, "MAR-INF/MANIFEST.json")?;
    let manifest = Manifest::parse(&bytes)?;

    let model = &manifest.model;
    let mut named: Vec<(&'static str, &str)> = Vec::new();
    for (field, value) in [
        ("serializedFile", &model.serialized_file),
        ("configFile", &model.config_file),
        ("modelFile", &model.model_file),
        ("requirementsFile", &model.requirements_file),
    ] {
        if let Some(file) = value.as_deref().filter(|f| !f.is_empty()) {
            named.push((field, file));
        }
    }
    // A handler is a file only when it names a `.py` (`handler.py`, `handler.py:fn`);
    // otherwise it is a built-in name or a module the archiver stored as `<name>.py`.
    if let Some(handler) = model.handler.as_deref() {
        let file = handler.split(':').next().unwrap_or(handler);
        if file.ends_with(".py") {
            named.push(("handler", file));
        }
    }
    for (field, file) in named {
        let rel = relative_path(file).map_err(|_| {
            MarError::InvalidManifest(format!(
                "{field} {file:?} must name a file inside the archive"
            ))
        })?;
        let in_memory = held == Some(rel.as_path());
        if rel.as_os_str().is_empty() || !(in_memory || dir.join(&rel).is_file()) {
            return Err(MarError::MissingFile {
                field,
                file: file.to_string(),
            });
        }
    }

    let config = match model.config_file.as_deref().filter(|f| !f.is_empty()) {
        Some(file) => {
            let path = dir.join(relative_path(file)?);
            let bytes = read_capped(&path, file)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| MarError::InvalidConfig(format!("{file} is not UTF-8 text")))?;
            let config = ModelConfig::parse(&text)?;
            for w in &config.warnings {
                warn!(model = manifest.model_name(), "{w}");
            }
            Some(config)
        }
        None => None,
    };
    Ok((manifest, config))
}

/// Reads a small metadata file, refusing one beyond [`MAX_METADATA_BYTES`].
fn read_capped(path: &Path, name: &str) -> Result<Vec<u8>, MarError> {
    let file = File::open(path).map_err(|e| MarError::io(format!("read {name}"), e))?;
    let mut bytes = Vec::new();
    file.take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| MarError::io(format!("read {name}"), e))?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(MarError::InvalidManifest(format!(
            "{name} is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// Checks a relative path named by an archive entry or the manifest and returns it cleaned
/// of `.` and empty components. Absolute paths, `..`, backslashes and NUL bytes are refused.
/// The result is empty for names like `./`.
fn relative_path(name: &str) -> Result<PathBuf, MarError> {
    if name.contains('\0') {
        return Err(MarError::unsafe_entry(name, "has a NUL byte in its name"));
    }
    if name.contains('\\') {
        return Err(MarError::unsafe_entry(
            name,
            "has a backslash in its name (a Windows path?)",
        ));
    }
    if name.starts_with('/') {
        return Err(MarError::unsafe_entry(
            name,
            "has an absolute path; entries must be relative to the archive root",
        ));
    }
    let mut out = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(MarError::unsafe_entry(
                    name,
                    "has a `..` component, which could write outside the unpack folder",
                ))
            }
            _ => {
                // On this platform a plain component must stay a plain component (this also
                // catches drive prefixes such as `C:` on Windows).
                let mut comps = Path::new(part).components();
                match (comps.next(), comps.next()) {
                    (Some(Component::Normal(_)), None) => out.push(part),
                    _ => {
                        return Err(MarError::unsafe_entry(
                            name,
                            "has a path component this system treats specially",
                        ))
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Counts entries and written bytes against [`Limits`].
struct Budget {
    limits: Limits,
    entries: usize,
    bytes: u64,
    /// Archive bytes read so far: summed from the zip's compressed sizes, or counted as the
    /// gzip stream is read.
    read: Read_,
    /// Where the entries are written (its free space is checked).
    dir: PathBuf,
}

/// How a [`Budget`] knows the archive bytes read.
enum Read_ {
    Summed(u64),
    Counted(Rc<Cell<u64>>),
}

impl Budget {
    fn new(limits: &Limits, dir: &Path) -> Self {
        Budget {
            limits: *limits,
            entries: 0,
            bytes: 0,
            read: Read_::Summed(0),
            dir: dir.to_path_buf(),
        }
    }

    fn read(&self) -> u64 {
        match &self.read {
            Read_::Summed(n) => *n,
            Read_::Counted(c) => c.get(),
        }
    }

    /// Refuses an archive expanding past the ratio limit, once past the floor.
    fn check_ratio(&self) -> Result<(), MarError> {
        let read = self.read().max(1);
        if self.bytes > EXPANSION_FLOOR
            && self.bytes / read >= self.limits.max_expansion_ratio.max(1)
        {
            return Err(MarError::Expands {
                limit: self.limits.max_expansion_ratio,
                written: self.bytes,
                read: self.read(),
            });
        }
        Ok(())
    }

    /// Refuses `size` more bytes when the unpack folder has not the room.
    fn check_space(&self, size: u64) -> Result<(), MarError> {
        if let Some(available) = available_bytes(&self.dir) {
            if size > available {
                return Err(MarError::NoSpace {
                    needed: size,
                    available,
                    dir: self.dir.clone(),
                });
            }
        }
        Ok(())
    }

    fn add_entry(&mut self) -> Result<(), MarError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(MarError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn too_large(&self) -> MarError {
        MarError::TooLarge {
            limit: self.limits.max_unpacked_bytes,
        }
    }

    /// Refuses early when an entry's declared size cannot fit (the honest case); the copy
    /// still counts what is really written.
    fn check_declared(&self, size: u64) -> Result<(), MarError> {
        self.check_size(size)?;
        self.check_space(size)
    }

    /// [`check_declared`](Self::check_declared) for an entry kept in memory: the size limit
    /// only.
    fn check_size(&self, size: u64) -> Result<(), MarError> {
        if size > self.limits.max_unpacked_bytes.saturating_sub(self.bytes) {
            return Err(self.too_large());
        }
        Ok(())
    }
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What the unpacker knows about the paths written so far, to refuse duplicates and
/// file/folder collisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    File,
    Dir,
}

/// Writes entries into a fresh folder, refusing anything that collides.
struct Writer<'a> {
    dest: &'a Path,
    seen: HashMap<PathBuf, Seen>,
}

impl<'a> Writer<'a> {
    fn new(dest: &'a Path) -> Self {
        Writer {
            dest,
            seen: HashMap::new(),
        }
    }

    /// Records `rel` and its parents as folders and creates them.
    fn dir(&mut self, entry: &str, rel: &Path) -> Result<(), MarError> {
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            match self.seen.get(&cur) {
                Some(Seen::File) => {
                    return Err(MarError::Duplicate {
                        entry: entry.to_string(),
                    })
                }
                Some(Seen::Dir) => {}
                None => {
                    self.seen.insert(cur.clone(), Seen::Dir);
                }
            }
        }
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        fs::create_dir_all(self.dest.join(rel))
            .map_err(|e| MarError::io(format!("create folder {entry:?}"), e))
    }

    /// Records `rel` as a file (its parents created); it must not have been seen.
    fn claim(&mut self, entry: &str, rel: &Path) -> Result<(), MarError> {
        if self.seen.contains_key(rel) {
            return Err(MarError::Duplicate {
                entry: entry.to_string(),
            });
        }
        if let Some(parent) = rel.parent() {
            self.dir(entry, parent)?;
        }
        self.seen.insert(rel.to_path_buf(), Seen::File);
        Ok(())
    }

    /// Creates the file for `rel` (its parents included); it must not exist yet.
    fn file(&mut self, entry: &str, rel: &Path) -> Result<File, MarError> {
        self.claim(entry, rel)?;
        // `create_new` never follows or overwrites what is there (the folder is fresh and
        // links are refused, so this is a second line of defence).
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dest.join(rel))
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    MarError::Duplicate {
                        entry: entry.to_string(),
                    }
                } else {
                    MarError::io(format!("write {entry:?}"), e)
                }
            })
    }
}

/// Copies one entry's data, counting every byte against the budget as it is written, so an
/// archive that lies about its sizes is still stopped. Read errors mean a damaged archive.
fn copy_entry(
    entry: &str,
    reader: &mut dyn Read,
    out: &mut File,
    budget: &mut Budget,
) -> Result<u64, MarError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MarError::Corrupt(format!("entry {entry:?}: {e}"))),
        };
        let n64 = n as u64;
        if budget.bytes.saturating_add(n64) > budget.limits.max_unpacked_bytes {
            return Err(budget.too_large());
        }
        out.write_all(&buf[..n])
            .map_err(|e| MarError::io(format!("write {entry:?}"), e))?;
        budget.bytes += n64;
        written += n64;
        budget.check_ratio()?;
    }
    out.flush()
        .map_err(|e| MarError::io(format!("write {entry:?}"), e))?;
    Ok(written)
}

// ---------------------------------------------------------------------------------------
// zip

/// The unix file-type bits of a zip entry's mode.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

fn zip_error(e: zip::result::ZipError) -> MarError {
    use zip::result::ZipError;
    match e {
        ZipError::UnsupportedArchive(what) => {
            MarError::Corrupt(format!("unsupported zip feature: {what}"))
        }
        other => MarError::Corrupt(format!("bad zip: {other}")),
    }
}

/// The manifest's `serializedFile`, read ahead of the other entries (the manifest is small;
/// torch-model-archiver writes it last, and a download fetches its last part first). `None`
/// when there is no readable manifest naming one: the unpack then reports what is wrong.
fn serialized_entry<R: Read + Seek>(archive: &mut zip::ZipArchive<R>) -> Option<PathBuf> {
    let entry = archive.by_name(MANIFEST_PATH).ok()?;
    let mut bytes = Vec::new();
    entry
        .take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return None;
    }
    let file = Manifest::parse(&bytes).ok()?.model.serialized_file?;
    let rel = relative_path(&file).ok()?;
    (!rel.as_os_str().is_empty()).then_some(rel)
}

/// Unpacks a zip into `dest`; with `hold_model`, the manifest's model file goes to a
/// [`HeldFile`] instead (where the system has memory files), which is returned.
fn unpack_zip(
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
    dest: &Path,
    budget: &mut Budget,
    hold_model: bool,
) -> Result<Option<HeldFile>, MarError> {
    let file = reopen().map_err(|e| MarError::io("read the model archive", e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(zip_error)?;

    // The zip reader keeps only the last of several entries with one name, so duplicates
    // and the true entry count are read from the central directory itself.
    check_zip_directory(
        reopen,
        archive.central_directory_start(),
        budget.limits.max_entries,
    )?;

    let hold = if hold_model {
        serialized_entry(&mut archive)
    } else {
        None
    };
    let mut held: Option<HeldFile> = None;

    // Room for everything the directory declares to go to disk, before anything is written.
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(zip_error)?;
        let in_memory = hold.is_some() && relative_path(entry.name()).ok() == hold;
        if !in_memory {
            declared = declared.saturating_add(entry.size());
        }
    }
    budget.check_space(declared.min(budget.limits.max_unpacked_bytes))?;

    let mut writer = Writer::new(dest);
    for i in 0..archive.len() {
        budget.add_entry()?;
        let mut entry = archive.by_index(i).map_err(zip_error)?;
        if let Read_::Summed(n) = &mut budget.read {
            *n = n.saturating_add(entry.compressed_size());
        }
        let name = entry.name().to_string();
        if entry.encrypted() {
            return Err(MarError::Corrupt(format!(
                "entry {name:?} is encrypted; model archives must not be"
            )));
        }
        let mode = entry.unix_mode().map(|m| m & S_IFMT).unwrap_or(0);
        let is_dir =
            match mode {
                S_IFLNK => {
                    return Err(MarError::unsafe_entry(
                        &name,
                        "is a symbolic link; model archives must hold only files and folders",
                    ))
                }
                S_IFDIR => true,
                S_IFREG | 0 => entry.is_dir(),
                _ => return Err(MarError::unsafe_entry(
                    &name,
                    "is a device, socket or pipe; model archives must hold only files and folders",
                )),
            };
        let rel = relative_path(&name)?;
        if is_dir {
            writer.dir(&name, &rel)?;
            continue;
        }
        if rel.as_os_str().is_empty() {
            return Err(MarError::unsafe_entry(&name, "does not name a file"));
        }
        let memory = match hold.as_deref() {
            Some(h) if held.is_none() && h == rel.as_path() => HeldFile::create(),
            _ => None,
        };
        let written = if let Some(mut memory) = memory {
            budget.check_size(entry.size())?;
            writer.claim(&name, &rel)?;
            let written = copy_entry(&name, &mut entry, &mut memory.file, budget)?;
            memory.rel = rel;
            memory.len = written;
            held = Some(memory);
            written
        } else {
            budget.check_declared(entry.size())?;
            let mut out = writer.file(&name, &rel)?;
            copy_entry(&name, &mut entry, &mut out, budget)?
        };
        if written != entry.size() {
            return Err(MarError::Corrupt(format!(
                "entry {name:?} declares {} bytes but holds {written}",
                entry.size()
            )));
        }
    }
    Ok(held)
}

/// Walks the zip central directory: counts the entries (refusing more than `max_entries`)
/// and refuses a name that appears twice.
fn check_zip_directory(
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
    start: u64,
    max_entries: usize,
) -> Result<(), MarError> {
    const CENTRAL_HEADER: u32 = 0x0201_4b50;
    let file = reopen().map_err(|e| MarError::io("read the model archive", e))?;
    let mut r = BufReader::new(file);
    r.seek(SeekFrom::Start(start))
        .map_err(|e| MarError::Corrupt(format!("bad zip central directory: {e}")))?;
    let mut names: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let mut fixed = [0u8; 46];
    loop {
        match r.read_exact(&mut fixed[..4]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(MarError::Corrupt(format!("bad zip central directory: {e}"))),
        }
        if u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]) != CENTRAL_HEADER {
            break;
        }
        r.read_exact(&mut fixed[4..])
            .map_err(|e| MarError::Corrupt(format!("bad zip central directory: {e}")))?;
        let le16 = |at: usize| u16::from_le_bytes([fixed[at], fixed[at + 1]]) as usize;
        let (name_len, extra_len, comment_len) = (le16(28), le16(30), le16(32));
        let mut name = vec![0u8; name_len];
        r.read_exact(&mut name)
            .map_err(|e| MarError::Corrupt(format!("bad zip central directory: {e}")))?;
        r.seek_relative((extra_len + comment_len) as i64)
            .map_err(|e| MarError::Corrupt(format!("bad zip central directory: {e}")))?;
        if names.len() >= max_entries {
            return Err(MarError::TooManyEntries { limit: max_entries });
        }
        if !names.insert(name.clone()) {
            return Err(MarError::Duplicate {
                entry: String::from_utf8_lossy(&name).into_owned(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// tar.gz

/// Wraps the decompressed tar stream and fails a read once the stream passes `allowed`
/// bytes, so tar metadata the reader would buffer in memory (long names, PAX records) is
/// bounded. The unpacker moves `allowed` forward entry by entry.
struct StreamGuard<R> {
    inner: R,
    consumed: Rc<Cell<u64>>,
    allowed: Rc<Cell<u64>>,
    tripped: Rc<Cell<bool>>,
}

impl<R: Read> Read for StreamGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.allowed.get().saturating_sub(self.consumed.get());
        if left == 0 {
            self.tripped.set(true);
            return Err(io::Error::other("tar metadata limit reached"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.consumed.set(self.consumed.get() + n as u64);
        Ok(n)
    }
}

/// A reader that counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get().saturating_add(n as u64));
        Ok(n)
    }
}

fn unpack_tgz(
    reopen: &dyn Fn() -> io::Result<Box<dyn ReadSeek>>,
    dest: &Path,
    budget: &mut Budget,
) -> Result<(), MarError> {
    let file = reopen().map_err(|e| MarError::io("read the model archive", e))?;
    let read = Rc::new(Cell::new(0u64));
    budget.read = Read_::Counted(Rc::clone(&read));
    let file = Counting {
        inner: file,
        count: read,
    };
    let consumed = Rc::new(Cell::new(0u64));
    let allowed = Rc::new(Cell::new(MAX_TAR_ENTRY_METADATA));
    let tripped = Rc::new(Cell::new(false));
    let guard = StreamGuard {
        inner: flate2::read::MultiGzDecoder::new(BufReader::new(file)),
        consumed: Rc::clone(&consumed),
        allowed: Rc::clone(&allowed),
        tripped: Rc::clone(&tripped),
    };
    let tar_error = |e: io::Error| {
        if tripped.get() {
            MarError::Corrupt(format!(
                "a tar entry carries more than {MAX_TAR_ENTRY_METADATA} bytes of headers"
            ))
        } else {
            MarError::Corrupt(format!("bad tar.gz: {e}"))
        }
    };

    let mut archive = tar::Archive::new(guard);
    let mut writer = Writer::new(dest);
    {
        let mut entries = archive.entries().map_err(tar_error)?;
        loop {
            allowed.set(consumed.get().saturating_add(MAX_TAR_ENTRY_METADATA));
            let mut entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(tar_error(e)),
            };
            budget.add_entry()?;
            // Let the entry's data (and its padding to 512 bytes) through.
            let size = entry.size();
            allowed.set(consumed.get().saturating_add(size).saturating_add(512));

            let name = String::from_utf8(entry.path_bytes().into_owned())
                .map_err(|_| MarError::Corrupt("a tar entry name is not UTF-8".into()))?;
            let kind = entry.header().entry_type();
            use tar::EntryType;
            let is_dir = match kind {
                EntryType::Regular | EntryType::Continuous => name.ends_with('/'),
                EntryType::Directory => true,
                EntryType::XGlobalHeader => {
                    io::copy(&mut entry, &mut io::sink()).map_err(tar_error)?;
                    continue;
                }
                EntryType::Symlink => {
                    return Err(MarError::unsafe_entry(
                        &name,
                        "is a symbolic link; model archives must hold only files and folders",
                    ))
                }
                EntryType::Link => {
                    return Err(MarError::unsafe_entry(
                        &name,
                        "is a hard link; model archives must hold only files and folders",
                    ))
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    return Err(MarError::unsafe_entry(
                        &name,
                        "is a device or pipe; model archives must hold only files and folders",
                    ))
                }
                other => {
                    return Err(MarError::unsafe_entry(
                        &name,
                        format!(
                            "has tar entry type {:?}; model archives must hold only files and \
                             folders",
                            char::from(other.as_byte())
                        ),
                    ))
                }
            };

            let rel = strip_top_folder(&relative_path(&name)?, is_dir);
            if is_dir {
                writer.dir(&name, &rel)?;
                io::copy(&mut entry, &mut io::sink()).map_err(tar_error)?;
                continue;
            }
            if rel.as_os_str().is_empty() {
                return Err(MarError::unsafe_entry(&name, "does not name a file"));
            }
            budget.check_declared(size)?;
            let mut out = writer.file(&name, &rel)?;
            let written = copy_entry(&name, &mut entry, &mut out, budget)?;
            if written != size {
                return Err(MarError::Corrupt(format!(
                    "entry {name:?} is truncated ({written} of {size} bytes)"
                )));
            }
        }
    }

    // Read what follows the end-of-archive marker so the gzip CRC and length are checked.
    allowed.set(consumed.get().saturating_add(MAX_TGZ_TRAILER));
    let mut rest = archive.into_inner();
    match io::copy(&mut rest, &mut io::sink()) {
        Ok(_) => Ok(()),
        // A long trailer is not worth refusing the archive for; its tar content is complete.
        Err(_) if tripped.get() => Ok(()),
        Err(e) => Err(MarError::Corrupt(format!("bad tar.gz: {e}"))),
    }
}

/// Drops the first path component, as TorchServe does for tar.gz archives (whose entries
/// sit under `<model-name>/`). The top folder itself becomes the root; a file of one
/// component keeps its name, as in TorchServe.
fn strip_top_folder(rel: &Path, is_dir: bool) -> PathBuf {
    let mut comps = rel.components();
    match (comps.next(), rel.components().count()) {
        (Some(_), n) if n > 1 => comps.as_path().to_path_buf(),
        (Some(_), _) if is_dir => PathBuf::new(),
        _ => rel.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn relative_path_cleans_and_refuses() {
        assert_eq!(relative_path("a/./b//c").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(relative_path("./").unwrap(), PathBuf::new());
        for bad in ["../a", "a/../b", "/a", "a\\b", "a\0b", ".."] {
            assert!(
                matches!(relative_path(bad), Err(MarError::Unsafe { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tar_top_folder_is_stripped() {
        let strip = |p: &str, dir| strip_top_folder(Path::new(p), dir);
        assert_eq!(
            strip("demo/MAR-INF/MANIFEST.json", false),
            PathBuf::from("MAR-INF/MANIFEST.json")
        );
        assert_eq!(strip("demo", true), PathBuf::new());
        assert_eq!(strip("loose.txt", false), PathBuf::from("loose.txt"));
    }

    #[test]
    fn folder_stem_is_safe() {
        assert_eq!(folder_stem("resnet-18_v1.0"), "resnet-18_v1.0");
        assert_eq!(folder_stem("../../x y"), "_.._x_y");
        assert_eq!(folder_stem("..."), "model");
        assert_eq!(folder_stem(""), "model");
    }
}
