//! The byte streams fluxgate speaks over: plain TCP or TLS over TCP, on either side.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection: a plain socket, or a TLS session over one (`T`: the server or client side).
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T> MaybeTls<T> {
    /// The socket, if nothing is layered on it (a tunnel over it can be spliced).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            MaybeTls::Plain(s) => Some(s),
            MaybeTls::Tls(_) => None,
        }
    }
}

/// A connection a tunnel may carry: when it is plain TCP underneath, with nothing buffered
/// above the socket, its bytes can move in the kernel.
pub trait TcpBacked: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> Option<&TcpStream>;
}

/// Carries a tunnel's bytes both ways until both directions end: with splice(2) when
/// `splice` and both sides are plain TCP, else copied through user space. With `idle`, a
/// tunnel where no byte moves either way for that long ends with `TimedOut`.
pub async fn pump<A: TcpBacked, B: TcpBacked>(
    a: &mut A,
    b: &mut B,
    splice: bool,
    idle: Option<std::time::Duration>,
) -> io::Result<(u64, u64)> {
    let last = std::cell::Cell::new(tokio::time::Instant::now());
    let moved = || last.set(tokio::time::Instant::now());
    let work = async {
        if splice {
            if let (Some(x), Some(y)) = (a.tcp(), b.tcp()) {
                if let Some(moved) = fluxgate_sys::tunnel::splice_both(x, y, &moved).await? {
                    return Ok(moved);
                }
            }
        }
        let mut a = Watched {
            io: a,
            moved: &moved,
        };
        let mut b = Watched {
            io: b,
            moved: &moved,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await
    };
    let Some(limit) = idle else {
        return work.await;
    };
    tokio::pin!(work);
    let mut deadline = last.get() + limit;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep_until(deadline) => {
                // Bytes may have moved since the timer was set: look again from then.
                let due = last.get() + limit;
                if tokio::time::Instant::now() >= due {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                deadline = due;
            }
        }
    }
}

/// A tunnel side on the copy path, telling when bytes go through it.
struct Watched<'a, T> {
    io: &'a mut T,
    moved: &'a dyn Fn(),
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            (this.moved)();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            (this.moved)();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// The copy path's buffer per direction.
const COPY_BUF: usize = 64 << 10;

impl<T: AsyncRead + AsyncWrite + Unpin> TcpBacked for MaybeTls<T> {
    fn tcp(&self) -> Option<&TcpStream> {
        MaybeTls::tcp(self)
    }
}

impl TcpBacked for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// A client's connection to us.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// Our connection to an upstream endpoint.
pub type UpstreamStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => poll_send_vectored(s, cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Writes `bufs` with send(2) or sendmsg(2). tokio's own vectored write is writev(2), which
/// goes through the file layer first (position lock, change notification): measurable at one
/// write per request.
fn poll_send_vectored(
    s: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(s.poll_write_ready(cx))?;
        let sent = s.try_io(tokio::io::Interest::WRITABLE, || {
            let sock = socket2::SockRef::from(s);
            match bufs {
                // send(2) takes the buffer as it is; sendmsg(2) copies a header and a vector in.
                [one] => sock.send_with_flags(one, libc::MSG_NOSIGNAL),
                _ => sock.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL),
            }
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Reads what is there into `buf`, with room for at least a quarter of `size`.
pub fn poll_fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    size: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.is_empty() {
        // Back to the front of the buffer when nothing else holds it any more: each read
        // then lands in the same cache-hot memory instead of walking on through it.
        let _ = buf.try_reclaim(size);
    }
    if buf.capacity() - buf.len() < size / 4 {
        buf.reserve(size);
    }
    let read = stream.read_buf(buf);
    std::future::Future::poll(std::pin::pin!(read), cx)
}

/// Carries an upgraded connection's bytes both ways once both sides switched protocols,
/// starting with what each sent past the heads (`early` from the upstream, `from_client`).
pub async fn tunnel<U: TcpBacked>(
    mut client: ClientStream,
    from_client: BytesMut,
    mut upstream: U,
    early: BytesMut,
    splice: bool,
) {
    use tokio::io::AsyncWriteExt;
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    if !from_client.is_empty() && upstream.write_all(&from_client).await.is_err() {
        return;
    }
    let _ = pump(&mut client, &mut upstream, splice, None).await;
}
