//! RESP2, the Redis protocol, for the few commands fluxgate sends: a command is an array of
//! bulk strings; a reply is a simple string, an error, an integer, a bulk string or an array.

use bytes::{Buf, BytesMut};

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    /// None: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// None: the null array.
    Array(Option<Vec<Reply>>),
}

/// Why bytes are not a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("unknown reply type {0:#04x}")]
    Type(u8),
    #[error("bad length or integer")]
    Number,
    #[error("reply nested too deep or too large")]
    TooLarge,
}

/// Largest bulk string or array taken.
const MAX_LEN: i64 = 1 << 20;
const MAX_DEPTH: usize = 8;

/// Appends `args` as one command.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Takes one whole reply off the front of `buf`; None when more bytes are needed.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Reply>, RespError> {
    match reply(buf, 0, 0)? {
        None => Ok(None),
        Some((r, used)) => {
            buf.advance(used);
            Ok(Some(r))
        }
    }
}

/// The line at `at` (without CRLF) and where the next begins.
fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn number(l: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError::Number)
}

fn reply(b: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::TooLarge);
    }
    let Some(&kind) = b.get(at) else {
        return Ok(None);
    };
    let Some((l, next)) = line(b, at + 1) else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(l).into_owned();
    Ok(Some(match kind {
        b'+' => (Reply::Simple(text()), next),
        b'-' => (Reply::Error(text()), next),
        b':' => (Reply::Integer(number(l)?), next),
        b'$' => match number(l)? {
            -1 => (Reply::Bulk(None), next),
            n if (0..=MAX_LEN).contains(&n) => {
                let end = next + n as usize;
                match b.get(next..end + 2) {
                    None => return Ok(None),
                    Some(d) if &d[n as usize..] == b"\r\n" => {
                        (Reply::Bulk(Some(d[..n as usize].to_vec())), end + 2)
                    }
                    Some(_) => return Err(RespError::Number),
                }
            }
            _ => return Err(RespError::TooLarge),
        },
        b'*' => match number(l)? {
            -1 => (Reply::Array(None), next),
            n if (0..=MAX_LEN).contains(&n) => {
                let mut items = Vec::with_capacity((n as usize).min(64));
                let mut at = next;
                for _ in 0..n {
                    match reply(b, at, depth + 1)? {
                        None => return Ok(None),
                        Some((r, used)) => {
                            items.push(r);
                            at = used;
                        }
                    }
                }
                (Reply::Array(Some(items)), at)
            }
            _ => return Err(RespError::TooLarge),
        },
        other => return Err(RespError::Type(other)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_and_replies_parse_byte_by_byte() {
        let mut out = Vec::new();
        command(&mut out, &[b"GET", b"k"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let stream = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n$1\r\nx\r\n*-1\r\n";
        let want = [
            Reply::Simple("OK".into()),
            Reply::Error("ERR no".into()),
            Reply::Integer(42),
            Reply::Bulk(Some(b"abc".to_vec())),
            Reply::Bulk(None),
            Reply::Array(Some(vec![
                Reply::Integer(1),
                Reply::Bulk(Some(b"x".to_vec())),
            ])),
            Reply::Array(None),
        ];
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in stream.iter() {
            buf.extend_from_slice(&[byte]);
            while let Some(r) = parse(&mut buf).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(got, want);
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b":x\r\n",
            b"$99999999999\r\n",
            b"$1\r\nab\r\n",
        ] {
            assert!(parse(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(20) + ":1\r\n";
        assert_eq!(
            parse(&mut BytesMut::from(deep.as_bytes())),
            Err(RespError::TooLarge)
        );
    }
}
