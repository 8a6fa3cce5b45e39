//! `torchfn-model`: the binary every model function runs (the built-in handlers only). All of
//! it is the library (`src/lib.rs`), which model functions with custom handlers reuse.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    torchfn_model::main_with(|| {})
}
