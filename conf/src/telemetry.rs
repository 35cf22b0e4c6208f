//! `[log]` (the gateway's own log lines: level, filter, format, bounded repeats) and
//! `[tracing]` (OpenTelemetry spans per request, sampled, exported over OTLP/HTTP).

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfError, Source};

/// `[log]`. The defaults hold when the section is absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    /// Directives in the `RUST_LOG` form this crate accepts: a level (`error`, `warn`,
    /// `info`, `debug`, `trace`, `off`), or `target=level`, comma-separated. `level` comes
    /// first, then `filter`. Default `info`.
    pub directives: String,
    pub format: LogFormat,
    /// Lines per second from one place in the code before the rest of that second's are
    /// counted and reported in one line; 0 lets every line through. Default 20.
    pub repeats: u32,
}

impl Default for Log {
    fn default() -> Log {
        Log {
            directives: "info".into(),
            format: LogFormat::Text,
            repeats: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `TIME LEVEL target: message key=value ...`
    Text,
    /// One JSON object per line: timestamp, level, target, fields (message among them).
    Json,
}

/// `[tracing]`: present means on.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// Where spans go: an OTLP/HTTP traces URL, `http://HOST:PORT/v1/traces`.
    pub endpoint: String,
    /// The share of requests without a sampled parent that are traced, 0 to 1. Default 0.01.
    pub sample: f64,
    /// Follow the incoming `traceparent`'s sampled flag (W3C parent-based sampling).
    /// Default true.
    pub parent_based: bool,
    /// `service.name` of the exported resource. Default `fluxgate`.
    pub service_name: String,
    /// Spans per export request. Default 512.
    pub batch: usize,
    /// Finished spans kept waiting for export; past it new ones are dropped.
    /// Default 4096.
    pub queue: usize,
    /// How often a batch goes out when it is not full. Default 1 s.
    pub flush_interval: Duration,
    /// One export's time limit. Default 5 s.
    pub timeout: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    level: Option<Spanned<String>>,
    filter: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    repeats: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTracing {
    endpoint: Spanned<String>,
    sample: Option<Spanned<f64>>,
    parent_based: Option<bool>,
    service_name: Option<Spanned<String>>,
    batch: Option<Spanned<i64>>,
    queue: Option<Spanned<i64>>,
    flush_interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Whether `s` is a list of directives fluxgate accepts; the reason when it is not.
pub fn check_directives(s: &str) -> Result<(), String> {
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match d.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, d),
        };
        if target.is_some_and(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
        }) {
            return Err(format!(
                "{d:?}: a target is a module path such as fluxgate::upstream"
            ));
        }
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{d:?}: the level is one of {}", LEVELS.join(", ")));
        }
    }
    Ok(())
}

pub(crate) fn log(src: &Source<'_>, raw: &Option<RawLog>) -> Result<Log, ConfError> {
    let Some(r) = raw else {
        return Ok(Log::default());
    };
    let mut directives = String::new();
    if let Some(l) = &r.level {
        if !LEVELS[1..].contains(&l.get_ref().as_str()) {
            return Err(src.invalid(
                "log.level".into(),
                l,
                "one of error, warn, info, debug, trace",
            ));
        }
        directives.push_str(l.get_ref());
    } else {
        directives.push_str("info");
    }
    if let Some(f) = &r.filter {
        check_directives(f.get_ref()).map_err(|e| src.invalid("log.filter".into(), f, e))?;
        if !f.get_ref().trim().is_empty() {
            directives.push(',');
            directives.push_str(f.get_ref().trim());
        }
    }
    let format = match r.format.as_ref().map(|f| f.get_ref().as_str()) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(_) => {
            let f = r.format.as_ref().expect("matched Some");
            return Err(src.invalid("log.format".into(), f, "\"text\" or \"json\""));
        }
    };
    Ok(Log {
        directives,
        format,
        repeats: src.count(|| "log.repeats".into(), &r.repeats, 20, 0, 1 << 20)? as u32,
    })
}

pub(crate) fn tracing(
    src: &Source<'_>,
    raw: &Option<RawTracing>,
) -> Result<Option<Tracing>, ConfError> {
    let Some(r) = raw else { return Ok(None) };
    let endpoint = r.endpoint.get_ref();
    let ok = endpoint
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/').map(|(a, _)| a).or(Some(rest)))
        .is_some_and(|authority| {
            authority
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        });
    if !ok {
        return Err(src.invalid(
            "tracing.endpoint".into(),
            &r.endpoint,
            "an OTLP/HTTP URL such as \"http://127.0.0.1:4318/v1/traces\"",
        ));
    }
    let sample = match &r.sample {
        None => 0.01,
        Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => return Err(src.invalid("tracing.sample".into(), s, "a fraction from 0 to 1")),
    };
    let service_name = match &r.service_name {
        None => "fluxgate".to_owned(),
        Some(s) if !s.get_ref().is_empty() => s.get_ref().clone(),
        Some(s) => return Err(src.invalid("tracing.service_name".into(), s, "must not be empty")),
    };
    Ok(Some(Tracing {
        endpoint: endpoint.clone(),
        sample,
        parent_based: r.parent_based.unwrap_or(true),
        service_name,
        batch: src.count(|| "tracing.batch".into(), &r.batch, 512, 1, 1 << 16)?,
        queue: src.count(|| "tracing.queue".into(), &r.queue, 4096, 1, 1 << 22)?,
        flush_interval: src.duration(
            || "tracing.flush_interval".into(),
            &r.flush_interval,
            Duration::from_secs(1),
        )?,
        timeout: src.duration(
            || "tracing.timeout".into(),
            &r.timeout,
            Duration::from_secs(5),
        )?,
    }))
}
