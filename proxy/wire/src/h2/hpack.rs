//! HPACK (RFC 7541), the header compression of HTTP/2, as the downstream server needs it: a
//! full decoder (static and dynamic tables, Huffman strings) for request heads, and an encoder
//! for response heads that never adds to the peer's dynamic table (names from the static
//! table, values as plain literals), so it keeps no state at all.
//!
//! Decoded fields come out as typed `http` names and values once, at this edge; a field the
//! dynamic table holds is handed out again as a clone (a reference count), not re-parsed.

use std::collections::VecDeque;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

/// Why a header block could not be decoded: a connection error (COMPRESSION_ERROR), since
/// the decoder's table can no longer be trusted to match the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// EOS inside a Huffman string.
    #[error("HPACK: EOS inside a Huffman string")]
    HuffmanEos,
    /// Index 0.
    #[error("HPACK: index 0")]
    IndexZero,
    /// Index beyond the dynamic table.
    #[error("HPACK: index beyond the dynamic table")]
    IndexOutOfRange,
    /// Integer too large.
    #[error("HPACK: integer too large")]
    IntegerTooLarge,
    /// Invalid Huffman code.
    #[error("HPACK: invalid Huffman code")]
    BadHuffmanCode,
    /// Invalid Huffman padding.
    #[error("HPACK: invalid Huffman padding")]
    BadHuffmanPadding,
    /// Table size update above the announced limit.
    #[error("HPACK: table size update above the announced limit")]
    SizeUpdateTooLarge,
    /// Table size update after a field.
    #[error("HPACK: table size update after a field")]
    LateSizeUpdate,
    /// Truncated integer.
    #[error("HPACK: truncated integer")]
    TruncatedInteger,
    /// Truncated string.
    #[error("HPACK: truncated string")]
    TruncatedString,
}

/// A field's name: one of the request pseudo-headers, a valid header name, or something a
/// request may not carry (kept so the table stays in step; the request is then malformed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    Method,
    Scheme,
    Authority,
    Path,
    /// `:status`, or a pseudo-header no request defines.
    OtherPseudo,
    Header(HeaderName),
    Invalid,
}

impl Name {
    fn parse(raw: &[u8]) -> Name {
        match raw {
            b":method" => Name::Method,
            b":scheme" => Name::Scheme,
            b":authority" => Name::Authority,
            b":path" => Name::Path,
            [b':', ..] => Name::OtherPseudo,
            // Upper case is malformed in HTTP/2 (RFC 9113 8.2.1); `HeaderName` would fold it.
            _ if raw.iter().any(u8::is_ascii_uppercase) => Name::Invalid,
            _ => HeaderName::from_bytes(raw).map_or(Name::Invalid, Name::Header),
        }
    }
}

/// One decoded field. A value that is not a valid header value is `None` (malformed).
#[derive(Clone, Debug)]
pub struct Field {
    pub name: Name,
    pub value: Option<HeaderValue>,
    /// Name and value length plus 32, as RFC 7541 4.1 counts an entry (and RFC 9113 a list).
    pub size: usize,
}

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("via", ""),
    ("vary", ""),
    ("www-authenticate", ""),
];

fn static_field(index: usize) -> Field {
    let (name, value) = STATIC[index - 1];
    Field {
        name: Name::parse(name.as_bytes()),
        value: Some(HeaderValue::from_static(value)),
        size: name.len() + value.len() + 32,
    }
}

/// The static table as decoded fields, built once.
fn static_fields() -> &'static [Field] {
    static FIELDS: std::sync::OnceLock<Vec<Field>> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| (1..=STATIC.len()).map(static_field).collect())
}

/// The decoder of one connection's request heads.
pub struct Decoder {
    /// Newest entry first, as the dynamic table is indexed.
    table: VecDeque<Field>,
    size: usize,
    /// The size the peer last set, at most `limit`.
    max: usize,
    /// SETTINGS_HEADER_TABLE_SIZE as we announce it (the protocol default).
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: 4096,
            limit: 4096,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block, handing each field to `out` in order.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut out: impl FnMut(Field),
    ) -> Result<(), HpackError> {
        let mut first = true;
        while let Some(&b) = block.first() {
            if b & 0x80 != 0 {
                let i = int(&mut block, 7)?;
                out(self.lookup(i)?);
            } else if b & 0x40 != 0 {
                let field = self.literal(&mut block, 6)?;
                self.insert(field.clone());
                out(field);
            } else if b & 0x20 != 0 {
                // A table size update may only open a block (RFC 7541 4.2).
                if !first {
                    return Err(HpackError::LateSizeUpdate);
                }
                let max = int(&mut block, 5)?;
                if max > self.limit {
                    return Err(HpackError::SizeUpdateTooLarge);
                }
                self.max = max;
                self.evict(0);
                continue;
            } else {
                // Without indexing (0000) or never indexed (0001): the same to a decoder.
                out(self.literal(&mut block, 4)?);
            }
            first = false;
        }
        Ok(())
    }

    fn lookup(&self, index: usize) -> Result<Field, HpackError> {
        match index {
            0 => Err(HpackError::IndexZero),
            i if i <= STATIC.len() => Ok(static_fields()[i - 1].clone()),
            i => self
                .table
                .get(i - STATIC.len() - 1)
                .cloned()
                .ok_or(HpackError::IndexOutOfRange),
        }
    }

    fn literal(&self, block: &mut &[u8], prefix: u8) -> Result<Field, HpackError> {
        let index = int(block, prefix)?;
        let (name, name_len) = if index == 0 {
            let raw = string(block)?;
            (Name::parse(&raw), raw.len())
        } else {
            let f = self.lookup(index)?;
            let len = f.size - 32 - f.value.as_ref().map_or(0, |v| v.len());
            (f.name, len)
        };
        let raw = string(block)?;
        let size = name_len + raw.len() + 32;
        Ok(Field {
            name,
            value: HeaderValue::from_maybe_shared(raw).ok(),
            size,
        })
    }

    fn insert(&mut self, field: Field) {
        // An entry larger than the whole table empties it and is not added (RFC 7541 4.4).
        self.evict(field.size);
        if field.size <= self.max {
            self.size += field.size;
            self.table.push_front(field);
        }
    }

    /// Drops the oldest entries until `room` more fits under the maximum.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            match self.table.pop_back() {
                Some(f) => self.size -= f.size,
                None => break,
            }
        }
    }
}

/// An integer with an N-bit prefix (RFC 7541 5.1).
fn int(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    const TRUNCATED: HpackError = HpackError::TruncatedInteger;
    let (&first, rest) = block.split_first().ok_or(TRUNCATED)?;
    let mask = (1u16 << prefix) as usize - 1;
    let mut value = first as usize & mask;
    *block = rest;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = block.split_first().ok_or(TRUNCATED)?;
        *block = rest;
        // Four continuation bytes reach 2^28, more than any length or index can be here.
        if shift > 21 {
            return Err(HpackError::IntegerTooLarge);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal, Huffman-coded or plain (RFC 7541 5.2).
fn string(block: &mut &[u8]) -> Result<Bytes, HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let len = int(block, 7)?;
    if len > block.len() {
        return Err(HpackError::TruncatedString);
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(raw).map(Bytes::from)
    } else {
        Ok(Bytes::copy_from_slice(raw))
    }
}

/// Code lengths in bits of the HPACK Huffman code (RFC 7541 Appendix B), symbols 0 to 256
/// (EOS). The code is canonical: codes of one length are consecutive, in symbol order, and
/// each length starts where the shorter ones ended, doubled; so lengths alone define it.
const HUFFMAN_LEN: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;

/// The canonical code in decoding form: per length, the first code and where its symbols
/// start in `symbols` (sorted by length, then symbol).
struct Canonical {
    first: [u32; 31],
    count: [u16; 31],
    offset: [u16; 31],
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; 31],
        count: [0; 31],
        offset: [0; 31],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        c.count[HUFFMAN_LEN[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut at = 0u16;
    let mut len = 1;
    while len <= 30 {
        c.first[len] = code;
        c.offset[len] = at;
        at += c.count[len];
        code = (code + c.count[len] as u32) << 1;
        len += 1;
    }
    let mut fill = c.offset;
    let mut s = 0;
    while s < 257 {
        let len = HUFFMAN_LEN[s] as usize;
        c.symbols[fill[len] as usize] = s as u16;
        fill[len] += 1;
        s += 1;
    }
    c
}

static HUFFMAN: Canonical = canonical();

fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    let h = &HUFFMAN;
    // Eight bits of input give at least one and at most 1.6 symbols.
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    let mut code = 0u32;
    let mut len = 0usize;
    for &byte in raw {
        for bit in (0..8).rev() {
            code = (code << 1) | ((byte >> bit) & 1) as u32;
            len += 1;
            let first = h.first[len];
            if code >= first && code - first < h.count[len] as u32 {
                let sym = h.symbols[(h.offset[len] as u32 + code - first) as usize];
                if sym == EOS {
                    return Err(HpackError::HuffmanEos);
                }
                out.push(sym as u8);
                code = 0;
                len = 0;
            } else if len == 30 {
                return Err(HpackError::BadHuffmanCode);
            }
        }
    }
    // Padding: fewer than eight bits, all ones (the start of EOS).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError::BadHuffmanPadding);
    }
    Ok(out)
}

/// Connection-specific fields, which an HTTP/2 or HTTP/3 message never carries (RFC 9113
/// 8.2.2, RFC 9114 4.2).
pub fn connection_specific(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, TRANSFER_ENCODING, UPGRADE};
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Appends a response head: `:status` then the fields, none of them added to the peer's
/// dynamic table.
pub fn encode_response(status: http::StatusCode, headers: &http::HeaderMap, out: &mut Vec<u8>) {
    match status.as_u16() {
        200 => out.push(0x80 | 8),
        204 => out.push(0x80 | 9),
        206 => out.push(0x80 | 10),
        304 => out.push(0x80 | 11),
        400 => out.push(0x80 | 12),
        404 => out.push(0x80 | 13),
        500 => out.push(0x80 | 14),
        _ => {
            // Literal without indexing, name `:status` (index 8).
            out.push(8);
            put_string(out, status.as_str().as_bytes());
        }
    }
    encode_fields(headers, out);
}

/// Appends fields (a response head's after `:status`, or trailers) as literals without
/// indexing, leaving out connection-specific ones.
pub fn encode_fields(headers: &http::HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        if connection_specific(name) {
            continue;
        }
        match static_name_index(name.as_str()) {
            Some(i) => put_int(out, 0, 4, i),
            None => {
                out.push(0);
                put_string(out, name.as_str().as_bytes());
            }
        }
        put_string(out, value.as_bytes());
    }
}

/// The static table index of a header name (the first entry with it).
fn static_name_index(name: &str) -> Option<usize> {
    // Entries 15 and on are the header names; the pseudo-headers before never match here.
    STATIC[14..]
        .iter()
        .position(|(n, _)| *n == name)
        .map(|p| p + 15)
}

fn put_int(out: &mut Vec<u8>, flags: u8, prefix: u8, mut value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut v = Vec::new();
        d.decode(block, |f| {
            let name = match f.name {
                Name::Method => ":method".to_string(),
                Name::Scheme => ":scheme".into(),
                Name::Authority => ":authority".into(),
                Name::Path => ":path".into(),
                Name::Header(h) => h.as_str().into(),
                other => format!("{other:?}"),
            };
            v.push((name, f.value.unwrap().to_str().unwrap().to_string()));
        })
        .unwrap();
        v
    }

    #[test]
    fn huffman_strings_from_rfc_7541_appendix_c() {
        let cases = [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ];
        for (code, text) in cases {
            assert_eq!(huffman_decode(&hex(code)).unwrap(), text.as_bytes());
        }
    }

    #[test]
    fn huffman_rejects_bad_padding_and_eos() {
        // "0" is 00000 (5 bits); padding with zeros is not EOS's prefix.
        assert!(huffman_decode(&[0b0000_0000]).is_err());
        assert_eq!(huffman_decode(&[0b0000_0111]).unwrap(), b"0");
        // Eight or more bits of padding.
        assert!(huffman_decode(&[0b0000_0111, 0xff]).is_err());
        // EOS itself (30 ones) is an error.
        assert!(huffman_decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn requests_from_rfc_7541_c4_share_the_dynamic_table() {
        let mut d = Decoder::default();
        let first = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(
            first,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(d.size, 57);
        let second = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        assert_eq!(d.size, 110);
        let third = decode_all(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(third[2], (":path".into(), "/index.html".into()));
        assert_eq!(third[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.size, 164);
        assert_eq!(d.table.len(), 3);
    }

    #[test]
    fn eviction_and_size_updates_follow_the_limit() {
        let mut d = Decoder::default();
        // Size update to 64, then a literal with indexing of 50 + 32 bytes: too big, empties.
        let mut block = vec![0x3f, 0x21]; // 31 + 33 = 64
        block.push(0x40);
        put_string(&mut block, b"x-long-name-of-twenty-five");
        put_string(&mut block, b"value-of-twenty-four-byt");
        decode_all(&mut d, &block);
        assert_eq!((d.max, d.table.len(), d.size), (64, 0, 0));
        // Above the announced 4096: an error.
        assert!(d.decode(&[0x3f, 0xe2, 0x1f], |_| {}).is_err());
        // A size update after a field: an error.
        assert!(d.decode(&[0x82, 0x20], |_| {}).is_err());
        // Index beyond the table, index 0, truncated input: errors, not panics.
        assert!(d.decode(&[0xbf, 0x10], |_| {}).is_err());
        assert!(d.decode(&[0x80], |_| {}).is_err());
        assert!(d.decode(&[0x41, 0x85, b'a'], |_| {}).is_err());
        assert!(d
            .decode(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f], |_| {})
            .is_err());
    }

    #[test]
    fn upper_case_and_unknown_pseudo_names_are_kept_as_malformed() {
        let mut d = Decoder::default();
        let mut block = vec![0x40];
        put_string(&mut block, b"X-Up");
        put_string(&mut block, b"1");
        block.push(0x00);
        put_string(&mut block, b":proto");
        put_string(&mut block, b"1");
        let mut names = Vec::new();
        d.decode(&block, |f| names.push(f.name)).unwrap();
        assert_eq!(names, [Name::Invalid, Name::OtherPseudo]);
        // The invalid field still took its place in the table.
        assert_eq!(d.table.len(), 1);
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_without_panicking() {
        // A fixed xorshift sequence: the same 20,000 blocks every run, biased towards the
        // representations' first-byte patterns so most get past the first field.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut d = Decoder::default();
        let mut decoded = 0;
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if d.decode(&block, |_| {}).is_ok() {
                decoded += 1;
            } else {
                // A failed block leaves the table unusable, as on a real connection.
                d = Decoder::default();
            }
            assert!(d.size <= d.max && d.max <= d.limit);
        }
        assert!(decoded > 0, "some blocks decode");
    }

    #[test]
    fn encoded_responses_decode_back() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert(
            "x-custom",
            HeaderValue::from_static("a value long enough to need more"),
        );
        h.insert("connection", HeaderValue::from_static("close"));
        let mut out = Vec::new();
        encode_response(http::StatusCode::OK, &h, &mut out);
        encode_response(http::StatusCode::BAD_GATEWAY, &h, &mut out);
        let mut d = Decoder::default();
        let mut fields = Vec::new();
        d.decode(&out, |f| fields.push(f)).unwrap();
        let shown: Vec<_> = fields
            .iter()
            .map(|f| f.value.as_ref().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            shown,
            [
                "200",
                "text/plain",
                "a value long enough to need more",
                "502",
                "text/plain",
                "a value long enough to need more"
            ]
        );
        assert!(d.table.is_empty());
        let mut big = Vec::new();
        put_int(&mut big, 0, 4, 1337);
        assert_eq!(int(&mut big.as_slice(), 4).unwrap(), 1337);
    }
}
