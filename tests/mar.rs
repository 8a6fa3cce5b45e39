//! Model archives: the formats the real torch-model-archiver 0.12 writes open to the same
//! model, model-config YAMLs are read as leniently as TorchServe reads them, and hostile or
//! damaged archives are refused without writing anything outside (or leaving anything in)
//! the unpack folder.
//!
//! Run: `cargo test -p torchfn-archive --test mar` (neither libtorch nor the Python venv is
//! needed: the archives are the checked-in ones of `tests/fixtures/small`).

#![allow(clippy::unwrap_used)]

use torchfn_test_support as common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use torchfn_archive::manifest::{Manifest, Runtime};
use torchfn_archive::mar::{self, ArchiveFormat, Limits, MarError, ModelArchive};
use torchfn_archive::model_config::{DeviceType, ModelConfig, ParallelType};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

// ---------------------------------------------------------------------------------------
// helpers

/// A scratch folder holding `input/` (archives made by a test) and `root/` (the unpack
/// root), so a test can check that nothing appeared anywhere else.
struct Sandbox {
    base: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let base = tempfile::tempdir().unwrap();
        fs::create_dir(base.path().join("input")).unwrap();
        fs::create_dir(base.path().join("root")).unwrap();
        fs::write(base.path().join("sentinel.txt"), b"untouched").unwrap();
        Sandbox { base }
    }

    fn root(&self) -> PathBuf {
        self.base.path().join("root")
    }

    /// Writes an archive into `input/` and returns its path.
    fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.base.path().join("input").join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    fn open(&self, archive: &Path) -> Result<ModelArchive, MarError> {
        mar::open(archive, &self.root(), &Limits::default())
    }

    fn open_with(&self, archive: &Path, limits: Limits) -> Result<ModelArchive, MarError> {
        mar::open(archive, &self.root(), &limits)
    }

    /// Nothing outside `input/` and `root/` changed, and `root/` is empty.
    fn assert_clean(&self) {
        let top = listing(self.base.path());
        assert_eq!(
            top,
            BTreeSet::from(["input".to_string(), "root".into(), "sentinel.txt".into()]),
            "something was written beside the unpack root"
        );
        assert_eq!(
            fs::read(self.base.path().join("sentinel.txt")).unwrap(),
            b"untouched"
        );
        let left = listing(&self.root());
        assert!(
            left.is_empty(),
            "the unpack root is not empty after a failure: {left:?}"
        );
    }
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn manifest_json(name: &str, serialized: &str) -> String {
    format!(
        r#"{{
  "createdOn": "25/11/2026 12:18:49",
  "runtime": "python",
  "model": {{
    "modelName": "{name}",
    "serializedFile": "{serialized}",
    "handler": "base_handler",
    "modelVersion": "1.0"
  }},
  "archiverVersion": "0.12.0"
}}"#
    )
}

fn stored() -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .unix_permissions(0o644)
}

fn deflated() -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(0o644)
}

/// A zip of `(name, bytes)` files, written as given (names are not checked).
fn zip_of(files: &[(&str, &[u8])], options: SimpleFileOptions) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes) in files {
        w.start_file(*name, options).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// The files of a small valid archive named `tiny`.
fn tiny_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.pt", b"not really torchscript".to_vec()),
        (
            "MAR-INF/MANIFEST.json",
            manifest_json("tiny", "model.pt").into_bytes(),
        ),
    ]
}

/// A valid zip with `extra` files appended after the real ones (so some files are already
/// written when a bad entry is met).
fn tiny_zip_with(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let base = tiny_files();
    let mut files: Vec<(&str, &[u8])> = base.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    files.extend_from_slice(extra);
    zip_of(&files, stored())
}

/// A tar header whose name bytes are written as given, bypassing the tar crate's checks.
fn raw_header(name: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    h.set_cksum();
    h
}

/// A tar.gz of a valid `tiny/` archive followed by `extra` raw entries.
fn tiny_tgz_with(extra: &[(tar::Header, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, bytes) in tiny_files() {
        let h = raw_header(
            &format!("tiny/{name}"),
            tar::EntryType::Regular,
            bytes.len() as u64,
            None,
        );
        b.append(&h, bytes.as_slice()).unwrap();
    }
    for (h, data) in extra {
        b.append(h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

/// A checked-in fixture (no venv or libtorch needed).
fn fixture(rel: &str) -> PathBuf {
    common::small_fixtures().join(rel)
}

// ---------------------------------------------------------------------------------------
// real archives

#[test]
fn every_archiver_format_opens_to_the_same_model() {
    let sb = Sandbox::new();
    let want_model = fs::read(fixture("models/model_scripted.pt")).unwrap();
    let cases = [
        ("formats/default/classifier.mar", ArchiveFormat::Zip),
        ("formats/zip-store/classifier.mar", ArchiveFormat::Zip),
        ("formats/tgz/classifier.tar.gz", ArchiveFormat::Tgz),
        ("formats/no-archive/classifier", ArchiveFormat::Directory),
    ];
    let mut manifests = Vec::new();
    for (rel, format) in cases {
        let a = sb
            .open(&fixture(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(a.format(), format, "{rel}");
        assert_eq!(a.model_name(), "classifier", "{rel}");
        assert_eq!(a.model_version(), "1.0", "{rel}");
        let m = a.manifest();
        assert_eq!(m.runtime, Runtime::Python, "{rel}");
        assert_eq!(m.archiver_version.as_deref(), Some("0.12.0"), "{rel}");
        assert_eq!(
            m.model.serialized_file.as_deref(),
            Some("model_scripted.pt"),
            "{rel}"
        );
        assert_eq!(m.model.handler.as_deref(), Some("handler.py"), "{rel}");
        assert!(a.config().is_none(), "{rel}");
        let model = fs::read(a.path_of("model_scripted.pt").unwrap()).unwrap();
        assert_eq!(model, want_model, "{rel}: model bytes differ");
        assert!(a.has_file("index_to_name.json"), "{rel}");
        assert!(a.has_file("handler.py"), "{rel}");
        assert!(a.has_file("MAR-INF/MANIFEST.json"), "{rel}");
        assert!(!a.has_file("nope.txt"), "{rel}");
        // The tgz's `classifier/` top folder is stripped.
        assert!(!a.dir().join("classifier").exists(), "{rel}");
        manifests.push(m.clone());
    }
    // The archiver stamps each archive with its own creation second; the rest is identical.
    for m in &mut manifests {
        assert!(m.created_on.is_some());
        m.created_on = None;
    }
    for m in &manifests[1..] {
        assert_eq!(m, &manifests[0]);
    }
}

/// With the model held in memory, a zip's serializedFile never reaches the unpack folder:
/// libtorch reads it through `/proc/self/fd`, everything else unpacks as before, and code
/// that asks for the file on disk (the Python backend, a handler reading it by path) gets it
/// written out. A tar.gz unpacks everything to disk.
#[test]
fn the_model_file_can_be_kept_in_memory() {
    let sb = Sandbox::new();
    let model: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let manifest = manifest_json("held", "weights/model.pt");
    let files: Vec<(&str, &[u8])> = vec![
        ("index_to_name.json", b"{}"),
        ("weights/model.pt", &model),
        ("MAR-INF/MANIFEST.json", manifest.as_bytes()),
    ];
    let path = sb.put("held.mar", &zip_of(&files, deflated()));
    let archive = mar::open_with(&path, &sb.root(), &Limits::default(), true).unwrap();
    let on_disk = archive.dir().join("weights/model.pt");
    assert!(!on_disk.exists(), "the held model file was written to disk");
    assert!(archive.dir().join("index_to_name.json").is_file());
    assert!(archive.has_file("weights/model.pt"));
    let (from, held) = archive.model_source("weights/model.pt").unwrap();
    let held = held.expect("a zip's model file is held where memfd exists");
    assert!(from.starts_with("/proc/self/fd"), "{}", from.display());
    assert_eq!(held.len(), model.len() as u64);
    assert_eq!(fs::read(&from).unwrap(), model);
    drop(held);
    // Handed over once: now neither in memory nor on disk.
    assert!(!archive.has_file("weights/model.pt"));

    // Asking for its path writes it out.
    let archive = mar::open_with(&path, &sb.root(), &Limits::default(), true).unwrap();
    let p = archive.path_of("weights/model.pt").unwrap();
    assert_eq!(fs::read(&p).unwrap(), model);
    let (from, held) = archive.model_source("weights/model.pt").unwrap();
    assert!(held.is_none());
    assert_eq!(from, p);
    // So does materialize.
    let archive = mar::open_with(&path, &sb.root(), &Limits::default(), true).unwrap();
    archive.materialize().unwrap();
    assert_eq!(
        fs::read(archive.dir().join("weights/model.pt")).unwrap(),
        model
    );
    drop(archive);

    // Without holding, and for a tar.gz, the model file is on disk.
    let archive = mar::open_with(&path, &sb.root(), &Limits::default(), false).unwrap();
    assert!(archive.dir().join("weights/model.pt").is_file());
    assert!(archive
        .model_source("weights/model.pt")
        .unwrap()
        .1
        .is_none());
    let tgz = sb.put("tiny.tar.gz", &tiny_tgz_with(&[]));
    let archive = mar::open_with(&tgz, &sb.root(), &Limits::default(), true).unwrap();
    assert!(archive.dir().join("model.pt").is_file());
}

#[test]
fn unpacked_folder_is_removed_on_drop_but_a_directory_is_not() {
    let sb = Sandbox::new();
    let a = sb.open(&fixture("formats/default/classifier.mar")).unwrap();
    let dir = a.dir().to_path_buf();
    assert!(dir.starts_with(sb.root()));
    assert!(dir.join("model_scripted.pt").is_file());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("classifier-"), "{name}");
    assert_eq!(listing(&sb.root()).len(), 1);
    drop(a);
    assert!(!dir.exists());
    assert!(listing(&sb.root()).is_empty());

    let src = fixture("formats/no-archive/classifier");
    let a = sb.open(&src).unwrap();
    assert_eq!(a.dir(), src);
    drop(a);
    assert!(src.join("MAR-INF/MANIFEST.json").is_file());
    assert!(listing(&sb.root()).is_empty());
}

#[test]
fn two_opens_of_one_archive_get_separate_folders() {
    let sb = Sandbox::new();
    let a = sb.open(&fixture("store/scripted.mar")).unwrap();
    let b = sb.open(&fixture("store/scripted.mar")).unwrap();
    assert_ne!(a.dir(), b.dir());
    drop(a);
    assert!(b.dir().join("model_scripted.pt").is_file());
}

#[test]
fn eager_archive_manifest_names_its_model_file() {
    let sb = Sandbox::new();
    let a = sb.open(&fixture("eager/eager.mar")).unwrap();
    let m = &a.manifest().model;
    assert_eq!(m.model_name, "eager");
    assert_eq!(m.model_file.as_deref(), Some("model.py"));
    assert_eq!(m.serialized_file.as_deref(), Some("model_weights.pth"));
    assert_eq!(m.handler.as_deref(), Some("base_handler"));
    assert!(a.has_file("model.py"));
}

#[test]
fn conv_archive_model_config_is_parsed() {
    let sb = Sandbox::new();
    let a = sb.open(&fixture("store/conv.mar")).unwrap();
    assert_eq!(
        a.manifest().model.config_file.as_deref(),
        Some("model-config.yaml")
    );
    let c = a.config().expect("conv.mar has a model config");
    assert_eq!(c.min_workers, Some(1));
    assert_eq!(c.max_workers, Some(2));
    assert_eq!(c.batch_size, Some(8));
    assert_eq!(c.max_batch_delay, Some(5));
    assert_eq!(c.response_timeout, Some(30));
    assert_eq!(c.device_type, Some(DeviceType::Cpu));
    assert_eq!(
        c.backend.get("handler"),
        Some(&serde_json::json!({"note": "backend parameter"}))
    );
    assert_eq!(c.backend.len(), 1);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn content_decides_the_format_not_the_extension() {
    let sb = Sandbox::new();
    // A tar.gz named .mar and a zip named .tar.gz both open.
    let tgz = fs::read(fixture("formats/tgz/classifier.tar.gz")).unwrap();
    let a = sb.open(&sb.put("classifier.mar", &tgz)).unwrap();
    assert_eq!(a.format(), ArchiveFormat::Tgz);
    let zip = fs::read(fixture("formats/default/classifier.mar")).unwrap();
    let b = sb.open(&sb.put("classifier.tar.gz", &zip)).unwrap();
    assert_eq!(b.format(), ArchiveFormat::Zip);
}

#[test]
fn nested_folders_and_directory_entries_unpack() {
    let sb = Sandbox::new();
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.add_directory("sub/", stored()).unwrap();
    for (name, bytes) in tiny_files() {
        w.start_file(name, deflated()).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.start_file("sub/deeper/b.txt", deflated()).unwrap();
    w.write_all(b"b").unwrap();
    w.start_file("./c.txt", stored()).unwrap();
    w.write_all(b"c").unwrap();
    let bytes = w.finish().unwrap().into_inner();
    let a = sb.open(&sb.put("nested.mar", &bytes)).unwrap();
    assert_eq!(
        fs::read(a.path_of("sub/deeper/b.txt").unwrap()).unwrap(),
        b"b"
    );
    assert!(a.has_file("c.txt"));
    assert_eq!(a.model_name(), "tiny");
}

#[test]
fn unpack_root_is_created_when_missing() {
    let sb = Sandbox::new();
    let root = sb.root().join("a/b");
    let a = mar::open(&fixture("store/scripted.mar"), &root, &Limits::default()).unwrap();
    assert!(a.dir().starts_with(&root));
}

#[test]
fn path_of_refuses_escaping_names() {
    let sb = Sandbox::new();
    let a = sb.open(&fixture("store/scripted.mar")).unwrap();
    for bad in ["../x", "/etc/passwd", "a/../../x", "", "a\\..\\x"] {
        let e = a.path_of(bad).unwrap_err();
        assert!(matches!(e, MarError::Unsafe { .. }), "{bad:?}: {e}");
        assert!(!a.has_file(bad));
    }
    assert_eq!(
        a.path_of("./model_scripted.pt").unwrap(),
        a.dir().join("model_scripted.pt")
    );
}

#[test]
fn missing_source_is_not_found() {
    let sb = Sandbox::new();
    let e = sb.open(&sb.base.path().join("input/nope.mar")).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("nope.mar"), "{e}");
    sb.assert_clean();
}

// ---------------------------------------------------------------------------------------
// manifest

#[test]
fn manifest_parse_checks_like_the_frontend() {
    let e = Manifest::parse(b"{not json").unwrap_err();
    assert!(matches!(e, MarError::InvalidManifest(_)), "{e}");
    assert!(e.to_string().contains("not valid JSON"), "{e}");

    let e = Manifest::parse(br#"{"runtime": "python"}"#).unwrap_err();
    assert!(
        e.to_string()
            .contains("Missing Model entry in manifest file."),
        "{e}"
    );

    let e = Manifest::parse(br#"{"runtime": "python", "model": {"handler": "x"}}"#).unwrap_err();
    assert!(e.to_string().contains("Model name is not defined."), "{e}");

    for runtime in [r#""runtime": "java","#, ""] {
        let text = format!(r#"{{{runtime} "model": {{"modelName": "m"}}}}"#);
        let e = Manifest::parse(text.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("Runtime is not defined or invalid."),
            "{e}"
        );
    }
}

#[test]
fn manifest_defaults_version_and_keeps_unknown_keys() {
    let text = br#"{
      "runtime": "LSP", "description": "top", "futureKey": [1, 2],
      "model": {"modelName": "m", "handler": "h:fn", "envelope": "json",
                "description": "d", "version": 3, "extensions": "e", "newThing": {"a": 1}}
    }"#;
    let m = Manifest::parse(text).unwrap();
    assert_eq!(m.runtime, Runtime::Lsp);
    assert_eq!(m.model.model_version, "1.0");
    assert_eq!(m.model.version.as_deref(), Some("3"));
    assert_eq!(m.model.envelope.as_deref(), Some("json"));
    assert_eq!(m.model.extensions.as_deref(), Some("e"));
    assert_eq!(m.description.as_deref(), Some("top"));
    assert_eq!(m.extra["futureKey"], serde_json::json!([1, 2]));
    assert_eq!(m.model.extra["newThing"], serde_json::json!({"a": 1}));
    // Round trip keeps everything.
    let again = Manifest::parse(&serde_json::to_vec(&m).unwrap()).unwrap();
    assert_eq!(again, m);

    let m = Manifest::parse(
        br#"{"runtime": "python3", "model": {"modelName": "m", "modelVersion": 2.5}}"#,
    )
    .unwrap();
    assert_eq!(m.model_version(), "2.5");
}

// ---------------------------------------------------------------------------------------
// model config

#[test]
fn model_config_ignores_wrong_types_with_warnings() {
    let c = ModelConfig::parse(
        "minWorkers: two\nmaxWorkers: 1.5\nbatchSize: [1]\nresponseTimeout: '30'\n\
         deviceType: 1\nuseJobTicket: 'yes'\ndeviceIds: [0, gpu1]\nparallelType: xx\n\
         startupTimeout: 99999999999\n",
    )
    .unwrap();
    assert_eq!(c.min_workers, None);
    assert_eq!(c.max_workers, None);
    assert_eq!(c.batch_size, None);
    assert_eq!(c.response_timeout, None);
    assert_eq!(c.device_type, None);
    assert_eq!(c.use_job_ticket, None);
    assert_eq!(c.device_ids, None);
    assert_eq!(c.parallel_type, None);
    assert_eq!(c.startup_timeout, None);
    assert_eq!(c.warnings.len(), 9, "{:#?}", c.warnings);
    for key in [
        "minWorkers",
        "maxWorkers",
        "batchSize",
        "responseTimeout",
        "deviceType",
    ] {
        assert!(
            c.warnings.iter().any(|w| w.contains(key)),
            "no warning for {key}: {:?}",
            c.warnings
        );
    }
    assert!(c.backend.is_empty());
}

#[test]
fn model_config_clamps_out_of_range_values() {
    let c = ModelConfig::parse(
        "minWorkers: 0\nbatchSize: -4\nmaxWorkers: -1\nmaxBatchDelay: -5\nresponseTimeout: 0\n\
         parallelLevel: 0\njobQueueSize: -1\n",
    )
    .unwrap();
    assert_eq!(c.min_workers, Some(1));
    assert_eq!(c.batch_size, Some(1));
    assert_eq!(c.max_workers, None);
    assert_eq!(c.max_batch_delay, None);
    assert_eq!(c.response_timeout, None);
    assert_eq!(c.parallel_level, Some(1));
    assert_eq!(c.job_queue_size, None);
    assert_eq!(c.warnings.len(), 7, "{:#?}", c.warnings);

    let c = ModelConfig::parse("maxWorkers: 0\nmaxBatchDelay: 0\n").unwrap();
    assert_eq!(c.max_workers, Some(0));
    assert_eq!(c.max_batch_delay, Some(0));
    assert!(c.warnings.is_empty());
}

#[test]
fn model_config_reads_every_frontend_key() {
    let c = ModelConfig::parse(
        "minWorkers: 2\nmaxWorkers: 4\nbatchSize: 16\nmaxBatchDelay: 50\nresponseTimeout: 60\n\
         startupTimeout: 90\ndeviceType: GPU\ndeviceIds: [0, 1]\nparallelType: pptp\n\
         parallelLevel: 2\ntorchrun:\n  nproc-per-node: 2\nmaxRetryTimeoutInSec: 10\n\
         clientTimeoutInMills: 500\njobQueueSize: 7\nuseJobTicket: true\n\
         continuousBatching: true\nsequenceBatching: false\nasyncCommunication: true\n\
         sequenceMaxIdleMSec: 11\nsequenceTimeoutMSec: 12\nmaxSequenceJobQueueSize: 3\n\
         maxNumSequence: 4\nuseVenv: false\npt2: {backend: inductor}\n",
    )
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.min_workers, Some(2));
    assert_eq!(c.max_workers, Some(4));
    assert_eq!(c.batch_size, Some(16));
    assert_eq!(c.max_batch_delay, Some(50));
    assert_eq!(c.response_timeout, Some(60));
    assert_eq!(c.startup_timeout, Some(90));
    assert_eq!(c.device_type, Some(DeviceType::Gpu));
    assert_eq!(c.device_ids, Some(vec![0, 1]));
    assert_eq!(c.parallel_type, Some(ParallelType::PpTp));
    assert_eq!(c.parallel_level, Some(2));
    assert_eq!(
        c.torchrun.as_ref().unwrap()["nproc-per-node"],
        serde_json::json!(2)
    );
    assert_eq!(c.max_retry_timeout_in_sec, Some(10));
    assert_eq!(c.client_timeout_in_mills, Some(500));
    assert_eq!(c.job_queue_size, Some(7));
    assert_eq!(c.use_job_ticket, Some(true));
    assert_eq!(c.continuous_batching, Some(true));
    assert_eq!(c.sequence_batching, Some(false));
    assert_eq!(c.async_communication, Some(true));
    assert_eq!(c.sequence_max_idle_msec, Some(11));
    assert_eq!(c.sequence_timeout_msec, Some(12));
    assert_eq!(c.max_sequence_job_queue_size, Some(3));
    assert_eq!(c.max_num_sequence, Some(4));
    assert_eq!(c.use_venv, Some(false));
    assert_eq!(c.backend["pt2"], serde_json::json!({"backend": "inductor"}));
}

#[test]
fn model_config_rejects_bad_yaml_and_accepts_empty() {
    let e = ModelConfig::parse("minWorkers: [1, 2\n").unwrap_err();
    assert!(matches!(e, MarError::InvalidConfig(_)), "{e}");
    assert!(e.to_string().contains("not valid YAML"), "{e}");
    let e = ModelConfig::parse("- 1\n- 2\n").unwrap_err();
    assert!(matches!(e, MarError::InvalidConfig(_)), "{e}");
    assert_eq!(ModelConfig::parse("").unwrap(), ModelConfig::default());
    assert_eq!(
        ModelConfig::parse("# only a comment\n").unwrap(),
        ModelConfig::default()
    );
}

#[test]
fn archive_with_invalid_config_yaml_is_refused() {
    let sb = Sandbox::new();
    let manifest = r#"{"runtime": "python", "model": {"modelName": "m",
        "serializedFile": "model.pt", "configFile": "model-config.yaml"}}"#;
    let bytes = zip_of(
        &[
            ("model.pt", b"x"),
            ("model-config.yaml", b"minWorkers: [1\n"),
            ("MAR-INF/MANIFEST.json", manifest.as_bytes()),
        ],
        deflated(),
    );
    let e = sb.open(&sb.put("bad-config.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::InvalidConfig(_)), "{e}");
    sb.assert_clean();
}

// ---------------------------------------------------------------------------------------
// hostile and damaged archives

#[test]
fn zip_slip_is_refused() {
    for evil in [
        "../evil",
        "../../evil",
        "sub/../../evil",
        "MAR-INF/../../evil",
    ] {
        let sb = Sandbox::new();
        let bytes = tiny_zip_with(&[(evil, b"pwned")]);
        let e = sb.open(&sb.put("slip.mar", &bytes)).unwrap_err();
        assert!(
            matches!(&e, MarError::Unsafe { entry, .. } if entry == evil),
            "{evil}: {e}"
        );
        assert!(e.to_string().contains(".."), "{e}");
        sb.assert_clean();
    }
}

#[test]
fn absolute_paths_are_refused() {
    let target = std::env::temp_dir().join(format!("torchfn-evil-{}", std::process::id()));
    let name = target.to_str().unwrap().to_string();
    let sb = Sandbox::new();
    let bytes = tiny_zip_with(&[(&name, b"pwned")]);
    let e = sb.open(&sb.put("abs.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Unsafe { .. }), "{e}");
    assert!(e.to_string().contains("absolute"), "{e}");
    assert!(!target.exists());
    sb.assert_clean();

    let sb = Sandbox::new();
    let h = raw_header(&name, tar::EntryType::Regular, 5, None);
    let bytes = tiny_tgz_with(&[(h, b"pwned".to_vec())]);
    let e = sb.open(&sb.put("abs.tar.gz", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Unsafe { .. }), "{e}");
    assert!(!target.exists());
    sb.assert_clean();
}

#[test]
fn tgz_slip_is_refused() {
    let sb = Sandbox::new();
    let h = raw_header("tiny/../../evil", tar::EntryType::Regular, 5, None);
    let bytes = tiny_tgz_with(&[(h, b"pwned".to_vec())]);
    let e = sb.open(&sb.put("slip.tar.gz", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Unsafe { .. }), "{e}");
    sb.assert_clean();
}

#[test]
fn zip_symlink_is_refused() {
    let sb = Sandbox::new();
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes) in tiny_files() {
        w.start_file(name, stored()).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.add_symlink("link", "/etc/passwd", stored()).unwrap();
    let bytes = w.finish().unwrap().into_inner();
    let e = sb.open(&sb.put("link.mar", &bytes)).unwrap_err();
    assert!(
        matches!(&e, MarError::Unsafe { entry, .. } if entry == "link"),
        "{e}"
    );
    assert!(e.to_string().contains("symbolic link"), "{e}");
    sb.assert_clean();
}

#[test]
fn zip_special_file_is_refused() {
    let sb = Sandbox::new();
    let mut bytes = tiny_zip_with(&[("fifo", b"")]);
    // Give the last central-directory entry ("fifo") the unix mode of a named pipe.
    let cd = bytes.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    bytes[cd + 38..cd + 42].copy_from_slice(&((0o010644u32) << 16).to_le_bytes());
    let e = sb.open(&sb.put("fifo.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Unsafe { .. }), "{e}");
    sb.assert_clean();
}

#[test]
fn tgz_links_and_special_files_are_refused() {
    let cases = [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Fifo, "device or pipe"),
        (tar::EntryType::Char, "device or pipe"),
    ];
    for (kind, words) in cases {
        let sb = Sandbox::new();
        let h = raw_header("tiny/bad", kind, 0, Some("/etc/passwd"));
        let bytes = tiny_tgz_with(&[(h, Vec::new())]);
        let e = sb.open(&sb.put("bad.tar.gz", &bytes)).unwrap_err();
        assert!(
            matches!(&e, MarError::Unsafe { entry, .. } if entry == "tiny/bad"),
            "{kind:?}: {e}"
        );
        assert!(e.to_string().contains(words), "{kind:?}: {e}");
        sb.assert_clean();
    }
}

#[test]
fn tgz_with_huge_long_name_header_is_refused() {
    // A GNU long-name record is held in memory by the tar reader; it must be capped.
    let sb = Sandbox::new();
    let long = vec![b'a'; 2 * 1024 * 1024];
    let h = raw_header(
        "././@LongLink",
        tar::EntryType::GNULongName,
        long.len() as u64,
        None,
    );
    let file = raw_header("tiny/x", tar::EntryType::Regular, 1, None);
    let bytes = tiny_tgz_with(&[(h, long), (file, b"x".to_vec())]);
    let e = sb.open(&sb.put("longname.tar.gz", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("headers"), "{e}");
    sb.assert_clean();
}

#[test]
fn oversized_archives_are_refused() {
    let limits = Limits {
        max_unpacked_bytes: 1024 * 1024,
        ..Limits::default()
    };
    let big = vec![0u8; 2 * 1024 * 1024];

    let sb = Sandbox::new();
    let bytes = tiny_zip_with(&[("big.bin", &big)]);
    let e = sb
        .open_with(&sb.put("big.mar", &bytes), limits)
        .unwrap_err();
    assert!(
        matches!(e, MarError::TooLarge { limit } if limit == 1024 * 1024),
        "{e}"
    );
    assert!(e.to_string().contains("1048576 bytes"), "{e}");
    sb.assert_clean();

    let sb = Sandbox::new();
    let h = raw_header(
        "tiny/big.bin",
        tar::EntryType::Regular,
        big.len() as u64,
        None,
    );
    let bytes = tiny_tgz_with(&[(h, big.clone())]);
    let e = sb
        .open_with(&sb.put("big.tar.gz", &bytes), limits)
        .unwrap_err();
    assert!(matches!(e, MarError::TooLarge { .. }), "{e}");
    sb.assert_clean();

    // Many files, each small, together too big.
    let sb = Sandbox::new();
    let chunk = vec![1u8; 300 * 1024];
    let names: Vec<String> = (0..5).map(|i| format!("part{i}.bin")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .map(|n| (n.as_str(), chunk.as_slice()))
        .collect();
    let bytes = tiny_zip_with(&files);
    let e = sb
        .open_with(&sb.put("parts.mar", &bytes), limits)
        .unwrap_err();
    assert!(matches!(e, MarError::TooLarge { .. }), "{e}");
    sb.assert_clean();
}

#[test]
fn zip_bomb_lying_about_its_size_is_stopped() {
    let limits = Limits {
        max_unpacked_bytes: 1024 * 1024,
        ..Limits::default()
    };
    let sb = Sandbox::new();
    // 8 MiB of zeros deflates to a few KiB; then both headers are made to claim 1000 bytes.
    let zeros = vec![0u8; 8 * 1024 * 1024];
    let mut bytes = zip_of(&[("bomb.bin", &zeros)], deflated());
    let claimed = 1000u32.to_le_bytes();
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    bytes[22..26].copy_from_slice(&claimed);
    let cd = find(&bytes, b"PK\x01\x02");
    bytes[cd + 24..cd + 28].copy_from_slice(&claimed);
    // Check the lie took: the zip reader believes the header.
    {
        let mut z = zip::ZipArchive::new(Cursor::new(bytes.clone())).unwrap();
        assert_eq!(z.by_index(0).unwrap().size(), 1000);
    }
    let e = sb
        .open_with(&sb.put("bomb.mar", &bytes), limits)
        .unwrap_err();
    assert!(matches!(e, MarError::TooLarge { .. }), "{e}");
    sb.assert_clean();
}

#[test]
fn too_many_entries_are_refused() {
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let names: Vec<String> = (0..20).map(|i| format!("f{i}.txt")).collect();

    let sb = Sandbox::new();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let bytes = tiny_zip_with(&files);
    let e = sb
        .open_with(&sb.put("many.mar", &bytes), limits)
        .unwrap_err();
    assert!(matches!(e, MarError::TooManyEntries { limit: 10 }), "{e}");
    assert!(e.to_string().contains("10 entries"), "{e}");
    sb.assert_clean();

    let sb = Sandbox::new();
    let extra: Vec<(tar::Header, Vec<u8>)> = names
        .iter()
        .map(|n| {
            (
                raw_header(&format!("tiny/{n}"), tar::EntryType::Regular, 1, None),
                b"x".to_vec(),
            )
        })
        .collect();
    let bytes = tiny_tgz_with(&extra);
    let e = sb
        .open_with(&sb.put("many.tar.gz", &bytes), limits)
        .unwrap_err();
    assert!(matches!(e, MarError::TooManyEntries { .. }), "{e}");
    sb.assert_clean();
}

#[test]
fn truncated_archives_are_corrupt() {
    for rel in [
        "formats/default/classifier.mar",
        "formats/zip-store/classifier.mar",
        "formats/tgz/classifier.tar.gz",
    ] {
        let sb = Sandbox::new();
        let full = fs::read(fixture(rel)).unwrap();
        let half = &full[..full.len() / 2];
        let e = sb.open(&sb.put("half", half)).unwrap_err();
        assert!(matches!(e, MarError::Corrupt(_)), "{rel}: {e}");
        assert!(e.to_string().contains("corrupt"), "{e}");
        sb.assert_clean();
    }
}

#[test]
fn tgz_cut_at_the_gzip_trailer_is_corrupt() {
    // The tar content is complete; only the gzip CRC and length are missing.
    let sb = Sandbox::new();
    let full = fs::read(fixture("formats/tgz/classifier.tar.gz")).unwrap();
    let e = sb
        .open(&sb.put("cut.tar.gz", &full[..full.len() - 4]))
        .unwrap_err();
    assert!(matches!(e, MarError::Corrupt(_)), "{e}");
    sb.assert_clean();
}

#[test]
fn bad_crc_is_corrupt() {
    let sb = Sandbox::new();
    let payload = b"the weights of a model, honestly".to_vec();
    let mut bytes = tiny_zip_with(&[("weights.bin", &payload)]);
    let at = find(&bytes, b"honestly");
    bytes[at] ^= 0xff;
    let e = sb.open(&sb.put("crc.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Corrupt(_)), "{e}");
    sb.assert_clean();
}

#[test]
fn garbage_and_empty_files_are_corrupt() {
    for (name, bytes) in [
        ("garbage.mar", b"this is not an archive at all".to_vec()),
        ("empty.mar", Vec::new()),
        ("fake-zip.mar", b"PK\x03\x04 and then nonsense".to_vec()),
        ("fake-gz.tar.gz", b"\x1f\x8b\x08\x00 nonsense".to_vec()),
    ] {
        let sb = Sandbox::new();
        let e = sb.open(&sb.put(name, &bytes)).unwrap_err();
        assert!(matches!(e, MarError::Corrupt(_)), "{name}: {e}");
        sb.assert_clean();
    }
}

#[test]
fn archive_without_manifest_is_refused() {
    let sb = Sandbox::new();
    let bytes = zip_of(&[("model.pt", b"x")], deflated());
    let e = sb.open(&sb.put("nomanifest.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::MissingManifest), "{e}");
    assert!(
        e.to_string()
            .contains("archive has no MAR-INF/MANIFEST.json"),
        "{e}"
    );
    sb.assert_clean();

    // The same for a folder, which is left as it is.
    let sb = Sandbox::new();
    let dir = sb.base.path().join("input/folder");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("model.pt"), b"x").unwrap();
    let e = sb.open(&dir).unwrap_err();
    assert!(matches!(e, MarError::MissingManifest), "{e}");
    assert!(dir.join("model.pt").is_file());
    sb.assert_clean();
}

#[test]
fn manifest_naming_a_missing_file_is_refused() {
    let sb = Sandbox::new();
    let manifest = manifest_json("tiny", "missing.pt");
    let bytes = zip_of(
        &[
            ("model.pt", b"x"),
            ("MAR-INF/MANIFEST.json", manifest.as_bytes()),
        ],
        deflated(),
    );
    let e = sb.open(&sb.put("missing.mar", &bytes)).unwrap_err();
    assert!(
        matches!(&e, MarError::MissingFile { field: "serializedFile", file }
            if file == "missing.pt"),
        "{e}"
    );
    assert!(e.to_string().contains("serializedFile"), "{e}");
    assert!(e.to_string().contains("missing.pt"), "{e}");
    sb.assert_clean();

    // A `.py` handler must be there too; a built-in name need not.
    let sb = Sandbox::new();
    let manifest = r#"{"runtime": "python", "model": {"modelName": "m",
        "serializedFile": "model.pt", "handler": "my_handler.py:handle"}}"#;
    let bytes = zip_of(
        &[
            ("model.pt", b"x"),
            ("MAR-INF/MANIFEST.json", manifest.as_bytes()),
        ],
        deflated(),
    );
    let e = sb.open(&sb.put("nohandler.mar", &bytes)).unwrap_err();
    assert!(
        matches!(&e, MarError::MissingFile { field: "handler", file } if file == "my_handler.py"),
        "{e}"
    );
    sb.assert_clean();

    // A manifest naming a file outside the archive.
    let sb = Sandbox::new();
    let manifest = manifest_json("tiny", "../../etc/passwd");
    let bytes = zip_of(
        &[("MAR-INF/MANIFEST.json", manifest.as_bytes())],
        deflated(),
    );
    let e = sb.open(&sb.put("outside.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::InvalidManifest(_)), "{e}");
    sb.assert_clean();
}

#[test]
fn invalid_manifest_in_an_archive_is_refused() {
    let sb = Sandbox::new();
    let bytes = zip_of(
        &[("MAR-INF/MANIFEST.json", br#"{"runtime": "python"}"#)],
        deflated(),
    );
    let e = sb.open(&sb.put("nomodel.mar", &bytes)).unwrap_err();
    assert!(
        e.to_string()
            .contains("Missing Model entry in manifest file."),
        "{e}"
    );
    sb.assert_clean();
}

#[test]
fn duplicate_entries_are_refused() {
    // The zip writer refuses duplicate names, so write two names and make them equal.
    let sb = Sandbox::new();
    let mut bytes = tiny_zip_with(&[("modelXpt", b"second copy")]);
    while let Some(at) = bytes.windows(8).position(|w| w == b"modelXpt") {
        bytes[at..at + 8].copy_from_slice(b"model.pt");
    }
    let e = sb.open(&sb.put("dupe.mar", &bytes)).unwrap_err();
    assert!(
        matches!(&e, MarError::Duplicate { entry } if entry == "model.pt"),
        "{e}"
    );
    assert!(e.to_string().contains("more than once"), "{e}");
    sb.assert_clean();

    // Names that differ but land on the same path.
    let sb = Sandbox::new();
    let bytes = tiny_zip_with(&[("./model.pt", b"second copy")]);
    let e = sb.open(&sb.put("dupe2.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Duplicate { .. }), "{e}");
    sb.assert_clean();

    // A file where a folder already is.
    let sb = Sandbox::new();
    let bytes = tiny_zip_with(&[("MAR-INF", b"not a folder")]);
    let e = sb.open(&sb.put("dupe3.mar", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Duplicate { .. }), "{e}");
    sb.assert_clean();

    let sb = Sandbox::new();
    let h = raw_header("tiny/model.pt", tar::EntryType::Regular, 6, None);
    let bytes = tiny_tgz_with(&[(h, b"second".to_vec())]);
    let e = sb.open(&sb.put("dupe.tar.gz", &bytes)).unwrap_err();
    assert!(matches!(e, MarError::Duplicate { .. }), "{e}");
    sb.assert_clean();
}

/// A compression bomb (zeros expand about 1000 times) is refused once it has written past the
/// floor, zip or tar.gz, with the limit's config key named; the same archive is taken under a
/// higher limit. Nothing is left behind.
#[test]
fn compression_bombs_are_refused_by_their_ratio() {
    let zeros = vec![0u8; (mar::EXPANSION_FLOOR + 2 * 1024 * 1024) as usize];
    let base = tiny_files();
    let mut files: Vec<(&str, &[u8])> = base.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    files.push(("zeros.bin", &zeros));
    let zip = zip_of(&files, deflated());
    let h = raw_header(
        "tiny/zeros.bin",
        tar::EntryType::Regular,
        zeros.len() as u64,
        None,
    );
    let tgz = tiny_tgz_with(&[(h, zeros.clone())]);
    for (name, bytes) in [("bomb.mar", &zip), ("bomb.tar.gz", &tgz)] {
        assert!(bytes.len() < 1 << 20, "{name}: {}", bytes.len());
        let sb = Sandbox::new();
        let e = sb.open(&sb.put(name, bytes)).unwrap_err();
        assert!(
            matches!(e, MarError::Expands { limit: 100, .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains("torchfn_archive_max_ratio"), "{e}");
        sb.assert_clean();

        let sb = Sandbox::new();
        let limits = Limits {
            max_expansion_ratio: 1_000_000,
            ..Limits::default()
        };
        let archive = sb.open_with(&sb.put(name, bytes), limits).unwrap();
        assert!(archive.has_file("zeros.bin"), "{name}");
    }
}

/// An entry declaring more bytes than the unpack folder has free is refused before anything
/// is written, and the message says where to point the unpacking.
#[test]
fn an_archive_larger_than_the_free_space_is_refused() {
    let sb = Sandbox::new();
    let h = raw_header("tiny/huge.bin", tar::EntryType::Regular, 1 << 60, None);
    let bytes = tiny_tgz_with(&[(h, Vec::new())]);
    let limits = Limits {
        max_unpacked_bytes: u64::MAX,
        ..Limits::default()
    };
    let e = sb
        .open_with(&sb.put("huge.tar.gz", &bytes), limits)
        .unwrap_err();
    assert!(
        matches!(e, MarError::NoSpace { needed, .. } if needed == 1 << 60),
        "{e}"
    );
    assert!(e.to_string().contains("torchfn_unpack_dir"), "{e}");
    sb.assert_clean();
}
