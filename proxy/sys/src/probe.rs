//! Whether io_uring can accept here. Shared with build.rs, which runs it on the machine that
//! builds (the one the tests run on) so that a test needing io_uring is ignored, and reported
//! as skipped, where it cannot run.

use std::io;

use io_uring::{opcode, IoUring};

/// The probe itself; see `probe_uring` for why callers run it on a thread of its own.
pub(crate) fn probe_on_this_thread() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::AcceptMulti::CODE) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel lacks IORING_OP_ACCEPT",
        ));
    }
    // Multishot accept arrived in Linux 5.19 and the probe cannot see flags, so check the release.
    let mut uts: libc::utsname = unsafe_zeroed_utsname();
    // SAFETY: uname fills the struct we pass by pointer and keeps no reference to it.
    if unsafe { libc::uname(&mut uts) } == 0 {
        // SAFETY: uname NUL-terminates release.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        let mut parts = release
            .to_str()
            .unwrap_or("0.0")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (5, 19) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("kernel {major}.{minor} predates multishot accept (5.19)"),
            ));
        }
    }
    Ok(())
}

fn unsafe_zeroed_utsname() -> libc::utsname {
    // SAFETY: utsname is plain old data (arrays of c_char); all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}
