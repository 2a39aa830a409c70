//! Helpers shared by the usage, quota and cache tests: one upstream double,
//! one Redis, and proxy replicas started on a config with two clients.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::time::{Duration, Instant};

use claude_relay_testkit::http::{self as th, Answer, TestClient, request, send};
use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::redis::RedisServer;
use claude_relay_testkit::upstream::MockUpstream;
use http::Method;

pub const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
pub const APP_KEY: &str = "relay-key-app";
pub const OTHER_KEY: &str = "relay-key-other";
pub const BODY: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;
pub const STREAM_BODY: &str = r#"{"model":"claude-test","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

/// The relay key of [`one_client_relay`]'s client, and its region's upstream key.
pub const ONE_CLIENT_KEY: &str = "relay-key-for-tests";

/// A relay run by `binary` with one client, `app`, and one region, `local`,
/// at `upstream_url`, with `server` settings besides its addresses: for
/// tests of the server itself, which speak raw HTTP.
pub fn one_client_relay(
    binary: &std::path::Path,
    upstream_url: &str,
    server: &str,
) -> ProxyProcess {
    let server = if server.is_empty() {
        String::new()
    } else {
        format!(", {server}")
    };
    let config = format!(
        r#"
server: {{listen: "{{listen}}", admin_listen: "{{admin}}"{server}}}
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: local
    base_url: {upstream_url}
    api_keys: [{{env: TEST_RELAY_KEY}}]
"#
    );
    ProxyProcess::start(binary, &config, &[("TEST_RELAY_KEY", ONE_CLIENT_KEY)])
}

/// Reads one response's head and its `content-length` body off a raw
/// connection, within `within` (`None` past it).
pub async fn read_response(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return Some(text);
            }
        }
        match tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(stream, &mut chunk))
            .await
        {
            Err(_) => return None,
            Ok(read) => {
                let n = read.unwrap();
                assert!(n > 0, "closed: {text}");
                got.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

pub struct Setup {
    pub upstream: MockUpstream,
    pub redis: Option<RedisServer>,
    pub client: TestClient,
}

impl Setup {
    pub async fn with_redis() -> Self {
        Self {
            upstream: MockUpstream::start().await,
            redis: Some(RedisServer::start().unwrap()),
            client: th::client(),
        }
    }

    pub async fn standalone() -> Self {
        Self {
            upstream: MockUpstream::start().await,
            redis: None,
            client: th::client(),
        }
    }

    /// A config with clients `app` and `other`; `app_extra` and
    /// `other_extra` are more lines of each client (indented by 4),
    /// `extra` more top-level sections.
    pub fn config(&self, app_extra: &str, other_extra: &str, extra: &str) -> String {
        let store = match &self.redis {
            Some(redis) => format!(
                "store:\n  redis: {{url: \"{}\", command_timeout: 200ms}}\n",
                redis.url()
            ),
            None => String::new(),
        };
        format!(
            r#"
relay_name: usage-test
server: {{listen: "{{listen}}", admin_listen: "{{admin}}", reload_interval: 50ms}}
{store}clients:
  - id: app
    relay_keys: [{{env: TEST_APP_KEY}}]
{app_extra}
  - id: other
    relay_keys: [{{env: TEST_OTHER_KEY}}]
{other_extra}
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{env: TEST_UPSTREAM_KEY}}]
{extra}
"#,
            upstream = self.upstream.base_url(),
        )
    }

    pub fn proxy(&self, config: &str) -> ProxyProcess {
        ProxyProcess::start(
            BIN.as_ref(),
            config,
            &[
                ("TEST_APP_KEY", APP_KEY),
                ("TEST_OTHER_KEY", OTHER_KEY),
                ("TEST_UPSTREAM_KEY", "sk-ant-up"),
            ],
        )
    }

    /// `POST /v1/messages` with `key`, `body` and more headers.
    pub async fn messages(
        &self,
        proxy: &ProxyProcess,
        key: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        send(&self.client, messages_request(proxy, key, body, headers)).await
    }

    /// A bodiless request to `path` (with its query) on the admin port.
    pub async fn admin(&self, proxy: &ProxyProcess, method: Method, path: &str) -> Answer {
        send(
            &self.client,
            request(method, &proxy.admin_url(path), &[], ""),
        )
        .await
    }

    /// `GET /usage?{query}` on the admin port.
    pub async fn usage(&self, proxy: &ProxyProcess, query: &str) -> serde_json::Value {
        let answer = self
            .admin(proxy, Method::GET, &format!("/usage?{query}"))
            .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        answer.json()
    }

    /// The usage totals of `client` today.
    pub async fn totals(&self, proxy: &ProxyProcess, client: &str) -> serde_json::Value {
        let usage = self.usage(proxy, &format!("client={client}")).await;
        usage["clients"][0]["total"].clone()
    }
}

/// `POST /v1/messages` to `proxy` with `key`, `body` and more headers.
pub fn messages_request(
    proxy: &ProxyProcess,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut all = vec![
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    all.extend_from_slice(headers);
    request(
        Method::POST,
        &proxy.url("/v1/messages"),
        &all,
        body.to_string(),
    )
}

/// The codings the upstream double answers in, `identity` first.
pub const ENCODINGS: [&str; 6] = ["identity", "gzip", "deflate", "deflate-raw", "br", "zstd"];

/// Request headers that get an answer in `coding` from the upstream double,
/// the way a client asks: `Accept-Encoding` (raw deflate, which servers
/// label `deflate`, has to be forced).
pub fn asking_for(coding: &'static str) -> Vec<(&'static str, &'static str)> {
    match coding {
        "identity" => Vec::new(),
        "deflate-raw" => vec![
            ("accept-encoding", "deflate"),
            ("x-mock-encoding", "deflate-raw"),
        ],
        _ => vec![("accept-encoding", coding)],
    }
}

/// A body as the client reads it, decoded (what an SDK sees).
pub fn decoded(coding: &str, answer: &Answer) -> String {
    if coding == "identity" {
        assert!(!answer.headers.contains_key("content-encoding"));
        return String::from_utf8_lossy(&answer.body).into_owned();
    }
    assert_eq!(
        answer.headers["content-encoding"],
        claude_relay_testkit::compress::label(coding),
        "the upstream's content-encoding reaches the client"
    );
    String::from_utf8(claude_relay_testkit::compress::decode(coding, &answer.body)).unwrap()
}

/// Reads a response whole, or up to where it broke off: the bytes and
/// whether it broke off.
pub async fn read_all(response: http::Response<hyper::body::Incoming>) -> (Answer, bool) {
    use http_body_util::BodyExt;
    let (parts, mut body) = response.into_parts();
    let mut all = Vec::new();
    let mut broke = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    all.extend_from_slice(&data);
                }
            }
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    let answer = Answer {
        status: parts.status,
        headers: parts.headers,
        body: all.into(),
    };
    (answer, broke)
}

/// Waits until the upstream double has sent `body` as one answer's body:
/// the client got the upstream's bytes unchanged.
pub async fn sent_unchanged(setup: &Setup, body: &[u8]) {
    eventually(
        Duration::from_secs(5),
        "the client's bytes are the upstream's",
        || async {
            setup
                .upstream
                .bodies_sent()
                .iter()
                .any(|sent| sent.as_ref() == body)
                .then_some(())
        },
    )
    .await;
}

/// Polls `check` every 20 ms until it gives `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `client`'s usage shows `requests` settled requests.
pub async fn settled(setup: &Setup, proxy: &ProxyProcess, client: &str, requests: u64) {
    // Generous: after a Redis restart the store reconnects with backoff.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = setup
            .admin(proxy, Method::GET, &format!("/usage?client={client}"))
            .await;
        // 503 while the store reconnects.
        let totals = match answer.status.as_u16() {
            200 => answer.json()["clients"][0]["total"].clone(),
            503 => serde_json::Value::Null,
            other => panic!("/usage answered {other}: {:?}", answer.body),
        };
        if totals["requests"] == requests {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{client}: not {requests} requests settled: {totals}\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks a relay-made 429 in the Claude API envelope.
pub fn assert_rate_limited(answer: &Answer, says: &str) -> u64 {
    assert_eq!(answer.status, 429, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{says:?} not in {message:?}");
    answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// If the current minute is nearly over, waits for the next one, so that a
/// test of a per-minute budget is not split by a minute boundary.
pub async fn not_near_a_minute_boundary(seconds_needed: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into_minute = now.as_secs() % 60;
    if into_minute + seconds_needed >= 60 {
        tokio::time::sleep(Duration::from_secs(60 - into_minute) + Duration::from_millis(200))
            .await;
    }
}

/// A relay named `name` with one client, `app` (its relay key from the
/// environment variable `TEST_RELAY_KEY`), `server` settings besides its
/// addresses (`, workers: 1`, say), the items of `regions` (see
/// [`region_entry`]) and `extra` top-level settings after them.
pub fn relay_config(name: &str, server: &str, regions: &str, extra: &str) -> String {
    format!(
        r#"
relay_name: {name}
server: {{listen: "{{listen}}", admin_listen: "{{admin}}"{server}}}
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
{regions}{extra}"#
    )
}

/// One item of a config's `regions`: its upstream keys from the environment
/// variables `keys`, its `timeouts` (the fields of the map) and `more`
/// fields after them (`, egress_proxy: ...`).
pub fn region_entry(
    name: &str,
    url: &str,
    priority: i32,
    keys: &[&str],
    timeouts: &str,
    more: &str,
) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("{{env: {k}}}")).collect();
    format!(
        "  - {{name: {name}, base_url: '{url}', priority: {priority}, api_keys: [{}], timeouts: {{{timeouts}}}{more}}}\n",
        keys.join(", ")
    )
}
