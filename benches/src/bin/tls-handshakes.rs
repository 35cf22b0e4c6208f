//! TLS 1.3 handshake load for `scripts/bench-tls.sh`: opens connections back to back (with
//! `CONCURRENCY` in parallel), each doing a full or a resumed handshake and one small request
//! read to the end (so the session ticket arrives), for `SECONDS`. Prints handshakes per
//! second and how many were actually resumed.
//!
//! Usage: tls-handshakes ADDR CA_PEM full|resumed SECONDS [CONCURRENCY]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: tls-handshakes ADDR CA_PEM full|resumed SECONDS [CONCURRENCY]");
        std::process::exit(2);
    }
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR is IP:PORT");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&args[2]).expect("CA_PEM readable") {
        roots
            .add(c.expect("a PEM certificate"))
            .expect("a usable root");
    }
    let resumed = match args[3].as_str() {
        "full" => false,
        "resumed" => true,
        other => panic!("mode {other:?}: full or resumed"),
    };
    let secs: u64 = args[4].parse().expect("SECONDS");
    let concurrency: usize = args.get(5).map_or(8, |c| c.parse().expect("CONCURRENCY"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = if resumed {
        rustls::client::Resumption::in_memory_sessions(1024)
    } else {
        rustls::client::Resumption::disabled()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let done = Arc::new(AtomicU64::new(0));
    let reused = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (connector, done, reused, failed) = (
                connector.clone(),
                done.clone(),
                reused.clone(),
                failed.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let name = ServerName::try_from("localhost").expect("a name");
                let mut sink = Vec::with_capacity(1024);
                while Instant::now() < until {
                    let one = async {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        tcp.set_nodelay(true)?;
                        let mut tls = connector.connect(name.clone(), tcp).await?;
                        tls.write_all(
                            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                        )
                        .await?;
                        sink.clear();
                        tls.read_to_end(&mut sink).await?;
                        if !sink.starts_with(b"HTTP/1.1 200") {
                            return Err(std::io::Error::other("the answer was not a 200"));
                        }
                        Ok::<_, std::io::Error>(tls.get_ref().1.handshake_kind())
                    };
                    match one.await {
                        Ok(kind) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            if kind == Some(rustls::HandshakeKind::Resumed) {
                                reused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first failure: {e}");
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "handshakes {n} in {elapsed:.1}s: {:.0}/s, resumed {}, failed {}",
        n as f64 / elapsed,
        reused.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
}
