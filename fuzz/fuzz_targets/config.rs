//! The config loader over arbitrary text: it never panics, and a config it refuses says
//! why (a non-empty message).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = fluxgate_conf::Config::from_toml(text) {
        assert!(!e.to_string().is_empty());
    }
});
