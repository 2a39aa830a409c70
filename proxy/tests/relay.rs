//! The relay driven as a client drives it: the real binary, real HTTP, and
//! an upstream that speaks the Claude Messages API.

use std::time::Duration;

use bytes::Bytes;
use claude_relay_testkit::http::{self as th, Answer, next_chunk, request, send, send_streaming};
use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::upstream::{MockUpstream, message_json, stream_events};
use http::Method;
use http_body_util::BodyExt;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const UPSTREAM_KEY: &str = "sk-ant-upstream-key-1";

fn config(upstream: &str, extra_region: &str) -> String {
    format!(
        r#"
server:
  listen: "{{listen}}"
  admin_listen: "{{admin}}"
  max_body_bytes: 65536
  reload_interval: 50ms
  shutdown_grace: 10s
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{env: TEST_UPSTREAM_KEY}}]
    timeouts: {{idle: 500ms, response_headers: 1s}}
{extra_region}"#
    )
}

fn start(upstream: &MockUpstream) -> ProxyProcess {
    ProxyProcess::start(
        BIN.as_ref(),
        &config(&upstream.base_url(), ""),
        &[
            ("TEST_RELAY_KEY", RELAY_KEY),
            ("TEST_UPSTREAM_KEY", UPSTREAM_KEY),
        ],
    )
}

const MESSAGE: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}"#;

fn post(
    proxy: &ProxyProcess,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut headers = vec![
        ("x-api-key", RELAY_KEY),
        ("anthropic-version", "2023-06-01"),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    request(Method::POST, &proxy.url(path), &headers, body.to_string())
}

fn assert_envelope(answer: &Answer, status: u16, kind: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], kind, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    let id = json["request_id"].as_str().unwrap();
    assert_eq!(answer.headers["x-relay-request-id"], id);
}

#[tokio::test]
async fn json_response_passes_byte_for_byte_with_headers() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();
    let answer = send(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[
                ("anthropic-beta", "prompt-caching-2024-07-31,x"),
                ("x-custom-trace", "t-1"),
            ],
            MESSAGE,
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, Bytes::from(message_json("claude-sonnet-4-5")));
    assert_eq!(answer.headers["request-id"], "req_mock_0123456789");
    assert_eq!(
        answer.headers["anthropic-ratelimit-requests-remaining"],
        "3999"
    );
    assert!(
        answer.headers["x-relay-request-id"]
            .to_str()
            .unwrap()
            .starts_with("relay_")
    );

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.body, MESSAGE.as_bytes());
    assert_eq!(seen.headers["x-api-key"], UPSTREAM_KEY);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert_eq!(
        seen.headers["anthropic-beta"],
        "prompt-caching-2024-07-31,x"
    );
    assert_eq!(seen.headers["x-custom-trace"], "t-1");
    assert!(!seen.headers.contains_key("authorization"));
    // The upstream's own name, never the one the client addressed the relay by.
    assert_eq!(seen.headers["host"], upstream.addr.to_string());
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
}

#[tokio::test]
async fn bearer_auth_works_and_client_credentials_never_go_upstream() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let bearer = format!("Bearer {RELAY_KEY}");
    let req = request(
        Method::POST,
        &proxy.url("/v1/messages"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        MESSAGE,
    );
    let answer = send(&th::client(), req).await;
    assert_eq!(answer.status, 200);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.headers["x-api-key"], UPSTREAM_KEY);
    assert!(!seen.headers.contains_key("authorization"));
    for (_, value) in &seen.headers {
        assert!(!value.to_str().unwrap_or("").contains(RELAY_KEY));
    }
}

#[tokio::test]
async fn every_path_is_relayed_with_its_query() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();
    let auth = [("x-api-key", RELAY_KEY)];

    let models = send(
        &client,
        request(Method::GET, &proxy.url("/v1/models?limit=5"), &auth, ""),
    )
    .await;
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "claude-test");

    let count = send(
        &client,
        post(&proxy, "/v1/messages/count_tokens", &[], MESSAGE),
    )
    .await;
    assert_eq!(count.json()["input_tokens"], 42);

    let batch = send(
        &client,
        request(
            Method::GET,
            &proxy.url("/v1/messages/batches/msgbatch_1/results"),
            &auth,
            "",
        ),
    )
    .await;
    assert_eq!(batch.status, 200);

    // A path the relay does not know goes upstream too; the upstream's 404 comes back unchanged.
    let unknown = send(
        &client,
        request(
            Method::DELETE,
            &proxy.url("/v1/brand-new?x=1&y=2"),
            &auth,
            "",
        ),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["type"], "not_found_error");

    let paths: Vec<String> = upstream
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/models?limit=5",
            "/v1/messages/count_tokens",
            "/v1/messages/batches/msgbatch_1/results",
            "/v1/brand-new?x=1&y=2"
        ]
    );
    assert_eq!(upstream.requests()[3].method, Method::DELETE);
}

#[tokio::test]
async fn stream_events_reach_the_client_before_the_upstream_finishes() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();
    let response = send_streaming(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-mock", "stream-gated")],
            MESSAGE,
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut body = response.into_body();
    let events = stream_events("claude-sonnet-4-5");

    // The upstream holds the rest of the stream until the gate opens: the
    // first event can only arrive now if the relay does not buffer.
    let first = next_chunk(&mut body, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first, events[0]);
    assert_eq!(upstream.streams_finished(), 0);
    upstream.open_gate();

    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body, Duration::from_secs(5)).await {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, events[1..].concat());
}

#[tokio::test]
async fn error_event_after_200_and_unknown_events_pass_untouched() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();

    let answer = send(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-mock", "stream-error")],
            MESSAGE,
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    assert!(text.contains("event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"},\"type\":\"error\"}\n\n"), "{text}");

    let answer = send(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-mock", "stream-unknown-event"), ("x-mock-delay-ms", "5")],
            MESSAGE,
        ),
    )
    .await;
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    assert!(text.contains(
        "event: future_event_type\ndata: {\"type\":\"future_event_type\",\"x\":[1,2]}\n\n"
    ));
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();
    let response = send_streaming(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-mock", "stream-endless"), ("x-mock-delay-ms", "20")],
            MESSAGE,
        ),
    )
    .await;
    let mut body = response.into_body();
    assert!(
        next_chunk(&mut body, Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        next_chunk(&mut body, Duration::from_secs(5))
            .await
            .is_some()
    );
    drop(body);
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while upstream.streams_cancelled() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.streams_cancelled(), 1);
    // The access log says how it ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !proxy.log().contains("client_gone") {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn timeouts_give_504_and_a_stalled_stream_is_ended_with_an_error_event() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();

    let started = std::time::Instant::now();
    let answer = send(
        &client,
        post(&proxy, "/v1/messages", &[("x-mock", "stall")], MESSAGE),
    )
    .await;
    assert_envelope(&answer, 504, "api_error");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Idle timeout (500 ms) between chunks of a stream.
    let answer = send(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-mock", "stream-stall")],
            MESSAGE,
        ),
    )
    .await;
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(text.ends_with("\n\n"));
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    assert!(last.contains("idle timeout"), "{last}");
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();

    let answer = send(
        &client,
        post(&proxy, "/v1/messages", &[("x-mock", "status-529")], MESSAGE),
    )
    .await;
    assert_eq!(answer.status, 529);
    assert_eq!(
        answer.body,
        Bytes::from(claude_relay_testkit::upstream::error_body(
            "overloaded_error",
            "Overloaded"
        ))
    );

    // Last: the 429 rests the only upstream key. A key's 429 is the key's,
    // not the client's: with no other key to go on with, the relay answers
    // 429 itself, `retry-after` saying when the key is back.
    let answer = send(
        &client,
        post(&proxy, "/v1/messages", &[("x-mock", "status-429")], MESSAGE),
    )
    .await;
    assert_envelope(&answer, 429, "rate_limit_error");
    assert_eq!(answer.headers["retry-after"], "7");
}

#[tokio::test]
async fn refused_requests_never_reach_the_upstream() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();

    let no_key = send(
        &client,
        request(Method::POST, &proxy.url("/v1/messages"), &[], MESSAGE),
    )
    .await;
    assert_envelope(&no_key, 401, "authentication_error");
    let bad_key = send(
        &client,
        request(
            Method::POST,
            &proxy.url("/v1/messages"),
            &[("x-api-key", "sk-ant-wrong")],
            MESSAGE,
        ),
    )
    .await;
    assert_envelope(&bad_key, 401, "authentication_error");
    assert!(!String::from_utf8_lossy(&bad_key.body).contains("sk-ant-wrong"));

    // 413 by Content-Length, before reading the body.
    let big = "x".repeat(70_000);
    let too_large = send(&client, post(&proxy, "/v1/messages", &[], &big)).await;
    assert_envelope(&too_large, 413, "request_too_large");

    // 413 for a chunked body that grows past the limit.
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = (0..20)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'a'; 8192]))))
        .collect();
    let streamed = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let chunked = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http()
        .request(
            http::Request::post(proxy.url("/v1/messages"))
                .header("x-api-key", RELAY_KEY)
                .body(streamed)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413);
    let body = chunked.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("request_too_large"));

    let malformed = send(&client, post(&proxy, "/v1/messages", &[], "{\"model\": ")).await;
    assert_envelope(&malformed, 400, "invalid_request_error");

    let unknown_region = send(
        &client,
        post(
            &proxy,
            "/v1/messages",
            &[("x-relay-region", "mars")],
            MESSAGE,
        ),
    )
    .await;
    assert_envelope(&unknown_region, 400, "invalid_request_error");
    assert!(
        unknown_region.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mars")
    );

    assert_eq!(
        upstream.request_count(),
        0,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn unreachable_upstream_gives_502_in_the_envelope() {
    let dead = format!(
        "http://127.0.0.1:{}",
        claude_relay_testkit::proxy::free_port()
    );
    let proxy = ProxyProcess::start(
        BIN.as_ref(),
        &config(&dead, ""),
        &[
            ("TEST_RELAY_KEY", RELAY_KEY),
            ("TEST_UPSTREAM_KEY", UPSTREAM_KEY),
        ],
    );
    let answer = send(&th::client(), post(&proxy, "/v1/messages", &[], MESSAGE)).await;
    assert_envelope(&answer, 502, "api_error");
    let message = answer.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!message.contains(UPSTREAM_KEY));
    let metrics = send(
        &th::client(),
        request(Method::GET, &proxy.admin_url("/metrics"), &[], ""),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("claude_relay_upstream_errors_total{upstream=\"local\",kind=\"connect\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn admin_port_serves_health_and_metrics() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let client = th::client();
    send(&client, post(&proxy, "/v1/messages", &[], MESSAGE)).await;
    for path in ["/healthz", "/readyz"] {
        let answer = send(
            &client,
            request(Method::GET, &proxy.admin_url(path), &[], ""),
        )
        .await;
        assert_eq!(answer.status, 200, "{path}");
    }
    let metrics = send(
        &client,
        request(Method::GET, &proxy.admin_url("/metrics"), &[], ""),
    )
    .await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for expected in [
        "claude_relay_requests_total{route=\"messages\",status=\"200\",upstream=\"local\"} 1",
        "claude_relay_request_duration_seconds_bucket{le=",
        "claude_relay_upstream_time_to_first_byte_seconds_count{upstream=\"local\"} 1",
        "claude_relay_upstream_pool_open_connections{upstream=\"local\"} 1",
        "claude_relay_upstream_pool_idle_connections{upstream=\"local\"} 1",
        "claude_relay_upstream_pool_waiting{upstream=\"local\"} 0",
        "claude_relay_in_flight_requests 0",
        "claude_relay_client_requests_total{client=\"app\"} 1",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(!text.contains(RELAY_KEY) && !text.contains(UPSTREAM_KEY));
    // The API port does not serve admin routes: they go upstream like any path.
    let on_api = send(
        &client,
        request(
            Method::GET,
            &proxy.url("/metrics"),
            &[("x-api-key", RELAY_KEY)],
            "",
        ),
    )
    .await;
    assert_eq!(on_api.status, 404);
    // One access line per request, without secrets.
    let log = proxy.log();
    assert!(
        log.contains("client=\"app\"") || log.contains("client=app"),
        "{log}"
    );
    assert!(
        !log.contains(RELAY_KEY) && !log.contains(UPSTREAM_KEY),
        "{log}"
    );
}
