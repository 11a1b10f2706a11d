//! The ciphertext parser must reject any byte string without panicking, and
//! whatever it accepts must serialize back to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(env) = sovkms::envelope::Envelope::parse(data) {
        assert_eq!(env.to_bytes(), data);
    }
});
