//! The route table: which configured route a request head matches. Pure: no I/O, no clock,
//! no allocation per request; shared read-only by every worker.
//!
//! Routes keep their configured order (first match wins). To avoid testing every route,
//! routes are bucketed by host condition (exact hosts in a map, wildcard suffixes in a map
//! keyed by suffix) and host-less routes by the first path segment their path condition
//! pins down (`/api/` or `^/api/` pins `api`; `/ap`, `/` or a general regex pins nothing).
//! A request walks the already ordered candidate lists of its host and first segment
//! together, lowest index first.

use std::collections::HashMap;

use fluxgate_conf::{HostMatch, PathMatch, Route, RouteMatch, ValueMatch};
use http::{HeaderMap, Method};

/// The parts of a request head that routes look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Host without port, any case; None when the request has none.
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Routes of one listener, indexed for matching.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    exact: HashMap<String, Vec<u32>>,
    suffix: HashMap<String, Vec<u32>>,
    /// Host-less routes whose path pins the first segment.
    by_segment: HashMap<String, Vec<u32>>,
    /// Host-less routes that may match any path.
    any: Vec<u32>,
}

/// Longest host name (RFC 1035).
const MAX_HOST: usize = 253;
/// Most candidate lists one request can draw from: its exact host, the no-host list and one
/// per dot in the host (each suffix).
const MAX_LISTS: usize = 3 + MAX_HOST / 2;

/// The first path segment a path condition requires, if it pins one.
fn pinned_segment(p: &PathMatch) -> Option<&str> {
    let (rest, exact) = match p {
        PathMatch::Exact(p) => (p.strip_prefix('/')?, true),
        PathMatch::Prefix(p) => (p.strip_prefix('/')?, false),
        // Only the plain form `^/literal/...`: anything cleverer is tried on every request.
        PathMatch::Regex(r) => (r.as_str().strip_prefix("^/")?, false),
    };
    let seg_len = rest.find('/').or(exact.then_some(rest.len()))?;
    let seg = &rest[..seg_len];
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    (!seg.is_empty() && seg.chars().all(plain)).then_some(seg)
}

/// The first segment of a request path (`/a/b` gives `a`).
fn first_segment(path: &str) -> &str {
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split('/').next().unwrap_or("")
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut exact: HashMap<String, Vec<u32>> = HashMap::new();
        let mut suffix: HashMap<String, Vec<u32>> = HashMap::new();
        let mut by_segment: HashMap<String, Vec<u32>> = HashMap::new();
        let mut any = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let i = i as u32;
            match &r.matcher.host {
                Some(HostMatch::Exact(h)) => exact.entry(h.clone()).or_default().push(i),
                Some(HostMatch::Suffix(s)) => suffix.entry(s.clone()).or_default().push(i),
                None => match r.matcher.path.as_ref().and_then(pinned_segment) {
                    Some(seg) => by_segment.entry(seg.to_owned()).or_default().push(i),
                    None => any.push(i),
                },
            }
        }
        RouteTable {
            routes,
            exact,
            suffix,
            by_segment,
            any,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route, in configured order, that matches `req`, with its index.
    pub fn match_request(&self, req: &RequestHead<'_>) -> Option<(usize, &Route)> {
        // Lowercase the host into a stack buffer: hosts are case-insensitive, keys lowercase.
        let mut buf = [0u8; MAX_HOST];
        let host = req.host.and_then(|h| {
            let b = h.as_bytes();
            let dst = buf.get_mut(..b.len())?;
            for (d, s) in dst.iter_mut().zip(b) {
                *d = s.to_ascii_lowercase();
            }
            std::str::from_utf8(dst).ok()
        });
        let mut lists: [&[u32]; MAX_LISTS] = [&[]; MAX_LISTS];
        let mut n = 0;
        lists[n] = &self.any;
        n += 1;
        if let Some(l) = self.by_segment.get(first_segment(req.path)) {
            lists[n] = l;
            n += 1;
        }
        if let Some(h) = host {
            if let Some(l) = self.exact.get(h) {
                lists[n] = l;
                n += 1;
            }
            if !self.suffix.is_empty() {
                for (i, _) in h.match_indices('.') {
                    if let Some(l) = self.suffix.get(&h[i..]) {
                        if n < MAX_LISTS {
                            lists[n] = l;
                            n += 1;
                        }
                    }
                }
            }
        }
        let lists = &mut lists[..n];
        // Merge walk: always try the lowest route index at the head of any list.
        loop {
            let (which, idx) = lists
                .iter()
                .enumerate()
                .filter_map(|(w, l)| l.first().map(|&i| (w, i)))
                .min_by_key(|&(_, i)| i)?;
            lists[which] = &lists[which][1..];
            let route = &self.routes[idx as usize];
            if matches_rest(&route.matcher, req) {
                return Some((idx as usize, route));
            }
        }
    }
}

impl RouteTable {
    /// What `match_request` answers, found by trying every route in order without the index:
    /// the reference the index is held to (tests and the route fuzz target).
    pub fn match_linear(&self, req: &RequestHead<'_>) -> Option<usize> {
        let host = req
            .host
            .filter(|h| h.len() <= MAX_HOST)
            .map(str::to_ascii_lowercase);
        self.routes.iter().position(|r| {
            let host_ok = match &r.matcher.host {
                None => true,
                Some(HostMatch::Exact(h)) => host.as_deref() == Some(h.as_str()),
                Some(HostMatch::Suffix(s)) => {
                    host.as_deref().is_some_and(|x| x.ends_with(s.as_str()))
                }
            };
            host_ok && matches_rest(&r.matcher, req)
        })
    }
}

/// Everything but the host, which the bucketing already checked.
fn matches_rest(m: &RouteMatch, req: &RequestHead<'_>) -> bool {
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x == req.method) {
        return false;
    }
    let path_ok = match &m.path {
        None => true,
        Some(PathMatch::Exact(p)) => req.path == p,
        Some(PathMatch::Prefix(p)) => req.path.starts_with(p.as_str()),
        Some(PathMatch::Regex(r)) => r.is_match(req.path),
    };
    if !path_ok {
        return false;
    }
    m.headers.iter().all(|h| {
        let mut values = req.headers.get_all(&h.name).iter();
        match &h.value {
            ValueMatch::Present => values.next().is_some(),
            ValueMatch::Absent => values.next().is_none(),
            ValueMatch::Exact(e) => values.any(|v| v.as_bytes() == e.as_bytes()),
            ValueMatch::Regex(r) => values.any(|v| v.to_str().is_ok_and(|s| r.is_match(s))),
        }
    }) && m.query.iter().all(|q| {
        let mut values = query_values(req.query, &q.name);
        match &q.value {
            ValueMatch::Present => values.next().is_some(),
            ValueMatch::Absent => values.next().is_none(),
            ValueMatch::Exact(e) => values.any(|v| v == e),
            ValueMatch::Regex(r) => values.any(|v| r.is_match(v)),
        }
    })
}

/// Values of parameter `name` in a raw query string (`a=1&b&a=2`; `b` has the value "").
fn query_values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query.unwrap_or("").split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name && !pair.is_empty()).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxgate_conf::Config;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            "[[upstream]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n{routes}"
        );
        let c = Config::from_toml(&text).unwrap();
        RouteTable::new(c.listeners[0].routes.clone())
    }

    fn which(
        t: &RouteTable,
        method: &str,
        host: Option<&str>,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Option<usize> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (path, query) = target
            .split_once('?')
            .map_or((target, None), |(p, q)| (p, Some(q)));
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let head = RequestHead {
            method: &m,
            host,
            path,
            query,
            headers: &h,
        };
        t.match_request(&head).map(|(i, _)| i)
    }

    const R: &str = "upstream = \"u\"\n";

    #[test]
    fn first_match_wins_across_host_buckets() {
        let t = table(&format!(
            "[[listener.route]]\npath_prefix = \"/a\"\n{R}\
             [[listener.route]]\nhost = \"x.example.com\"\n{R}\
             [[listener.route]]\nhost = \"*.example.com\"\n{R}\
             [[listener.route]]\n{R}"
        ));
        assert_eq!(
            which(&t, "GET", Some("x.example.com"), "/a/b", &[]),
            Some(0)
        );
        assert_eq!(which(&t, "GET", Some("X.Example.COM"), "/z", &[]), Some(1));
        assert_eq!(
            which(&t, "GET", Some("deep.y.example.com"), "/z", &[]),
            Some(2)
        );
        assert_eq!(which(&t, "GET", Some("example.com"), "/z", &[]), Some(3));
        assert_eq!(which(&t, "GET", None, "/z", &[]), Some(3));
    }

    #[test]
    fn paths_methods_headers_query() {
        let t = table(&format!(
            "[[listener.route]]\npath = \"/exact\"\n{R}\
             [[listener.route]]\npath_regex = \"^/v[0-9]+/\"\nmethods = [\"post\"]\n{R}\
             [[listener.route]]\nheaders = [{{ name = \"x-env\", exact = \"canary\" }}, {{ name = \"x-off\", absent = true }}]\n{R}\
             [[listener.route]]\nheaders = [{{ name = \"user-agent\", regex = \"^curl/\" }}, {{ name = \"x-id\", present = true }}]\n{R}\
             [[listener.route]]\nquery = [{{ name = \"v\", exact = \"2\" }}, {{ name = \"debug\", present = true }}]\n{R}"
        ));
        assert_eq!(which(&t, "GET", None, "/exact", &[]), Some(0));
        assert_eq!(which(&t, "GET", None, "/exact/no", &[]), None);
        assert_eq!(which(&t, "POST", None, "/v12/x", &[]), Some(1));
        assert_eq!(which(&t, "GET", None, "/v12/x", &[]), None);
        assert_eq!(which(&t, "GET", None, "/", &[("x-env", "canary")]), Some(2));
        assert_eq!(
            which(&t, "GET", None, "/", &[("x-env", "canary"), ("x-off", "1")]),
            None
        );
        assert_eq!(
            which(
                &t,
                "GET",
                None,
                "/",
                &[("user-agent", "curl/8"), ("x-id", "")]
            ),
            Some(3)
        );
        assert_eq!(
            which(&t, "GET", None, "/", &[("user-agent", "curl/8")]),
            None
        );
        assert_eq!(which(&t, "GET", None, "/?a=1&v=2&debug", &[]), Some(4));
        assert_eq!(which(&t, "GET", None, "/?v=2", &[]), None);
        assert_eq!(which(&t, "GET", None, "/?v=20&debug", &[]), None);
    }

    #[test]
    fn segments_pinned_only_when_certain() {
        let seg = |p: PathMatch| pinned_segment(&p).map(str::to_owned);
        assert_eq!(seg(PathMatch::Prefix("/api/".into())), Some("api".into()));
        assert_eq!(seg(PathMatch::Prefix("/api".into())), None);
        assert_eq!(
            seg(PathMatch::Exact("/health".into())),
            Some("health".into())
        );
        assert_eq!(seg(PathMatch::Exact("/a/b".into())), Some("a".into()));
        assert_eq!(seg(PathMatch::Prefix("/".into())), None);
        let re = |r: &str| PathMatch::Regex(regex::Regex::new(r).unwrap());
        assert_eq!(seg(re("^/v1/[0-9]+$")), Some("v1".into()));
        assert_eq!(seg(re("^/v[0-9]/")), None);
        assert_eq!(seg(re("/v1/")), None);
        assert_eq!(first_segment("/a/b"), "a");
        assert_eq!(first_segment("/"), "");
    }

    #[test]
    fn pinned_and_unpinned_routes_keep_their_order() {
        let t = table(&format!(
            "[[listener.route]]\npath_prefix = \"/ap\"\n{R}\
             [[listener.route]]\npath_prefix = \"/api/\"\n{R}\
             [[listener.route]]\npath_regex = \"^/api/v[0-9]$\"\n{R}\
             [[listener.route]]\n{R}"
        ));
        assert_eq!(which(&t, "GET", None, "/api/v1", &[]), Some(0));
        let t = table(&format!(
            "[[listener.route]]\npath_regex = \"^/api/v[0-9]$\"\n{R}\
             [[listener.route]]\npath_prefix = \"/ap\"\n{R}\
             [[listener.route]]\n{R}"
        ));
        assert_eq!(which(&t, "GET", None, "/api/v1", &[]), Some(0));
        assert_eq!(which(&t, "GET", None, "/api/x", &[]), Some(1));
        assert_eq!(which(&t, "GET", None, "/zzz", &[]), Some(2));
    }

    #[test]
    fn query_values_split_pairs() {
        let v: Vec<_> = query_values(Some("a=1&b&a=2&&c="), "a").collect();
        assert_eq!(v, ["1", "2"]);
        assert_eq!(
            query_values(Some("a=1&b&c="), "b").collect::<Vec<_>>(),
            [""]
        );
        assert_eq!(query_values(None, "a").count(), 0);
    }
}
