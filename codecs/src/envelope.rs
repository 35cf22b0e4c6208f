//! The frame envelope shared by ticks and orders: a fixed 24-byte little-endian header, then
//! the payload.
//!
//! ```text
//! 0..2   magic "FG"
//! 2      schema version (1)
//! 3      message kind (1 = tick, 2 = new order, 3 = control: UTF-8 text, 4 = cancel,
//!        5 = order acknowledgement; see `Kind`)
//! 4..6   flags (bit 0: last in batch; others reserved, must be 0)
//! 6..8   reserved, must be 0
//! 8..12  payload length in bytes
//! 12..16 instrument id   } routing metadata, readable without decoding the payload;
//! 16..24 sequence number } the decoders check they match the payload
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 24;
const MAGIC: [u8; 2] = *b"FG";
/// The schema version this crate reads and writes.
pub const SCHEMA_VERSION: u8 = 1;
/// Flag bit: the last frame of a batch.
pub const FLAG_LAST_IN_BATCH: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_LAST_IN_BATCH;
/// Default largest payload a parser accepts: 64 KiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 10;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A FlatBuffers `Tick` (market data).
    Tick = 1,
    /// A Protobuf `NewOrder`.
    NewOrder = 2,
    /// A control message of a feed session: one line of UTF-8 text (a subscriber's
    /// `sub`/`unsub`/`resume`/`auth`, the gateway's notices); instrument and seq name what it
    /// is about, or are 0.
    Control = 3,
    /// A Protobuf `CancelOrder`.
    CancelOrder = 4,
    /// A Protobuf `OrderAck`: the gateway's answer to an order or a cancel.
    OrderAck = 5,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not "FG".
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// A schema version this build does not read.
    #[error("unsupported schema version {0}")]
    UnsupportedVersion(u8),
    /// A message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Flag or reserved bits this build does not know are set.
    #[error("reserved bits set: flags {flags:#06x}, reserved {reserved:#06x}")]
    ReservedBits { flags: u16, reserved: u16 },
    /// The payload length exceeds the parser's maximum.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
}

/// A frame header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub version: u8,
    pub flags: u16,
    pub payload_len: u32,
    pub instrument: u32,
    pub seq: u64,
}

impl Header {
    /// Decodes a header from the first `HEADER_LEN` bytes; `None` if fewer are there.
    pub fn peek(buf: &[u8]) -> Result<Option<Header>, FrameError> {
        let Some(mut h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let magic = [h.get_u8(), h.get_u8()];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = h.get_u8();
        if version != SCHEMA_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = match h.get_u8() {
            1 => Kind::Tick,
            2 => Kind::NewOrder,
            3 => Kind::Control,
            4 => Kind::CancelOrder,
            5 => Kind::OrderAck,
            k => return Err(FrameError::UnknownKind(k)),
        };
        let flags = h.get_u16_le();
        let reserved = h.get_u16_le();
        if flags & !KNOWN_FLAGS != 0 || reserved != 0 {
            return Err(FrameError::ReservedBits { flags, reserved });
        }
        Ok(Some(Header {
            kind,
            version,
            flags,
            payload_len: h.get_u32_le(),
            instrument: h.get_u32_le(),
            seq: h.get_u64_le(),
        }))
    }

    fn write(&self, out: &mut BytesMut) {
        out.put_slice(&MAGIC);
        out.put_u8(self.version);
        out.put_u8(self.kind as u8);
        out.put_u16_le(self.flags);
        out.put_u16_le(0);
        out.put_u32_le(self.payload_len);
        out.put_u32_le(self.instrument);
        out.put_u64_le(self.seq);
    }
}

/// One whole frame: the header, decoded, and the bytes of header and payload, shared with
/// the buffer it was cut from (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    header: Header,
    bytes: Bytes,
}

impl Frame {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The payload: a view of the same memory as the frame.
    pub fn payload(&self) -> Bytes {
        self.bytes.slice(HEADER_LEN..)
    }

    /// The payload as a slice.
    pub fn payload_slice(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// Header and payload, as received: what a fan-out writes to each subscriber.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// Cuts frames off the front of a stream buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameParser {
    max_payload: usize,
}

impl Default for FrameParser {
    /// Payloads up to `DEFAULT_MAX_PAYLOAD`.
    fn default() -> Self {
        FrameParser::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameParser {
    /// A parser refusing payloads larger than `max_payload` bytes.
    pub fn new(max_payload: usize) -> FrameParser {
        FrameParser { max_payload }
    }

    /// Takes the next whole frame off the front of `buf`. `Ok(None)` means more bytes are
    /// needed (nothing is consumed); an error means the stream is not a frame stream and
    /// should be closed (nothing is consumed either).
    pub fn parse(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Header::peek(buf)? else {
            return Ok(None);
        };
        let len = header.payload_len as usize;
        if len > self.max_payload {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_payload,
            });
        }
        if buf.len() < HEADER_LEN + len {
            // Make room once for the rest instead of growing step by step.
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        let bytes = buf.split_to(HEADER_LEN + len).freeze();
        Ok(Some(Frame { header, bytes }))
    }
}

/// Appends a frame with the given routing metadata and payload to `out`.
pub fn write_frame(
    out: &mut BytesMut,
    kind: Kind,
    flags: u16,
    instrument: u32,
    seq: u64,
    payload: &[u8],
) {
    out.reserve(HEADER_LEN + payload.len());
    Header {
        kind,
        version: SCHEMA_VERSION,
        flags,
        payload_len: payload.len() as u32,
        instrument,
        seq,
    }
    .write(out);
    out.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        write_frame(&mut b, Kind::Tick, FLAG_LAST_IN_BATCH, 7, 99, payload);
        b
    }

    #[test]
    fn partial_frames_need_more_bytes_and_consume_nothing() {
        let whole = frame(b"hello");
        let p = FrameParser::default();
        for cut in 0..whole.len() {
            let mut b = BytesMut::from(&whole[..cut]);
            assert_eq!(p.parse(&mut b).unwrap().map(|f| f.bytes().len()), None);
            assert_eq!(b.len(), cut);
        }
        let mut b = whole.clone();
        b.extend_from_slice(&frame(b"second"));
        let f = p.parse(&mut b).unwrap().unwrap();
        assert_eq!(f.header().instrument, 7);
        assert_eq!(f.header().seq, 99);
        assert_eq!(f.header().flags, FLAG_LAST_IN_BATCH);
        assert_eq!(&f.payload()[..], b"hello");
        assert_eq!(&p.parse(&mut b).unwrap().unwrap().payload()[..], b"second");
        assert!(b.is_empty());
    }

    #[test]
    fn payload_is_the_same_memory() {
        let mut b = frame(b"zero-copy");
        let base = b.as_ptr() as usize;
        let f = FrameParser::default().parse(&mut b).unwrap().unwrap();
        assert_eq!(f.payload().as_ptr() as usize, base + HEADER_LEN);
    }

    #[test]
    fn bad_headers_are_named() {
        let p = FrameParser::new(4);
        let mut b = frame(b"12345");
        assert_eq!(
            p.parse(&mut b),
            Err(FrameError::TooLarge { len: 5, max: 4 })
        );
        let mut b = frame(b"1");
        b[0] = b'X';
        assert!(matches!(p.parse(&mut b), Err(FrameError::BadMagic(_))));
        let mut b = frame(b"1");
        b[2] = 9;
        assert_eq!(p.parse(&mut b), Err(FrameError::UnsupportedVersion(9)));
        let mut b = frame(b"1");
        b[3] = 6;
        assert_eq!(p.parse(&mut b), Err(FrameError::UnknownKind(6)));
        let mut b = frame(b"1");
        b[5] = 0x80;
        assert!(matches!(
            p.parse(&mut b),
            Err(FrameError::ReservedBits { .. })
        ));
        let mut b = frame(b"1");
        b[6] = 1;
        assert!(matches!(
            p.parse(&mut b),
            Err(FrameError::ReservedBits { .. })
        ));
    }
}
