#[path = "../../build-support/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit();
}
