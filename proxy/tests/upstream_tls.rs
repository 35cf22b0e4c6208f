//! TLS to upstreams, through real sockets: verified against given roots with SNI, HTTP/2 by
//! ALPN, sessions resumed across connections, refused roots, and mutual TLS.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fluxgate_conf::IoMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;

fn certs(dir: &Path, name: &str) -> PathBuf {
    test_certs(&dir.join(name), &["localhost"])
}

/// A fluxgate terminating TLS with `c`'s certificate, answering "from tls upstream".
fn tls_origin(c: &Path) -> fluxgate::Handle {
    start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\nrespond = {{ status = 200, body = \"from tls upstream\" }}\n\
             [listener.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            c.join("cert.pem").display(),
            c.join("key.pem").display()
        ),
        IoMode::Epoll,
    )
}

fn gateway_to(origin: std::net::SocketAddr, tls: &str, extra: &str) -> fluxgate::Handle {
    start(
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"o\"\n\
             [[upstream]]\nname = \"o\"\nendpoints = [\"{origin}\"]\n{extra}\ntls = {{ {tls} }}\n"
        ),
        IoMode::Epoll,
    )
}

#[test]
fn verified_tls_upstream_h1_h2_and_resumption() {
    let dir = scratch("uptls-ok");
    let c = certs(&dir, "origin");
    let origin = tls_origin(&c);
    let oaddr = origin.local_addrs()[0];
    let ca = format!(
        "ca = \"{}\", sni = \"localhost\"",
        c.join("ca.pem").display()
    );
    // New connection each time (no idle pool): the second and later handshakes resume.
    let fg = gateway_to(oaddr, &ca, "max_idle_per_host = 0");
    for _ in 0..3 {
        let r = get(fg.local_addrs()[0], "/");
        assert_eq!((r.status, &r.body[..]), (200, &b"from tls upstream"[..]));
    }
    fg.shutdown();
    let fg = gateway_to(oaddr, &ca, "protocol = \"h2\"");
    assert_eq!(get(fg.local_addrs()[0], "/").body, b"from tls upstream");
    fg.shutdown();

    let m = String::from_utf8(get(origin.admin_addr().unwrap(), "/metrics").body).unwrap();
    assert!(
        m.contains("kind=\"full\",version=\"1.3\",alpn=\"http/1.1\""),
        "{m}"
    );
    assert!(
        m.contains("kind=\"resumed\",version=\"1.3\",alpn=\"http/1.1\""),
        "sessions resumed: {m}"
    );
    assert!(m.contains("alpn=\"h2\""), "h2 by ALPN: {m}");

    // Roots that did not sign the origin's certificate: refused, 502.
    let other = certs(&dir, "other");
    let wrong = format!(
        "ca = \"{}\", sni = \"localhost\"",
        other.join("ca.pem").display()
    );
    let fg = gateway_to(oaddr, &wrong, "");
    assert_eq!(get(fg.local_addrs()[0], "/").status, 502);
    fg.shutdown();
    origin.shutdown();
}

/// A TLS origin that requires a client certificate signed by `client_ca`.
fn mtls_origin(server: &Path, client_ca: &Path) -> std::net::SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(server.join("cert.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(server.join("key.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(client_ca.join("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    serve_in_background(move |s| {
        let acceptor = acceptor.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tls.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(b[0]);
            }
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmtls")
                .await;
            let _ = tls.flush().await;
        }
    })
}

#[test]
fn mutual_tls_presents_the_client_certificate() {
    let dir = scratch("uptls-mtls");
    let server = certs(&dir, "server");
    let client = certs(&dir, "client");
    let origin = mtls_origin(&server, &client);
    let roots = format!(
        "ca = \"{}\", sni = \"localhost\"",
        server.join("ca.pem").display()
    );
    let with_cert = format!(
        "{roots}, client_cert = \"{}\", client_key = \"{}\"",
        client.join("cert.pem").display(),
        client.join("key.pem").display()
    );
    let fg = gateway_to(origin, &with_cert, "");
    let r = get(fg.local_addrs()[0], "/");
    assert_eq!((r.status, &r.body[..]), (200, &b"mtls"[..]));
    fg.shutdown();
    let fg = gateway_to(origin, &roots, "");
    assert!(eventually(Duration::from_secs(2), || get(
        fg.local_addrs()[0],
        "/"
    )
    .status
        == 502));
    fg.shutdown();
}
