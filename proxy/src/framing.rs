//! A byte-at-a-time look at a request head as it arrives, for the one thing hyper does not
//! refuse: a head carrying both Content-Length and Transfer-Encoding (RFC 9112 6.3 lets a
//! server treat it as an error; a proxy should, since it is the shape of request smuggling).
//! It keeps no copy of the bytes and stops at the end of the head.

/// Scans one request head.
#[derive(Debug, Default)]
pub(crate) struct HeadScan {
    /// Position in the current line: 0 = at its start; counts name bytes while they still match.
    col: u8,
    /// Bitmask of which of the two names the current line may still be.
    cand: u8,
    /// Previous byte was '\n' preceded by an empty line start: the head is over.
    done: bool,
    /// The current line is empty so far (only '\r' seen).
    empty: bool,
    seen_cl: bool,
    seen_te: bool,
    /// The head ended on the last byte of the chunk that completed it.
    ended_at_end: bool,
}

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";

impl HeadScan {
    /// Feeds bytes read from the client; returns true once the head is known to carry both
    /// framing headers.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        for (i, &b) in bytes.iter().enumerate() {
            if self.done {
                break;
            }
            if b == b'\n' {
                if self.empty {
                    self.done = true;
                    self.ended_at_end = i + 1 == bytes.len();
                }
                self.col = 0;
                self.cand = 0b11;
                self.empty = true;
                continue;
            }
            if b != b'\r' {
                self.empty = false;
            }
            if self.cand == 0 {
                continue;
            }
            let i = self.col as usize;
            let lb = b.to_ascii_lowercase();
            if self.cand & 1 != 0 && (i >= CL.len() || CL[i] != lb) {
                self.cand &= !1;
            }
            if self.cand & 2 != 0 && (i >= TE.len() || TE[i] != lb) {
                self.cand &= !2;
            }
            self.col = self.col.saturating_add(1);
            if self.cand & 1 != 0 && i + 1 == CL.len() {
                self.seen_cl = true;
                self.cand = 0;
            } else if self.cand & 2 != 0 && i + 1 == TE.len() {
                self.seen_te = true;
                self.cand = 0;
            }
        }
        self.seen_cl && self.seen_te
    }

    /// Whether the end of the head has been seen.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// Whether the head ended exactly at the end of the bytes fed last (nothing follows it).
    pub(crate) fn ended_at_chunk_end(&self) -> bool {
        self.done && self.ended_at_end
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    fn scan(parts: &[&[u8]]) -> bool {
        let mut s = HeadScan::default();
        let mut found = false;
        for p in parts {
            found |= s.feed(p);
        }
        found
    }

    #[test]
    fn finds_both_in_any_case_and_split() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nTRANSFER-enc",
            b"oding: chunked\r\ncontent-LENGTH:3\r\n\r\n"
        ]));
    }

    #[test]
    fn knows_where_the_head_ended() {
        let mut s = HeadScan::default();
        s.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(s.ended_at_chunk_end());
        let mut s = HeadScan::default();
        s.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\n");
        assert!(s.done() && !s.ended_at_chunk_end());
    }

    #[test]
    fn ignores_one_alone_values_and_body() {
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nX-Note: content-length: transfer-encoding:\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\n",
            b"\r\ntransfer-encoding: x\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nContent-Lengthy: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
    }
}
