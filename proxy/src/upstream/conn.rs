//! One upstream HTTP/1.1 connection's socket and read buffer, shared by the pool (which keeps
//! it idle and checks it is still open) and the client (which exchanges requests on it).

use std::io;
use std::task::{Context, Poll};

use bytes::BytesMut;

use fluxgate_http::stream::MaybeTls;
use fluxgate_wire::h1::Span;

/// How much room a read asks for.
const READ_SIZE: usize = 16 * 1024;

/// The socket of an upstream connection and what was read from it past the last response.
pub(crate) struct H1Io {
    pub(crate) stream: fluxgate_http::stream::UpstreamStream,
    pub(crate) rbuf: BytesMut,
    /// Where the fields of the response head being parsed lie (kept to reuse the allocation).
    pub(crate) spans: Vec<Span>,
}

impl H1Io {
    pub(crate) fn new(stream: fluxgate_http::stream::UpstreamStream) -> H1Io {
        H1Io {
            stream,
            rbuf: BytesMut::new(),
            spans: Vec::new(),
        }
    }

    /// Whether an idle connection has been closed by the upstream (or sent something it
    /// should not have). Never blocks and, while nothing arrived, makes no system call.
    pub(crate) fn looks_closed(&self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let tcp = match &self.stream {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.get_ref().0,
        };
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match tcp.poll_peek(&mut cx, &mut buf) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            // Plain HTTP/1.1 sends nothing unasked; over TLS it may be a session ticket.
            Poll::Ready(Ok(_)) => matches!(self.stream, MaybeTls::Plain(_)),
        }
    }

    /// Reads more bytes into `rbuf`; Ok(0) at end of stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        fluxgate_http::stream::poll_fill(&mut self.stream, &mut self.rbuf, READ_SIZE, cx)
    }
}
