//! The one list of handler names: torchfn's built-in handlers and the handlers TorchServe
//! knows by name. The emulator's `--help`, the engine's handler choice and its errors, the
//! registrar, the converter and the README test all read it from here.

/// torchfn's built-in handlers, as a manifest, `--handler` or `TORCHFN_HANDLER` names them
/// (TorchServe's names and torchfn's own), each with what it does.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "tensor",
        "tensors in, tensors out (JSON, .npy, raw bytes, KServe v2)",
    ),
    ("base_handler", "TorchServe's name for `tensor`"),
    (
        "classifier",
        "top-k class probabilities with index_to_name.json labels",
    ),
    (
        "image_classifier",
        "TorchServe's image classifier: image in, top-5 labels out",
    ),
    (
        "image_segmenter",
        "TorchServe's image segmenter: image in, per-pixel classes out",
    ),
    (
        "object_detector",
        "TorchServe's object detector: image in, labelled boxes out",
    ),
    (
        "text_classifier",
        "TorchServe's text classifier: text in, labels out",
    ),
];

/// The handlers torch-model-archiver 0.12 knows by name (it copies no handler file for
/// them): an archive naming one carries no `handler.py`.
pub const TORCHSERVE: &[&str] = &[
    "base_handler",
    "text_classifier",
    "image_classifier",
    "object_detector",
    "image_segmenter",
    "dali_image_classifier",
    "vllm_handler",
    "trt_llm_handler",
];

/// Whether `name` is one of torchfn's built-in handlers.
pub fn is_builtin(name: &str) -> bool {
    BUILTIN.iter().any(|(n, _)| *n == name)
}

/// The built-in handlers' names, in order.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(n, _)| *n)
}

/// The built-in handlers' names as one line for messages: `tensor, base_handler, ...`.
pub fn names_line() -> String {
    names().collect::<Vec<_>>().join(", ")
}

/// TorchServe handlers torchfn has no built-in for (`vllm_handler`, ...).
pub fn torchserve_only() -> impl Iterator<Item = &'static str> {
    TORCHSERVE.iter().copied().filter(|n| !is_builtin(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_torchserve_handler_is_a_builtin_or_listed_as_not_served() {
        let not_served: Vec<_> = torchserve_only().collect();
        assert_eq!(
            not_served,
            ["dali_image_classifier", "vllm_handler", "trt_llm_handler"]
        );
        for name in TORCHSERVE {
            assert!(is_builtin(name) || not_served.contains(name), "{name}");
        }
        assert!(names_line().starts_with("tensor, base_handler, classifier"));
    }
}
