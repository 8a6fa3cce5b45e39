//! `torchfn-regressor`: the model function with the `house_price` handler (see the library's
//! docs, `src/lib.rs`, for the handler and for how to write your own). It is `torchfn-model`
//! with one handler registered before start-up: same environment variables, same routes,
//! same Lambda and plain-HTTP modes.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Register the custom handler, then run the model function as `torchfn-model` does.
    torchfn_model::main_with(torchfn_regressor::register)
}
