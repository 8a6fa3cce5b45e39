//! Any bytes as `MAR-INF/MANIFEST.json`: a manifest or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use torchfn_archive::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        // What parsed can be read back.
        let _ = (m.model_name(), m.model_version());
    }
});
