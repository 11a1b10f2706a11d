//! The TTLV decoder must reject any byte string without panicking; what it
//! accepts must encode back to the same bytes; and the request parser must
//! answer any decoded message without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = sovkms::kmip::ttlv::Limits::default();
    if let Ok(item) = sovkms::kmip::ttlv::decode(data, &limits) {
        assert_eq!(item.encode(), data);
        let _ = sovkms::kmip::message::parse_request(item);
    }
});
