//! The gateway: what a request becomes (route, direct answer, redirect or forward through
//! the upstream side) and the response body it streams back. Speaks to clients only through
//! the service seam; never touches a client socket.

pub(crate) mod body;
pub(crate) mod fanout;
pub(crate) mod gateway;
pub(crate) mod orders;
