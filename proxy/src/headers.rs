//! Header rewriting at the proxy boundary: hop-by-hop removal (RFC 9110 7.6.1) and the
//! X-Forwarded-* headers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never the message: removed in both directions.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // By length first: most request headers fall out without a string comparison.
    let s = name.as_str();
    matches!(s.len(), 2 | 7 | 10 | 16 | 17 | 18 | 19) && HOP_BY_HOP.contains(&s)
}

/// Removes the hop-by-hop headers and every header the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass to find out whether there is anything to do: the common request has none.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether the Connection header lists `token` (case-insensitive).
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Appends `value` to a comma-separated list header, creating it when absent.
pub(crate) fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
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
