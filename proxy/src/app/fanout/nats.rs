//! NATS ingest (`[feed.nats]`): the feed subscribes to a subject on a NATS server and takes
//! each message's payload (one or more envelope frames) as a publisher's, through the same
//! verification and the same hub, so several gateways fan out one feed.
//!
//! One thread per followed feed, with its own single-threaded runtime: ingest is a single
//! stream, the hub is shared across threads anyway, and a worker never waits on the NATS
//! server. The client is the sans-IO `fluxgate_wire::nats` (the benchmark's load tool speaks
//! the protocol with it too): a message's payload is cut out of the read buffer, never
//! copied, and every message of one read goes to the hub as one batch (one lock).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fluxgate_conf::NatsIngest;
use fluxgate_wire::nats::{self, ServerOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::hub::FeedHub;
use super::session::{hub_reject, read_room, Ingest};

/// Largest NATS message taken (the server's own default `max_payload` is 1 MiB).
const MAX_MESSAGE: usize = 8 << 20;
/// Silence after which the server is pinged, and after which it is taken for dead.
const PING_AFTER: Duration = Duration::from_secs(10);
const DEAD_AFTER: Duration = Duration::from_secs(30);

/// Makes the hub's NATS ingest match its config: started, restarted on new settings, or
/// stopped. Called whenever a generation is built.
pub(crate) fn follow(hub: &Arc<FeedHub>) {
    let want = hub.config().nats.clone();
    let mut cur = hub.nats.0.lock().unwrap_or_else(|e| e.into_inner());
    if cur.as_ref().map(|(n, _)| n) == want.as_ref() {
        return;
    }
    if let Some((_, stop)) = cur.take() {
        stop.store(true, Ordering::Relaxed);
    }
    let Some(settings) = want else { return };
    let stop = Arc::new(AtomicBool::new(false));
    let (weak, flag, s) = (Arc::downgrade(hub), Arc::clone(&stop), settings.clone());
    let started = std::thread::Builder::new()
        .name(format!("nats-{}", hub.name))
        .spawn(move || run(weak, s, flag));
    match started {
        Ok(_) => *cur = Some((settings, stop)),
        Err(e) => tracing::error!(feed = %hub.name, error = %e, "cannot start NATS ingest"),
    }
}

fn run(hub: Weak<FeedHub>, cfg: NatsIngest, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::error!(error = %e, "NATS ingest: no runtime"),
    };
    rt.block_on(async {
        let mut logged = false;
        loop {
            let Some(h) = hub.upgrade() else { return };
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let name = h.name.clone();
            drop(h);
            let outcome =
                match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(cfg.address))
                    .await
                {
                    Ok(Ok(s)) => {
                        logged = false;
                        session(s, &hub, &cfg, &stop).await
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("connect timed out".into()),
                };
            if let Some(h) = hub.upgrade() {
                h.stats.nats_up.store(0, Ordering::Relaxed);
            }
            match outcome {
                Ok(()) => return,
                // One line per outage, not one per attempt.
                Err(e) if !logged => {
                    tracing::warn!(
                        feed = %name,
                        nats = %cfg.address,
                        subject = %cfg.subject,
                        error = %e,
                        retry_every = ?cfg.reconnect,
                        "NATS ingest lost; retrying"
                    );
                    logged = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(cfg.reconnect).await;
        }
    });
}

/// One connection: subscribe, then ingest until it fails (Err) or the follower is stopped.
async fn session(
    mut io: TcpStream,
    hub: &Weak<FeedHub>,
    cfg: &NatsIngest,
    stop: &AtomicBool,
) -> Result<(), String> {
    let _ = io.set_nodelay(true);
    let mut out = Vec::new();
    nats::connect(&mut out, "fluxgate");
    nats::sub(&mut out, &cfg.subject, 1);
    out.extend_from_slice(nats::PING);
    io.write_all(&out).await.map_err(|e| e.to_string())?;
    let Some(h) = hub.upgrade() else {
        return Ok(());
    };
    let mut ingest = Ingest::new(&h.config());
    drop(h);
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut reply = Vec::new();
    let mut heard = Instant::now();
    let mut pinged = false;
    let mut up = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        read_room(&mut buf);
        let n = match tokio::time::timeout(Duration::from_secs(1), io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err("the server closed the connection".into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => 0,
        };
        let Some(h) = hub.upgrade() else {
            return Ok(());
        };
        if n == 0 {
            let quiet = heard.elapsed();
            if quiet > DEAD_AFTER {
                return Err(format!("no answer for {quiet:?}"));
            }
            if quiet > PING_AFTER && !pinged {
                io.write_all(nats::PING).await.map_err(|e| e.to_string())?;
                pinged = true;
            }
            continue;
        }
        heard = Instant::now();
        pinged = false;
        out.clear();
        loop {
            let (op, used) = match nats::parse(&buf, MAX_MESSAGE) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    ingest.commit(&h, &mut reply);
                    return Err(format!("protocol error: {e}"));
                }
            };
            let mut whole = buf.split_to(used);
            match op {
                ServerOp::Msg { payload, .. } => {
                    let _ = whole.split_to(payload.start);
                    whole.truncate(payload.len());
                    // A message is whole frames (a malformed one is counted in `verify`);
                    // the next starts afresh.
                    let ended_well = ingest.verify(&mut whole, &h, &mut reply);
                    if ended_well.is_ok() && !whole.is_empty() {
                        hub_reject(&h, &mut reply, "a message ended inside a frame");
                    }
                    ingest.message_end();
                }
                ServerOp::Ping => out.extend_from_slice(nats::PONG),
                ServerOp::Pong if !up => {
                    // The answer to the PING after SUB: the subscription is in place.
                    up = true;
                    h.stats.nats_up.store(1, Ordering::Relaxed);
                    h.stats.nats_connects.fetch_add(1, Ordering::Relaxed);
                }
                ServerOp::Err(r) => {
                    ingest.commit(&h, &mut reply);
                    let text = String::from_utf8_lossy(&whole[r]).into_owned();
                    return Err(format!("server error {text}"));
                }
                ServerOp::Info(_) | ServerOp::Pong | ServerOp::Ok => {}
            }
        }
        ingest.commit(&h, &mut reply);
        // Rejections are counted; a NATS publisher has no channel back.
        reply.clear();
        if !out.is_empty() {
            io.write_all(&out).await.map_err(|e| e.to_string())?;
        }
    }
}
