// Shared by the build scripts of crates whose binaries or tests link libtorch.
//
// torch-sys (`links = "tch"`) tells crates that depend on it directly where libtorch's
// shared libraries are (DEP_TCH_LIBTORCH_LIB). We bake that folder into our binaries as an
// rpath, so they start without LD_LIBRARY_PATH: no "error while loading shared libraries:
// libtorch_cpu.so". libtorch_cuda is deliberately not linked: loading it costs ~0.12 s and
// ~400 MB of resident memory at start-up even without a GPU, so the runtime loads it only on
// machines that have one (`session::load_cuda_backend`), from the same folder.

use std::path::PathBuf;

pub fn emit() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // Resolve links (the repository's `.libtorch` points into a cache folder) so the rpath
    // names the real folder and keeps working if the clone moves.
    let dir: PathBuf = std::fs::canonicalize(&dir).unwrap_or_else(|_| PathBuf::from(&dir));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
}
