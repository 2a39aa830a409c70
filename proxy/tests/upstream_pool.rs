//! The relay's own upstream connection pool, seen from outside: connections
//! are reused, one the upstream closed while idle is never used, idle ones
//! close after the region's `pool.idle_timeout`, an HTTP/2 upstream
//! carries concurrent requests on one connection, and the relay's HTTP/1
//! client sends requests whole and decodes chunked answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use claude_relay_testkit::http::{self as th, request, send};
use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::upstream::{MockUpstream, stream_events};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

/// One worker, so that every request draws on the same pool.
fn config(base_url: &str, region_extra: &str, server_extra: &str) -> String {
    format!(
        r#"
server: {{listen: "{{listen}}", admin_listen: "{{admin}}", workers: 1{server_extra}}}
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: local
    base_url: {base_url}
    api_keys: [{{env: TEST_RELAY_KEY}}]{region_extra}
"#
    )
}

fn start(config: &str) -> ProxyProcess {
    ProxyProcess::start(BIN.as_ref(), config, &[("TEST_RELAY_KEY", RELAY_KEY)])
}

fn message(
    proxy: &ProxyProcess,
    extra: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut headers = vec![
        ("x-api-key", RELAY_KEY),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    request(Method::POST, &proxy.url("/v1/messages"), &headers, MESSAGE)
}

async fn open_connections(proxy: &ProxyProcess) -> String {
    let metrics = send(
        &th::client(),
        request(Method::GET, &proxy.admin_url("/metrics"), &[], ""),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    text.lines()
        .find(|l| l.starts_with("claude_relay_upstream_pool_open_connections{upstream=\"local\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("missing")
        .to_string()
}

/// The length of the request (head and the body its Content-Length
/// announces) at the start of `seen`, once all of it is there.
fn request_len(seen: &[u8]) -> Option<usize> {
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (seen.len() >= end + 4 + length).then_some(end + 4 + length)
}

/// An HTTP/1.1 upstream that answers one request per connection with
/// keep-alive, then closes the connection `close_after` later, as servers
/// do with idle keep-alive connections. Counts the connections it accepts.
async fn closing_upstream(close_after: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then the body its Content-Length announces.
                while request_len(&seen).is_none() {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&chunk[..n]);
                }
                let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                tokio::time::sleep(close_after).await;
                // Dropped: closed while the relay holds it idle.
            });
        }
    });
    (url, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    let (url, accepted) = closing_upstream(Duration::from_millis(100)).await;
    let proxy = start(&config(&url, "", ""));
    let client = th::client();
    for round in 0..3 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "round {round}: {:?}", answer.body);
        // The upstream closes its side meanwhile.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert!(
        !proxy.log().contains("upstream attempt failed"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_closed_after_the_idle_timeout() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&config(
        &upstream.base_url(),
        "\n    pool: {idle_timeout: 300ms}",
        "",
    ));
    let client = th::client();
    for _ in 0..5 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(
        open_connections(&proxy).await,
        "1",
        "one connection, reused"
    );
    th::wait_for(
        "the idle upstream connection to close",
        Duration::from_secs(5),
        async || open_connections(&proxy).await == "0",
    )
    .await;
    // A request after that opens a new one and is served.
    assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    assert_eq!(upstream.request_count(), 6);
}

/// The upstream is a relay serving HTTPS, which offers HTTP/2 by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_carries_concurrent_requests_on_one_connection() {
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let https = start(&config(
        &upstream.base_url(),
        "",
        &format!(
            ", tls: {{cert_file: {}, key_file: {}}}",
            cert_file.display(),
            key_file.display()
        ),
    ));
    let https_url = format!("https://localhost:{}", https.api.port());
    let relay = start(&config(
        &https_url,
        &format!("\n    tls: {{ca_file: {}}}", cert_file.display()),
        "",
    ));

    let client = th::client();
    // The first request makes the connection; then streams that take a
    // while, all open at once.
    assert_eq!(send(&client, message(&relay, &[])).await.status, 200);
    let answers = futures_util::future::join_all((0..6).map(|_| {
        send(
            &client,
            message(&relay, &[("x-mock", "stream"), ("x-mock-delay-ms", "40")]),
        )
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{:?}\n{}", answer.body, relay.log());
        assert_eq!(answer.body, stream_events("claude-test").concat());
    }
    assert_eq!(upstream.request_count(), 7);
    assert_eq!(
        open_connections(&relay).await,
        "1",
        "six concurrent requests share one HTTP/2 connection"
    );
}

/// HTTP/1 carries one exchange at a time: while a stream is still coming,
/// its connection is not lent to another request; once the stream is done,
/// it is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_carrying_a_stream_is_not_lent_to_another_request() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&config(&upstream.base_url(), "", ""));
    let client = th::client();
    let streaming = th::send_streaming(
        &client,
        message(&proxy, &[("x-mock", "stream"), ("x-mock-delay-ms", "100")]),
    )
    .await;
    assert_eq!(streaming.status(), 200);
    let mut body = streaming.into_body();
    let mut received = th::next_chunk(&mut body, Duration::from_secs(5))
        .await
        .unwrap()
        .to_vec();
    // Mid-stream, other requests go over another connection and are served.
    for _ in 0..3 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert_eq!(open_connections(&proxy).await, "2");
    while let Some(chunk) = th::next_chunk(&mut body, Duration::from_secs(5)).await {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, stream_events("claude-test").concat().to_vec());
    // Both connections are idle now; the next requests reuse them.
    for _ in 0..3 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(open_connections(&proxy).await, "2");
    assert_eq!(upstream.request_count(), 7);
}

/// An HTTP/1.1 upstream that keeps its connections open and answers every
/// request with `answer`, written in small pieces. Records each request as
/// it arrived (head and body) and counts the connections.
async fn recording_upstream(
    answer: &'static [u8],
) -> (
    String,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (counter, record) = (accepted.clone(), received.clone());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let record = record.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let request_len = loop {
                        if let Some(len) = request_len(&seen) {
                            break len;
                        }
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&chunk[..n]);
                    };
                    record
                        .lock()
                        .unwrap()
                        .push(seen.drain(..request_len).collect());
                    for piece in answer.chunks(7) {
                        stream.write_all(piece).await.unwrap();
                        stream.flush().await.unwrap();
                    }
                }
            });
        }
    });
    (url, accepted, received)
}

/// The relay's own HTTP/1 client, seen from both ends: a large request
/// body reaches the upstream byte for byte with its length, an interim
/// 100 Continue is not relayed, a chunked answer (odd chunk sizes, a chunk
/// extension, a trailer) reaches the client decoded and whole, and the
/// connection is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upstream_gets_the_request_whole_and_its_chunked_answer_is_relayed() {
    const ANSWER: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_raw\r\n\
        transfer-encoding: chunked\r\n\r\n\
        b;ext=1\r\n{\"id\":\"msg_\r\n1e\r\nraw\",\"type\":\"message\",\"usage\":\r\n\
        20\r\n{\"input_tokens\":3,\"output_t\":4}}\r\n0\r\nx-trailer: dropped\r\n\r\n";
    let (url, accepted, received) = recording_upstream(ANSWER).await;
    let proxy = start(&config(&url, "", ""));
    let client = th::client();
    // Over 16 KB: written apart from the head.
    let big = format!(
        r#"{{"model":"claude-test","max_tokens":8,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100_000)
    );
    for body in [MESSAGE.to_string(), big] {
        let answer = send(
            &client,
            request(
                Method::POST,
                &proxy.url("/v1/messages?beta=true"),
                &[
                    ("x-api-key", RELAY_KEY),
                    ("content-type", "application/json"),
                    ("anthropic-version", "2023-06-01"),
                ],
                body.clone(),
            ),
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(
            &answer.body[..],
            br#"{"id":"msg_raw","type":"message","usage":{"input_tokens":3,"output_t":4}}"#
        );
        assert_eq!(answer.headers["request-id"], "req_raw");
        let sent = received.lock().unwrap().pop().unwrap();
        let split = sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&sent[..split]).to_string();
        assert!(
            head.starts_with("POST /v1/messages?beta=true HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("\r\nanthropic-version: 2023-06-01"), "{head}");
        assert_eq!(&sent[split + 4..], body.as_bytes());
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the connection is reused"
    );
}

/// Header names that become framing, hop-by-hop or credential headers when
/// `_` is read as `-` (as CGI and some gateways do) never reach the
/// upstream: it would see another body boundary, or another key. Other
/// names with `_` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_look_alikes_of_framing_headers_are_not_forwarded() {
    const ANSWER: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let (url, _, received) = recording_upstream(ANSWER).await;
    let proxy = start(&config(&url, "", ""));
    let answer = send(
        &th::client(),
        message(
            &proxy,
            &[
                ("Content_Length", "5"),
                ("Transfer_Encoding", "chunked"),
                ("X_Api_Key", "sk-ant-client-own"),
                ("Proxy_Authorization", "Basic eDp5"),
                ("X_Request_Tag", "kept"),
            ],
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let sent = received.lock().unwrap().pop().unwrap();
    let split = sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&sent[..split]).to_ascii_lowercase();
    for gone in [
        "content_length",
        "transfer_encoding",
        "x_api_key",
        "proxy_authorization",
    ] {
        assert!(!head.contains(gone), "{gone} reached the upstream:\n{head}");
    }
    assert!(head.contains("\r\nx_request_tag: kept"), "{head}");
    assert!(
        head.contains(&format!("\r\ncontent-length: {}", MESSAGE.len())),
        "{head}"
    );
    assert_eq!(&sent[split + 4..], MESSAGE.as_bytes());
}
