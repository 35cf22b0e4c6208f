//! Header rewriting at the proxy boundary: hop-by-hop removal (RFC 9110 7.6.1) and the
//! X-Forwarded-* headers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never the message: removed in both directions.
/// Connection first: the headers it names go too. HTTP2-Settings belongs to the h2c upgrade,
/// which is never forwarded (RFC 9113 3.1).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("http2-settings"),
];

/// The index of `name` in `HOP_BY_HOP`.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    // By length first: most headers fall out without a comparison.
    if !matches!(name.as_str().len(), 2 | 7 | 10 | 14 | 16 | 17 | 18 | 19) {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// Removes the hop-by-hop headers and every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass to find which are present; the common request has none, the common response
    // only Connection.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // keep-alive and close, the usual tokens, name nothing to remove but themselves.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

pub use fluxgate_wire::h1::connection_has;

/// Appends `value` to a comma-separated list header, creating it when absent.
pub fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(v) => {
            v.insert(value.clone());
        }
        header::Entry::Occupied(mut o) => {
            let mut joined = Vec::with_capacity(o.get().len() + 2 + value.len());
            for (i, existing) in o.iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(existing.as_bytes());
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                o.insert(v);
            }
        }
    }
}

/// The Date header value, formatted once a second per thread.
pub fn http_date() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some((at, value)) if *at == secs => value.clone(),
            _ => {
                let value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                    .expect("an HTTP date is a valid header value");
                *c = Some((secs, value.clone()));
                value
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn appends_to_lists() {
        let mut h = HeaderMap::new();
        let ip = HeaderValue::from_static("10.0.0.2");
        append_list(&mut h, HeaderName::from_static("x-forwarded-for"), &ip);
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.3"));
        append_list(&mut h, HeaderName::from_static("x-forwarded-for"), &ip);
        assert_eq!(h["x-forwarded-for"], "10.0.0.2, 10.0.0.3, 10.0.0.2");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }
}
