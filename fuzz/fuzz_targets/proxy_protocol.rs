//! The PROXY protocol parser over arbitrary bytes: it never panics; a header it takes is
//! never longer than the input; every prefix of a complete header is "incomplete" (the
//! parser never decides early); addresses it reads, encoded again in either version, parse
//! to the same addresses.
#![no_main]

use fluxgate_wire::proxy_protocol::{encode, parse, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(h)) = parse(data) else {
        return;
    };
    assert!(h.len <= data.len());
    for cut in 0..h.len {
        assert_eq!(parse(&data[..cut]), Ok(None), "decided at {cut} of {}", h.len);
    }
    if let Some(a) = h.addresses {
        for v in [Version::V1, Version::V2] {
            let mut out = Vec::new();
            encode(v, a.source, a.destination, &mut out);
            let again = parse(&out).expect("our own header parses");
            assert_eq!(again.map(|g| (g.addresses, g.len)), Some((Some(a), out.len())));
        }
    }
});
