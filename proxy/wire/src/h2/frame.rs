//! HTTP/2 frames on the wire (RFC 9113 section 4 and 6): types, flags, error codes, and
//! writing frame heads and header blocks.

pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// SETTINGS identifiers (RFC 9113 section 6.5.2) that fluxgate sends or reads.
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes (RFC 9113 section 7).
pub const NO_ERROR: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
pub const INTERNAL_ERROR: u32 = 2;
pub const FLOW_CONTROL_ERROR: u32 = 3;
pub const STREAM_CLOSED: u32 = 5;
pub const FRAME_SIZE_ERROR: u32 = 6;
pub const REFUSED_STREAM: u32 = 7;
pub const CANCEL: u32 = 8;
pub const COMPRESSION_ERROR: u32 = 9;
pub const ENHANCE_YOUR_CALM: u32 = 11;

/// The 9 bytes before every frame's payload.
pub const HEAD_LEN: usize = 9;

/// A frame head, decoded (RFC 9113 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Payload length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream id, its reserved bit cleared.
    pub id: u32,
}

/// A frame whose length passes the receiver's SETTINGS_MAX_FRAME_SIZE (FRAME_SIZE_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {0} bytes above SETTINGS_MAX_FRAME_SIZE")]
pub struct FrameTooLarge(pub usize);

impl FrameHead {
    /// The head of the frame at the front of `buf`, once the whole frame is there; Ok(None)
    /// while more bytes are needed. A length over `max_len` is an error as soon as the head
    /// is in (no need to wait for a payload that must be refused).
    pub fn parse(buf: &[u8], max_len: usize) -> Result<Option<FrameHead>, FrameTooLarge> {
        let Some(h) = buf.get(..HEAD_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        if len > max_len {
            return Err(FrameTooLarge(len));
        }
        if buf.len() < HEAD_LEN + len {
            return Ok(None);
        }
        Ok(Some(FrameHead {
            len,
            kind: h[3],
            flags: h[4],
            id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        }))
    }

    /// Writes this head (the inverse of `parse`).
    pub fn write(&self, out: &mut Vec<u8>) {
        frame_head(out, self.len, self.kind, self.flags, self.id);
    }
}

/// Writes a frame head.
pub fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, id: u32) {
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.extend_from_slice(&id.to_be_bytes());
}

/// A header block as HEADERS and, if it does not fit one frame, CONTINUATION frames.
pub fn write_block(out: &mut Vec<u8>, block: &[u8], id: u32, end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    loop {
        let chunk = chunks.next().unwrap_or_default();
        let last = chunks.peek().is_none();
        if last {
            flags |= END_HEADERS;
        }
        frame_head(out, chunk.len(), kind, flags, id);
        out.extend_from_slice(chunk);
        if last {
            return;
        }
        kind = CONTINUATION;
        flags = 0;
    }
}
