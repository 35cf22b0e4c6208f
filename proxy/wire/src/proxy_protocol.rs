//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer in front of
//! us puts before a connection's first byte to say whom it carries, and the one we put before
//! ours to an upstream.
//!
//! Version 1 is one text line: `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n` (at most 107
//! bytes), or `PROXY UNKNOWN ...\r\n`. Version 2 is a 16-byte binary head (a 12-byte
//! signature, version and command, family and transport, the length of what follows) then
//! the addresses and optional TLVs, which are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first 12 bytes of every version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included.
pub const V1_MAX: usize = 107;
/// The longest version 2 header we take (addresses and TLVs past the 16-byte head). The
/// format allows 64 KiB; an edge balancer's TLVs fit well within this.
pub const V2_MAX_BODY: usize = 1024;

/// What a header says of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client, as the sender saw it.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// None for a version 2 LOCAL command (the sender's own health check), a version 1
    /// UNKNOWN line, or a family other than TCP over IPv4 or IPv6: use the connection's own
    /// addresses.
    pub addresses: Option<Addresses>,
    /// How many bytes of the input it took; the connection's own bytes start there.
    pub len: usize,
}

/// Why a header is refused (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line")]
    V1Malformed,
    #[error("PROXY v2 version or command unknown")]
    V2Version,
    #[error("PROXY v2 header longer than we take")]
    V2TooLong,
    #[error("PROXY v2 addresses shorter than their family")]
    V2Short,
}

/// Parses the header at the start of `buf`: Ok(None) while it may still be incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(ProxyError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| ProxyError::V1Malformed)?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let family = parts.next().ok_or(ProxyError::V1Malformed)?;
    if family == "UNKNOWN" {
        // Whatever follows is to be ignored.
        return Ok(Some(Header {
            addresses: None,
            len,
        }));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1Malformed);
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let ip = match family {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => return Err(ProxyError::V1Malformed),
        };
        ip.map_err(|_| ProxyError::V1Malformed)
    };
    let port = |s: &str| -> Result<u16, ProxyError> {
        // Decimal without a sign or leading zeros (a port is 0 only as "0").
        let ok = !s.is_empty()
            && s.len() <= 5
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        ok.then(|| s.parse().ok())
            .flatten()
            .ok_or(ProxyError::V1Malformed)
    };
    Ok(Some(Header {
        addresses: Some(Addresses {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        }),
        len,
    }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 || ver_cmd & 0xf > 1 {
        return Err(ProxyError::V2Version);
    }
    if body > V2_MAX_BODY {
        return Err(ProxyError::V2TooLong);
    }
    if buf.len() < 16 + body {
        return Ok(None);
    }
    let len = 16 + body;
    let local = ver_cmd & 0xf == 0;
    let a = &buf[16..len];
    let addresses = match family {
        // TCP over IPv4, TCP over IPv6.
        0x11 => {
            if a.len() < 12 {
                return Err(ProxyError::V2Short);
            }
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            })
        }
        0x21 => {
            if a.len() < 36 {
                return Err(ProxyError::V2Short);
            }
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            Some(Addresses {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // UNSPEC, UDP, Unix sockets: nothing we use.
        _ => None,
    };
    Ok(Some(Header {
        addresses: if local { None } else { addresses },
        len,
    }))
}

/// Which version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Appends a header for a connection from `source` to `destination` (PROXY; an IPv4 and an
/// IPv6 address together go as IPv6, the IPv4 one mapped).
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    match version {
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            out.extend_from_slice(
                format!(
                    "PROXY {family} {src} {dst} {} {}\r\n",
                    source.port(),
                    destination.port()
                )
                .as_bytes(),
            );
        }
        Version::V2 => {
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21);
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_lines() {
        let h = parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET /").unwrap();
        let h = h.unwrap();
        assert_eq!(h.len, 45);
        assert_eq!(
            h.addresses,
            Some(Addresses {
                source: sa("192.0.2.1:56324"),
                destination: sa("198.51.100.1:443")
            })
        );
        let h = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.addresses.unwrap().source, sa("[2001:db8::1]:1"));
        let h = parse(b"PROXY UNKNOWN whatever\r\n").unwrap().unwrap();
        assert_eq!((h.addresses, h.len), (None, 24));
        // Incomplete, then refused.
        assert_eq!(parse(b"PROX"), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_headers() {
        let mut h = Vec::new();
        encode(
            Version::V2,
            sa("192.0.2.1:56324"),
            sa("198.51.100.1:443"),
            &mut h,
        );
        assert_eq!(h.len(), 28);
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut at {cut}");
        }
        let got = parse(&h).unwrap().unwrap();
        assert_eq!(got.len, 28);
        assert_eq!(got.addresses.unwrap().source, sa("192.0.2.1:56324"));
        // A TLV after the addresses is skipped.
        let mut t = h.clone();
        t[15] += 5;
        t.extend_from_slice(&[0x04, 0, 2, b'h', b'i']);
        assert_eq!(parse(&t).unwrap().unwrap().len, 33);
        // LOCAL: the connection's own addresses.
        let mut l = h.clone();
        l[12] = 0x20;
        assert_eq!(parse(&l).unwrap().unwrap().addresses, None);
        // Version 1 in a v2 head, a command past LOCAL and PROXY, too long, too short.
        for (at, v) in [(12, 0x11), (12, 0x22), (14, 0x08)] {
            let mut b = h.clone();
            b[at] = v;
            assert!(parse(&b).is_err(), "byte {at} = {v:#x}");
        }
        let mut s = h.clone();
        s[15] = 4;
        assert_eq!(parse(&s[..20]), Err(ProxyError::V2Short));
    }

    #[test]
    fn encode_round_trips() {
        for (src, dst) in [
            ("10.0.0.1:1234", "10.0.0.2:80"),
            ("[2001:db8::1]:1", "[2001:db8::2]:2"),
        ] {
            for v in [Version::V1, Version::V2] {
                let mut out = Vec::new();
                encode(v, sa(src), sa(dst), &mut out);
                let h = parse(&out).unwrap().unwrap();
                assert_eq!(h.len, out.len());
                assert_eq!(
                    h.addresses,
                    Some(Addresses {
                        source: sa(src),
                        destination: sa(dst)
                    })
                );
            }
        }
    }
}
