//! The access log: one JSON line per request, written when the response body ends (so the
//! byte count is true). Each worker gathers lines in its own buffer and appends them to the
//! file when the buffer fills or the flush interval passes: no system call per request.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use crate::telemetry::json;

/// One worker's access log writer.
pub(crate) struct AccessLog {
    file: RefCell<File>,
    buf: RefCell<String>,
    limit: usize,
}

impl AccessLog {
    /// Opens (appending, creating) the log file for this worker and starts its flush timer.
    pub(crate) fn open(cfg: &fluxgate_conf::AccessLog) -> std::io::Result<Rc<AccessLog>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)?;
        let log = Rc::new(AccessLog {
            file: RefCell::new(file),
            buf: RefCell::new(String::with_capacity(cfg.buffer + 512)),
            limit: cfg.buffer,
        });
        let weak = Rc::downgrade(&log);
        let every = cfg.flush_interval;
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(log) => log.flush(),
                    None => return,
                }
            }
        });
        Ok(log)
    }

    /// Writes out whatever is buffered. Errors are reported once per flush, not per line.
    pub(crate) fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        if let Err(e) = self.file.borrow_mut().write_all(buf.as_bytes()) {
            tracing::error!(error = %e, "access log write failed");
        }
        buf.clear();
    }

    fn push(&self, line: impl FnOnce(&mut String)) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            line(&mut buf);
            buf.len() >= self.limit
        };
        if full {
            self.flush();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What is known about a request when its answer starts; completed when the body ends.
pub(crate) struct Pending {
    /// None: only the trace wants the request's end.
    pub(crate) log: Option<Rc<AccessLog>>,
    /// The request's spans, when `[tracing]` is on.
    pub(crate) trace: Option<crate::telemetry::trace::RequestTrace>,
    /// The request's trace, sampled or not, when `[tracing]` is on.
    pub(crate) trace_id: Option<opentelemetry::trace::TraceId>,
    pub(crate) time: SystemTime,
    pub(crate) started: Instant,
    pub(crate) client: http::HeaderValue,
    /// None for a refusal: no head was read.
    pub(crate) method: Option<http::Method>,
    pub(crate) path: String,
    pub(crate) route: String,
    pub(crate) upstream: String,
    pub(crate) status: u16,
    /// Time until the upstream's response head, for forwarded requests.
    pub(crate) upstream_time: Option<Duration>,
    pub(crate) bytes: u64,
    /// Why the server refused the request or reset its stream itself.
    pub(crate) reason: Option<&'static str>,
}

impl Pending {
    /// A line for a request from `client` that began at `started`; the rest is filled in as
    /// the request goes.
    pub(crate) fn new(
        log: Option<Rc<AccessLog>>,
        started: Instant,
        client: http::HeaderValue,
    ) -> Pending {
        Pending {
            log,
            trace: None,
            trace_id: None,
            time: SystemTime::now(),
            started,
            client,
            method: None,
            path: String::new(),
            route: String::new(),
            upstream: String::new(),
            status: 0,
            upstream_time: None,
            bytes: 0,
            reason: None,
        }
    }

    /// Appends the line: the request is over (body sent, or the client went away).
    pub(crate) fn finish(mut self) {
        if let Some(t) = self.trace.take() {
            t.finish(self.status, self.bytes);
        }
        let Some(log) = &self.log else { return };
        let total = self.started.elapsed();
        log.push(|o| {
            o.push_str("{\"time\":\"");
            o.push_str(&json::rfc3339(self.time));
            o.push_str("\",\"client\":");
            json::push_str(o, self.client.to_str().unwrap_or(""));
            o.push_str(",\"method\":");
            json::push_str(o, self.method.as_ref().map_or("", |m| m.as_str()));
            o.push_str(",\"path\":");
            json::push_str(o, &self.path);
            o.push_str(",\"route\":");
            json::push_str(o, &self.route);
            o.push_str(",\"upstream\":");
            json::push_str(o, &self.upstream);
            let _ = write!(
                o,
                ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3}",
                self.status,
                self.bytes,
                total.as_secs_f64() * 1e3
            );
            match self.upstream_time {
                Some(d) => {
                    let _ = write!(o, ",\"upstream_ms\":{:.3}", d.as_secs_f64() * 1e3);
                }
                None => o.push_str(",\"upstream_ms\":null"),
            }
            if let Some(why) = self.reason {
                o.push_str(",\"reason\":");
                json::push_str(o, why);
            }
            if let Some(id) = self.trace_id {
                let _ = write!(o, ",\"trace_id\":\"{id}\"");
            }
            o.push_str("}\n");
        });
    }
}
