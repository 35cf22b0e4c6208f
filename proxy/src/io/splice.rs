//! Moving a tunnel's bytes: splice(2) through a pipe per direction, so the bytes never enter
//! user space, or a user-space copy where splice is refused or turned off.

use std::cell::Cell;
use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// What a pipe is asked to hold per direction: what one splice moves at most.
const PIPE: usize = 1 << 20;
/// The copy path's buffer per direction.
const COPY_BUF: usize = 64 << 10;

/// Carries bytes both ways between `a` and `b` until both directions end (each end passed on
/// as a half close) or one fails; `splice` chooses the kernel path. Returns the bytes moved
/// from `a` to `b` and from `b` to `a`.
pub(crate) async fn pump(
    mut a: TcpStream,
    mut b: TcpStream,
    splice: bool,
) -> io::Result<(u64, u64)> {
    if splice {
        if let (Ok(ab), Ok(ba)) = (fluxgate_sys::pipe(PIPE), fluxgate_sys::pipe(PIPE)) {
            let started = Cell::new(false);
            match tokio::try_join!(half(&a, &b, ab, &started), half(&b, &a, ba, &started)) {
                Err(Refused::Splice) => {}
                Err(Refused::Io(e)) => return Err(e),
                Ok(moved) => return Ok(moved),
            }
        }
    }
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF).await
}

enum Refused {
    /// splice(2) does not take these descriptors (found before any byte was read).
    Splice,
    Io(io::Error),
}

/// One direction through `pipe` (read end, write end, capacity): socket to pipe, pipe to
/// socket. `started` is set once either direction has read a byte.
async fn half(
    from: &TcpStream,
    to: &TcpStream,
    pipe: (OwnedFd, OwnedFd, usize),
    started: &Cell<bool>,
) -> Result<u64, Refused> {
    let (out, into, cap) = pipe;
    let refused = |e: io::Error| {
        if !started.get() && e.raw_os_error() == Some(libc::EINVAL) {
            Refused::Splice
        } else {
            Refused::Io(e)
        }
    };
    let mut held = 0usize;
    let mut moved = 0u64;
    let mut eof = false;
    loop {
        // Asked for no more than the pipe has room for, a WouldBlock here is the socket's.
        if !eof && held < cap {
            let read = from.try_io(Interest::READABLE, || {
                fluxgate_sys::splice(from, &into, cap - held)
            });
            match read {
                Ok(0) => eof = true,
                Ok(n) => {
                    held += n;
                    started.set(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if held == 0 {
                        from.readable().await.map_err(Refused::Io)?;
                        continue;
                    }
                }
                Err(e) => return Err(refused(e)),
            }
        }
        if held > 0 {
            match to.try_io(Interest::WRITABLE, || fluxgate_sys::splice(&out, to, held)) {
                Ok(n) => {
                    held -= n;
                    moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(Refused::Io)?;
                }
                Err(e) => return Err(refused(e)),
            }
        } else if eof {
            // Passes the end on; the other direction may still run.
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(moved);
        }
    }
}
