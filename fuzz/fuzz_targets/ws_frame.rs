//! The WebSocket frame head parser over arbitrary bytes, as a client's and as a server's: it
//! never panics; a head it takes is never longer than the input, its length is within the
//! limit, and every shorter prefix is "incomplete" (it never decides early); a server head
//! encoded for the same opcode and length parses back to them.
#![no_main]

use fluxgate_wire::ws::{parse_head, server_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for from_client in [true, false] {
        let max = 1 << 16;
        let Ok(Some(h)) = parse_head(data, from_client, max) else {
            continue;
        };
        assert!(h.head_len <= data.len());
        assert!(h.len <= max);
        let bare = h.head_len - if h.mask.is_some() { 4 } else { 0 };
        assert!([2, 4, 10].contains(&bare), "head of {} bytes", h.head_len);
        for cut in 0..h.head_len {
            assert_eq!(
                parse_head(&data[..cut], from_client, max),
                Ok(None),
                "decided at {cut}"
            );
        }
        if h.fin {
            let (again, n) = server_head(h.opcode, h.len as usize);
            let g = parse_head(&again[..n], false, max).expect("our own head parses");
            assert_eq!(
                g.map(|g| (g.opcode, g.len, g.head_len)),
                Some((h.opcode, h.len, n))
            );
        }
    }
});
