//! A caller identity parses without panicking, and what parses prints back
//! as a SPIFFE id that parses to the same caller.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = sovkms::region::Caller::parse_spiffe(s) {
            let again = sovkms::region::Caller::parse_spiffe(&c.spiffe_id());
            assert_eq!(again.ok(), Some(c));
        }
        let _ = sovkms::policy::Principal::parse(s);
    }
});
