#[path = "../build-support/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    // Only the `torch` feature links libtorch; DEP_TCH_LIBTORCH_LIB is absent without it.
    libtorch_link::emit();
}
