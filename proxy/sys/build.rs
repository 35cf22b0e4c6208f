//! Sets `cfg(io_uring_unavailable)` when this machine cannot accept through io_uring, so the
//! tests that need it are ignored (nextest reports them as skipped) instead of passing
//! without running.

#[allow(dead_code, unsafe_code)]
#[path = "src/probe.rs"]
mod probe;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(io_uring_unavailable)");
    println!("cargo::rerun-if-changed=src/probe.rs");
    if let Err(e) = probe::probe_on_this_thread() {
        println!("cargo::rustc-cfg=io_uring_unavailable");
        println!("cargo::warning=io_uring unavailable here ({e}): its tests are ignored");
    }
}
