//! The gateway's own log: `tracing` events written to stderr as text or JSON lines, filtered
//! by `[log]` directives (or `FLUXGATE_LOG`, which wins), with repeats bounded per place in
//! the code so that an attack cannot turn the log into the bottleneck.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fluxgate_conf::{Log, LogFormat};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The environment variable whose directives replace `[log] level` and `filter`.
pub const ENV: &str = "FLUXGATE_LOG";

/// Lines dropped by the repeat bound since start, for /metrics.
pub(crate) static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static REPEATS: OnceLock<&'static Repeats> = OnceLock::new();

/// Installs the log for this process from `cfg`; later calls only change the filter
/// (the format is chosen once). Directives were checked when the config was read, so a
/// bad `FLUXGATE_LOG` is the only error left: it is reported and `cfg` used instead.
pub fn init(cfg: &Log) {
    if FILTER.get().is_some() {
        return apply(cfg);
    }
    let (filter, from_env) = directives(cfg);
    let (filter, handle) = reload::Layer::new(filter);
    let repeats: &'static Repeats = Box::leak(Box::new(Repeats::new(cfg.repeats)));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let out = match cfg.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(out.with_filter(repeats))
        .try_init()
        .is_ok();
    if installed {
        let _ = FILTER.set(handle);
        let _ = REPEATS.set(repeats);
        std::thread::Builder::new()
            .name("fluxgate-log".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                repeats.report();
            })
            .ok();
    }
    if let Some(Err(e)) = from_env {
        tracing::error!(env = ENV, error = %e, "log directives not understood; using [log]");
    }
}

/// Applies a reloaded `[log]`: its directives and repeat bound (`FLUXGATE_LOG` still wins).
pub fn apply(cfg: &Log) {
    if let Some(h) = FILTER.get() {
        let _ = h.reload(directives(cfg).0);
    }
    if let Some(r) = REPEATS.get() {
        r.per_second
            .store(u64::from(cfg.repeats), Ordering::Relaxed);
    }
}

/// The filter: `FLUXGATE_LOG` when it is set and parses, else the config's directives.
fn directives(cfg: &Log) -> (EnvFilter, Option<Result<(), String>>) {
    let from_cfg =
        || EnvFilter::try_new(&cfg.directives).unwrap_or_else(|_| EnvFilter::new("info"));
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(&v) {
            Ok(f) => (f, Some(Ok(()))),
            Err(e) => (from_cfg(), Some(Err(e.to_string()))),
        },
        _ => (from_cfg(), None),
    }
}

/// The repeat bound: at most `per_second` lines a second from each place in the code; the
/// rest are counted, and reported once a second in one line per place.
struct Repeats {
    per_second: AtomicU64,
    start: Instant,
    places: Mutex<HashMap<usize, Place>>,
}

struct Place {
    second: u64,
    lines: u64,
    suppressed: u64,
    name: &'static str,
    target: &'static str,
}

impl Repeats {
    fn new(per_second: u32) -> Repeats {
        Repeats {
            per_second: AtomicU64::new(u64::from(per_second)),
            start: Instant::now(),
            places: Mutex::new(HashMap::new()),
        }
    }

    fn allows(&self, meta: &'static Metadata<'static>) -> bool {
        let limit = self.per_second.load(Ordering::Relaxed);
        if limit == 0 {
            return true;
        }
        let second = self.start.elapsed().as_secs();
        let key = meta as *const Metadata<'static> as usize;
        let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
        let p = places.entry(key).or_insert(Place {
            second,
            lines: 0,
            suppressed: 0,
            name: meta.name(),
            target: meta.target(),
        });
        if p.second != second {
            p.second = second;
            p.lines = 0;
        }
        p.lines += 1;
        if p.lines <= limit {
            return true;
        }
        p.suppressed += 1;
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// One line per place whose lines were suppressed since the last report.
    fn report(&self) {
        let counted: Vec<(&'static str, &'static str, u64)> = {
            let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
            places
                .values_mut()
                .filter(|p| p.suppressed > 0)
                .map(|p| (p.target, p.name, std::mem::take(&mut p.suppressed)))
                .collect()
        };
        for (target, place, n) in counted {
            tracing::warn!(
                target: "fluxgate::log",
                suppressed = n,
                of = %target,
                place = %place,
                "repeated log lines suppressed"
            );
        }
    }
}

impl<S> Filter<S> for &'static Repeats {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        self.allows(event.metadata())
    }
}
