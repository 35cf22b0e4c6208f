//! TLS termination through real sockets with independent clients (curl, openssl s_client):
//! HTTP/1.1 and h2 by ALPN, SNI picking the certificate, session resumption, old versions
//! refused, and bad key files named in the error.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fluxgate_conf::{Config, IoMode};
use support::*;

fn certs(dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let out = test_certs(&dir.join(name), names);
    (out.join("cert.pem"), out.join("key.pem"))
}

fn tls_gateway(dir: &Path, extra_tls: &str) -> fluxgate::Handle {
    let (dc, dk) = certs(dir, "default", &["default.test"]);
    let (ac, ak) = certs(dir, "a", &["a.example.com"]);
    let (wc, wk) = certs(dir, "wild", &["*.b.example.com"]);
    start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200, body = \"secret\" }}\n\
             [listener.tls]\n{extra_tls}\ncertificates = [\
               {{ cert = \"{}\", key = \"{}\" }},\
               {{ cert = \"{}\", key = \"{}\", names = [\"a.example.com\"] }},\
               {{ cert = \"{}\", key = \"{}\", names = [\"*.b.example.com\"] }}]\n",
            dc.display(),
            dk.display(),
            ac.display(),
            ak.display(),
            wc.display(),
            wk.display()
        ),
        IoMode::Epoll,
    )
}

fn curl(addr: std::net::SocketAddr, flags: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "-w", " %{http_version}"])
        .args(flags)
        .arg(format!("https://{addr}/"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `openssl s_client` with `args`, sending one request; returns its stdout and stderr.
fn s_client(addr: std::net::SocketAddr, args: &[&str]) -> String {
    s_client_sending(
        addr,
        args,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

/// `s_client` writing `input` after the handshake (nothing: just wait for the answer). Its
/// stdin stays open until it exits: the requests say `Connection: close`, so the server's
/// close, after the answer and any session tickets, is what ends it. Still running after 10 s
/// fails the test.
fn s_client_sending(addr: std::net::SocketAddr, args: &[&str], input: &'static [u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        let late = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .is_err();
        if late {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        late
    });
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let _ = done.send(());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!watchdog.join().unwrap(), "s_client did not finish: {text}");
    text
}

fn subject_cn(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("subject=CN = ")
                .or_else(|| l.trim().strip_prefix("subject=CN="))
        })
        .map(str::to_owned)
}

#[test]
fn http1_and_h2_by_alpn_sni_and_versions() {
    let dir = scratch("tls-main");
    let fg = tls_gateway(&dir, "");
    let addr = fg.local_addrs()[0];
    assert_eq!(curl(addr, &["--http1.1"]), "secret 1.1");
    assert_eq!(curl(addr, &["--http2"]), "secret 2");
    assert_eq!(
        curl(addr, &["--tlsv1.2", "--tls-max", "1.2", "--http1.1"]),
        "secret 1.1"
    );

    let sni = |name: &str| subject_cn(&s_client(addr, &["-servername", name]));
    assert_eq!(sni("a.example.com").as_deref(), Some("a.example.com"));
    assert_eq!(sni("x.b.example.com").as_deref(), Some("*.b.example.com"));
    assert_eq!(
        sni("deep.x.b.example.com").as_deref(),
        Some("default.test"),
        "one label only"
    );
    assert_eq!(sni("unknown.test").as_deref(), Some("default.test"));

    let old = s_client(addr, &["-tls1_1"]);
    assert!(
        !old.contains("Protocol  : TLSv1.1") || old.contains("alert"),
        "{old}"
    );
    assert!(subject_cn(&old).is_none(), "TLS 1.1 handshake refused");
    fg.shutdown();
}

#[test]
fn tls13_only_refuses_tls12() {
    let dir = scratch("tls-13");
    let fg = tls_gateway(&dir, "min_version = \"1.3\"");
    let addr = fg.local_addrs()[0];
    assert_eq!(curl(addr, &["--http1.1"]), "secret 1.1");
    assert_eq!(
        curl(addr, &["--tlsv1.2", "--tls-max", "1.2"]),
        " 0",
        "no TLS 1.2 handshake"
    );
    fg.shutdown();
}

#[test]
fn sessions_resume_with_tickets_and_with_the_cache() {
    for settings in [
        "session_tickets = true",
        "session_tickets = false\nsession_cache = 64",
    ] {
        let dir = scratch(if settings.contains("true") {
            "tls-tickets"
        } else {
            "tls-cache"
        });
        let fg = tls_gateway(&dir, settings);
        let addr = fg.local_addrs()[0];
        let sess = dir.join("sess.pem");
        let sess = sess.to_str().unwrap();
        let first = s_client(addr, &["-sess_out", sess]);
        assert!(first.contains("New, TLSv1.3"), "{first}");
        let second = s_client(addr, &["-sess_in", sess]);
        assert!(second.contains("Reused, TLSv1.3"), "{settings}: {second}");
        let m = String::from_utf8(get(fg.admin_addr().unwrap(), "/metrics").body).unwrap();
        assert!(m.contains("kind=\"resumed\",version=\"1.3\""), "{m}");
        fg.shutdown();
    }
}

#[test]
fn bad_key_files_are_named() {
    let dir = scratch("tls-bad");
    let (cert, _) = certs(&dir, "one", &["one.test"]);
    let (_, other_key) = certs(&dir, "two", &["two.test"]);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    for (key, expect) in [
        (dir.join("missing.pem"), "missing.pem"),
        (garbage.clone(), "garbage.pem"),
        (other_key.clone(), "does not belong"),
    ] {
        let path = dir.join("cfg.toml");
        std::fs::write(
            &path,
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200 }}\n\
                 [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fluxgate"))
            .args(["check", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect) && err.contains("listener[0].tls"),
            "{err}"
        );
    }
}

#[test]
fn instances_sharing_ticket_keys_resume_each_others_sessions() {
    let dir = scratch("tls-shared");
    let (cert, key) = certs(&dir, "c", &["localhost"]);
    let keys = dir.join("ticket.keys");
    std::fs::write(&keys, format!("# newest first\n{}\n", "ab".repeat(32))).unwrap();
    let instance = || {
        start(
            &format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200 }}\n\
                 [listener.tls]\nsession_cache = 0\nticket_keys = \"{}\"\n\
                 certificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
                keys.display(),
                cert.display(),
                key.display()
            ),
            IoMode::Epoll,
        )
    };
    let (a, b) = (instance(), instance());
    let sess = dir.join("sess.pem");
    let sess = sess.to_str().unwrap();
    assert!(s_client(a.local_addrs()[0], &["-sess_out", sess]).contains("New, TLSv1.3"));
    let on_b = s_client(b.local_addrs()[0], &["-sess_in", sess]);
    assert!(on_b.contains("Reused, TLSv1.3"), "{on_b}");
    a.shutdown();
    b.shutdown();
    // A bad key file is a config error naming the file and line.
    std::fs::write(&keys, "not hex\n").unwrap();
    let cfg = Config::from_toml(&format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200 }}\n\
         [listener.tls]\nticket_keys = \"{}\"\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        keys.display(),
        cert.display(),
        key.display()
    ))
    .unwrap();
    let err = fluxgate::tls::validate(&cfg).unwrap_err();
    assert!(err.contains("ticket.keys line 1"), "{err}");
}

#[test]
fn zero_rtt_requests_are_answered_after_the_handshake() {
    let dir = scratch("tls-0rtt");
    let fg = tls_gateway(&dir, "session_cache = 64\nearly_data = \"16KiB\"");
    let addr = fg.local_addrs()[0];
    let sess = dir.join("sess.pem");
    let sess = sess.to_str().unwrap();
    let first = s_client(addr, &["-sess_out", sess]);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let req = dir.join("early.txt");
    std::fs::write(
        &req,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let second = s_client_sending(
        addr,
        &["-sess_in", sess, "-early_data", req.to_str().unwrap()],
        b"",
    );
    assert!(second.contains("Early data was accepted"), "{second}");
    assert!(
        second.contains("HTTP/1.1 200") && second.contains("secret"),
        "answered: {second}"
    );
    // A POST in early data is not acted on early either: it waits for the handshake.
    let first = s_client(addr, &["-sess_out", sess]);
    assert!(first.contains("TLSv1.3"), "{first}");
    std::fs::write(
        &req,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .unwrap();
    let early = ["-sess_in", sess, "-early_data", req.to_str().unwrap()];
    let post = s_client_sending(addr, &early, b"");
    assert!(
        post.contains("Early data was accepted") && post.contains("HTTP/1.1 200"),
        "{post}"
    );
    // Offered to an instance that cannot resume the session: rejected, full handshake.
    let other = tls_gateway(
        &scratch("tls-0rtt-other"),
        "session_cache = 64\nearly_data = \"16KiB\"",
    );
    // The rejected early request is lost: it is sent again after the handshake.
    let refused = s_client_sending(
        other.local_addrs()[0],
        &early,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(refused.contains("Early data was rejected"), "{refused}");
    let metric = |h: &fluxgate::Handle, result: &str| {
        let m = String::from_utf8(get(h.admin_addr().unwrap(), "/metrics").body).unwrap();
        let series = format!(
            "fluxgate_tls_early_data_total{{listener=\"{}\",result=\"{result}\"}} ",
            h.local_addrs()[0]
        );
        m.lines()
            .find_map(|x| x.strip_prefix(&series).map(str::to_owned))
    };
    assert_eq!(metric(&fg, "accepted").as_deref(), Some("2"));
    assert_eq!(metric(&other, "rejected").as_deref(), Some("1"));
    other.shutdown();
    fg.shutdown();

    // 0-RTT needs stateful resumption: with tickets it is refused at config load.
    let bad = Config::from_toml(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 200 }\n\
         [listener.tls]\nearly_data = 1024\nsession_tickets = true\ncertificates = [{ cert = \"c\", key = \"k\" }]\n",
    );
    let err = bad.unwrap_err().to_string();
    assert!(err.contains("listener[0].tls.early_data"), "{err}");
}

/// Reads from `sock` into `conn` until `done(conn)` or the server closes; returns the plaintext
/// read on the way.
fn pump_until(
    conn: &mut rustls::ClientConnection,
    sock: &mut std::net::TcpStream,
    done: impl Fn(&rustls::ClientConnection, &[u8]) -> bool,
) -> Vec<u8> {
    use std::io::Read;
    let mut plain = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !done(conn, &plain) {
        let n = sock.read(&mut buf).expect("the server answers in time");
        if n == 0 {
            break;
        }
        conn.read_tls(&mut &buf[..n]).unwrap();
        conn.process_new_packets()
            .expect("valid TLS from the server");
        let _ = conn.reader().read_to_end(&mut plain);
    }
    plain
}

/// Everything the client has queued for the wire, as bytes (not yet sent).
fn queued_flight(conn: &mut rustls::ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn answered(plain: &[u8]) -> bool {
    plain.windows(4).any(|w| w == b"\r\n\r\n")
}

#[test]
fn zero_rtt_is_forwarded_only_after_the_handshake_and_never_replayed() {
    use rustls::pki_types::pem::PemObject;
    use std::io::Write;
    let dir = scratch("tls-0rtt-fwd");
    let out = test_certs(&dir.join("c"), &["localhost"]);
    let up = upstream(Behavior::Echo);
    let fg = start(
        &format!(
            "[http]\nheader_read_timeout = \"1s\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\n\
             [listener.tls]\nsession_cache = 64\nearly_data = \"16KiB\"\n\
             certificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n",
            out.join("cert.pem").display(),
            out.join("key.pem").display(),
            up.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(out.join("ca.pem")).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.enable_early_data = true;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // A full handshake and one request; the answer brings the session to resume.
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name.clone()).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(READ_LIMIT)).unwrap();
    conn.writer()
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    sock.write_all(&queued_flight(&mut conn)).unwrap();
    while conn.is_handshaking() || conn.wants_write() {
        let flight = queued_flight(&mut conn);
        sock.write_all(&flight).unwrap();
        if conn.is_handshaking() {
            pump_until(&mut conn, &mut sock, |c, _| !c.is_handshaking());
        }
    }
    let first = pump_until(&mut conn, &mut sock, |_, p| answered(p));
    assert!(
        first.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    drop(sock);

    // Resumed with the request as early data. The client's second flight (EndOfEarlyData and
    // Finished) is held back, as a relay could hold it.
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(READ_LIMIT)).unwrap();
    conn.early_data()
        .expect("the resumed session allows 0-RTT")
        .write_all(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let first_flight = queued_flight(&mut conn);
    sock.write_all(&first_flight).unwrap();
    pump_until(&mut conn, &mut sock, |c, _| !c.is_handshaking());
    assert!(
        conn.is_early_data_accepted(),
        "the server took the early data"
    );
    // Long enough for a gateway that forwards early data to have done so.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        up.requests(),
        1,
        "nothing was forwarded before the handshake completed"
    );
    let second_flight = queued_flight(&mut conn);
    let released = std::time::Instant::now();
    sock.write_all(&second_flight).unwrap();
    let early = pump_until(&mut conn, &mut sock, |_, p| answered(p));
    let early = String::from_utf8_lossy(&early);
    assert!(early.starts_with("HTTP/1.1 200"), "{early}");
    assert!(
        early.to_ascii_lowercase().contains("x-up-path: /early"),
        "{early}"
    );
    let arrived = *up.arrivals().last().unwrap();
    assert!(
        arrived > released,
        "forwarded after the client's Finished was released"
    );
    drop(sock);

    // The same two flights replayed on a new connection: the session was single-use, so the
    // server falls back to a full handshake (skipping the early records it cannot read) that
    // the replayer cannot finish, and closes it at header_read_timeout.
    let mut replay = std::net::TcpStream::connect(addr).unwrap();
    replay.set_read_timeout(Some(READ_LIMIT)).unwrap();
    replay.write_all(&first_flight).unwrap();
    let _ = replay.write_all(&second_flight);
    let mut sink = Vec::new();
    match std::io::Read::read_to_end(&mut replay, &mut sink) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "closed: {e}"),
    }
    assert_eq!(up.requests(), 2, "the replayed request was not forwarded");
    fg.shutdown();
}
