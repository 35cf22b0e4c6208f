//! The `fluxgate` command: `run` and `check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use fluxgate::Server;
use fluxgate_conf::{
    Config, Endpoint, IoMode, RouteAction, Tls, TlsCertificate, TlsVersion, Upstream,
    UpstreamProtocol,
};

/// mimalloc returns freed pages to the kernel promptly (parked idle connections free their
/// buffers; glibc would keep them resident) and is faster on this allocation pattern.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage:
  fluxgate run                      serve the embedded default (127.0.0.1:8080 -> built-in hello on :8081)
  fluxgate run -c FILE              serve a TOML config
  fluxgate run --listen ADDR --upstream ADDR [--upstream ADDR ...] [--h2c-upstream]
               [--tls-cert FILE --tls-key FILE]
               [--workers N] [--io auto|uring|epoll]
                                    quick mode: proxy ADDR to the upstreams, no config file
  fluxgate check -c FILE            validate a config; non-zero exit names the key and line
options for run with -c or the default: --workers N and --io MODE override the config";

#[derive(Default)]
struct Args {
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    upstreams: Vec<SocketAddr>,
    h2c_upstream: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    workers: Option<usize>,
    io: Option<IoMode>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match flag.as_str() {
            "-c" | "--config" => a.config = Some(value("-c")?.into()),
            "--listen" => {
                a.listen = Some(
                    value("--listen")?
                        .parse()
                        .context("--listen wants IP:PORT")?,
                )
            }
            "--upstream" => a.upstreams.push(
                value("--upstream")?
                    .parse()
                    .context("--upstream wants IP:PORT")?,
            ),
            "--h2c-upstream" => a.h2c_upstream = true,
            "--tls-cert" => a.tls_cert = Some(value("--tls-cert")?.into()),
            "--tls-key" => a.tls_key = Some(value("--tls-key")?.into()),
            "--workers" => {
                a.workers = Some(
                    value("--workers")?
                        .parse()
                        .context("--workers wants a number")?,
                )
            }
            "--io" => a.io = Some(value("--io")?.parse().map_err(anyhow::Error::msg)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// The config quick mode builds: one listener, one upstream, every other setting at its default.
fn quick_config(listen: SocketAddr, upstreams: Vec<SocketAddr>, h2c: bool) -> Result<Config> {
    let mut c = Config::from_toml(&format!(
        "[[listener]]\naddress = \"{listen}\"\nupstream = \"quick\"\n\
         [[upstream]]\nname = \"quick\"\nendpoints = [\"{}\"]\n",
        upstreams[0]
    ))?;
    let u: &mut Upstream = &mut c.upstreams[0];
    u.endpoints = upstreams
        .into_iter()
        .map(|addr| Endpoint { addr, weight: 1 })
        .collect();
    if h2c {
        u.protocol = UpstreamProtocol::H2c;
    }
    debug_assert!(matches!(
        c.listeners[0].routes[0].action,
        RouteAction::Forward(0)
    ));
    Ok(c)
}

fn run(args: Args) -> Result<()> {
    let source = args.config.clone();
    let mut config = match (&args.config, args.listen) {
        (Some(_), Some(_)) => bail!("use either -c FILE or --listen/--upstream, not both"),
        (Some(path), None) => Config::from_file(path)?,
        (None, Some(listen)) => {
            if args.upstreams.is_empty() {
                bail!("quick mode needs at least one --upstream ADDR");
            }
            let mut c = quick_config(listen, args.upstreams, args.h2c_upstream)?;
            c.listeners[0].tls = match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => Some(Tls {
                    certificates: vec![TlsCertificate {
                        cert,
                        key,
                        names: Vec::new(),
                    }],
                    min_version: TlsVersion::Tls12,
                    session_tickets: true,
                    ticket_keys: None,
                    session_cache: 1024,
                    early_data: 0,
                    client_auth: None,
                }),
                (None, None) => None,
                _ => bail!("--tls-cert and --tls-key go together"),
            };
            c
        }
        (None, None) => {
            if !args.upstreams.is_empty() {
                bail!("--upstream needs --listen ADDR");
            }
            Config::embedded_default()
        }
    };
    if let Some(w) = args.workers {
        config.runtime.workers = if w == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            w
        };
    }
    if let Some(io) = args.io {
        config.runtime.io = io;
    }
    fluxgate::logging::init(&config.log);
    if source.is_none() && args.listen.is_none() {
        tracing::info!(target: "fluxgate::run", "no config given, serving the embedded default");
    }
    let workers = config.runtime.workers;
    let grace = config.runtime.drain_timeout;
    // Handlers first: a SIGTERM that lands during start-up must drain, not kill.
    let mut signals = Signals::install()?;
    fluxgate_sys::ignore_file_size_signal();
    if let Err(e) = fluxgate_sys::raise_nofile_limit() {
        tracing::warn!(target: "fluxgate::run", error = %e, "cannot raise the open-file limit");
    }
    let kinds: Vec<&str> = config
        .listeners
        .iter()
        .map(|l| {
            match (
                l.tls.is_some(),
                l.tcp.is_some(),
                l.feed.is_some(),
                l.orders.is_some(),
            ) {
                (_, _, true, _) => "feed sessions",
                (_, _, _, true) => "order sessions",
                (_, true, _, _) => "TCP",
                (true, ..) => "TLS: h2 and HTTP/1.1 by ALPN",
                _ => "HTTP/1.1 and h2c",
            }
        })
        .collect();
    let handle = Server::start_from(config, source)?;
    for (a, proto) in handle.local_addrs().iter().zip(&kinds) {
        tracing::info!(target: "fluxgate::run", "listening on {a} ({proto})");
    }
    tracing::info!(target: "fluxgate::run",
        "{workers} worker(s), accepting through {}",
        match handle.io_mode() {
            IoMode::Uring => "io_uring (multishot accept, deferred task work)",
            _ => "epoll",
        }
    );
    // SIGHUP reloads (the outcome is logged by the reloader); SIGTERM and SIGINT drain.
    while signals.next() == Event::Reload {
        let _ = handle.reload_source();
    }
    tracing::info!(target: "fluxgate::run", grace = ?grace, "draining");
    if handle.drain(grace) {
        tracing::info!(target: "fluxgate::run", "drained, exiting");
    } else {
        tracing::warn!(target: "fluxgate::run", "drain timeout reached, exiting with requests cut off");
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Reload,
    Stop,
}

/// SIGTERM, SIGINT and SIGHUP, caught on the main thread.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let entered = rt.enter();
        let term = signal(SignalKind::terminate())?;
        let int = signal(SignalKind::interrupt())?;
        let hup = signal(SignalKind::hangup())?;
        drop(entered);
        Ok(Signals { rt, term, int, hup })
    }

    fn next(&mut self) -> Event {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.term.recv() => Event::Stop,
                _ = self.int.recv() => Event::Stop,
                _ = self.hup.recv() => Event::Reload,
            }
        })
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next();
    let result = match cmd.as_deref() {
        Some("run") => parse_args(argv).and_then(run),
        Some("check") => parse_args(argv).and_then(|a| {
            let path = a.config.context("check needs -c FILE")?;
            let config = Config::from_file(&path)?;
            fluxgate::tls::validate(&config).map_err(anyhow::Error::msg)?;
            println!("{}: ok", path.display());
            Ok(())
        }),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("--version" | "-V") => {
            println!("fluxgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluxgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
