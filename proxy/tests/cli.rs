//! The `fluxgate` binary: `check` on good and bad configs, and quick mode serving HTTP/1.1
//! and h2c on the address it is given.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn fluxgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fluxgate"))
}

#[test]
fn check_accepts_every_example() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // From the repository root, where the examples' relative paths start.
            let out = fluxgate()
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .arg("check")
                .arg("-c")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 4);
}

#[test]
fn check_names_key_and_line_of_a_bad_value() {
    let dir = scratch("cli");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\n\
         endpoints = [\"127.0.0.1:1\"]\nidle_timeout = \"forever\"\n",
    )
    .unwrap();
    let out = fluxgate()
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream[0].idle_timeout") && err.contains("line 8"),
        "{err}"
    );

    let out = fluxgate()
        .args(["check", "-c", "/nonexistent/fluxgate.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// Starts the binary in quick mode in front of `up`, with `extra` flags.
fn quick_mode(up: &Upstream, extra: &[&str]) -> Running {
    let upstream = up.addr.to_string();
    let mut args = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--workers",
        "1",
        "--io",
        "auto",
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sighup_reloads_the_file_and_refuses_a_bad_one() {
    let dir = scratch("hup");
    let path = dir.join("f.toml");
    let cfg = |body: &str| {
        format!("[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200, body = \"{body}\" }}\n")
    };
    std::fs::write(&path, cfg("one")).unwrap();
    let mut r = spawn(&["run", "-c", path.to_str().unwrap(), "--workers", "1"]);
    assert_eq!(get(r.addr, "/").body, b"one");
    std::fs::write(&path, cfg("two")).unwrap();
    signal(&r.child, "-HUP");
    assert!(eventually(Duration::from_secs(3), || get(r.addr, "/").body == b"two"));
    std::fs::write(
        &path,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 99 }\n",
    )
    .unwrap();
    signal(&r.child, "-HUP");
    assert!(eventually(Duration::from_secs(3), || r
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("refused") && l.contains("respond.status"))));
    assert_eq!(
        get(r.addr, "/").body,
        b"two",
        "the old config keeps serving"
    );
    signal(&r.child, "-TERM");
    assert!(r.child.wait().unwrap().success());
}

fn sigterm(child: &std::process::Child) {
    signal(child, "-TERM");
}

#[test]
fn quick_mode_serves_http1_and_h2c_and_stops_on_sigterm() {
    let up = upstream(Behavior::Echo);
    let Running {
        mut child, addr, ..
    } = quick_mode(&up, &[]);
    let r = get(addr, "/quick");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-up-path"), Some("/quick"));
    // h2c prior knowledge on the same port.
    let mut c = RawClient::connect(addr);
    c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
    let mut first = [0u8; 9];
    std::io::Read::read_exact(&mut c.stream, &mut first).unwrap();
    assert_eq!(first[3], 0x04, "server answers the preface with SETTINGS");
    drop(c);
    sigterm(&child);
    assert!(child.wait().unwrap().success(), "exit 0 on SIGTERM");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_refuses_new_connections() {
    let up = upstream(Behavior::Slow(Duration::from_millis(1000)));
    let Running {
        mut child, addr, ..
    } = quick_mode(&up, &[]);
    let slow = std::thread::spawn(move || get(addr, "/slow").status);
    assert!(eventually(Duration::from_secs(3), || up.requests() == 1));
    let t = Instant::now();
    sigterm(&child);
    assert!(
        eventually(Duration::from_secs(2), || std::net::TcpStream::connect(
            addr
        )
        .is_err()),
        "new connections refused while draining"
    );
    assert_eq!(slow.join().unwrap(), 200, "the request in flight completed");
    assert!(child.wait().unwrap().success(), "exit 0 after the drain");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "well within the 30 s grace"
    );
}

#[test]
fn bad_arguments_fail_with_usage() {
    let out = fluxgate()
        .args(["run", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen wants IP:PORT"));
    let out = fluxgate().args(["run", "--bogus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}

#[test]
fn quick_mode_speaks_tls() {
    let dir = test_certs(&scratch("cli-tls"), &[]);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let up = upstream(Behavior::Echo);
    let mut r = quick_mode(
        &up,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(r
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("(TLS: h2 and HTTP/1.1 by ALPN)")));
    let out = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "5",
            "-D",
            "-",
            &format!("https://{}/quick", r.addr),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.contains("x-up-path: /quick"), "{text}");
    assert!(text.contains("x-up-xfp: https\r\n"), "{text}");
    signal(&r.child, "-TERM");
    assert!(r.child.wait().unwrap().success());
}

/// Starts the binary in quick mode under an open-file limit of `nofile` (soft and hard, so
/// its own raise cannot lift it) with `--io io`, until it says which acceptor runs or exits.
/// Returns whether it started and everything it logged.
fn start_under_fd_limit(nofile: u32, io: &str) -> (bool, String) {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_fluxgate"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--workers", "1", "--io", io])
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let mut log = String::new();
    let mut started = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("accepting through") && line.contains("worker(s)") {
            started = true;
            break;
        }
    }
    if started {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(
        started || !status.success(),
        "neither started nor failed: {log}"
    );
    (started, log)
}

#[test]
fn io_uring_by_name_fails_rather_than_falling_back() {
    // Raise the limit one descriptor at a time: the probe passes before the worker's own ring
    // has room, so some limit fails the worker's ring setup alone.
    let mut worker_ring_failed = None;
    for nofile in 6..=64 {
        let (started, log) = start_under_fd_limit(nofile, "uring");
        assert!(!log.contains("accepting through epoll"), "{nofile}: {log}");
        if started {
            assert!(log.contains("accepting through io_uring"), "{log}");
            break;
        }
        if log.contains("worker 0: io_uring setup failed") {
            worker_ring_failed = Some(nofile);
        }
    }
    let nofile = worker_ring_failed.expect("some limit failed only the worker's ring");
    // Chosen automatically, the same worker falls back and says so.
    let (started, log) = start_under_fd_limit(nofile, "auto");
    assert!(started, "{log}");
    assert!(
        log.contains("worker 0: io_uring setup failed")
            && log.contains("worker(s), accepting through epoll"),
        "{log}"
    );
}

#[test]
fn sigterm_cuts_off_requests_still_running_at_drain_timeout() {
    let up = upstream(Behavior::Slow(Duration::from_secs(8)));
    let dir = scratch("drain-timeout");
    let path = dir.join("fg.toml");
    std::fs::write(
        &path,
        format!(
            "[runtime]\nworkers = 1\ndrain_timeout = \"300ms\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\nresponse_timeout = \"20s\"\n",
            up.addr
        ),
    )
    .unwrap();
    let Running {
        mut child,
        addr,
        log,
    } = spawn(&["run", "-c", path.to_str().unwrap()]);
    let mut c = RawClient::connect(addr);
    c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(eventually(Duration::from_secs(3), || up.requests() == 1));
    let t = Instant::now();
    sigterm(&child);
    assert!(child.wait().unwrap().success(), "exit 0 after the drain");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cut off at drain_timeout, not the upstream's 8 s: {:?}",
        t.elapsed()
    );
    assert!(
        c.read_response().is_none(),
        "the request was cut off unanswered"
    );
    // The log is read on a thread of its own: wait for its last lines.
    let said = || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("drain timeout reached"))
    };
    assert!(
        eventually(Duration::from_secs(3), said),
        "{}",
        log.lock().unwrap().join("\n")
    );
}
