//! HTTP/3 load for `scripts/bench-h3.sh`: `CONNECTIONS` QUIC connections, each with
//! `STREAMS` requests in flight (GET of `PATH`), for `SECONDS`; the server's certificate is
//! verified against `CA_PEM` with the name `localhost`. Prints one line:
//! `ok N failed M seconds S`, N counting 2xx answers read to their end.
//!
//! Usage: h3load ADDR CA_PEM PATH SECONDS [CONNECTIONS] [STREAMS]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: h3load ADDR CA_PEM PATH SECONDS [CONNECTIONS] [STREAMS]");
        std::process::exit(2);
    }
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR is IP:PORT");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&args[2]).expect("CA_PEM readable") {
        roots
            .add(c.expect("a PEM certificate"))
            .expect("a usable root");
    }
    let path = args[3].clone();
    let seconds: f64 = args[4].parse().expect("SECONDS");
    let conns: usize = args.get(5).map_or(10, |s| s.parse().expect("CONNECTIONS"));
    let streams: usize = args.get(6).map_or(5, |s| s.parse().expect("STREAMS"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let config = quinn::ClientConfig::new(Arc::new(quic));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("UDP");
        endpoint.set_default_client_config(config);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let conn = match endpoint.connect(addr, "localhost").expect("connect").await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("h3load: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn))
                .await
                .expect("HTTP/3 set up");
            tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            });
            for _ in 0..streams {
                let mut sender = sender.clone();
                let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                let uri: http::Uri = format!("https://localhost:{}{path}", addr.port())
                    .parse()
                    .expect("a URI");
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        let req = http::Request::get(uri.clone()).body(()).expect("a request");
                        let done = async {
                            let mut s = sender.send_request(req).await.ok()?;
                            s.finish().await.ok()?;
                            let resp = s.recv_response().await.ok()?;
                            while s.recv_data().await.ok()?.is_some() {}
                            Some(resp.status().is_success())
                        };
                        match done.await {
                            Some(true) => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    println!(
        "ok {} failed {} seconds {:.3}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}
