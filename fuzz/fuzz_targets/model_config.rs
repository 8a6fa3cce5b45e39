//! Any text as a model-config YAML: a config or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use torchfn_archive::model_config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModelConfig::parse(text);
    }
});
