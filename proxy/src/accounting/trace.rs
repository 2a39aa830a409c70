//! OpenTelemetry traces over OTLP/HTTP (JSON encoding), off unless the
//! config has `traces`.
//!
//! A sampled request gets a server span (the OpenTelemetry GenAI
//! conventions: `gen_ai.*`, plus the relay's client, region, cache result
//! and status) and a client span per upstream attempt, so failovers show.
//! A client's W3C `traceparent` makes the request span its child and
//! decides sampling (parent-based); requests without one are sampled at
//! `traces.sampling_ratio`. The upstream gets a `traceparent` naming the
//! attempt span. No bodies, no keys: attributes are names, numbers and the
//! model fields of the request and answer.
//!
//! The hot path only decides sampling and, when sampled, fills a
//! [`RequestSpan`], which queues itself when dropped (a lock, a push). A
//! background task sends the queue every `traces.export_interval`. A full
//! queue or a collector that fails drops spans, counted in
//! `claude_relay_trace_spans_total{result}`; a request never waits for it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use claude_relay_crds::config::TracesConfig;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::fmt::Write as _;

use crate::base::metrics::{Metrics, Name, ResultLabels};
use crate::base::secrets;
use crate::http::error::RelayError;
use crate::store::Usage;

pub use crate::http::headers::TRACEPARENT;

/// Spans per export request: collectors refuse bodies of several MB.
const SPANS_PER_EXPORT: usize = 512;
/// The longest an export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `traces` config in force, its header secrets resolved.
pub struct TraceSettings {
    endpoint: http::Uri,
    /// Marked sensitive; never logged.
    headers: Vec<(HeaderName, HeaderValue)>,
    service_name: String,
    /// A root is sampled when a random draw is below this.
    sample_below: u64,
    sample_all: bool,
    export_interval: Duration,
    max_queue_spans: usize,
}

impl TraceSettings {
    /// Resolves the header secrets. Errors name the header and where its
    /// secret was looked for, never a value.
    pub fn build(config: &TracesConfig) -> Result<Self, String> {
        let mut url = config.endpoint.clone();
        let has_path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .is_some_and(|(_, path)| !path.is_empty());
        if !has_path {
            url = format!("{}/v1/traces", url.trim_end_matches('/'));
        }
        let endpoint: http::Uri = url
            .parse()
            .map_err(|e| format!("traces.endpoint: not a URL: {e}"))?;
        let mut headers = Vec::with_capacity(config.headers.len());
        for (name, source) in &config.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("traces.headers.{name}: not a valid HTTP header name"))?;
            let secret =
                secrets::resolve(source).map_err(|e| format!("traces.headers.{name}: {e}"))?;
            let mut value = HeaderValue::from_str(secret.expose())
                .map_err(|_| format!("traces.headers.{name}: not a valid header value"))?;
            value.set_sensitive(true);
            headers.push((header, value));
        }
        let ratio = config.sampling_ratio.clamp(0.0, 1.0);
        Ok(Self {
            endpoint,
            headers,
            service_name: config.service_name.clone(),
            // `as` saturates: 1.0 gives u64::MAX, hence `sample_all`.
            sample_below: (ratio * u64::MAX as f64) as u64,
            sample_all: ratio >= 1.0,
            export_interval: *config.export_interval,
            max_queue_spans: config.max_queue_spans,
        })
    }

    fn sample_root(&self, draw: u64) -> bool {
        self.sample_all || draw < self.sample_below
    }
}

/// The span queue and its exporter; outlives reloads.
pub struct Tracer {
    settings: ArcSwapOption<TraceSettings>,
    queue: Mutex<Queue>,
    metrics: Arc<Metrics>,
    exporting: AtomicBool,
}

#[derive(Default)]
struct Queue {
    traces: Vec<SpanData>,
    spans: usize,
}

impl Tracer {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        for result in ["exported", "dropped_queue_full", "dropped_export_failed"] {
            let _ = metrics.trace_spans.get_or_create(&ResultLabels { result });
        }
        Arc::new(Self {
            settings: ArcSwapOption::empty(),
            queue: Mutex::default(),
            metrics,
            exporting: AtomicBool::new(false),
        })
    }

    /// Puts the settings of a new snapshot in force for the exporter.
    pub fn configure(&self, settings: Option<Arc<TraceSettings>>) {
        self.settings.store(settings);
    }

    /// Starts the exporter on the current runtime (once).
    pub fn spawn_export(self: &Arc<Self>) {
        if !self.exporting.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().export_loop());
        }
    }

    /// The span of a request, when it is sampled: a client's `traceparent`
    /// decides (its sampled flag), else `sampling_ratio`.
    pub fn start(
        self: &Arc<Self>,
        settings: &TraceSettings,
        headers: &HeaderMap,
        method: &Method,
        path: &str,
        route: &'static str,
    ) -> Option<Box<RequestSpan>> {
        let parent = headers.get(TRACEPARENT).and_then(parse_traceparent);
        let (trace_id, parent_span_id) = match parent {
            Some(parent) if !parent.sampled => return None,
            Some(parent) => (parent.trace_id, Some(parent.span_id)),
            None => {
                let draw = random_u64();
                if !settings.sample_root(draw) {
                    return None;
                }
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&draw.to_be_bytes());
                id[8..].copy_from_slice(&random_u64().to_be_bytes());
                (id, None)
            }
        };
        Some(Box::new(RequestSpan {
            tracer: self.clone(),
            data: SpanData {
                trace_id,
                span_id: new_span_id(),
                parent_span_id,
                start_ns: unix_nanos(),
                end_ns: 0,
                method: method.clone(),
                path: path.to_owned(),
                route,
                request: RequestFields::default(),
                answer: None,
                relay: RelayFields::default(),
                attempts: Vec::new(),
            },
        }))
    }

    fn enqueue(&self, record: SpanData) {
        let spans = 1 + record.attempts.len();
        let cap = self
            .settings
            .load()
            .as_ref()
            .map_or(0, |s| s.max_queue_spans);
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.spans + spans <= cap {
                queue.spans += spans;
                queue.traces.push(record);
                return;
            }
        }
        self.count("dropped_queue_full", spans);
    }

    fn count(&self, result: &'static str, spans: usize) {
        self.metrics
            .trace_spans
            .get_or_create(&ResultLabels { result })
            .inc_by(spans as u64);
    }

    async fn export_loop(self: Arc<Self>) {
        let client = match export_client() {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "trace export cannot start: no TLS client");
                return;
            }
        };
        let mut failing = false;
        loop {
            let interval = self
                .settings
                .load()
                .as_ref()
                .map_or(Duration::from_secs(1), |s| s.export_interval);
            tokio::time::sleep(interval).await;
            let taken = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if taken.traces.is_empty() {
                continue;
            }
            let Some(settings) = self.settings.load_full() else {
                // Tracing was turned off by a reload: what was queued goes.
                continue;
            };
            let mut traces = taken.traces.into_iter().peekable();
            while traces.peek().is_some() {
                let mut batch = Vec::new();
                let mut spans = 0;
                while spans < SPANS_PER_EXPORT
                    && let Some(trace) = traces.next()
                {
                    spans += 1 + trace.attempts.len();
                    batch.push(trace);
                }
                let body = encode(&settings.service_name, &batch);
                match export(&client, &settings, body).await {
                    Ok(()) => {
                        self.count("exported", spans);
                        if failing {
                            tracing::info!("trace export works again");
                            failing = false;
                        }
                    }
                    Err(error) => {
                        self.count("dropped_export_failed", spans);
                        if !failing {
                            tracing::warn!(endpoint = %settings.endpoint, %error, "trace export failed; spans are dropped until the collector answers");
                            failing = true;
                        }
                    }
                }
            }
        }
    }
}

type ExportClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

fn export_client() -> Result<ExportClient, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| e.to_string())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

/// One POST of a batch. The error says what failed, never a header.
async fn export(
    client: &ExportClient,
    settings: &TraceSettings,
    body: Bytes,
) -> Result<(), String> {
    let mut request = http::Request::post(settings.endpoint.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(body))
        .map_err(|e| e.to_string())?;
    for (name, value) in &settings.headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    let response = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
        .map_err(|e| format!("{e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", response.status()))
    }
}

/// What the request body says, read only for a sampled request.
#[derive(Default, serde::Deserialize)]
struct RequestFields {
    model: Option<String>,
    max_tokens: Option<u64>,
    stream: Option<bool>,
}

/// What the relay decided, set when the exchange ends.
#[derive(Default)]
struct RelayFields {
    status: u16,
    request_id: Option<Arc<str>>,
    client: Option<Name>,
    region: Option<Name>,
    cache: Option<&'static str>,
    outcome: &'static str,
}

struct AttemptSpan {
    span_id: [u8; 8],
    start_ns: u64,
    end_ns: u64,
    region: Name,
    key_index: usize,
    status: Option<u16>,
    error: Option<&'static str>,
}

/// A sampled request's span; queued for export when dropped.
pub struct RequestSpan {
    tracer: Arc<Tracer>,
    data: SpanData,
}

/// What the answer reported, as its span shows it.
struct Answer {
    model: Option<String>,
    id: Option<String>,
    /// `None` when the answer carried no usage at all.
    usage: Option<Usage>,
}

/// What a request's spans say; encoded by the exporter, off the request path.
#[derive(Default)]
struct SpanData {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start_ns: u64,
    end_ns: u64,
    method: Method,
    path: String,
    route: &'static str,
    request: RequestFields,
    answer: Option<Answer>,
    relay: RelayFields,
    attempts: Vec<AttemptSpan>,
}

impl RequestSpan {
    /// Reads the model fields of a (decoded) JSON request body.
    pub fn read_request(&mut self, body: &[u8]) {
        if let Ok(fields) = serde_json::from_slice::<RequestFields>(body) {
            self.data.request = fields;
        }
    }

    /// Opens an attempt's span; the `traceparent` that names it goes upstream.
    pub fn attempt_started(&mut self, region: &Name, key_index: usize) -> HeaderValue {
        let span_id = new_span_id();
        self.data.attempts.push(AttemptSpan {
            span_id,
            start_ns: unix_nanos(),
            end_ns: 0,
            region: region.clone(),
            key_index,
            status: None,
            error: None,
        });
        let text = format!(
            "00-{}-{}-01",
            hex::encode(self.data.trace_id),
            hex::encode(span_id)
        );
        HeaderValue::from_str(&text).expect("hex is a valid header value")
    }

    /// The attempt's answer: its status. An attempt's span lasts until
    /// its answer's headers; the request's span covers the body.
    pub fn attempt_answered(&mut self, status: u16) {
        if let Some(attempt) = self.data.attempts.last_mut() {
            attempt.status = Some(status);
            attempt.end_ns = unix_nanos();
        }
    }

    /// The attempt failed before an answer.
    pub fn attempt_failed(&mut self, error: &RelayError) {
        if let Some(attempt) = self.data.attempts.last_mut() {
            attempt.end_ns = unix_nanos();
            attempt.error = Some(match error {
                RelayError::UpstreamTimeout { .. } => "timeout",
                RelayError::UpstreamConnect { .. } => "connect",
                _ => "error",
            });
        }
    }

    /// The exchange ended: what the client got.
    pub fn close(
        &mut self,
        request_id: &Arc<str>,
        status: u16,
        client: Option<&Name>,
        region: Option<&Name>,
        cache: Option<&'static str>,
        outcome: &'static str,
    ) {
        self.data.end_ns = unix_nanos();
        self.data.relay = RelayFields {
            status,
            request_id: Some(request_id.clone()),
            client: client.cloned(),
            region: region.cloned(),
            cache,
            outcome,
        };
    }

    /// What the answer reported (model, id, usage), read after it went out.
    pub fn answered(&mut self, model: Option<&str>, id: Option<&str>, usage: Option<&Usage>) {
        if usage.is_some() || model.is_some() {
            self.data.answer = Some(Answer {
                model: model.map(str::to_owned),
                id: id.map(str::to_owned),
                usage: usage.cloned(),
            });
        }
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        let data = &mut self.data;
        if data.end_ns == 0 {
            data.end_ns = unix_nanos();
        }
        let end = data.end_ns;
        for attempt in &mut data.attempts {
            if attempt.end_ns == 0 {
                attempt.end_ns = end.max(attempt.start_ns);
            }
        }
        self.tracer.enqueue(std::mem::take(&mut self.data));
    }
}

// OTLP span kinds and status codes.
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;
const STATUS_ERROR: u8 = 2;

impl SpanData {
    fn is_inference(&self) -> bool {
        self.route == "messages"
    }

    fn request_span(&self, out: &mut String) {
        let mut attributes = Attributes::default();
        let request_model = self.request.model.as_deref();
        if self.route == "messages" || self.route == "count_tokens" {
            attributes.text("gen_ai.system", "anthropic");
            attributes.text("gen_ai.provider.name", "anthropic");
        }
        if self.is_inference() {
            attributes.text("gen_ai.operation.name", "chat");
        }
        if let Some(model) = request_model {
            attributes.text("gen_ai.request.model", model);
        }
        if let Some(max) = self.request.max_tokens {
            attributes.int("gen_ai.request.max_tokens", max);
        }
        if let Some(stream) = self.request.stream {
            attributes.boolean("gen_ai.request.stream", stream);
        }
        if let Some(answer) = &self.answer {
            if let Some(model) = &answer.model {
                attributes.text("gen_ai.response.model", model);
            }
            if let Some(id) = &answer.id {
                attributes.text("gen_ai.response.id", id);
            }
            if let Some(usage) = &answer.usage {
                attributes.int("gen_ai.usage.input_tokens", usage.input_tokens);
                attributes.int("gen_ai.usage.output_tokens", usage.output_tokens);
                attributes.int(
                    "gen_ai.usage.cache_read.input_tokens",
                    usage.cache_read_input_tokens,
                );
                attributes.int(
                    "gen_ai.usage.cache_creation.input_tokens",
                    usage.cache_creation_input_tokens,
                );
            }
        }
        attributes.text("http.request.method", self.method.as_str());
        attributes.text("url.path", &self.path);
        let relay = &self.relay;
        attributes.int("http.response.status_code", u64::from(relay.status));
        if relay.status >= 500 {
            attributes.text("error.type", &relay.status.to_string());
        }
        attributes.text("relay.route", self.route);
        if let Some(id) = &relay.request_id {
            attributes.text("relay.request_id", id);
        }
        if let Some(client) = &relay.client {
            attributes.text("relay.client", &client.0);
        }
        if let Some(region) = &relay.region {
            attributes.text("relay.region", &region.0);
        }
        if let Some(cache) = relay.cache {
            attributes.text("relay.cache", cache);
        }
        if !relay.outcome.is_empty() {
            attributes.text("relay.outcome", relay.outcome);
        }
        attributes.int("relay.attempts", self.attempts.len() as u64);
        let name = match (self.is_inference(), request_model) {
            (true, Some(model)) => format!("chat {model}"),
            (true, None) => "chat".to_owned(),
            (false, _) => format!("{} {}", self.method, self.route),
        };
        span_json(
            SpanJson {
                trace_id: &self.trace_id,
                span_id: &self.span_id,
                parent: self.parent_span_id.as_ref(),
                name,
                kind: KIND_SERVER,
                start_ns: self.start_ns,
                end_ns: self.end_ns,
                attributes,
                error: relay.status >= 500,
            },
            out,
        );
    }

    fn attempt_span(&self, attempt: &AttemptSpan, out: &mut String) {
        let mut attributes = Attributes::default();
        attributes.text("gen_ai.system", "anthropic");
        attributes.text("gen_ai.provider.name", "anthropic");
        if self.is_inference() {
            attributes.text("gen_ai.operation.name", "chat");
        }
        if let Some(model) = &self.request.model {
            attributes.text("gen_ai.request.model", model);
        }
        attributes.text("http.request.method", self.method.as_str());
        attributes.text("relay.region", &attempt.region.0);
        attributes.int("relay.upstream.key_index", attempt.key_index as u64);
        if let Some(status) = attempt.status {
            attributes.int("http.response.status_code", u64::from(status));
        }
        let error_type = match (attempt.error, attempt.status) {
            (Some(error), _) => Some(error.to_owned()),
            (None, Some(status)) if status >= 400 => Some(status.to_string()),
            _ => None,
        };
        let failed = error_type.is_some();
        if let Some(error) = &error_type {
            attributes.text("error.type", error);
        }
        span_json(
            SpanJson {
                trace_id: &self.trace_id,
                span_id: &attempt.span_id,
                parent: Some(&self.span_id),
                name: format!("upstream {}", attempt.region.0),
                kind: KIND_CLIENT,
                start_ns: attempt.start_ns,
                end_ns: attempt.end_ns,
                attributes,
                error: failed,
            },
            out,
        );
    }
}

/// Span attributes written as OTLP/JSON `KeyValue`s as they are added:
/// a span costs one string, not a tree of JSON values.
#[derive(Default)]
struct Attributes(String);

impl Attributes {
    fn key(&mut self, key: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        // Keys are the constants of this module: nothing to escape.
        let _ = write!(self.0, r#"{{"key":"{key}","value":{{"#);
    }
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        self.0.push_str(r#""stringValue":"#);
        json_string(&mut self.0, value);
        self.0.push_str("}}");
    }
    /// OTLP/JSON writes 64-bit integers as strings.
    fn int(&mut self, key: &str, value: u64) {
        self.key(key);
        let _ = write!(self.0, r#""intValue":"{value}"}}}}"#);
    }
    fn boolean(&mut self, key: &str, value: bool) {
        self.key(key);
        let _ = write!(self.0, r#""boolValue":{value}}}}}"#);
    }
}

struct SpanJson<'a> {
    trace_id: &'a [u8; 16],
    span_id: &'a [u8; 8],
    parent: Option<&'a [u8; 8]>,
    name: String,
    kind: u8,
    start_ns: u64,
    end_ns: u64,
    attributes: Attributes,
    error: bool,
}

/// Appends an OTLP/JSON `Span` to `out`.
fn span_json(span: SpanJson<'_>, out: &mut String) {
    let mut hex = [0u8; 32];
    let mut id = |bytes: &[u8]| -> String {
        let text = &mut hex[..bytes.len() * 2];
        hex::encode_to_slice(bytes, text).expect("twice the length");
        String::from_utf8_lossy(text).into_owned()
    };
    let _ = write!(
        out,
        r#"{{"traceId":"{}","spanId":"{}","#,
        id(span.trace_id),
        id(span.span_id)
    );
    if let Some(parent) = span.parent {
        let _ = write!(out, r#""parentSpanId":"{}","#, id(parent));
    }
    out.push_str(r#""name":"#);
    json_string(out, &span.name);
    let _ = write!(
        out,
        r#","kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":[{}]"#,
        span.kind, span.start_ns, span.end_ns, span.attributes.0
    );
    if span.error {
        let _ = write!(out, r#","status":{{"code":{STATUS_ERROR}}}"#);
    }
    out.push('}');
}

/// `value` as a JSON string.
fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// An OTLP `ExportTraceServiceRequest` in JSON.
fn encode(service_name: &str, traces: &[SpanData]) -> Bytes {
    let mut out = String::with_capacity(512 + traces.len() * 2048);
    let mut resource = Attributes::default();
    resource.text("service.name", service_name);
    resource.text("service.version", env!("CARGO_PKG_VERSION"));
    let _ = write!(
        out,
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{}]}},"scopeSpans":[{{"scope":{{"name":"claude-relay","version":"{}"}},"spans":["#,
        resource.0,
        env!("CARGO_PKG_VERSION")
    );
    let mut first = true;
    for trace in traces {
        for attempt in std::iter::once(None).chain(trace.attempts.iter().map(Some)) {
            if !first {
                out.push(',');
            }
            first = false;
            match attempt {
                None => trace.request_span(&mut out),
                Some(attempt) => trace.attempt_span(attempt, &mut out),
            }
        }
    }
    out.push_str("]}]}]}");
    Bytes::from(out)
}

/// A parsed W3C `traceparent`.
#[derive(Debug, PartialEq, Eq)]
struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
}

/// `version-traceid-spanid-flags`; an invalid one is ignored (the request
/// becomes a root), as the W3C recommendation says.
fn parse_traceparent(value: &HeaderValue) -> Option<TraceParent> {
    let text = value.to_str().ok()?.trim();
    let mut parts = text.split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later one may add more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(version) || !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    let mut flag = [0u8; 1];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(span, &mut span_id).ok()?;
    hex::decode_to_slice(flags, &mut flag).ok()?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flag[0] & 1 == 1,
    })
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = random_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

thread_local! {
    /// A per-thread generator seeded from the OS once: ids need to be
    /// unique, not secret, and a system call per id costs more than a span.
    static RANDOM: Cell<u64> = Cell::new({
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        u64::from_ne_bytes(seed) | 1
    });
}

/// xorshift64*: fast, and good enough for sampling and span ids.
fn random_u64() -> u64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    #[test]
    fn traceparent_is_parsed_and_bad_ones_ignored() {
        let parsed = parse_traceparent(&header(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ))
        .unwrap();
        assert_eq!(
            hex::encode(parsed.trace_id),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(hex::encode(parsed.span_id), "b7ad6b7169203331");
        assert!(parsed.sampled);
        let unsampled = parse_traceparent(&header(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        ))
        .unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd-b7ad6b7169203331-01",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(&header(bad)), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent(&header(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future"
            ))
            .is_some()
        );
    }

    #[test]
    fn exports_are_json_whatever_the_names() {
        let mut data = SpanData {
            trace_id: [7; 16],
            span_id: [8; 8],
            route: "messages",
            path: "/v1/messages".into(),
            ..SpanData::default()
        };
        data.request.model = Some("claude \"x\"\\\n\u{1}é".into());
        data.attempts.push(AttemptSpan {
            span_id: [9; 8],
            start_ns: 1,
            end_ns: 2,
            region: Name::from("eu"),
            key_index: 1,
            status: Some(529),
            error: None,
        });
        let body = encode("relay \"one\"", &[data]);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let spans = &value["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans[0]["name"], "chat claude \"x\"\\\n\u{1}é");
        assert_eq!(spans[0]["traceId"], "07".repeat(16));
        assert_eq!(spans[1]["parentSpanId"], "08".repeat(8));
        assert_eq!(spans[1]["status"]["code"], 2);
        assert_eq!(
            value["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "relay \"one\""
        );
    }

    #[test]
    fn sampling_ratio_bounds() {
        let config = |ratio: f64| TracesConfig {
            endpoint: "http://collector:4318".into(),
            sampling_ratio: ratio,
            headers: Default::default(),
            service_name: "relay".into(),
            export_interval: claude_relay_crds::duration::HumanDuration::from_secs(1),
            max_queue_spans: 10,
        };
        let all = TraceSettings::build(&config(1.0)).unwrap();
        assert!(all.sample_root(u64::MAX));
        assert_eq!(all.endpoint.to_string(), "http://collector:4318/v1/traces");
        let none = TraceSettings::build(&config(0.0)).unwrap();
        assert!(!none.sample_root(0));
        let tenth = TraceSettings::build(&config(0.1)).unwrap();
        let sampled = (0..100_000)
            .filter(|_| tenth.sample_root(random_u64()))
            .count();
        assert!((9_000..11_000).contains(&sampled), "{sampled}");
    }
}
