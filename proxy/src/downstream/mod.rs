//! The servers clients talk to: HTTP/1.1 and HTTP/2, each one future per connection,
//! generic over `http::service::Service`. Never imports `upstream` or `app`.

pub(crate) mod h1;
pub(crate) mod h2;
