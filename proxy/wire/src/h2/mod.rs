//! HTTP/2 on the wire: frame heads and the header blocks they carry (RFC 9113), and HPACK
//! (RFC 7541).

pub mod frame;
pub mod hpack;
