//! The NATS client protocol (text control lines, binary payloads), sans-IO: what a server
//! sends parsed from a buffer (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`), and
//! what a client sends encoded (`CONNECT`, `SUB`, `PUB`, `PING`, `PONG`).
//!
//! A `MSG` is returned as offsets into the buffer, so the caller cuts its payload out of the
//! read buffer without copying it.

use std::ops::Range;

/// Longest control line accepted (the server's own default `max_control_line`).
pub const MAX_CONTROL_LINE: usize = 4096;

/// Why bytes are not a server's protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsError {
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    #[error("unknown operation {0:?}")]
    Unknown(String),
    #[error("malformed {0} line")]
    Malformed(&'static str),
    #[error("message of {len} bytes over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("message payload not followed by CRLF")]
    NoTrailer,
}

/// One operation from a server; ranges are offsets into the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The server's JSON description (its first line, and again on cluster changes).
    Info(Range<usize>),
    /// A message: its subject, subscription id, reply subject, and payload (after any
    /// headers of an `HMSG`).
    Msg {
        subject: Range<usize>,
        sid: u64,
        reply: Option<Range<usize>>,
        payload: Range<usize>,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR` and its text.
    Err(Range<usize>),
}

/// Parses the operation at the front of `buf`: `Ok(None)` means more bytes are needed;
/// otherwise the operation and how many bytes it took. Payloads over `max_payload` are
/// refused.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(ServerOp, usize)>, NatsError> {
    let Some(nl) = buf
        .iter()
        .take(MAX_CONTROL_LINE + 2)
        .position(|&b| b == b'\n')
    else {
        return match buf.len() > MAX_CONTROL_LINE + 1 {
            true => Err(NatsError::LineTooLong),
            false => Ok(None),
        };
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let line = &buf[..line_end];
    let after = nl + 1;
    let (verb, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(p) => (&line[..p], p + 1),
        None => (line, line.len()),
    };
    let done = |op| Ok(Some((op, after)));
    if verb.eq_ignore_ascii_case(b"PING") {
        return done(ServerOp::Ping);
    }
    if verb.eq_ignore_ascii_case(b"PONG") {
        return done(ServerOp::Pong);
    }
    if verb.eq_ignore_ascii_case(b"+OK") {
        return done(ServerOp::Ok);
    }
    if verb.eq_ignore_ascii_case(b"-ERR") {
        return done(ServerOp::Err(rest.min(line_end)..line_end));
    }
    if verb.eq_ignore_ascii_case(b"INFO") {
        return done(ServerOp::Info(rest.min(line_end)..line_end));
    }
    let headers = verb.eq_ignore_ascii_case(b"HMSG");
    if !headers && !verb.eq_ignore_ascii_case(b"MSG") {
        let shown = String::from_utf8_lossy(&verb[..verb.len().min(16)]).into_owned();
        return Err(NatsError::Unknown(shown));
    }
    let what = if headers { "HMSG" } else { "MSG" };
    // MSG subject sid [reply] size / HMSG subject sid [reply] header-size total-size
    let mut words: [Range<usize>; 5] = Default::default();
    let mut n = 0;
    let mut i = rest;
    while i < line_end {
        while i < line_end && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < line_end && line[i] != b' ' && line[i] != b'\t' {
            i += 1;
        }
        if start < i {
            if n == words.len() {
                return Err(NatsError::Malformed(what));
            }
            words[n] = start..i;
            n += 1;
        }
    }
    let number = |r: &Range<usize>| -> Result<usize, NatsError> {
        let s = &line[r.clone()];
        if s.is_empty() || s.len() > 12 || !s.iter().all(u8::is_ascii_digit) {
            return Err(NatsError::Malformed(what));
        }
        Ok(s.iter().fold(0, |a, d| a * 10 + (d - b'0') as usize))
    };
    let sizes = if headers { 2 } else { 1 };
    if n < 2 + sizes || n > 3 + sizes {
        return Err(NatsError::Malformed(what));
    }
    let reply = (n == 3 + sizes).then(|| words[2].clone());
    let (head_len, total) = if headers {
        let (h, t) = (number(&words[n - 2])?, number(&words[n - 1])?);
        if h > t {
            return Err(NatsError::Malformed(what));
        }
        (h, t)
    } else {
        (0, number(&words[n - 1])?)
    };
    if total > max_payload {
        return Err(NatsError::TooLarge {
            len: total,
            max: max_payload,
        });
    }
    let end = after + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(NatsError::NoTrailer);
    }
    Ok(Some((
        ServerOp::Msg {
            subject: words[0].clone(),
            sid: number(&words[1])? as u64,
            reply,
            payload: after + head_len..end,
        },
        end + 2,
    )))
}

/// `CONNECT` with the options fluxgate uses: no `+OK` per command, headers not needed, the
/// connection named. `name` must not need JSON escaping beyond what is done here.
pub fn connect(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"lang\":\"rust\",\"version\":\"",
    );
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"protocol\":1,\"name\":\"");
    for c in name
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
    {
        let mut b = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
    }
    out.extend_from_slice(b"\"}\r\n");
}

/// Whether a subject (or, with `wildcards`, a subscription pattern) is well formed: tokens
/// separated by dots, none empty, no whitespace; `*` a whole token, `>` only the last.
pub fn valid_subject(s: &str, wildcards: bool) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && !t
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                && match *t {
                    "*" => wildcards,
                    ">" => wildcards && i == tokens.len() - 1,
                    t => !t.contains(['*', '>']),
                }
        })
}

/// `SUB subject sid`.
pub fn sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

/// The head of `PUB subject len`; the payload and a CRLF follow it.
pub fn pub_head(out: &mut Vec<u8>, subject: &str, len: usize) {
    out.extend_from_slice(format!("PUB {subject} {len}\r\n").as_bytes());
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> (ServerOp, usize) {
        parse(buf, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn messages_and_controls() {
        let b = b"MSG md.ticks 7 5\r\nhello\r\nPING\r\n";
        let (op, used) = one(b);
        assert_eq!(
            op,
            ServerOp::Msg {
                subject: 4..12,
                sid: 7,
                reply: None,
                payload: 18..23
            }
        );
        assert_eq!(&b[18..23], b"hello");
        assert_eq!(one(&b[used..]), (ServerOp::Ping, 6));
        let b = b"MSG a 1 inbox.x 0\r\n\r\n";
        let (op, used) = one(b);
        assert!(
            matches!(op, ServerOp::Msg { reply: Some(ref r), .. } if &b[r.clone()] == b"inbox.x")
        );
        assert_eq!(used, b.len());
        let b = b"HMSG a 1 12 15\r\nNATS/1.0\r\n\r\nabc\r\n";
        let (op, _) = one(b);
        assert!(matches!(op, ServerOp::Msg { ref payload, .. } if &b[payload.clone()] == b"abc"));
        let b = b"INFO {\"max_payload\":1048576}\r\n";
        assert!(matches!(one(b).0, ServerOp::Info(r) if b[r.clone()].starts_with(b"{")));
        assert!(matches!(
            one(b"-ERR 'Authorization Violation'\r\n").0,
            ServerOp::Err(_)
        ));
        assert_eq!(one(b"+OK\r\n").0, ServerOp::Ok);
        assert_eq!(one(b"pong\r\n").0, ServerOp::Pong);
    }

    #[test]
    fn partial_input_waits() {
        let b = b"MSG md.ticks 7 5\r\nhello\r\n";
        for cut in 0..b.len() {
            assert_eq!(parse(&b[..cut], 1 << 20), Ok(None), "{cut}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            parse(b"NOPE\r\n", 100),
            Err(NatsError::Unknown(_))
        ));
        assert!(parse(b"MSG a\r\n", 100).is_err());
        assert!(parse(b"MSG a 1 x\r\n", 100).is_err());
        assert!(parse(b"MSG a 1 b c 5\r\n", 100).is_err());
        assert!(parse(b"MSG a 1 -5\r\n", 100).is_err());
        assert!(parse(b"HMSG a 1 9 5\r\n", 100).is_err());
        assert_eq!(
            parse(b"MSG a 1 101\r\n", 100),
            Err(NatsError::TooLarge { len: 101, max: 100 })
        );
        assert_eq!(parse(b"MSG a 1 2\r\nabXY", 100), Err(NatsError::NoTrailer));
        assert_eq!(
            parse(&vec![b'A'; MAX_CONTROL_LINE + 2], 100),
            Err(NatsError::LineTooLong)
        );
    }

    #[test]
    fn subjects() {
        assert!(valid_subject("md.ticks.>", true));
        assert!(valid_subject("md.*.x", true));
        assert!(!valid_subject("md.ticks.>", false));
        assert!(!valid_subject("md.>.x", true));
        assert!(!valid_subject("md..x", true));
        assert!(!valid_subject("md x", true));
        assert!(!valid_subject("", true));
        assert!(!valid_subject("a*b", true));
    }

    #[test]
    fn client_lines() {
        let mut out = Vec::new();
        connect(&mut out, "fluxgate \"x\"");
        sub(&mut out, "md.>", 1);
        pub_head(&mut out, "md.a", 3);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("CONNECT {\"verbose\":false"));
        assert!(s.contains("\"name\":\"fluxgate x\"}\r\nSUB md.> 1\r\nPUB md.a 3\r\n"));
    }
}
