//! The HPACK decoder over arbitrary header blocks, one connection's decoder across several:
//! it never panics, and every regular field of a block it decodes, encoded again by our
//! encoder, decodes to the same names and values on a fresh decoder.
#![no_main]

use fluxgate_wire::h2::hpack::{self, Decoder, Name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::default();
    for block in data.split(|&b| b == 0xff) {
        let mut fields = http::HeaderMap::new();
        let decoded = decoder.decode(block, |f| {
            if let (Name::Header(n), Some(v)) = (f.name, f.value) {
                if !hpack::connection_specific(&n) {
                    fields.append(n, v);
                }
            }
        });
        if decoded.is_err() {
            // The table can no longer be trusted: a connection ends here.
            return;
        }
        let mut encoded = Vec::new();
        hpack::encode_fields(&fields, &mut encoded);
        let mut back = http::HeaderMap::new();
        Decoder::default()
            .decode(&encoded, |f| {
                if let (Name::Header(n), Some(v)) = (f.name, f.value) {
                    back.append(n, v);
                }
            })
            .expect("our own encoding decodes");
        assert_eq!(back, fields);
    }
});
