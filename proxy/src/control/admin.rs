//! The admin listener, on its own thread and address: `/metrics` (Prometheus text),
//! `/healthz` (the process is up), `/readyz` (503 while draining), `/config` and `/status`
//! (JSON, from `status`), `/` (the admin page that reads `/status`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::control::reload::Reloader;

/// What the admin endpoints read.
pub(crate) struct AdminState {
    pub(crate) reloader: Arc<Reloader>,
    pub(crate) draining: AtomicBool,
    /// When the admin listener (and the process) started, for `/status`.
    pub(crate) started: std::time::Instant,
}

/// The admin page: one self-contained HTML file (styles and script inline) that reads
/// `/status` every two seconds.
const PAGE: &str = include_str!("admin.html");

/// Serves the admin endpoints on `listener` until `stop` turns true.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fluxgate-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener failed");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                loop {
                    let accepted = tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        a = listener.accept() => a,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let state = Arc::clone(&state);
                            async move { Ok::<_, Infallible>(admin_response(&state, &req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static parts are valid")
}

fn admin_response<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if (req.method(), req.uri().path()) == (&Method::POST, "/reload") {
        return match state.reloader.reload_source() {
            Ok(()) => text(StatusCode::OK, "text/plain", "reloaded\n".into()),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("refused: {e}\n"),
            ),
        };
    }
    if req.method() != Method::GET {
        let allowed = "GET, or POST /reload\n".to_owned();
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", allowed);
    }
    let g = state.reloader.current();
    match req.uri().path() {
        "/metrics" => {
            let mut m = g.metrics.render(&g.config, &g.addrs, &g.health);
            crate::app::fanout::render_metrics(&mut m, &g.feeds);
            crate::app::orders::desk::Desk::render_metrics(&mut m, &g.desks);
            crate::telemetry::metrics::render_breakers(&mut m, &g.config, &g.breakers);
            crate::telemetry::metrics::render_rate_limits(&mut m, &g.config, &g.addrs, &g.limiters);
            crate::telemetry::metrics::render_canaries(&mut m, &g.config, &g.addrs, &g.canaries);
            text(StatusCode::OK, "text/plain; version=0.0.4", m)
        }
        "/" => text(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned()),
        "/status" => text(
            StatusCode::OK,
            "application/json",
            crate::control::status::status_json(&g, state.started),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.draining.load(Ordering::Relaxed) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/readyz" => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/config" => text(
            StatusCode::OK,
            "application/json",
            crate::control::status::config_json(&g.config, &g.health),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
