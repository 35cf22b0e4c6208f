//! Moving a tunnel's bytes in the kernel: splice(2) through a pipe per direction, so the
//! bytes never enter user space.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::{pipe, splice};

/// What a pipe is asked to hold per direction: what one splice moves at most.
const PIPE: usize = 1 << 20;

/// Carries bytes both ways between `a` and `b` until both directions end (each end passed on
/// as a half close) or one fails, calling `moved` each time bytes go. Returns the bytes
/// moved from `a` to `b` and from `b` to `a`, or Ok(None) when splice(2) does not take these
/// sockets (found before any byte was read): the caller copies instead.
pub async fn splice_both(
    a: &TcpStream,
    b: &TcpStream,
    moved: &dyn Fn(),
) -> io::Result<Option<(u64, u64)>> {
    let (Ok(ab), Ok(ba)) = (pipe(PIPE), pipe(PIPE)) else {
        return Ok(None);
    };
    let started = Cell::new(false);
    match tokio::try_join!(
        half(a, b, ab, &started, moved),
        half(b, a, ba, &started, moved)
    ) {
        Ok(moved) => Ok(Some(moved)),
        Err(Refused::Splice) => Ok(None),
        Err(Refused::Io(e)) => Err(e),
    }
}

enum Refused {
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
    on_move: &dyn Fn(),
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
        if !eof && held < cap {
            // A pipe counts its room in page slots, not bytes: with bytes in it, EAGAIN may
            // mean the pipe is full while the socket still holds data. Only an empty pipe's
            // EAGAIN says the socket is drained, so only then may the socket's readiness be
            // cleared (else it would wait for bytes that are already there).
            let read = if held == 0 {
                from.try_io(Interest::READABLE, || splice(from, &into, cap))
            } else {
                splice(from, &into, cap - held)
            };
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
            match to.try_io(Interest::WRITABLE, || splice(&out, to, held)) {
                Ok(n) => {
                    held -= n;
                    moved += n as u64;
                    on_move();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(Refused::Io)?;
                }
                Err(e) => return Err(refused(e)),
            }
        } else if eof {
            // Passes the end on; the other direction may still run.
            // SAFETY: shutdown(2) on a descriptor borrowed for the call.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(moved);
        }
    }
}
