//! Archives made from fixtures inside a test.

use serde_json::{json, Value};

/// A zip MAR with its manifest's `modelVersion` set to `version`.
pub fn with_version(mar: &[u8], version: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(mar)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if name == "MAR-INF/MANIFEST.json" {
            let mut manifest: Value = serde_json::from_slice(&bytes).unwrap();
            manifest["model"]["modelVersion"] = json!(version);
            bytes = serde_json::to_vec(&manifest).unwrap();
        }
        out.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap().into_inner()
}
