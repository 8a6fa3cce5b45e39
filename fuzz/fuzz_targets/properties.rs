//! Any text as config.properties, then applied to the settings: values or errors, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use torchfn_archive::properties;
use torchfn_archive::settings::Settings;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env = |name: &str| (name == "SET").then(|| "1".to_string());
    if let Ok(props) = properties::parse(&text, "fuzz.properties", env) {
        let mut settings = Settings::default();
        let _ = settings.apply_properties(&props);
    }
});
