//! Worker threads and acceptors. Each worker is one thread running a current-thread tokio
//! runtime, with its own SO_REUSEPORT socket per listener, its own upstream pools and its own
//! acceptor: io_uring multishot accept (completions signalled through an eventfd the runtime
//! polls, completion work deferred to the worker instead of interrupting it) or
//! tokio's epoll accept.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use fluxgate_conf::{Config, IoMode};
use fluxgate_sys::{AcceptRing, Drained};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::balance::Health;
use crate::conn::{worker_housekeeping, ConnServer};
use crate::metrics::{self, ListenerStats, Metrics};
use crate::pool::UpstreamPool;
use crate::proxy::Handler;
use crate::route::RouteTable;
use std::sync::atomic::AtomicBool;

/// Spawns futures on the current thread's `LocalSet`: hyper's HTTP/2 tasks and upstream
/// connection drivers hold `Rc`s and never leave their worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Starts fluxgate from a config.
pub struct Server;

/// Where the workers are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Not accepting; finishing what is in flight.
    Draining,
    /// Stop now, whatever is in flight.
    Stopped,
}

/// A running fluxgate: its bound addresses and the way to stop it.
pub struct Handle {
    addrs: Vec<SocketAddr>,
    admin: Option<Admin>,
    io: IoMode,
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
    /// The admin listener's bound address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    fn stop_admin(&mut self) {
        if let Some(a) = self.admin.take() {
            let _ = a.stop.send(true);
            let _ = a.thread.join();
        }
    }

    /// The bound address of each `[[listener]]`, in config order (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The acceptor in use: `Uring` or `Epoll` (never `Auto`).
    pub fn io_mode(&self) -> IoMode {
        self.io
    }

    /// Stops every worker at once and waits for them to exit.
    pub fn shutdown(mut self) {
        self.stop_admin();
        let _ = self.phase.send(Phase::Stopped);
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// Graceful stop: listeners close (new connections are refused), idle connections close,
    /// requests in flight finish (HTTP/1.1 answers carry `Connection: close`, HTTP/2 gets
    /// GOAWAY), then the workers exit. Whatever is still running after `grace` is cut off.
    /// Returns whether everything finished within `grace`.
    pub fn drain(mut self, grace: std::time::Duration) -> bool {
        if let Some(a) = &self.admin {
            a.state
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = self.phase.send(Phase::Draining);
        let deadline = std::time::Instant::now() + grace;
        let mut finished = 0;
        while finished < self.workers.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.exited.recv_timeout(left) {
                Ok(()) => finished += 1,
                Err(_) => break,
            }
        }
        let clean = finished == self.workers.len();
        self.stop_admin();
        let _ = self.phase.send(Phase::Stopped);
        for w in self.workers {
            let _ = w.join();
        }
        clean
    }
}

impl Server {
    /// Binds every listener (failing here, before any thread starts, if one cannot be bound),
    /// picks the acceptor and starts the workers.
    pub fn start(config: Config) -> io::Result<Handle> {
        let io = resolve_io(config.runtime.io)?;
        let workers = config.runtime.workers.max(1);
        // Bind worker 0's sockets first: that resolves port 0 for the others.
        let mut per_worker: Vec<Vec<std::net::TcpListener>> = Vec::with_capacity(workers);
        let mut addrs = Vec::with_capacity(config.listeners.len());
        let mut first = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let sock = bind(l, l.address)?;
            addrs.push(sock.local_addr()?);
            first.push(sock);
        }
        per_worker.push(first);
        for _ in 1..workers {
            let socks = config
                .listeners
                .iter()
                .zip(&addrs)
                .map(|(l, &a)| bind(l, a))
                .collect::<io::Result<Vec<_>>>()?;
            per_worker.push(socks);
        }
        let health: Arc<[Arc<Health>]> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Health::new(u.endpoints.len(), u.passive.clone())))
            .collect();
        let tables: Arc<[Arc<RouteTable>]> = config
            .listeners
            .iter()
            .map(|l| Arc::new(RouteTable::new(l.routes.clone())))
            .collect();
        let metrics = Metrics::new(&config, workers);
        let config = Arc::new(config);
        let admin = match config.admin {
            None => None,
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| io::Error::new(e.kind(), format!("bind admin {addr}: {e}")))?;
                listener.set_nonblocking(true)?;
                let addr = listener.local_addr()?;
                let state = Arc::new(AdminState {
                    config: Arc::clone(&config),
                    addrs: addrs.clone(),
                    health: Arc::clone(&health),
                    metrics: Arc::clone(&metrics),
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
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let (exited_tx, exited) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(workers);
        for (id, socks) in per_worker.into_iter().enumerate() {
            let config = Arc::clone(&config);
            let tables = Arc::clone(&tables);
            let health = Arc::clone(&health);
            let metrics = Arc::clone(&metrics);
            let phase_rx = phase_rx.clone();
            let exited_tx = exited_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("fluxgate-w{id}"))
                .spawn(move || {
                    let shared = WorkerShared {
                        config: &config,
                        tables: &tables,
                        health: &health,
                        metrics: &metrics,
                    };
                    if let Err(e) = run_worker(id, shared, socks, io, phase_rx) {
                        eprintln!("fluxgate: worker {id} failed: {e}");
                    }
                    let _ = exited_tx.send(());
                })?;
            threads.push(t);
        }
        Ok(Handle {
            addrs,
            admin,
            io,
            phase,
            workers: threads,
            exited,
        })
    }
}

fn resolve_io(mode: IoMode) -> io::Result<IoMode> {
    match mode {
        IoMode::Epoll => Ok(IoMode::Epoll),
        IoMode::Uring => fluxgate_sys::probe_uring()
            .map(|()| IoMode::Uring)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("--io uring: io_uring unavailable: {e}"))
            }),
        IoMode::Auto => match fluxgate_sys::probe_uring() {
            Ok(()) => Ok(IoMode::Uring),
            Err(e) => {
                eprintln!("fluxgate: io_uring unavailable ({e}); accepting through epoll");
                Ok(IoMode::Epoll)
            }
        },
    }
}

fn bind(l: &fluxgate_conf::Listener, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    // Port 0 with SO_REUSEPORT already set may hand out a port another reuseport listener of
    // the same user holds, silently sharing its traffic. So pick the port without it, then
    // join the group before listen(2), where Linux forms it.
    let any_port = addr.port() == 0;
    sock.set_reuse_port(!any_port)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    if any_port {
        sock.set_reuse_port(true)?;
    }
    sock.listen(l.backlog as i32)?;
    if l.tcp_fastopen > 0 {
        if let Err(e) = fluxgate_sys::set_tcp_fastopen(&sock, l.tcp_fastopen) {
            eprintln!("fluxgate: TCP_FASTOPEN on {addr} not set: {e}");
        }
    }
    Ok(sock.into())
}

/// Per-listener state of one worker.
struct ListenerCtx {
    server: ConnServer,
    handler: Rc<Handler>,
    active: Cell<usize>,
    max_connections: usize,
    metrics: Arc<Metrics>,
    worker: usize,
    index: usize,
}

impl ListenerCtx {
    fn stats(&self) -> &ListenerStats {
        &self.metrics.workers[self.worker].listeners[self.index]
    }
}

/// What every worker reads and nobody writes (but through atomics).
struct WorkerShared<'a> {
    config: &'a Config,
    tables: &'a [Arc<RouteTable>],
    health: &'a [Arc<Health>],
    metrics: &'a Arc<Metrics>,
}

fn run_worker(
    id: usize,
    shared: WorkerShared<'_>,
    socks: Vec<std::net::TcpListener>,
    io: IoMode,
    mut phase: watch::Receiver<Phase>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let WorkerShared {
        config,
        tables,
        health,
        metrics,
    } = shared;
    local.block_on(&rt, async move {
        let pools: Rc<[Rc<UpstreamPool>]> = config
            .upstreams
            .iter()
            .zip(health)
            .enumerate()
            .map(|(i, (u, h))| {
                let stats = (Arc::clone(metrics), id, i);
                UpstreamPool::new(u.clone(), Arc::clone(h), stats, (id * 1000 + i) as u64)
            })
            .collect();
        if id == 0 {
            // One prober per upstream for the whole process; the verdicts are shared.
            for (u, h) in config.upstreams.iter().zip(health) {
                if let Some(check) = &u.health_check {
                    tokio::task::spawn_local(crate::health::probe_forever(
                        u.clone(),
                        check.clone(),
                        Arc::clone(h),
                    ));
                }
            }
        }
        for p in pools.iter() {
            tokio::task::spawn_local(Rc::clone(p).prewarm());
        }
        let parks = Rc::new(Cell::new(0));
        tokio::task::spawn_local(worker_housekeeping(Rc::clone(&parks)));
        // This worker's own drain signal, for its acceptors and connections.
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, ((l, sock), table)) in config.listeners.iter().zip(socks).zip(tables).enumerate() {
            let ctx = Rc::new(ListenerCtx {
                server: ConnServer::new(&config.http, Rc::clone(&parks), drain_rx.clone()),
                handler: Rc::new(Handler {
                    metrics: Arc::clone(metrics),
                    worker: id,
                    listener: index,
                    routes: Arc::clone(table),
                    pools: Rc::clone(&pools),
                    max_request_line: config.http.max_request_line,
                }),
                active: Cell::new(0),
                max_connections: l.max_connections,
                metrics: Arc::clone(metrics),
                worker: id,
                index,
            });
            let uring = match io {
                IoMode::Uring => match AcceptRing::new(sock.as_raw_fd()) {
                    Ok(ring) => Some(ring),
                    Err(e) => {
                        eprintln!("fluxgate: worker {id}: io_uring setup failed ({e}); accepting through epoll");
                        None
                    }
                },
                _ => None,
            };
            listeners.push(Rc::clone(&ctx));
            let drain = drain_rx.clone();
            match uring {
                Some(ring) => tokio::task::spawn_local(accept_uring(sock, ring, ctx, drain)),
                None => tokio::task::spawn_local(accept_epoll(sock, ctx, drain)),
            };
        }
        let _ = phase.wait_for(|p| *p != Phase::Running).await;
        let _ = drain_tx.send(true);
        // Wait for the connections to finish, unless told to stop now.
        let open = || listeners.iter().map(|l| l.active.get()).sum::<usize>();
        while open() > 0 && *phase.borrow() == Phase::Draining {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(20), phase.changed()).await;
        }
    });
    Ok(())
}

fn start_conn(ctx: &Rc<ListenerCtx>, stream: std::net::TcpStream, peer: SocketAddr) {
    if ctx.active.get() >= ctx.max_connections {
        // Over the per-worker cap: close at once rather than queue unbounded work.
        return;
    }
    let _ = stream.set_nodelay(true);
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fluxgate: cannot register accepted socket: {e}");
            return;
        }
    };
    ctx.active.set(ctx.active.get() + 1);
    metrics::inc(&ctx.stats().active);
    let ctx = Rc::clone(ctx);
    tokio::task::spawn_local(async move {
        ctx.server
            .serve(stream, peer, Rc::clone(&ctx.handler))
            .await;
        ctx.active.set(ctx.active.get() - 1);
        metrics::dec(&ctx.stats().active);
    });
}

/// Out of descriptors or memory: back off instead of spinning on a listener that stays ready.
async fn accept_backoff(e: &io::Error) {
    eprintln!("fluxgate: accept failed: {e}");
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    ) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn accept_epoll(
    sock: std::net::TcpListener,
    ctx: Rc<ListenerCtx>,
    mut drain: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fluxgate: cannot register listener: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => match stream.into_std() {
                Ok(s) => start_conn(&ctx, s, peer),
                Err(e) => eprintln!("fluxgate: accepted socket unusable: {e}"),
            },
            Err(e) => accept_backoff(&e).await,
        }
    }
}

async fn accept_uring(
    sock: std::net::TcpListener,
    ring: AcceptRing,
    ctx: Rc<ListenerCtx>,
    mut drain: watch::Receiver<bool>,
) {
    // The listening socket stays open as long as this accept loop runs.
    let _listener = sock;
    let mut ring = match ring.register() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fluxgate: cannot poll the io_uring: {e}");
            return;
        }
    };
    let mut out = Drained::default();
    loop {
        let readable = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => return,
            r = ring.readable_mut() => r,
        };
        let mut ready = match readable {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fluxgate: io_uring poll failed: {e}");
                return;
            }
        };
        ready.clear_ready();
        if let Err(e) = ready.get_inner_mut().drain(&mut out) {
            eprintln!("fluxgate: io_uring re-arm failed: {e}");
            accept_backoff(&e).await;
        }
        for r in out.accepted.drain(..) {
            match r {
                Ok((fd, peer)) => start_conn(&ctx, std::net::TcpStream::from(fd), peer),
                Err(e) => accept_backoff(&e).await,
            }
        }
    }
}
