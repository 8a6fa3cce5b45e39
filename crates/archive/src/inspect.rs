//! Looking inside a model archive without unpacking it: its format, its `MAR-INF/MANIFEST.json`
//! and the names of its entries, which is what registering an archive needs.
//!
//! Zips (deflated or stored, zip64 included) are read through the `zip` crate from any
//! [`Read`] + [`Seek`]; only the end of central directory, the central directory and the
//! manifest's entry are touched. For an archive held remotely, [`RangeReader`] is such a reader
//! over byte ranges fetched on demand (the end of the archive first), so inspecting a large
//! archive reads a few tens of kilobytes rather than the whole object. A tar.gz has no index,
//! so it is read as a stream from start to end.
//!
//! Entry names come out as the unpacker in [`crate::mar`] would place them: a tar.gz's top
//! folder (`<model-name>/`) is stripped.

use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;

use crate::error::MarError;
use crate::manifest::Manifest;
use crate::mar::{ArchiveFormat, MANIFEST_PATH};

/// The most bytes a manifest may take (compressed or not).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// How many bytes at the end of a zip hold its end of central directory whatever its comment
/// (22 bytes of record and up to 65,535 of comment): what to fetch first.
pub const ZIP_TAIL_BYTES: u64 = 22 + 65_535;

/// What a model archive holds, read without unpacking it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contents {
    /// [`ArchiveFormat::Zip`] or [`ArchiveFormat::Tgz`].
    pub format: ArchiveFormat,
    /// The parsed `MAR-INF/MANIFEST.json`.
    pub manifest: Manifest,
    /// Every entry's name as it would be unpacked (folders included, a tar.gz's top folder
    /// stripped), in archive order.
    pub names: Vec<String>,
}

impl Contents {
    /// Whether the archive holds an entry of this name.
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// The archive format its first bytes (at least 4 of them) announce; the extension is not
/// trusted. Folders are not archives here.
pub fn format_of(head: &[u8]) -> Result<ArchiveFormat, MarError> {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(ArchiveFormat::Zip)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Ok(ArchiveFormat::Tgz)
    } else if head.is_empty() {
        Err(MarError::Corrupt("the file is empty".into()))
    } else {
        Err(MarError::Corrupt(
            "the file is neither a zip nor a gzip-compressed tar".into(),
        ))
    }
}

/// Inspects a zip or tar.gz archive, told apart by their first bytes.
pub fn inspect<R: Read + Seek>(mut reader: R) -> Result<Contents, MarError> {
    let mut head = Vec::with_capacity(4);
    (&mut reader)
        .take(4)
        .read_to_end(&mut head)
        .and_then(|_| reader.seek(SeekFrom::Start(0)))
        .map_err(|e| MarError::io("read the model archive", e))?;
    match format_of(&head)? {
        ArchiveFormat::Tgz => inspect_tgz(reader),
        _ => inspect_zip(reader),
    }
}

/// Inspects a zip archive (deflated or stored, zip64 or not): its entry names from the central
/// directory and its manifest from its own entry.
pub fn inspect_zip<R: Read + Seek>(reader: R) -> Result<Contents, MarError> {
    let mut archive = zip::ZipArchive::new(reader).map_err(zip_error)?;
    let names: Vec<String> = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(str::to_string))
        .collect();
    let mut entry = match archive.by_name(MANIFEST_PATH) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => return Err(MarError::MissingManifest),
        Err(e) => return Err(zip_error(e)),
    };
    if entry.encrypted() {
        return Err(MarError::Corrupt(format!(
            "entry {MANIFEST_PATH:?} is encrypted; model archives must not be"
        )));
    }
    check_manifest_size(entry.size().max(entry.compressed_size()))?;
    let bytes = read_manifest(&mut entry)?;
    drop(entry);
    Ok(Contents {
        format: ArchiveFormat::Zip,
        manifest: Manifest::parse(&bytes)?,
        names,
    })
}

/// Inspects a gzip-compressed tar, read once from start to end: its entry names with the top
/// folder stripped, and its manifest.
pub fn inspect_tgz<R: Read>(reader: R) -> Result<Contents, MarError> {
    let tar_error = |e: io::Error| MarError::Corrupt(format!("bad tar.gz: {e}"));
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(reader));
    let mut names = Vec::new();
    let mut manifest = None;
    for entry in archive.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let full = entry
            .path()
            .map_err(tar_error)?
            .to_string_lossy()
            .into_owned();
        let is_dir = entry.header().entry_type().is_dir() || full.ends_with('/');
        let name = without_top_folder(&full, is_dir);
        if name.is_empty() {
            continue;
        }
        if name == MANIFEST_PATH && !is_dir {
            check_manifest_size(entry.size())?;
            manifest = Some(Manifest::parse(&read_manifest(&mut entry)?)?);
        }
        names.push(name);
    }
    Ok(Contents {
        format: ArchiveFormat::Tgz,
        manifest: manifest.ok_or(MarError::MissingManifest)?,
        names,
    })
}

/// A tar entry's name as the unpacker places it: `.` and empty components dropped, then the
/// first component (the `<model-name>/` folder) stripped; a lone file keeps its name, a lone
/// folder becomes the root (empty).
fn without_top_folder(name: &str, is_dir: bool) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    match parts.len() {
        0 => String::new(),
        1 if is_dir => String::new(),
        1 => parts[0].to_string(),
        _ => parts[1..].join("/"),
    }
}

fn check_manifest_size(size: u64) -> Result<(), MarError> {
    if size > MAX_MANIFEST_BYTES {
        return Err(MarError::InvalidManifest(format!(
            "it is {size} bytes, over the {MAX_MANIFEST_BYTES} a manifest may take"
        )));
    }
    Ok(())
}

/// The manifest entry's bytes, at most [`MAX_MANIFEST_BYTES`] of them (read to its end, so a
/// zip entry's CRC is checked).
fn read_manifest(entry: &mut impl Read) -> Result<Vec<u8>, MarError> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| MarError::Corrupt(format!("entry {MANIFEST_PATH:?}: {e}")))?;
    check_manifest_size(bytes.len() as u64)?;
    Ok(bytes)
}

fn zip_error(e: zip::result::ZipError) -> MarError {
    use zip::result::ZipError;
    match e {
        ZipError::UnsupportedArchive(what) => {
            MarError::Corrupt(format!("unsupported zip feature: {what}"))
        }
        other => MarError::Corrupt(format!("bad zip: {other}")),
    }
}

/// The smallest range fetched when a read falls outside what has been fetched.
const MIN_FETCH: u64 = 64 << 10;
/// The largest range one fetch asks for.
const MAX_FETCH: u64 = 8 << 20;

/// A [`Read`] + [`Seek`] over an object of known size whose bytes come from `fetch(range)`
/// (end exclusive) as reads need them; every range fetched is kept, so nothing is fetched
/// twice.
///
/// A read outside what has been fetched asks for at least 64 KiB. Reads that keep running
/// off the edge of what was fetched, forwards (a central directory larger than the first
/// fetch) or backwards (a search for the end of central directory), double the next range up
/// to 8 MiB, so even a scan of the whole object takes few fetches. Memory grows with what is
/// fetched, at most the object's size.
pub struct RangeReader<F> {
    size: u64,
    pos: u64,
    fetch: F,
    /// Fetched bytes by offset: sorted, disjoint.
    chunks: Vec<(u64, Vec<u8>)>,
    /// The next fetch's length when reads keep running off an edge.
    step: u64,
    fetches: usize,
    fetched: u64,
}

impl<F> RangeReader<F>
where
    F: FnMut(Range<u64>) -> io::Result<Vec<u8>>,
{
    /// A reader over an object of `size` bytes, positioned at its start, that has fetched
    /// nothing yet.
    pub fn new(size: u64, fetch: F) -> Self {
        RangeReader {
            size,
            pos: 0,
            fetch,
            chunks: Vec::new(),
            step: MIN_FETCH,
            fetches: 0,
            fetched: 0,
        }
    }

    /// Fetches the last `len` bytes (all of them for a smaller object) in one range, unless
    /// already fetched: where a zip keeps its directory.
    pub fn prefetch_tail(&mut self, len: u64) -> io::Result<()> {
        let start = self.size.saturating_sub(len);
        let mut pos = start;
        while pos < self.size {
            match self.chunk_index(pos) {
                Some(i) => pos = self.chunks[i].0 + self.chunks[i].1.len() as u64,
                None => {
                    let end = self.next_start(pos);
                    self.load(pos..end)?;
                    pos = end;
                }
            }
        }
        Ok(())
    }

    /// How many ranges have been fetched.
    pub fn fetches(&self) -> usize {
        self.fetches
    }

    /// How many bytes have been fetched.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched
    }

    /// The object's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk holding byte `pos`, if fetched.
    fn chunk_index(&self, pos: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|(start, _)| *start <= pos);
        let i = i.checked_sub(1)?;
        let (start, bytes) = &self.chunks[i];
        (pos < start + bytes.len() as u64).then_some(i)
    }

    /// Where the first fetched chunk after `pos` starts (the object's end if none).
    fn next_start(&self, pos: u64) -> u64 {
        let i = self.chunks.partition_point(|(start, _)| *start <= pos);
        self.chunks.get(i).map_or(self.size, |(start, _)| *start)
    }

    /// Where the last fetched chunk at or before `pos` ends, if there is one.
    fn prev_end(&self, pos: u64) -> Option<u64> {
        let i = self.chunks.partition_point(|(start, _)| *start <= pos);
        let (start, bytes) = &self.chunks[i.checked_sub(1)?];
        Some(start + bytes.len() as u64)
    }

    /// Fetches `range` (not yet fetched, within the object) and keeps it.
    fn load(&mut self, range: Range<u64>) -> io::Result<()> {
        let want = range.end - range.start;
        let mut bytes = (self.fetch)(range.clone())?;
        self.fetches += 1;
        if (bytes.len() as u64) < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "bytes {}..{} of the archive came back short ({} of {want}): it is shorter \
                     than its {} bytes",
                    range.start,
                    range.end,
                    bytes.len(),
                    self.size
                ),
            ));
        }
        bytes.truncate(usize::try_from(want).unwrap_or(usize::MAX));
        self.fetched += want;
        let at = self
            .chunks
            .partition_point(|(start, _)| *start < range.start);
        self.chunks.insert(at, (range.start, bytes));
        Ok(())
    }

    /// Fetches a range holding byte `pos` (not yet fetched) for a read of `len` bytes: up to
    /// the next fetched chunk, reaching back towards the previous one when that is closer.
    fn fill(&mut self, pos: u64, len: u64) -> io::Result<()> {
        let (prev_end, next_start) = (self.prev_end(pos), self.next_start(pos));
        let touches_prev = prev_end == Some(pos);
        let touches_next = next_start < self.size && pos.saturating_add(len) >= next_start;
        self.step = if touches_prev || touches_next {
            self.step.saturating_mul(2).min(MAX_FETCH)
        } else {
            MIN_FETCH
        };
        let want = len.max(self.step).min(MAX_FETCH);
        let end = pos.saturating_add(want).min(next_start);
        let start = end.saturating_sub(want).max(prev_end.unwrap_or(0)).min(pos);
        self.load(start..end)
    }
}

impl<F> Read for RangeReader<F>
where
    F: FnMut(Range<u64>) -> io::Result<Vec<u8>>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let i = match self.chunk_index(self.pos) {
            Some(i) => i,
            None => {
                self.fill(self.pos, buf.len() as u64)?;
                self.chunk_index(self.pos).ok_or_else(|| {
                    io::Error::other("a fetched range did not hold the byte it was fetched for")
                })?
            }
        };
        let (start, bytes) = &self.chunks[i];
        let from = usize::try_from(self.pos - start).unwrap_or(usize::MAX);
        let available = bytes.get(from..).unwrap_or_default();
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F> Seek for RangeReader<F>
where
    F: FnMut(Range<u64>) -> io::Result<Vec<u8>>,
{
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the archive",
            )
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Cursor, Write};
    use zip::write::SimpleFileOptions;

    const MANIFEST: &str = r#"{"runtime": "python", "model": {"modelName": "m",
        "modelVersion": "2.0", "serializedFile": "m.pt", "handler": "h.py"}}"#;

    /// A zip of a manifest, `m.pt` and `h.py`; with `zip64`, every entry carries zip64 sizes
    /// and the end of central directory defers to zip64 records, as in archives over 4 GiB.
    fn zip(method: zip::CompressionMethod, zip64: bool) -> Vec<u8> {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(method)
            .large_file(zip64);
        for (name, bytes) in [
            (MANIFEST_PATH, MANIFEST.as_bytes().to_vec()),
            ("m.pt", vec![7u8; 200_000]),
            (
                "h.py",
                b"def handle(data, ctx):\n    return data\n".to_vec(),
            ),
        ] {
            out.start_file(name, opts).unwrap();
            out.write_all(&bytes).unwrap();
        }
        if zip64 {
            out.set_zip64_comment(Some(""));
        }
        let mut bytes = out.finish().unwrap().into_inner();
        if zip64 {
            saturate_eocd(&mut bytes);
        }
        bytes
    }

    /// Sets the 32-bit end of central directory's counts, size and offset to their zip64
    /// markers, leaving the zip64 record as the only place they are.
    fn saturate_eocd(bytes: &mut [u8]) {
        let eocd = (0..bytes.len() - 21)
            .rev()
            .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .unwrap();
        bytes[eocd + 8..eocd + 12].fill(0xff);
        bytes[eocd + 12..eocd + 20].fill(0xff);
    }

    fn tgz(top: &str) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, bytes) in [
            (format!("{top}MAR-INF/MANIFEST.json"), MANIFEST.as_bytes()),
            (format!("{top}m.pt"), &b"weights"[..]),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, bytes).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    /// A reader over `bytes` fetched in ranges, counting the fetches and bytes.
    fn ranged(bytes: &[u8]) -> RangeReader<impl FnMut(Range<u64>) -> io::Result<Vec<u8>> + '_> {
        RangeReader::new(bytes.len() as u64, move |r: Range<u64>| {
            let end = usize::try_from(r.end).unwrap().min(bytes.len());
            Ok(bytes[usize::try_from(r.start).unwrap()..end].to_vec())
        })
    }

    #[test]
    fn zips_deflated_stored_and_zip64() {
        for method in [
            zip::CompressionMethod::Deflated,
            zip::CompressionMethod::Stored,
        ] {
            for zip64 in [false, true] {
                let bytes = zip(method, zip64);
                let contents = inspect(Cursor::new(&bytes)).unwrap();
                assert_eq!(contents.format, ArchiveFormat::Zip);
                assert_eq!(contents.manifest.model_version(), "2.0");
                assert_eq!(contents.names, [MANIFEST_PATH, "m.pt", "h.py"]);
                assert!(contents.has("m.pt") && !contents.has("x"));
                // Through ranges: the same, without reading the weights.
                let mut reader = ranged(&bytes);
                reader.prefetch_tail(ZIP_TAIL_BYTES).unwrap();
                assert_eq!(inspect_zip(&mut reader).unwrap(), contents);
                assert!(
                    reader.bytes_fetched() < 140_000 && reader.fetches() <= 3,
                    "{method:?} zip64={zip64}: {} bytes in {} fetches",
                    reader.bytes_fetched(),
                    reader.fetches()
                );
            }
        }
    }

    #[test]
    fn tgz_top_folder_is_stripped() {
        for top in ["classifier/", "./classifier/"] {
            let contents = inspect(Cursor::new(tgz(top))).unwrap();
            assert_eq!(contents.format, ArchiveFormat::Tgz);
            assert_eq!(contents.manifest.model_name(), "m");
            assert_eq!(contents.names, [MANIFEST_PATH, "m.pt"], "{top:?}");
        }
        // Without a top folder, MAR-INF is what gets stripped, as when unpacking.
        assert!(matches!(
            inspect(Cursor::new(tgz(""))),
            Err(MarError::MissingManifest)
        ));
    }

    #[test]
    fn bad_archives_are_errors() {
        let missing = {
            let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
            out.start_file("m.pt", SimpleFileOptions::default())
                .unwrap();
            out.finish().unwrap().into_inner()
        };
        assert!(matches!(
            inspect(Cursor::new(missing)),
            Err(MarError::MissingManifest)
        ));
        assert!(matches!(
            inspect(Cursor::new(b"PK\x03\x04 and nothing else".to_vec())),
            Err(MarError::Corrupt(_))
        ));
        assert!(matches!(
            inspect(Cursor::new(b"hello".to_vec())),
            Err(MarError::Corrupt(_))
        ));
        assert!(matches!(
            inspect(Cursor::new(Vec::new())),
            Err(MarError::Corrupt(_))
        ));
        let mut truncated = zip(zip::CompressionMethod::Deflated, false);
        truncated.truncate(truncated.len() - 10);
        assert!(inspect(Cursor::new(truncated)).is_err());
        let mut cut = tgz("c/");
        cut.truncate(cut.len() / 2);
        assert!(inspect(Cursor::new(cut)).is_err());
    }

    #[test]
    fn range_reader_fetches_little_and_reports_short_objects() {
        // A scan of a whole object, backwards in small steps as a search for a zip's end
        // does, takes few fetches.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let mut reader = ranged(&data);
        let mut buf = [0u8; 2048];
        let mut pos = data.len() as u64;
        while pos > 0 {
            let start = pos.saturating_sub(2048);
            reader.seek(SeekFrom::Start(start)).unwrap();
            let n = usize::try_from(pos - start).unwrap();
            reader.read_exact(&mut buf[..n]).unwrap();
            assert_eq!(&buf[..n], &data[start as usize..pos as usize]);
            pos = start;
        }
        assert_eq!(reader.bytes_fetched(), data.len() as u64);
        assert!(reader.fetches() < 12, "{} fetches", reader.fetches());
        // And forwards.
        let mut reader = ranged(&data);
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        assert!(reader.fetches() < 12, "{} fetches", reader.fetches());
        // An object shorter than its recorded size fails the read, not the process.
        let mut short = RangeReader::new(100, |_| Ok(vec![1u8; 10]));
        let err = short.read_exact(&mut [0u8; 50]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(short.seek(SeekFrom::End(-1)).unwrap(), 99);
        assert!(short.seek(SeekFrom::Current(-100)).is_err());
        assert!(short.seek(SeekFrom::End(-101)).is_err());
    }
}
