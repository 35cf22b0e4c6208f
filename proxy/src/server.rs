//! Starting and stopping fluxgate: the first generation, the worker threads, the admin
//! listener, and the `Handle` that reloads, drains and stops them (reloads: `control`).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fluxgate_conf::{Config, IoMode};
use tokio::sync::{mpsc, watch};

use crate::control::admin::AdminState;
use crate::control::reload::{
    bind_all, route_tables, Apply, Generation, ListenerSockets, Phase, Reloader,
};
use crate::listen::accept::Acceptor;
use crate::telemetry::metrics::Metrics;
use fluxgate_policy::balance::Health;
use fluxgate_policy::breaker::Breaker;

/// Starts fluxgate from a config.
pub struct Server;

/// A running fluxgate: its bound addresses and the ways to reload and stop it.
pub struct Handle {
    io: IoMode,
    reloader: Arc<Reloader>,
    admin: Option<Admin>,
    phase: watch::Sender<Phase>,
    workers: Vec<JoinHandle<()>>,
    /// Each worker sends once when it has exited its loop.
    exited: std::sync::mpsc::Receiver<()>,
}

/// The admin listener's thread and controls.
struct Admin {
    addr: SocketAddr,
    state: Arc<AdminState>,
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl Handle {
    /// The bound address of each `[[listener]]` of the running config, in config order
    /// (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.reloader.current().addrs.clone()
    }

    /// The admin listener's bound address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// The acceptor in use: `Uring` or `Epoll` (never `Auto`); `Epoll` when any worker fell
    /// back to it.
    pub fn io_mode(&self) -> IoMode {
        self.io
    }

    /// Swaps in a validated config (see `Reloader::apply`).
    pub fn reload(&self, config: Config) -> io::Result<()> {
        self.reloader.apply(config)
    }

    /// Re-reads the config file fluxgate was started from and applies it; an invalid one
    /// is refused with the reason, and the running config stays.
    pub fn reload_source(&self) -> Result<(), String> {
        self.reloader.reload_source()
    }

    fn stop_admin(&mut self) {
        if let Some(a) = self.admin.take() {
            let _ = a.stop.send(true);
            let _ = a.thread.join();
        }
    }

    /// Stops every worker at once and waits for them to exit.
    pub fn shutdown(mut self) {
        self.stop_admin();
        let _ = self.phase.send(Phase::Stopped);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.flush_traces();
    }

    /// Exports the spans still queued.
    fn flush_traces(&self) {
        if let Some(t) = &self.reloader.current().tracer {
            t.shutdown();
        }
    }

    /// Graceful stop: listeners close (new connections are refused), idle connections close,
    /// requests in flight finish (HTTP/1.1 answers carry `Connection: close`, HTTP/2 gets
    /// GOAWAY), then the workers exit. Whatever is still running after `grace` is cut off.
    /// Returns whether everything finished within `grace`.
    pub fn drain(mut self, grace: Duration) -> bool {
        if let Some(a) = &self.admin {
            a.state.draining.store(true, Ordering::Relaxed);
        }
        let _ = self.phase.send(Phase::Draining);
        let deadline = Instant::now() + grace;
        let mut finished = 0;
        while finished < self.workers.len() {
            match self
                .exited
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(()) => finished += 1,
                Err(_) => break,
            }
        }
        let clean = finished == self.workers.len();
        self.stop_admin();
        let _ = self.phase.send(Phase::Stopped);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.flush_traces();
        clean
    }
}

impl Server {
    /// Starts from a config with no file behind it (`reload_source` is then refused).
    pub fn start(config: Config) -> io::Result<Handle> {
        Server::start_from(config, None)
    }

    /// Binds every listener (failing here, before any thread starts, if one cannot be bound),
    /// picks the acceptor and starts the workers. `source` is the file reloads re-read.
    pub fn start_from(config: Config, source: Option<PathBuf>) -> io::Result<Handle> {
        let io = resolve_io(config.runtime.io)?;
        let tls = crate::io::tls::listener_configs(&config).map_err(io::Error::other)?;
        let upstream_tls = crate::io::tls::upstream_configs(&config).map_err(io::Error::other)?;
        let workers = config.runtime.workers.max(1);
        let metrics = Metrics::new(&config, workers, None);
        let quic = crate::io::tls::quic_configs(&config, &metrics.resumed_counters())
            .map_err(io::Error::other)?;
        // Worker 0's sockets first: that resolves port 0 for the others.
        let mut addrs = Vec::with_capacity(config.listeners.len());
        let mut sockets: Vec<Vec<Option<ListenerSockets>>> =
            (0..workers).map(|_| Vec::new()).collect();
        for l in &config.listeners {
            let (bound, per_worker) = bind_all(l, workers)?;
            addrs.push(bound);
            for (s, sock) in sockets.iter_mut().zip(per_worker) {
                s.push(Some(sock));
            }
        }
        let feeds = crate::control::reload::feed_hubs(&config, &[]);
        let desks = crate::app::orders::desk::desks(&config, &[], &feeds)?;
        let tracer = match &config.tracing {
            Some(t) => Some(crate::telemetry::trace::Tracer::start(t).map_err(io::Error::other)?),
            None => None,
        };
        let generation = Arc::new(Generation {
            tracer,
            desks,
            tables: route_tables(&config),
            limiters: crate::control::reload::route_limiters(&config, None),
            canaries: crate::control::reload::route_canaries(&config, None),
            health: config
                .upstreams
                .iter()
                .map(|u| Arc::new(Health::new(u.endpoints.len(), u.passive.clone())))
                .collect(),
            breakers: config
                .upstreams
                .iter()
                .map(|u| {
                    u.breaker
                        .as_ref()
                        .map(|b| Arc::new(Breaker::new(&u.name, b)))
                })
                .collect(),
            feeds,
            metrics,
            config: Arc::new(config),
            addrs,
            tls,
            quic,
            upstream_tls,
        });
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let (exited_tx, exited) = std::sync::mpsc::channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut senders = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for (id, sockets) in sockets.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let first = Apply {
                generation: Arc::clone(&generation),
                previous: vec![None; sockets.len()],
                sockets,
                applied: Some(started_tx.clone()),
            };
            let phase_rx = phase_rx.clone();
            let exited_tx = exited_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("fluxgate-w{id}"))
                .spawn(move || {
                    if let Err(e) = crate::worker::run(id, io, first, rx, phase_rx) {
                        tracing::error!(worker = id, error = %e, "worker failed");
                    }
                    let _ = exited_tx.send(());
                })?;
            threads.push(t);
        }
        // Every worker serves its listeners, or none does: a worker that could not start an
        // acceptor stops them all.
        drop(started_tx);
        let mut failed = None;
        let mut running = io.mode();
        for _ in 0..workers {
            match started.recv() {
                Ok(Ok(IoMode::Epoll)) => running = IoMode::Epoll,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(io::Error::other("a worker exited during start"));
                }
            }
        }
        if let Some(e) = failed {
            let _ = phase.send(Phase::Stopped);
            for t in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        let reloader = Arc::new(Reloader {
            current: Mutex::new(Arc::clone(&generation)),
            workers: senders,
            source,
        });
        let admin = match generation.config.admin {
            None => None,
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| io::Error::new(e.kind(), format!("bind admin {addr}: {e}")))?;
                listener.set_nonblocking(true)?;
                let addr = listener.local_addr()?;
                let state = Arc::new(AdminState {
                    reloader: Arc::clone(&reloader),
                    draining: AtomicBool::new(false),
                    started: std::time::Instant::now(),
                });
                let (stop, stop_rx) = watch::channel(false);
                let thread = crate::control::admin::spawn(listener, Arc::clone(&state), stop_rx)?;
                Some(Admin {
                    addr,
                    state,
                    stop,
                    thread,
                })
            }
        };
        Ok(Handle {
            io: running,
            reloader,
            admin,
            phase,
            workers: threads,
            exited,
        })
    }
}

/// The acceptor for `--io`: auto falls back to epoll (and says so) where io_uring cannot run;
/// uring by name fails instead, here or when a worker's ring cannot be set up.
fn resolve_io(mode: IoMode) -> io::Result<Acceptor> {
    match mode {
        IoMode::Epoll => Ok(Acceptor::Epoll),
        IoMode::Uring => fluxgate_sys::probe_uring()
            .map(|()| Acceptor::Uring { strict: true })
            .map_err(|e| {
                io::Error::new(e.kind(), format!("--io uring: io_uring unavailable: {e}"))
            }),
        IoMode::Auto => match fluxgate_sys::probe_uring() {
            Ok(()) => Ok(Acceptor::Uring { strict: false }),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; accepting through epoll");
                Ok(Acceptor::Epoll)
            }
        },
    }
}
