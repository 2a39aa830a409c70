//! An OpenTelemetry collector double: an OTLP/HTTP receiver of JSON trace
//! exports (`POST /v1/traces`) that keeps every request as received and
//! reads the spans out of them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::http::serve_http;

/// One export request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Export {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A span read out of an export, its attributes flattened to JSON values
/// (an OTLP `intValue`, a string in JSON, becomes a number).
#[derive(Clone, Debug)]
pub struct Span {
    pub service_name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    /// 2 server, 3 client.
    pub kind: u64,
    /// 0 unset, 2 error.
    pub status_code: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: serde_json::Map<String, Value>,
}

impl Span {
    pub fn text(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.attributes.get(key).and_then(Value::as_i64)
    }
}

#[derive(Default)]
struct State {
    exports: Mutex<Vec<Export>>,
    /// Answer 503 to every export.
    failing: AtomicBool,
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let receiving = state.clone();
        let task = tokio::spawn(serve_http(listener, move |request, _| {
            let state = receiving.clone();
            async move { receive(&state, request).await }
        }));
        Self { addr, state, task }
    }

    /// The base URL to give as the exporter's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers every export 503 (`true`) or 200.
    pub fn fail(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn exports(&self) -> Vec<Export> {
        self.state.exports.lock().unwrap().clone()
    }

    /// Every span received so far, in order.
    pub fn spans(&self) -> Vec<Span> {
        self.exports()
            .iter()
            .flat_map(|export| parse_spans(&export.body))
            .collect()
    }

    /// Waits until at least `count` spans arrived (or `within` passed) and
    /// returns those received.
    pub async fn wait_for_spans(&self, count: usize, within: Duration) -> Vec<Span> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if spans.len() >= count || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The spans of an OTLP/JSON `ExportTraceServiceRequest`.
pub fn parse_spans(body: &[u8]) -> Vec<Span> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service_name = flatten(&resource["resource"]["attributes"])
            .get("service.name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                let nanos = |key: &str| {
                    span[key]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .or_else(|| span[key].as_u64())
                        .unwrap_or_default()
                };
                out.push(Span {
                    service_name: service_name.clone(),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: span["parentSpanId"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                    name: text("name"),
                    kind: span["kind"].as_u64().unwrap_or_default(),
                    status_code: span["status"]["code"].as_u64().unwrap_or_default(),
                    start_ns: nanos("startTimeUnixNano"),
                    end_ns: nanos("endTimeUnixNano"),
                    attributes: flatten(&span["attributes"]),
                });
            }
        }
    }
    out
}

/// OTLP `KeyValue`s as a map of plain JSON values.
fn flatten(attributes: &Value) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for attribute in attributes.as_array().into_iter().flatten() {
        let Some(key) = attribute["key"].as_str() else {
            continue;
        };
        let value = &attribute["value"];
        let flat = if let Some(s) = value.get("stringValue") {
            s.clone()
        } else if let Some(i) = value.get("intValue") {
            match i {
                Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or(Value::Null),
                other => other.clone(),
            }
        } else if let Some(b) = value.get("boolValue") {
            b.clone()
        } else if let Some(d) = value.get("doubleValue") {
            d.clone()
        } else {
            value.clone()
        };
        map.insert(key.to_owned(), flat);
    }
    map
}

async fn receive(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state.exports.lock().unwrap().push(Export {
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
    });
    let status = if state.failing.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}
