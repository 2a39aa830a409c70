//! A double of the Claude Messages API, served over real HTTP on a free
//! loopback port. It records every request it receives and answers by the
//! `x-mock` request header (which the relay passes through like any header):
//!
//! | `x-mock` | answer |
//! |---|---|
//! | (none), `json` | 200, a ~1 KB Messages response, `request-id` and `anthropic-ratelimit-*` headers; after `x-mock-delay-ms` (generation time) |
//! | `stream` | 200 SSE: message_start, ping, content blocks, message_delta, message_stop; `x-mock-delay-ms` between events |
//! | `stream-gated` | like `stream`, but waits after message_start until [`MockUpstream::open_gate`] |
//! | `stream-error` | 200 SSE, then an `error` event (overloaded_error) after message_start |
//! | `stream-endless` | an event every `x-mock-delay-ms` (default 50) until the client goes away |
//! | `stream-stall` | 200 SSE, message_start, then silence |
//! | `stream-unknown-event` | a stream with an event type the relay cannot know |
//! | `stream-cut` | message_start, two text deltas, then the connection breaks (no message_delta) |
//! | `status-429` | 429 rate_limit_error, `retry-after: 7` |
//! | `status-529` | 529 overloaded_error |
//! | `status-500` | 500 api_error |
//! | `status-NNN:VALUE` | as `status-NNN`, with `retry-after: VALUE` (seconds or an HTTP-date) |
//! | `status-401` | 401 authentication_error (a bad upstream key) |
//! | `stall` | never answers |
//!
//! Compression as the Claude API does it: a request whose `Accept-Encoding`
//! lists gzip, deflate, br or zstd gets its answer in one of them (the
//! highest q-value; gzip first among equals), JSON answers encoded whole,
//! event streams encoded live and flushed after every event. Without
//! `Accept-Encoding`, identity. [`MockUpstream::force_encoding`] or the
//! `x-mock-encoding` request header (`gzip`, `deflate`, `deflate-raw`,
//! `br`, `zstd`, `identity`, or any other name, sent as is over an
//! uncompressed body) override the choice. [`MockUpstream::bodies_sent`]
//! has every answer's body as sent. `x-mock-pad: N` adds N bytes of `x`
//! to a JSON answer's text (a compression bomb when compressed).
//!
//! `x-mock-usage: INPUT,OUTPUT,CACHE_CREATION,CACHE_READ[,CACHE_1H]` sets
//! the usage a Messages answer reports (JSON `usage`; in a stream,
//! `message_start` has all but OUTPUT, which it reports as 1, and
//! `message_delta` reports OUTPUT). Like the API, `usage.cache_creation`
//! splits the cache writes by lifetime: CACHE_1H of them (default 0) as
//! `ephemeral_1h_input_tokens`, the rest as `ephemeral_5m_input_tokens`.
//! [`MockUpstream::messages_answered`] counts `/v1/messages` calls.
//!
//! Paths: `/v1/messages`, `/v1/messages/count_tokens`, `/v1/models`; any
//! other path answers 404 not_found_error, as the API does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use crate::compress;
use crate::http::serve_http;

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Who connected: the relay, or the egress proxy it tunnelled through.
    pub peer: SocketAddr,
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct State {
    /// Answers every request in this mode, whatever its `x-mock` header.
    forced: Mutex<Option<String>>,
    /// Answers requests made with this upstream key in this mode.
    forced_by_key: Mutex<std::collections::HashMap<String, String>>,
    /// Encodes every answer so, whatever the request accepts.
    forced_encoding: Mutex<Option<String>>,
    /// Answer bodies as sent (a stream's once it ends), in order.
    sent: Mutex<Vec<Bytes>>,
    requests: Mutex<Vec<Recorded>>,
    streams_cancelled: AtomicUsize,
    streams_finished: AtomicUsize,
    gate: Notify,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind mock upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let task = tokio::spawn(serve(listener, state.clone()));
        Self { addr, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// `/v1/messages` requests received.
    pub fn messages_answered(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                r.path_and_query.starts_with("/v1/messages")
                    && !r.path_and_query.starts_with("/v1/messages/")
            })
            .count()
    }

    /// Streams whose client went away before the stream ended.
    pub fn streams_cancelled(&self) -> usize {
        self.state.streams_cancelled.load(Ordering::SeqCst)
    }

    pub fn streams_finished(&self) -> usize {
        self.state.streams_finished.load(Ordering::SeqCst)
    }

    /// Answers every request in `mode` (an `x-mock` value), or by header again with `None`.
    pub fn force(&self, mode: Option<&str>) {
        *self.state.forced.lock().unwrap() = mode.map(String::from);
    }

    /// Answers requests that carry upstream key `key` in `mode`; e.g.
    /// `status-429:1` is a 429 with `retry-after: 1`.
    pub fn force_for_key(&self, key: &str, mode: Option<&str>) {
        let mut map = self.state.forced_by_key.lock().unwrap();
        match mode {
            Some(mode) => map.insert(key.to_string(), mode.to_string()),
            None => map.remove(key),
        };
    }

    /// Requests seen with upstream key `key`.
    pub fn requests_with_key(&self, key: &str) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.headers.get("x-api-key").is_some_and(|v| v == key))
            .count()
    }

    /// Encodes every answer in `coding` (see the module doc), whatever the
    /// request's `Accept-Encoding`; `None` to negotiate again.
    pub fn force_encoding(&self, coding: Option<&str>) {
        *self.state.forced_encoding.lock().unwrap() = coding.map(String::from);
    }

    /// Every answer's body as it went on the wire (compressed if it was),
    /// a stream's once it has ended.
    pub fn bodies_sent(&self) -> Vec<Bytes> {
        self.state.sent.lock().unwrap().clone()
    }

    /// Lets one `stream-gated` response go on.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }
}

/// Serves until the task is aborted; usable from a binary as well.
pub async fn serve_forever(listener: TcpListener) {
    serve(listener, Arc::new(State::default())).await;
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    serve_http(listener, move |request, peer| {
        answer(state.clone(), request, peer)
    })
    .await;
}

type MockResponse = Response<MockBody>;

async fn answer(state: Arc<State>, request: Request<Incoming>, peer: SocketAddr) -> MockResponse {
    let coding = {
        let forced = state.forced_encoding.lock().unwrap().clone();
        let header = |name| {
            request
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        forced
            .or_else(|| header("x-mock-encoding"))
            .or_else(|| {
                header("accept-encoding")
                    .and_then(|accepted| compress::negotiate(&accepted).map(str::to_owned))
            })
            .filter(|coding| coding != "identity")
    };
    let response = respond(state.clone(), request, peer, coding.clone()).await;
    finish_answer(&state, response, coding.as_deref())
}

/// Encodes a whole answer in `coding` and keeps its bytes as sent (a
/// stream encodes and keeps its own as it goes).
fn finish_answer(state: &State, mut response: MockResponse, coding: Option<&str>) -> MockResponse {
    let Some(whole) = response.body_mut().full.take() else {
        return response;
    };
    let whole = match coding {
        Some(coding) => {
            let (label, whole) = match compress::StreamEncoder::new(coding) {
                Some(_) => (compress::label(coding), compress::encode(coding, &whole)),
                // A coding the double cannot apply is named over plain bytes.
                None => (coding, whole),
            };
            if let Ok(value) = HeaderValue::from_str(label) {
                response.headers_mut().insert("content-encoding", value);
            }
            response
                .headers_mut()
                .insert("vary", HeaderValue::from_static("accept-encoding"));
            whole
        }
        None => whole,
    };
    state.sent.lock().unwrap().push(whole.clone());
    *response.body_mut() = MockBody::full(whole);
    response
}

async fn respond(
    state: Arc<State>,
    request: Request<Incoming>,
    peer: SocketAddr,
    coding: Option<String>,
) -> MockResponse {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |pq| pq.to_string());
    state.requests.lock().unwrap().push(Recorded {
        peer,
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let by_key = parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|key| state.forced_by_key.lock().unwrap().get(key).cloned());
    let forced = state.forced.lock().unwrap().clone();
    let mode = by_key.or(forced).unwrap_or_else(|| {
        parts
            .headers
            .get("x-mock")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("json")
            .to_string()
    });
    // `status-429:N`: a 429 with `retry-after: N` (an HTTP-date has colons
    // of its own: only the first one splits).
    let (mode, asked_retry_after) = match mode.split_once(':') {
        Some((mode, value)) => (mode.to_string(), Some(value.to_string())),
        None => (mode, None),
    };
    let retry_after_header =
        |value: &str| HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("7"));
    let delay = Duration::from_millis(
        parts
            .headers
            .get("x-mock-delay-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let usage = parts
        .headers
        .get("x-mock-usage")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_usage)
        .map_or((None, 0), |(usage, one_hour)| (Some(usage), one_hour));
    let (usage, one_hour) = usage;
    let pad = parts
        .headers
        .get("x-mock-pad")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let path = parts.uri.path();
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(String::from))
        .unwrap_or_else(|| "claude-test".to_string());

    match path {
        "/v1/models" => return json(StatusCode::OK, models_list()),
        "/v1/messages/count_tokens" => {
            return json(StatusCode::OK, r#"{"input_tokens":42}"#.to_string());
        }
        "/v1/messages" => {}
        p if p.starts_with("/v1/messages/batches") => {
            return json(
                StatusCode::OK,
                format!(r#"{{"id":"msgbatch_test","type":"message_batch","path":"{p}"}}"#),
            );
        }
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                error_body("not_found_error", "Not found"),
            );
        }
    }

    match mode.as_str() {
        "status-429" => {
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                error_body(
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit",
                ),
            );
            r.headers_mut().insert(
                "retry-after",
                retry_after_header(asked_retry_after.as_deref().unwrap_or("7")),
            );
            r
        }
        "status-529" | "status-500" => {
            let mut r = if mode == "status-529" {
                json(
                    StatusCode::from_u16(529).unwrap(),
                    error_body("overloaded_error", "Overloaded"),
                )
            } else {
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    error_body("api_error", "Internal server error"),
                )
            };
            if let Some(value) = &asked_retry_after {
                r.headers_mut()
                    .insert("retry-after", retry_after_header(value));
            }
            r
        }
        "status-401" => json(
            StatusCode::UNAUTHORIZED,
            error_body("authentication_error", "invalid x-api-key"),
        ),
        "stall" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json(StatusCode::OK, message_json(&model))
        }
        m if m.starts_with("stream") => stream(
            state,
            m.to_string(),
            model,
            delay,
            usage.unwrap_or(DEFAULT_STREAM_USAGE),
            one_hour,
            coding,
        ),
        _ => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            json(
                StatusCode::OK,
                message_body(&model, usage.unwrap_or(DEFAULT_USAGE), one_hour, pad),
            )
        }
    }
}

fn with_api_headers(response: &mut MockResponse) {
    let h = response.headers_mut();
    h.insert(
        "request-id",
        HeaderValue::from_static("req_mock_0123456789"),
    );
    h.insert(
        "anthropic-ratelimit-requests-limit",
        HeaderValue::from_static("4000"),
    );
    h.insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from_static("3999"),
    );
    h.insert(
        "anthropic-ratelimit-requests-reset",
        HeaderValue::from_static("2026-11-26T00:00:01Z"),
    );
}

fn json(status: StatusCode, body: String) -> MockResponse {
    let mut response = Response::new(MockBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    with_api_headers(&mut response);
    response
}

pub fn error_body(kind: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
}

/// Usage a Messages answer reports unless `x-mock-usage` says otherwise:
/// input, output, cache creation, cache read.
pub const DEFAULT_USAGE: [u64; 4] = [25, 180, 0, 0];
/// What a default stream reports: message_start's input and message_delta's output.
pub const DEFAULT_STREAM_USAGE: [u64; 4] = [25, 15, 0, 0];

/// The four counts of `x-mock-usage`, and how many cache writes were for 1 hour.
fn parse_usage(text: &str) -> Option<([u64; 4], u64)> {
    let numbers: Vec<u64> = text
        .split(',')
        .map(|n| n.trim().parse().ok())
        .collect::<Option<_>>()?;
    match numbers[..] {
        [i, o, c, r] => Some(([i, o, c, r], 0)),
        [i, o, c, r, h] if h <= c => Some(([i, o, c, r], h)),
        _ => None,
    }
}

/// `usage.cache_creation` as the API writes it: `cache_creation` cache
/// writes, `one_hour` of them for an hour.
fn cache_creation(cache_creation: u64, one_hour: u64) -> serde_json::Value {
    serde_json::json!({
        "ephemeral_5m_input_tokens": cache_creation - one_hour.min(cache_creation),
        "ephemeral_1h_input_tokens": one_hour.min(cache_creation),
    })
}

/// A Messages API response of about 1 KB.
pub fn message_json(model: &str) -> String {
    message_json_with(model, DEFAULT_USAGE)
}

/// A Messages API response of about 1 KB reporting `usage`.
pub fn message_json_with(model: &str, usage: [u64; 4]) -> String {
    padded_message_json(model, usage, 0)
}

/// A Messages API response reporting `usage`, its text `pad` bytes longer.
pub fn padded_message_json(model: &str, usage: [u64; 4], pad: usize) -> String {
    message_body(model, usage, 0, pad)
}

/// A Messages API response reporting `usage` with `one_hour` of its cache
/// writes for an hour, its text `pad` bytes longer.
pub fn message_body(model: &str, usage: [u64; 4], one_hour: u64, pad: usize) -> String {
    let mut text = "The relay passes every byte through unchanged. ".repeat(16);
    text.extend(std::iter::repeat_n('x', pad));
    serde_json::json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text.trim_end()}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": usage[0],
            "output_tokens": usage[1],
            "cache_creation_input_tokens": usage[2],
            "cache_read_input_tokens": usage[3],
            "cache_creation": cache_creation(usage[2], one_hour),
            "service_tier": "standard"
        }
    })
    .to_string()
}

fn models_list() -> String {
    serde_json::json!({
        "data": [{"type": "model", "id": "claude-test", "display_name": "Claude Test", "created_at": "2026-01-01T00:00:00Z"}],
        "has_more": false, "first_id": "claude-test", "last_id": "claude-test"
    })
    .to_string()
}

fn event(name: &str, data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The events of a short streamed message.
pub fn stream_events(model: &str) -> Vec<Bytes> {
    stream_events_with(model, DEFAULT_STREAM_USAGE)
}

/// The events of a short streamed message reporting `usage`.
pub fn stream_events_with(model: &str, usage: [u64; 4]) -> Vec<Bytes> {
    stream_events_split(model, usage, 0)
}

/// The events of a short streamed message reporting `usage`, `one_hour`
/// of its cache writes for an hour.
pub fn stream_events_split(model: &str, usage: [u64; 4], one_hour: u64) -> Vec<Bytes> {
    use serde_json::json;
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_stream_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": usage[0], "output_tokens": 1, "cache_creation_input_tokens": usage[2], "cache_read_input_tokens": usage[3], "cache_creation": cache_creation(usage[2], one_hour), "service_tier": "standard"}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for word in ["Hello", ", ", "relayed", " world", "!"] {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": usage[1]}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    events
}

fn stream(
    state: Arc<State>,
    mode: String,
    model: String,
    delay: Duration,
    usage: [u64; 4],
    one_hour: u64,
    coding: Option<String>,
) -> MockResponse {
    let (tx, rx) = mpsc::channel::<Chunk>(4);
    let mut response = Response::new(MockBody::channel(rx));
    let encoder = coding.as_deref().and_then(compress::StreamEncoder::new);
    if let Some(coding) = &coding {
        let label = if encoder.is_some() {
            compress::label(coding)
        } else {
            coding
        };
        if let Ok(value) = HeaderValue::from_str(label) {
            response.headers_mut().insert("content-encoding", value);
        }
    }
    let mut tx = Out {
        tx,
        encoder,
        sent: Vec::new(),
    };
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    with_api_headers(&mut response);

    tokio::spawn(async move {
        let tx = &mut tx;
        let events = stream_events_split(&model, usage, one_hour);
        let completed = match mode.as_str() {
            "stream-cut" => {
                // The connection breaks: the body ends with an error, so
                // hyper drops it without the final chunk.
                if send_all(tx, events[..4].iter().cloned(), delay).await {
                    let _ = tx.tx.send(Err(BrokenOff)).await;
                }
                false
            }
            "stream-error" => {
                send_all(tx, [
                    events[0].clone(),
                    event("error", serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
                ], delay)
                .await
            }
            "stream-endless" => {
                let delay = if delay.is_zero() { Duration::from_millis(50) } else { delay };
                let mut ok = send(tx, events[0].clone(), Duration::ZERO).await;
                while ok {
                    ok = send(tx, event("ping", serde_json::json!({"type": "ping"})), delay).await;
                }
                false
            }
            "stream-stall" => {
                if send(tx, events[0].clone(), Duration::ZERO).await {
                    tx.tx.closed().await;
                }
                false
            }
            "stream-gated" => {
                send(tx, events[0].clone(), Duration::ZERO).await && {
                    tokio::select! {
                        () = state.gate.notified() => send_all(tx, events[1..].iter().cloned(), delay).await,
                        () = tx.tx.closed() => false,
                    }
                }
            }
            "stream-unknown-event" => {
                let mut with_unknown = events.clone();
                with_unknown.insert(
                    2,
                    event("future_event_type", serde_json::json!({"type": "future_event_type", "x": [1, 2]})),
                );
                send_all(tx, with_unknown, delay).await
            }
            _ => send_all(tx, events, delay).await,
        };
        if completed {
            // The end of the compressed stream (gzip's trailer, say).
            if let Some(encoder) = tx.encoder.take() {
                let trailer = encoder.finish();
                tx.sent.extend_from_slice(&trailer);
                let _ = tx.tx.send(Ok(trailer)).await;
            }
        }
        state
            .sent
            .lock()
            .unwrap()
            .push(Bytes::from(std::mem::take(&mut tx.sent)));
        if completed {
            state.streams_finished.fetch_add(1, Ordering::SeqCst);
        } else {
            state.streams_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    });
    response
}

/// A chunk of a streamed body, or the break of the connection.
type Chunk = Result<Bytes, BrokenOff>;

/// What ends a `stream-cut` body.
#[derive(Debug)]
pub struct BrokenOff;

impl std::fmt::Display for BrokenOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the mock upstream broke the stream off")
    }
}

impl std::error::Error for BrokenOff {}

/// Where a stream's events go: encoded and flushed one by one when the
/// answer is compressed, and kept as sent.
struct Out {
    tx: mpsc::Sender<Chunk>,
    encoder: Option<compress::StreamEncoder>,
    sent: Vec<u8>,
}

/// Sends after `delay`; false when the client has gone away.
async fn send(out: &mut Out, bytes: Bytes, delay: Duration) -> bool {
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = out.tx.closed() => return false,
        }
    }
    let bytes = match &mut out.encoder {
        Some(encoder) => encoder.chunk(&bytes),
        None => bytes,
    };
    out.sent.extend_from_slice(&bytes);
    out.tx.send(Ok(bytes)).await.is_ok()
}

async fn send_all(tx: &mut Out, events: impl IntoIterator<Item = Bytes>, delay: Duration) -> bool {
    for (i, e) in events.into_iter().enumerate() {
        let wait = if i == 0 { Duration::ZERO } else { delay };
        if !send(tx, e, wait).await {
            return false;
        }
    }
    true
}

/// A whole body, or chunks as a task sends them.
pub struct MockBody {
    full: Option<Bytes>,
    rx: Option<mpsc::Receiver<Chunk>>,
}

impl MockBody {
    fn full(bytes: Bytes) -> Self {
        Self {
            full: Some(bytes),
            rx: None,
        }
    }
    fn channel(rx: mpsc::Receiver<Chunk>) -> Self {
        Self {
            full: None,
            rx: Some(rx),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BrokenOff;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BrokenOff>>> {
        if let Some(bytes) = self.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        match &mut self.rx {
            Some(rx) => rx.poll_recv(cx).map(|b| b.map(|b| b.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.full, &self.rx) {
            (Some(b), _) => http_body::SizeHint::with_exact(b.len() as u64),
            (None, None) => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}
