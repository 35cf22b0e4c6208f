//! WebSocket frames (RFC 6455 section 5), sans-IO: frame heads parsed from a buffer, client
//! payloads unmasked in place, server heads encoded (servers never mask, so one head serves
//! every receiver of the same payload), and the opening handshake's accept value's input.
//!
//! No extensions are negotiated, so the RSV bits must be 0.

/// The GUID the handshake appends to the client's key (RFC 6455 section 1.3).
pub const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest head: 2 bytes, an 8-byte length, a 4-byte mask key.
pub const MAX_HEAD: usize = 14;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl Opcode {
    pub fn is_control(self) -> bool {
        (self as u8) & 8 != 0
    }
}

/// Why bytes are not an acceptable frame; each is answered with close code 1002 (protocol
/// error), except `TooLarge` (1009).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("reserved bits set (no extension was negotiated)")]
    Reserved,
    #[error("unknown opcode {0}")]
    Opcode(u8),
    #[error("a client frame must be masked")]
    Unmasked,
    #[error("a control frame must be final and at most 125 bytes")]
    BadControl,
    #[error("frame length is not minimally encoded or has the top bit set")]
    BadLength,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
}

impl WsError {
    /// The close code the peer is sent.
    pub fn close_code(self) -> u16 {
        match self {
            WsError::TooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

/// A parsed frame head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    pub opcode: Opcode,
    /// The mask key, when the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes of the head itself.
    pub head_len: usize,
}

/// Parses a frame head at the front of `buf`; `Ok(None)` means more bytes are needed. A
/// client's frames (`from_client`) must be masked; payloads over `max` are refused.
pub fn parse_head(buf: &[u8], from_client: bool, max: u64) -> Result<Option<Head>, WsError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let opcode = match b0 & 0x0f {
        0 => Opcode::Continuation,
        1 => Opcode::Text,
        2 => Opcode::Binary,
        8 => Opcode::Close,
        9 => Opcode::Ping,
        10 => Opcode::Pong,
        n => return Err(WsError::Opcode(n)),
    };
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    if from_client && !masked {
        return Err(WsError::Unmasked);
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let n = u16::from_be_bytes([b[0], b[1]]) as u64;
            if n < 126 {
                return Err(WsError::BadLength);
            }
            (n, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let n = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if n >> 63 != 0 || n <= 0xffff {
                return Err(WsError::BadLength);
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(WsError::BadControl);
    }
    if len > max {
        return Err(WsError::TooLarge { len, max });
    }
    let mask = if masked {
        let Some(k) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some(k.try_into().expect("4 bytes"))
    } else {
        None
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask,
        len,
        head_len: at,
    }))
}

/// Unmasks (or masks: the same XOR) `data`, which starts `offset` bytes into the payload.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(offset + i) & 3];
    }
}

/// A server frame head (final, unmasked) for a payload of `len` bytes: the bytes and how many
/// of them are used.
pub fn server_head(opcode: Opcode, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode as u8;
    let used = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= 0xffff {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, used)
}

/// A whole masked client frame (what a client sends): for tests and load tools.
pub fn client_frame(opcode: Opcode, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    let (h, n) = server_head(opcode, payload.len());
    out.push(h[0]);
    out.push(h[1] | 0x80);
    out.extend_from_slice(&h[2..n]);
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

/// A Close frame's payload: the code, then the reason (cut to fit a control frame).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_round_trip_through_every_length_form() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            client_frame(Opcode::Binary, &payload, [1, 2, 3, 4], &mut wire);
            for cut in [0, 1, 2, 3, 9] {
                if cut < wire.len() - len {
                    assert_eq!(
                        parse_head(&wire[..cut], true, 1 << 20),
                        Ok(None),
                        "{len} {cut}"
                    );
                }
            }
            let h = parse_head(&wire, true, 1 << 20).unwrap().unwrap();
            assert_eq!((h.fin, h.opcode, h.len), (true, Opcode::Binary, len as u64));
            let mut body = wire[h.head_len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap(), 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn bad_frames_are_named() {
        let server = |op, len| {
            let (h, n) = server_head(op, len);
            h[..n].to_vec()
        };
        assert_eq!(
            parse_head(&server(Opcode::Binary, 3), true, 100),
            Err(WsError::Unmasked)
        );
        assert!(parse_head(&server(Opcode::Binary, 3), false, 100)
            .unwrap()
            .is_some());
        assert_eq!(parse_head(&[0xC2, 0x80], true, 100), Err(WsError::Reserved));
        assert_eq!(
            parse_head(&[0x83, 0x80], true, 100),
            Err(WsError::Opcode(3))
        );
        assert_eq!(
            parse_head(&[0x09, 0x80], true, 100),
            Err(WsError::BadControl)
        );
        assert_eq!(
            parse_head(&[0x89, 0xFE, 0, 200], true, 1000),
            Err(WsError::BadControl)
        );
        assert_eq!(
            parse_head(&[0x82, 0xFE, 0, 5], true, 1000),
            Err(WsError::BadLength)
        );
        assert_eq!(
            parse_head(&[0x82, 0xFE, 1, 0], true, 100),
            Err(WsError::TooLarge { len: 256, max: 100 })
        );
        assert_eq!(close_payload(1008, "slow")[..2], [0x03, 0xF0]);
    }
}
