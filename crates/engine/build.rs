#[path = "../../build-support/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit();
    default_python();
}

/// The Python backend's default interpreter: the venv whose torch wheel provides libtorch
/// (`<venv>/lib/pythonX.Y/site-packages/torch/lib`), when it has one.
fn default_python() {
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
    if let Some(python) = dir
        .ancestors()
        .nth(5)
        .map(|venv| venv.join("bin/python"))
        .filter(|p| p.exists())
    {
        println!("cargo:rustc-env=TORCHFN_BUILD_PYTHON={}", python.display());
    }
}
