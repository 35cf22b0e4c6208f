//! A request head as it arrives on a stream, decoded and checked field by field.

use http::{HeaderMap, HeaderValue, Method, Request, Uri};

use crate::body::ClientBody;
use fluxgate_wire::h2::hpack::{self, Field, Name};

/// The request head being decoded.
pub(super) struct StreamHead {
    pub(super) method: Option<HeaderValue>,
    pub(super) scheme: Option<HeaderValue>,
    pub(super) authority: Option<HeaderValue>,
    pub(super) path: Option<HeaderValue>,
    pub(super) headers: HeaderMap,
    /// The list size as RFC 9113 counts it; past `limit`, fields are counted, not kept.
    pub(super) size: usize,
    pub(super) limit: usize,
    /// Regular fields (pseudo-headers not counted), kept or not.
    pub(super) fields: usize,
    pub(super) malformed: bool,
    pub(super) regular: bool,
}

impl StreamHead {
    pub(super) fn new(limit: usize) -> StreamHead {
        StreamHead {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            size: 0,
            limit,
            fields: 0,
            malformed: false,
            regular: false,
        }
    }

    pub(super) fn has_pseudo(&self) -> bool {
        self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
    }

    pub(super) fn add(&mut self, f: Field) {
        self.size += f.size;
        if matches!(f.name, Name::Header(_)) {
            self.fields += 1;
        }
        if self.size > self.limit {
            return;
        }
        let Some(value) = f.value else {
            self.malformed = true;
            return;
        };
        let slot = match f.name {
            Name::Method => &mut self.method,
            Name::Scheme => &mut self.scheme,
            Name::Authority => &mut self.authority,
            Name::Path => &mut self.path,
            Name::OtherPseudo | Name::Invalid => {
                self.malformed = true;
                return;
            }
            Name::Header(name) => {
                self.regular = true;
                if hpack::connection_specific(&name)
                    || (name == http::header::TE && value != "trailers")
                {
                    self.malformed = true;
                }
                self.headers.append(name, value);
                return;
            }
        };
        // Pseudo-headers come first, once each (RFC 9113 8.3).
        if self.regular || slot.is_some() {
            self.malformed = true;
        }
        *slot = Some(value);
    }

    /// The request, or None when the head is malformed.
    pub(super) fn into_request(self, body: ClientBody) -> Option<Request<ClientBody>> {
        let method = Method::from_bytes(self.method?.as_bytes()).ok()?;
        let mut uri = http::uri::Parts::default();
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return None;
            }
            uri.authority = Some(self.authority?.as_bytes().try_into().ok()?);
        } else {
            uri.scheme = Some(self.scheme?.as_bytes().try_into().ok()?);
            uri.authority = match self.authority {
                Some(a) => Some(a.as_bytes().try_into().ok()?),
                None => None,
            };
            let path = self.path?;
            if path.is_empty() {
                return None;
            }
            uri.path_and_query = Some(path.as_bytes().try_into().ok()?);
        }
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_parts(uri).ok()?;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}
