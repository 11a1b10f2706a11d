//! Any config text is accepted or refused with a message, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = sovkms::config::Settings::parse(s, std::path::Path::new("/nonexistent"));
    }
});
