//! Any bytes as a model archive (the format is detected from the bytes: zip, zip-store or
//! tar.gz): opening either fails with an error or yields an archive, and nothing is ever
//! written outside the unpack folder, nor left behind in it.

#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use torchfn_archive::mar::{open_archive, Limits, ReadSeek};

fuzz_target!(|data: &[u8]| {
    let outer = tempfile::tempdir().expect("temp folder");
    let root = outer.path().join("unpack");
    let limits = Limits {
        max_unpacked_bytes: 8 << 20,
        max_entries: 256,
        max_expansion_ratio: 100,
    };
    let reopen =
        || -> std::io::Result<Box<dyn ReadSeek>> { Ok(Box::new(Cursor::new(data.to_vec()))) };
    let opened = open_archive(Path::new("fuzz.mar"), &reopen, &root, &limits);
    if let Ok(archive) = &opened {
        // What it unpacked is inside the unpack folder.
        assert!(
            archive.dir().starts_with(&root),
            "unpacked outside: {}",
            archive.dir().display()
        );
    }
    drop(opened);
    // Only the unpack folder exists beside it; after the archive is dropped, it is empty.
    let beside: Vec<_> = std::fs::read_dir(outer.path())
        .expect("outer folder")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        beside.iter().all(|n| n == "unpack"),
        "written beside the unpack folder: {beside:?}"
    );
    if root.exists() {
        let left: Vec<_> = std::fs::read_dir(&root).expect("unpack folder").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
});
