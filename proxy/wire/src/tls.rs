//! What a proxy reads of a TLS ClientHello without terminating TLS: its extensions, and the
//! server name (SNI) among them (RFC 8446 4.1.2, RFC 6066 3). And what it reads of a
//! client certificate rustls has verified: the subject's common name (RFC 5280 4.1).

/// Walks the extensions of the ClientHello at the start of `b`, as far as `b` goes, calling
/// `f(kind, data)` for each one that is whole in `b`. None when `b` does not start like a
/// ClientHello (a handshake record holding one) or is too short to reach its extensions;
/// otherwise whether the record is whole in `b`.
pub fn client_hello_extensions<'a>(b: &'a [u8], mut f: impl FnMut(u16, &'a [u8])) -> Option<bool> {
    // Record header (5), handshake header (4), version (2), random (32).
    if *b.first()? != 0x16 || *b.get(5)? != 0x01 {
        return None;
    }
    let record_end = 5 + usize::from(u16::from_be_bytes([*b.get(3)?, *b.get(4)?]));
    let len16 = |i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *b.get(i)?,
            *b.get(i + 1)?,
        ])))
    };
    let mut i = 5 + 4 + 2 + 32;
    i += 1 + usize::from(*b.get(i)?); // session id
    i += 2 + len16(i)?; // cipher suites
    i += 1 + usize::from(*b.get(i)?); // compression methods
    let end = (i + 2 + len16(i)?).min(record_end);
    i += 2;
    while i + 4 <= end.min(b.len()) {
        let kind = u16::from_be_bytes([b[i], b[i + 1]]);
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        let Some(data) = b.get(i + 4..i + 4 + len) else {
            break;
        };
        f(kind, data);
        i += 4 + len;
    }
    Some(b.len() >= record_end)
}

/// The host name of a server_name extension's data (type 0), lower-cased by the caller if
/// it compares; None if it holds no host name or a malformed one.
pub fn server_name(data: &[u8]) -> Option<&str> {
    let list = usize::from(u16::from_be_bytes([*data.first()?, *data.get(1)?]));
    let mut i = 2;
    while i + 3 <= (2 + list).min(data.len()) {
        let kind = data[i];
        let len = usize::from(u16::from_be_bytes([data[i + 1], data[i + 2]]));
        let name = data.get(i + 3..i + 3 + len)?;
        if kind == 0 {
            let name = std::str::from_utf8(name).ok()?;
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
            return ok.then_some(name);
        }
        i += 3 + len;
    }
    None
}

/// The extension types read here.
pub const SERVER_NAME: u16 = 0;
pub const EARLY_DATA: u16 = 42;

/// One DER element at the front of `b`: (tag, contents, the rest after it).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = match first {
        n if n < 0x80 => (usize::from(n), b),
        0x81..=0x84 => {
            let k = usize::from(first & 0x7f);
            let len = b
                .get(..k)?
                .iter()
                .fold(0usize, |a, d| (a << 8) | usize::from(*d));
            (len, &b[k..])
        }
        _ => return None,
    };
    (len <= b.len()).then(|| (tag, &b[..len], &b[len..]))
}

/// The subject's common name (OID 2.5.4.3; the last one when there are several) of an X.509
/// certificate in DER, when it is a UTF8String, PrintableString or IA5String. Only for
/// certificates already verified: it checks structure, not signatures.
pub fn subject_common_name(cert: &[u8]) -> Option<&str> {
    const SEQUENCE: u8 = 0x30;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (SEQUENCE, cert, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(cert)? else {
        return None;
    };
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject.
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (SEQUENCE, mut rdns, _) = der(rest)? else {
        return None;
    };
    let mut found = None;
    while !rdns.is_empty() {
        let (set_tag, mut set, next) = der(rdns)?;
        rdns = next;
        if set_tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (_, atv, next) = der(set)?;
            set = next;
            let (0x06, oid, value) = der(atv)? else {
                return None;
            };
            if oid == CN {
                let (kind, text, _) = der(value)?;
                if matches!(kind, 0x0c | 0x13 | 0x16) {
                    found = Some(std::str::from_utf8(text).ok()?);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with these extensions.
    fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (k, d) in exts {
            e.extend(k.to_be_bytes());
            e.extend((d.len() as u16).to_be_bytes());
            e.extend(d);
        }
        body.extend((e.len() as u16).to_be_bytes());
        body.extend(e);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn sni_ext(name: &str) -> Vec<u8> {
        let mut d = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        d.push(0);
        d.extend((name.len() as u16).to_be_bytes());
        d.extend(name.as_bytes());
        d
    }

    fn sni_of(b: &[u8]) -> (Option<bool>, Option<String>) {
        let mut name = None;
        let whole = client_hello_extensions(b, |k, d| {
            if k == SERVER_NAME {
                name = server_name(d).map(str::to_owned);
            }
        });
        (whole, name)
    }

    #[test]
    fn finds_the_server_name() {
        let h = hello(&[(10, vec![0, 2, 0, 29]), (SERVER_NAME, sni_ext("a.example"))]);
        assert_eq!(sni_of(&h), (Some(true), Some("a.example".into())));
        // Cut short: not whole, and the name is not read from half an extension.
        assert_eq!(sni_of(&h[..h.len() - 3]), (Some(false), None));
        assert_eq!(
            sni_of(&hello(&[(10, vec![0, 2, 0, 29])])),
            (Some(true), None)
        );
        assert_eq!(sni_of(b"GET / HTTP/1.1\r\n"), (None, None));
        assert_eq!(sni_of(&hello(&[(SERVER_NAME, sni_ext("a/b"))])).1, None);
    }

    #[test]
    fn common_name_of_a_certificate() {
        // openssl req -x509 -subj "/C=GB/O=Example Desk/CN=desk-a.example/OU=trading"
        let cert = include_bytes!("testdata/client-cert.der");
        assert_eq!(subject_common_name(cert), Some("desk-a.example"));
        // Cut anywhere, or not a certificate: no name, no panic.
        for cut in 0..cert.len() {
            let _ = subject_common_name(&cert[..cut]);
        }
        assert_eq!(subject_common_name(b"\x30\x82\xff\xff"), None);
        assert_eq!(subject_common_name(&[]), None);
    }
}
