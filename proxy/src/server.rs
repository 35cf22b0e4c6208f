//! Starting, reloading and stopping fluxgate. A config becomes a `Generation` (bound
//! addresses, route tables, shared health, metrics), which every worker applies; a reload
//! builds the next generation from the previous one, keeping what did not change.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fluxgate_conf::{Config, IoMode};
use tokio::sync::{mpsc, watch};

use crate::accept::Acceptor;
use crate::admin::AdminState;
use crate::balance::Health;
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::worker::Apply;

/// Spawns futures on the current thread's `LocalSet`: hyper's HTTP/2 tasks and upstream
/// connection drivers hold `Rc`s and never leave their worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Where the workers are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Not accepting; finishing what is in flight.
    Draining,
    /// Stop now, whatever is in flight.
    Stopped,
}

/// Everything derived from one config that the workers share read-only.
pub(crate) struct Generation {
    pub(crate) config: Arc<Config>,
    /// Bound address of each listener, in config order.
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) tables: Vec<Arc<RouteTable>>,
    pub(crate) health: Vec<Arc<Health>>,
    pub(crate) metrics: Arc<Metrics>,
    /// TLS settings per listener (certificates read when the generation was built).
    pub(crate) tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// TLS client settings per upstream.
    pub(crate) upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
}

/// Applies new configs to running workers; shared by the `Handle` and the admin listener.
pub(crate) struct Reloader {
    current: Mutex<Arc<Generation>>,
    workers: Vec<mpsc::UnboundedSender<Apply>>,
    /// The file `reload_source` reads, when there is one.
    source: Option<PathBuf>,
}

impl Reloader {
    pub(crate) fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.lock().expect("reloader lock"))
    }

    /// Re-reads the config file and applies it. An invalid config (or one that cannot be
    /// bound) is refused, counted and logged; the running one carries on.
    pub(crate) fn reload_source(&self) -> Result<(), String> {
        let Some(path) = &self.source else {
            return Err("fluxgate was started without a config file".into());
        };
        let result = Config::from_file(path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c).map_err(|e| e.to_string()));
        match &result {
            Ok(()) => eprintln!("fluxgate: reloaded {}", path.display()),
            Err(e) => {
                self.current()
                    .metrics
                    .reloads_failed
                    .fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "fluxgate: reload of {} refused, still serving the old config: {e}",
                    path.display()
                );
            }
        }
        result
    }

    /// Swaps in `config`: listeners with an address the old config had keep their sockets,
    /// upstreams with unchanged settings keep their pools and health; the rest start fresh.
    pub(crate) fn apply(&self, config: Config) -> io::Result<()> {
        let mut current = self.current.lock().expect("reloader lock");
        let old = Arc::clone(&current);
        let workers = self.workers.len();
        if config.runtime.workers != old.config.runtime.workers
            || config.runtime.io != old.config.runtime.io
        {
            eprintln!("fluxgate: runtime.workers and runtime.io take effect on restart only");
        }
        // A listener continues the first old one with its configured address not yet taken.
        let mut taken = vec![false; old.config.listeners.len()];
        let keep_listener: Vec<Option<usize>> = config
            .listeners
            .iter()
            .map(|l| {
                let j = (0..taken.len())
                    .find(|&j| !taken[j] && old.config.listeners[j].address == l.address)?;
                taken[j] = true;
                Some(j)
            })
            .collect();
        let keep_upstream: Vec<Option<usize>> = config
            .upstreams
            .iter()
            .map(|u| old.config.upstreams.iter().position(|o| o == u))
            .collect();
        // Read certificates and bind every new listener before touching anything, so a
        // failure changes nothing.
        let tls = crate::tls::listener_configs(&config).map_err(io::Error::other)?;
        let upstream_tls = crate::tls::upstream_configs(&config).map_err(io::Error::other)?;
        let mut addrs = Vec::with_capacity(config.listeners.len());
        let mut sockets: Vec<Vec<Option<std::net::TcpListener>>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (l, keep) in config.listeners.iter().zip(&keep_listener) {
            match keep {
                Some(j) => {
                    addrs.push(old.addrs[*j]);
                    sockets.iter_mut().for_each(|s| s.push(None));
                }
                None => {
                    let (bound, per_worker) = bind_all(l, workers)?;
                    for (s, sock) in sockets.iter_mut().zip(per_worker) {
                        s.push(Some(sock));
                    }
                    addrs.push(bound);
                }
            }
        }
        let health = config
            .upstreams
            .iter()
            .zip(&keep_upstream)
            .map(|(u, keep)| match keep {
                Some(j) => Arc::clone(&old.health[*j]),
                None => Arc::new(Health::new(u.endpoints.len(), u.passive.clone())),
            })
            .collect();
        let metrics = Metrics::new(
            &config,
            workers,
            Some((&old.metrics, &keep_listener, &keep_upstream)),
        );
        let generation = Arc::new(Generation {
            tables: route_tables(&config),
            config: Arc::new(config),
            addrs,
            health,
            metrics,
            tls,
            upstream_tls,
        });
        let (applied, acks) = std::sync::mpsc::channel::<io::Result<IoMode>>();
        for (tx, sockets) in self.workers.iter().zip(sockets) {
            let _ = tx.send(Apply {
                generation: Arc::clone(&generation),
                sockets,
                previous: keep_listener.clone(),
                applied: Some(applied.clone()),
            });
        }
        // Return once every worker serves the new config (a stopped worker never answers).
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..workers {
            if acks
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                break;
            }
        }
        generation
            .metrics
            .reloads_ok
            .fetch_add(1, Ordering::Relaxed);
        *current = generation;
        Ok(())
    }
}

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
        let tls = crate::tls::listener_configs(&config).map_err(io::Error::other)?;
        let upstream_tls = crate::tls::upstream_configs(&config).map_err(io::Error::other)?;
        let workers = config.runtime.workers.max(1);
        // Worker 0's sockets first: that resolves port 0 for the others.
        let mut addrs = Vec::with_capacity(config.listeners.len());
        let mut sockets: Vec<Vec<Option<std::net::TcpListener>>> =
            (0..workers).map(|_| Vec::new()).collect();
        for l in &config.listeners {
            let (bound, per_worker) = bind_all(l, workers)?;
            addrs.push(bound);
            for (s, sock) in sockets.iter_mut().zip(per_worker) {
                s.push(Some(sock));
            }
        }
        let generation = Arc::new(Generation {
            tables: route_tables(&config),
            health: config
                .upstreams
                .iter()
                .map(|u| Arc::new(Health::new(u.endpoints.len(), u.passive.clone())))
                .collect(),
            metrics: Metrics::new(&config, workers, None),
            config: Arc::new(config),
            addrs,
            tls,
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
                        eprintln!("fluxgate: worker {id} failed: {e}");
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
                });
                let (stop, stop_rx) = watch::channel(false);
                let thread = crate::admin::spawn(listener, Arc::clone(&state), stop_rx)?;
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

/// One socket per worker for a listener. The first bind resolves port 0; the others join
/// its SO_REUSEPORT group on the resolved port.
fn bind_all(
    l: &fluxgate_conf::Listener,
    workers: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = crate::accept::bind(l, l.address)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(crate::accept::bind(l, bound)?);
    }
    Ok((bound, all))
}

fn route_tables(config: &Config) -> Vec<Arc<RouteTable>> {
    config
        .listeners
        .iter()
        .map(|l| Arc::new(RouteTable::new(l.routes.clone())))
        .collect()
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
                eprintln!("fluxgate: io_uring unavailable ({e}); accepting through epoll");
                Ok(Acceptor::Epoll)
            }
        },
    }
}
