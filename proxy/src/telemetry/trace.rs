//! OpenTelemetry traces: a span per request (the server span), a child for the routing
//! decision, one client span per upstream exchange (whose id the upstream receives in
//! `traceparent`) with a child per attempt, and one for the response body. The W3C
//! `traceparent` / `tracestate` of the client are read, the sampling is the SDK's
//! (parent-based, else by trace-id ratio), and finished spans go to the SDK's batch
//! processor, which exports them over OTLP/HTTP (protobuf) from its own thread.
//!
//! The sampling decision is made here, per request, before the SDK is asked for anything
//! (the SDK's own sampler is always-on and sees only sampled requests): a request that is
//! not sampled costs two draws of the worker's generator and one header, the upstream is
//! told the trace and our span id with the sampled flag off, and no span is built.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fluxgate_conf::Tracing;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span,
};
use opentelemetry_sdk::Resource;

pub(crate) const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The process's tracer: shared by every worker.
pub(crate) struct Tracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Requests without a parent traced, out of 2^53.
    ratio: u64,
    parent_based: bool,
}

/// Who a request is in its trace, decided when its head arrives.
pub(crate) struct TraceIds {
    pub(crate) trace: TraceId,
    /// Our server span's id: the upstream's parent when the request is not sampled.
    span: SpanId,
    pub(crate) sampled: bool,
    /// The client's span, when it sent a valid `traceparent`.
    parent: Option<SpanContext>,
}

impl TraceIds {
    /// `traceparent` / `tracestate` for the upstream of a request that is not sampled.
    pub(crate) fn headers(&self) -> (HeaderValue, Option<HeaderValue>) {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = self
            .parent
            .as_ref()
            .and_then(|p| tracestate(p.trace_state()));
        (traceparent(self.trace, self.span, flags), state)
    }
}

impl Tracer {
    /// Starts the export thread; spans go out in batches from here on.
    pub(crate) fn start(cfg: &Tracing) -> Result<Arc<Tracer>, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Exporter::new(cfg.timeout)?)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.timeout)
            .build()
            .map_err(|e| format!("tracing.endpoint: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.queue)
            .with_max_export_batch_size(cfg.batch.min(cfg.queue))
            .with_scheduled_delay(cfg.flush_interval)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "fluxgate");
        Ok(Arc::new(Tracer {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            ratio: (cfg.sample * (1u64 << 53) as f64) as u64,
            parent_based: cfg.parent_based,
        }))
    }

    /// The ids and the sampling decision of a request with head `headers`: a valid
    /// parent's sampled flag decides (parent-based), else a draw against the ratio.
    /// `draw` is the worker's random generator.
    pub(crate) fn decide(&self, headers: &HeaderMap, mut draw: impl FnMut() -> u64) -> TraceIds {
        let parent = headers
            .contains_key(TRACEPARENT)
            .then(|| {
                let cx = self.propagator.extract(&HeaderExtractor(headers));
                cx.span().span_context().clone()
            })
            .filter(SpanContext::is_valid);
        let span = SpanId::from(draw().max(1));
        let (trace, sampled) = match &parent {
            Some(p) => (
                p.trace_id(),
                match self.parent_based {
                    true => p.is_sampled(),
                    false => draw() >> 11 < self.ratio,
                },
            ),
            None => {
                let hi = draw();
                let trace = TraceId::from((u128::from(hi) << 64) | u128::from(draw().max(1)));
                (trace, hi >> 11 < self.ratio)
            }
        };
        TraceIds {
            trace,
            span,
            sampled,
            parent,
        }
    }

    /// Exports what is queued and stops the export thread (at exit).
    pub(crate) fn shutdown(&self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
    }

    /// The server span of a sampled request, with the ids `decide` gave it: a child of the
    /// client's span when it sent one.
    pub(crate) fn begin(
        self: &Arc<Self>,
        ids: &TraceIds,
        method: &http::Method,
        path: &str,
        version: http::Version,
        client: &HeaderValue,
    ) -> RequestTrace {
        let parent = match &ids.parent {
            Some(p) => Context::new().with_remote_span_context(p.clone()),
            None => Context::new(),
        };
        let name: Cow<'static, str> = match method.as_str() {
            "GET" => "GET".into(),
            "POST" => "POST".into(),
            other => other.to_owned().into(),
        };
        let mut server = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_trace_id(ids.trace)
            .with_span_id(ids.span)
            .start_with_context(&self.tracer, &parent);
        server.set_attributes([
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("network.protocol.version", protocol(version)),
            KeyValue::new("client.address", client.to_str().unwrap_or("").to_owned()),
        ]);
        RequestTrace {
            tracer: Arc::clone(self),
            start: SystemTime::now(),
            server,
            client: None,
            response: None,
        }
    }
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// The spans of one request, ended when its response body is.
pub(crate) struct RequestTrace {
    tracer: Arc<Tracer>,
    start: SystemTime,
    server: Span,
    /// The upstream exchange: its id is the parent the upstream sees.
    client: Option<Span>,
    response: Option<Span>,
}

impl RequestTrace {
    fn child_of(&self, span: &Span) -> Context {
        Context::new().with_remote_span_context(span.span_context().clone())
    }

    fn start(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Span,
        attrs: Vec<KeyValue>,
    ) -> Span {
        let t = &self.tracer.tracer;
        let mut b = t.span_builder(name).with_kind(kind);
        b.attributes = Some(attrs);
        b.start_with_context(t, &self.child_of(parent))
    }

    /// The routing decision (from the request's start to now), and the client span of the
    /// exchange with `upstream` that follows. Returns the `traceparent` (and `tracestate`)
    /// the upstream gets.
    pub(crate) fn forwarded(
        &mut self,
        route: &str,
        upstream: &str,
        endpoint: Option<std::net::SocketAddr>,
    ) -> (HeaderValue, Option<HeaderValue>) {
        {
            self.server
                .set_attribute(KeyValue::new("http.route", route.to_owned()));
            let t = &self.tracer.tracer;
            let mut b = t
                .span_builder("route")
                .with_kind(SpanKind::Internal)
                .with_start_time(self.start);
            b.attributes = Some(vec![
                KeyValue::new("fluxgate.route", route.to_owned()),
                KeyValue::new("fluxgate.upstream", upstream.to_owned()),
            ]);
            b.start_with_context(t, &self.child_of(&self.server)).end();
            let mut attrs = vec![KeyValue::new("fluxgate.upstream", upstream.to_owned())];
            if let Some(ep) = endpoint {
                attrs.push(KeyValue::new("server.address", ep.ip().to_string()));
                attrs.push(KeyValue::new("server.port", i64::from(ep.port())));
            }
            let client = self.start("upstream", SpanKind::Client, &self.server, attrs);
            let sc = self.client.insert(client).span_context();
            (
                traceparent(sc.trace_id(), sc.span_id(), sc.trace_flags()),
                tracestate(sc.trace_state()),
            )
        }
    }

    /// One try of the exchange (the first, or a retry), to `endpoint`.
    pub(crate) fn attempt(&self, n: u32, endpoint: std::net::SocketAddr) -> Option<Span> {
        let client = self.client.as_ref()?;
        Some(self.start(
            "attempt",
            SpanKind::Internal,
            client,
            vec![
                KeyValue::new("fluxgate.attempt", i64::from(n)),
                KeyValue::new("server.address", endpoint.ip().to_string()),
                KeyValue::new("server.port", i64::from(endpoint.port())),
            ],
        ))
    }

    /// The exchange is over: its answer's status, or the error; the response starts.
    pub(crate) fn answered(&mut self, outcome: Result<u16, &dyn std::fmt::Display>) {
        let Some(mut client) = self.client.take() else {
            return;
        };
        end_with(&mut client, outcome);
        let response = self.start("response", SpanKind::Internal, &self.server, Vec::new());
        self.response = Some(response);
    }

    /// The response body is sent (or the client went away): `status` and `bytes` go on the
    /// server span, and every open span ends.
    pub(crate) fn finish(mut self, status: u16, bytes: u64) {
        if let Some(mut r) = self.response.take() {
            r.set_attribute(KeyValue::new("http.response.body.size", bytes as i64));
            r.end();
        }
        if let Some(mut c) = self.client.take() {
            c.end();
        }
        self.server.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            self.server.set_status(Status::error(""));
        }
        self.server.end();
    }
}

/// Ends an attempt's or exchange's span with its outcome: the answer's status, or the error.
pub(crate) fn end_with(span: &mut Span, outcome: Result<u16, &dyn std::fmt::Display>) {
    match outcome {
        Ok(status) => {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(""));
            }
        }
        Err(e) => {
            span.set_attribute(KeyValue::new("error.type", e.to_string()));
            span.set_status(Status::error(e.to_string()));
        }
    }
    span.end();
}

/// `00-TRACE-SPAN-FLAGS` (W3C Trace Context, version 00).
fn traceparent(trace: TraceId, span: SpanId, flags: TraceFlags) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let hex = |out: &mut [u8], bytes: &[u8]| {
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
    };
    hex(&mut v[3..35], &trace.to_bytes());
    hex(&mut v[36..52], &span.to_bytes());
    hex(&mut v[53..55], &[flags.to_u8()]);
    HeaderValue::from_bytes(&v).expect("hex digits and dashes")
}

fn tracestate(ts: &TraceState) -> Option<HeaderValue> {
    let s = ts.header();
    (!s.is_empty())
        .then(|| HeaderValue::try_from(s).ok())
        .flatten()
}

/// The OTLP exporter's HTTP client: HTTP/1.1 through hyper, on a runtime of its own (the
/// SDK's batch processor calls it from its own thread, never from a worker).
#[derive(Debug)]
struct Exporter {
    rt: tokio::runtime::Runtime,
    timeout: Duration,
}

impl Exporter {
    fn new(timeout: Duration) -> Result<Exporter, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tracing: no runtime for the exporter: {e}"))?;
        Ok(Exporter { rt, timeout })
    }
}

#[async_trait::async_trait]
impl HttpClient for Exporter {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let exchange = async {
            let uri = request.uri();
            let host = uri.host().ok_or("no host in the OTLP endpoint")?.to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let (mut parts, body) = request.into_parts();
            if !parts.headers.contains_key(http::header::HOST) {
                let authority = format!("{host}:{port}");
                parts
                    .headers
                    .insert(http::header::HOST, HeaderValue::try_from(authority)?);
            }
            let req = Request::from_parts(parts, http_body_util::Full::new(body));
            let resp = send.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, exchange).await })
            .map_err(|_| HttpError::from("OTLP export timed out"))?
    }
}
