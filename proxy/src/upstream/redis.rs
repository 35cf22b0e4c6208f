//! A worker's connection to a Redis server (`rate_limit.redis`): commands from any task of
//! the worker are written in order, several in flight on the one connection, and their
//! replies handed back in that order. Down, it fails calls at once and tries again every
//! 200 ms.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use fluxgate_wire::resp::{self, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

struct Call {
    command: Vec<u8>,
    done: oneshot::Sender<Reply>,
}

pub(crate) struct Redis {
    pub(crate) address: SocketAddr,
    calls: mpsc::UnboundedSender<Call>,
}

impl Redis {
    /// The worker's link to `address`, its task started on this worker.
    pub(crate) fn start(address: SocketAddr) -> Rc<Redis> {
        let (calls, rx) = mpsc::unbounded_channel();
        tokio::task::spawn_local(run(address, rx));
        Rc::new(Redis { address, calls })
    }

    /// Sends one command (RESP-encoded); None when Redis did not answer within `limit`.
    pub(crate) async fn call(&self, command: Vec<u8>, limit: Duration) -> Option<Reply> {
        let (done, answer) = oneshot::channel();
        self.calls.send(Call { command, done }).ok()?;
        tokio::time::timeout(limit, answer).await.ok()?.ok()
    }
}

async fn run(address: SocketAddr, mut calls: mpsc::UnboundedReceiver<Call>) {
    loop {
        let conn = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(address),
        );
        let stream = match conn.await {
            Ok(Ok(s)) => s,
            _ => {
                // Unreachable: every call of the next 200 ms fails at once (its sender dropped).
                let until = tokio::time::Instant::now() + Duration::from_millis(200);
                loop {
                    match tokio::time::timeout_at(until, calls.recv()).await {
                        Ok(Some(_failed)) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut r, mut w) = stream.into_split();
        let mut waiting: VecDeque<oneshot::Sender<Reply>> = VecDeque::new();
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                call = calls.recv() => {
                    let Some(call) = call else { return };
                    out.clear();
                    out.extend_from_slice(&call.command);
                    waiting.push_back(call.done);
                    // Whatever else is queued goes in the same write.
                    while let Ok(more) = calls.try_recv() {
                        out.extend_from_slice(&more.command);
                        waiting.push_back(more.done);
                    }
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
                read = r.read_buf(&mut buf) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        break;
                    }
                    let mut broken = false;
                    loop {
                        match resp::parse(&mut buf) {
                            Ok(Some(reply)) => match waiting.pop_front() {
                                Some(done) => {
                                    let _ = done.send(reply);
                                }
                                None => broken = true,
                            },
                            Ok(None) => break,
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                    if broken {
                        break;
                    }
                }
            }
        }
        // The connection is gone: the calls waiting on it fail (their senders drop here).
    }
}

/// GCRA in Redis, atomic: KEYS[1] holds the key's theoretical arrival time (µs, Redis's
/// clock); ARGV are the interval and the burst tolerance (µs). Returns 0 when the request
/// may pass, else the µs to wait.
const GCRA: &[u8] = br#"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
if tat - now > tolerance then return tat - now - tolerance end
local nxt = tat + interval
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1)
return 0"#;

/// The command asking whether one request of bucket `key` may pass.
pub(crate) fn gcra_command(key: &[u8], interval_us: u64, tolerance_us: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(GCRA.len() + key.len() + 64);
    let (i, t) = (interval_us.to_string(), tolerance_us.to_string());
    resp::command(
        &mut out,
        &[b"EVAL", GCRA, b"1", key, i.as_bytes(), t.as_bytes()],
    );
    out
}
