//! Any audit log bytes are verified or refused with a failure naming the
//! line, never a panic (the auditor's `audit verify` reads untrusted files).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A fixed, valid P-256 point: signatures will not verify, records will
    // still be parsed and chained.
    const KEY: [u8; 65] = [
        4, 107, 23, 209, 242, 225, 44, 66, 71, 248, 188, 230, 229, 99, 164, 64, 242, 119, 3, 125,
        129, 45, 235, 51, 160, 244, 161, 57, 69, 216, 152, 194, 150, 79, 227, 66, 226, 254, 26,
        127, 155, 142, 231, 235, 74, 124, 15, 158, 22, 43, 206, 51, 87, 107, 49, 94, 206, 203,
        182, 64, 104, 55, 191, 81, 245,
    ];
    let _ = sovkms::audit::verify(data, &KEY, false);
    let _ = sovkms::audit::verify(data, &KEY, true);
});
