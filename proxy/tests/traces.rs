//! OpenTelemetry traces: real requests through the relay binary to the
//! Claude API double, spans exported over OTLP/HTTP to a receiver started
//! by the test.

mod common;

use std::time::Duration;

use claude_relay_testkit::http::{self as th, request, send, wait_for};
use claude_relay_testkit::otlp::{OtlpReceiver, Span};
use claude_relay_testkit::proxy::{ProxyProcess, free_port};
use claude_relay_testkit::upstream::{DEFAULT_STREAM_USAGE, DEFAULT_USAGE, MockUpstream};
use common::messages_request;
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-trace-tests";
const UPSTREAM_KEY: &str = "sk-ant-trace-test-upstream-key";
const COLLECTOR_TOKEN: &str = "Bearer collector-token-for-trace-tests";
const BODY: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;
const STREAM_BODY: &str = r#"{"model":"claude-test","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";
const WAIT: Duration = Duration::from_secs(10);

fn region(name: &str, url: &str, priority: i32) -> String {
    common::region_entry(
        name,
        url,
        priority,
        &["UPSTREAM_KEY"],
        "connect: 300ms, response_headers: 2s",
        "",
    )
}

fn config(regions: &str, traces: &str) -> String {
    common::relay_config("traces-test", "", regions, traces)
}

fn traces(endpoint: &str, ratio: f64, extra: &str) -> String {
    format!(
        "traces:\n  endpoint: '{endpoint}'\n  sampling_ratio: {ratio}\n  export_interval: 100ms\n  service_name: relay-under-test\n  headers: {{authorization: {{env: COLLECTOR_TOKEN}}}}\n{extra}"
    )
}

fn start(config: &str) -> ProxyProcess {
    ProxyProcess::start(
        BIN.as_ref(),
        config,
        &[
            ("TEST_RELAY_KEY", RELAY_KEY),
            ("UPSTREAM_KEY", UPSTREAM_KEY),
            ("COLLECTOR_TOKEN", COLLECTOR_TOKEN),
        ],
    )
}

/// Sends `count` plain messages through `proxy`, each answered 200.
async fn relay_ok(client: &th::TestClient, proxy: &ProxyProcess, count: usize) {
    for _ in 0..count {
        let answer = send(client, messages_request(proxy, RELAY_KEY, BODY, &[])).await;
        assert_eq!(answer.status, 200);
    }
}

fn only<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {spans:#?}");
    found[0]
}

fn request_spans(spans: &[Span]) -> Vec<&Span> {
    spans.iter().filter(|s| s.kind == 2).collect()
}

fn attempts_of<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.kind == 3 && s.parent_span_id.as_deref() == Some(&*parent.span_id))
        .collect()
}

async fn spans_metric(proxy: &ProxyProcess, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "claude_relay_trace_spans_total{{result=\"{result}\"}}"
        ))
        .await
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn requests_become_genai_spans_with_attempt_children_and_the_upstream_gets_a_traceparent() {
    let upstream = MockUpstream::start().await;
    let collector = OtlpReceiver::start().await;
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 1.0, ""),
    ));
    let client = th::client();

    // A client's sampled trace: the relay's span joins it.
    let parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let answer = send(
        &client,
        messages_request(&proxy, RELAY_KEY, BODY, &[("traceparent", &parent)]),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // A stream, without a parent: a root span.
    let answer = send(
        &client,
        messages_request(&proxy, RELAY_KEY, STREAM_BODY, &[("x-mock", "stream")]),
    )
    .await;
    assert_eq!(answer.status, 200);

    let spans = collector.wait_for_spans(4, WAIT).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service_name == "relay-under-test"));

    let joined = only(&spans, "the span of the traced request", |s| {
        s.kind == 2 && s.trace_id == CLIENT_TRACE
    });
    assert_eq!(joined.parent_span_id.as_deref(), Some(CLIENT_SPAN));
    assert_eq!(joined.name, "chat claude-test");
    assert_eq!(joined.text("gen_ai.system"), Some("anthropic"));
    assert_eq!(joined.text("gen_ai.provider.name"), Some("anthropic"));
    assert_eq!(joined.text("gen_ai.operation.name"), Some("chat"));
    assert_eq!(joined.text("gen_ai.request.model"), Some("claude-test"));
    assert_eq!(joined.int("gen_ai.request.max_tokens"), Some(8));
    assert_eq!(joined.text("gen_ai.response.model"), Some("claude-test"));
    assert_eq!(
        joined.text("gen_ai.response.id"),
        Some("msg_01XFDUDYJgAACzvnptvVoYEL")
    );
    assert_eq!(
        joined.int("gen_ai.usage.input_tokens"),
        Some(DEFAULT_USAGE[0] as i64)
    );
    assert_eq!(
        joined.int("gen_ai.usage.output_tokens"),
        Some(DEFAULT_USAGE[1] as i64)
    );
    assert_eq!(joined.int("http.response.status_code"), Some(200));
    assert_eq!(joined.text("relay.client"), Some("app"));
    assert_eq!(joined.text("relay.region"), Some("main"));
    assert_eq!(joined.text("relay.outcome"), Some("complete"));
    assert!(joined.end_ns >= joined.start_ns && joined.start_ns > 0);

    // Its attempt: a client span, and the traceparent the upstream got names it.
    let attempts = attempts_of(&spans, joined);
    assert_eq!(attempts.len(), 1, "{spans:#?}");
    let attempt = attempts[0];
    assert_eq!(attempt.trace_id, CLIENT_TRACE);
    assert_eq!(attempt.text("relay.region"), Some("main"));
    assert_eq!(attempt.int("relay.upstream.key_index"), Some(0));
    assert_eq!(attempt.int("http.response.status_code"), Some(200));
    assert!(attempt.start_ns >= joined.start_ns && attempt.end_ns <= joined.end_ns);
    let sent = upstream.requests();
    let traceparent = |i: usize| {
        sent[i]
            .headers
            .get_all("traceparent")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        traceparent(0),
        [format!("00-{CLIENT_TRACE}-{}-01", attempt.span_id)]
    );

    // The stream's span: a root of its own, with the stream's usage.
    let streamed = only(&spans, "the stream's span", |s| {
        s.kind == 2 && s.trace_id != CLIENT_TRACE
    });
    assert_eq!(streamed.parent_span_id, None);
    assert_eq!(streamed.text("gen_ai.response.id"), Some("msg_stream_1"));
    assert_eq!(
        streamed.attributes.get("gen_ai.request.stream"),
        Some(&serde_json::Value::Bool(true))
    );
    assert_eq!(
        streamed.int("gen_ai.usage.input_tokens"),
        Some(DEFAULT_STREAM_USAGE[0] as i64)
    );
    assert!(streamed.int("gen_ai.usage.output_tokens").unwrap() > 0);
    let stream_attempt = attempts_of(&spans, streamed);
    assert_eq!(stream_attempt.len(), 1);
    assert_eq!(
        traceparent(1),
        [format!(
            "00-{}-{}-01",
            streamed.trace_id, stream_attempt[0].span_id
        )]
    );

    // The collector got the header from the secret; no export body
    // carries a key, nor a request's content.
    let exports = collector.exports();
    assert!(exports.iter().all(|e| e.path == "/v1/traces"));
    assert!(
        exports
            .iter()
            .all(|e| e.headers.get("authorization").unwrap() == COLLECTOR_TOKEN)
    );
    for export in &exports {
        let raw = String::from_utf8_lossy(&export.body);
        for secret in [
            UPSTREAM_KEY,
            RELAY_KEY,
            COLLECTOR_TOKEN,
            "\"Hi\"",
            "passes every byte",
        ] {
            assert!(!raw.contains(secret), "{secret} in an export: {raw}");
        }
    }
    assert_eq!(spans_metric(&proxy, "exported").await, 4.0);
    assert!(!proxy.log().contains(COLLECTOR_TOKEN));
}

#[tokio::test]
async fn a_failover_shows_one_attempt_span_per_region_tried() {
    let good = MockUpstream::start().await;
    let collector = OtlpReceiver::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = start(&config(
        &(region("dead", &dead, 0) + &region("good", &good.base_url(), 1)),
        &traces(&collector.endpoint(), 1.0, ""),
    ));
    let answer = send(
        &th::client(),
        messages_request(&proxy, RELAY_KEY, BODY, &[]),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    let spans = collector.wait_for_spans(3, WAIT).await;
    let request = only(&spans, "the request span", |s| s.kind == 2);
    assert_eq!(request.text("relay.region"), Some("good"));
    assert_eq!(request.int("relay.attempts"), Some(2));
    let mut attempts = attempts_of(&spans, request);
    attempts.sort_by_key(|s| s.start_ns);
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert_eq!(attempts[0].text("relay.region"), Some("dead"));
    assert_eq!(attempts[0].text("error.type"), Some("connect"));
    assert_eq!(attempts[0].status_code, 2);
    assert_eq!(attempts[0].int("http.response.status_code"), None);
    assert_eq!(attempts[1].text("relay.region"), Some("good"));
    assert_eq!(attempts[1].int("http.response.status_code"), Some(200));
    assert_eq!(attempts[1].status_code, 0);
    assert!(attempts[0].end_ns <= attempts[1].start_ns);
    // The region that answered got the traceparent of the second attempt.
    let sent = good.requests();
    assert_eq!(
        sent[0].headers.get("traceparent").unwrap(),
        &format!("00-{}-{}-01", request.trace_id, attempts[1].span_id)
    );
}

#[tokio::test]
async fn sampling_follows_the_ratio_for_roots_and_the_parent_flag_otherwise() {
    let upstream = MockUpstream::start().await;
    let collector = OtlpReceiver::start().await;
    // Ratio 0: roots are never traced, a sampled parent still is.
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 0.0, ""),
    ));
    let client = th::client();
    relay_ok(&client, &proxy, 5).await;
    let parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let answer = send(
        &client,
        messages_request(&proxy, RELAY_KEY, BODY, &[("traceparent", &parent)]),
    )
    .await;
    assert_eq!(answer.status, 200);
    let spans = collector.wait_for_spans(2, WAIT).await;
    // Several export intervals more: nothing else arrives.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let spans_after = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert_eq!(spans_after.len(), 2, "{spans_after:#?}");
    assert!(spans.iter().all(|s| s.trace_id == CLIENT_TRACE));
    // Untraced requests reach the upstream without a traceparent.
    let sent = upstream.requests();
    assert!(
        sent[..5]
            .iter()
            .all(|r| r.headers.get("traceparent").is_none())
    );
    drop(proxy);

    // Ratio 1: every root is traced, an unsampled parent is not, and its
    // traceparent goes upstream as the client sent it.
    let upstream = MockUpstream::start().await;
    let collector = OtlpReceiver::start().await;
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 1.0, ""),
    ));
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    let answer = send(
        &client,
        messages_request(&proxy, RELAY_KEY, BODY, &[("traceparent", &unsampled)]),
    )
    .await;
    assert_eq!(answer.status, 200);
    relay_ok(&client, &proxy, 3).await;
    let spans = collector.wait_for_spans(6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(collector.spans().len(), 6);
    assert_eq!(request_spans(&spans).len(), 3);
    assert!(spans.iter().all(|s| s.trace_id != CLIENT_TRACE));
    let sent = upstream.requests();
    assert_eq!(sent[0].headers.get("traceparent").unwrap(), &unsampled);
    // A garbage traceparent is a root of a new trace, not passed on as ours.
    let answer = send(
        &client,
        messages_request(&proxy, RELAY_KEY, BODY, &[("traceparent", "00-nothex-01")]),
    )
    .await;
    assert_eq!(answer.status, 200);
    let spans = collector.wait_for_spans(8, WAIT).await;
    assert_eq!(request_spans(&spans).len(), 4);
    let last = upstream.requests().pop().unwrap();
    let ours = last.headers.get_all("traceparent").iter().count();
    assert_eq!(ours, 1);
    assert!(
        last.headers
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("00-")
    );
    assert_ne!(last.headers.get("traceparent").unwrap(), "00-nothex-01");
}

#[tokio::test]
async fn a_collector_down_or_a_full_queue_drops_spans_and_never_a_request() {
    let upstream = MockUpstream::start().await;
    // Nothing listens there.
    let down = format!("http://127.0.0.1:{}", free_port());
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&down, 1.0, ""),
    ));
    let client = th::client();
    relay_ok(&client, &proxy, 20).await;
    // Two spans a request (the request and its attempt), all dropped.
    wait_for("the drops counted", WAIT, async || {
        spans_metric(&proxy, "dropped_export_failed").await == 40.0
    })
    .await;
    assert_eq!(spans_metric(&proxy, "exported").await, 0.0);
    assert!(
        proxy.log().contains("trace export failed"),
        "{}",
        proxy.log()
    );
    drop(proxy);

    // A collector that answers 503: counted the same.
    let collector = OtlpReceiver::start().await;
    collector.fail(true);
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 1.0, ""),
    ));
    relay_ok(&client, &proxy, 1).await;
    wait_for("the failed export counted", WAIT, async || {
        spans_metric(&proxy, "dropped_export_failed").await == 2.0
    })
    .await;
    drop(proxy);

    // A queue of 3 spans, exported once an hour: the first request's two
    // spans fit, every later request's are dropped.
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 1.0, "  max_queue_spans: 3\n")
            .replace("export_interval: 100ms", "export_interval: 1h"),
    ));
    relay_ok(&client, &proxy, 5).await;
    wait_for("the queue drops counted", WAIT, async || {
        spans_metric(&proxy, "dropped_queue_full").await == 8.0
    })
    .await;
}

#[tokio::test]
async fn requests_refused_before_forwarding_get_a_span_too() {
    let upstream = MockUpstream::start().await;
    let collector = OtlpReceiver::start().await;
    let proxy = start(&config(
        &region("main", &upstream.base_url(), 0),
        &traces(&collector.endpoint(), 1.0, ""),
    ));
    let wrong_key = request(
        Method::POST,
        &proxy.url("/v1/messages"),
        &[
            ("x-api-key", "not-the-relay-key"),
            ("content-type", "application/json"),
        ],
        BODY,
    );
    let answer = send(&th::client(), wrong_key).await;
    assert_eq!(answer.status, 401);
    let spans = collector.wait_for_spans(1, WAIT).await;
    let refused = only(&spans, "the refused request's span", |s| s.kind == 2);
    assert_eq!(refused.int("http.response.status_code"), Some(401));
    assert_eq!(refused.int("relay.attempts"), Some(0));
    assert_eq!(refused.text("relay.client"), None);
    assert_eq!(upstream.request_count(), 0);
    let raw = String::from_utf8_lossy(&collector.exports()[0].body).into_owned();
    assert!(!raw.contains("not-the-relay-key"), "{raw}");
}

#[test]
fn bad_traces_configs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = "https://api.anthropic.com";
    let cases = [
        (
            traces("collector:4318", 1.0, ""),
            "traces.endpoint: must start with http:// or https://",
        ),
        (
            traces("http://user:pass@collector:4318", 1.0, ""),
            "traces.endpoint: must not carry credentials",
        ),
        (
            traces("http://collector:4318", 1.5, ""),
            "traces.sampling_ratio: must be between 0 and 1",
        ),
        (
            traces("http://collector:4318", 1.0, "  max_queue_spans: 0\n"),
            "traces.max_queue_spans: must be greater than 0",
        ),
        (
            traces("http://collector:4318", 1.0, "").replace("100ms", "0s"),
            "traces.export_interval: must be greater than 0",
        ),
        (
            traces("http://collector:4318", 1.0, "").replace("COLLECTOR_TOKEN", "UNSET_TOKEN_VAR"),
            "traces.headers.authorization: environment variable UNSET_TOKEN_VAR is not set",
        ),
        (
            traces("http://collector:4318", 1.0, "")
                .replace("{env: COLLECTOR_TOKEN}", "'Bearer inline-secret'"),
            "a secret is never written inline",
        ),
        (
            traces("http://collector:4318", 1.0, "  sampling: 0.5\n"),
            "unknown field `sampling`",
        ),
    ];
    for (traces, expected) in cases {
        let text = config(&region("main", upstream, 0), &traces)
            .replace("{listen}", "127.0.0.1:0")
            .replace("{admin}", "127.0.0.1:0");
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, &text).unwrap();
        for args in [
            vec!["check-config".as_ref(), path.as_os_str()],
            vec!["--config".as_ref(), path.as_os_str()],
        ] {
            let out = std::process::Command::new(BIN)
                .args(args)
                .env("TEST_RELAY_KEY", RELAY_KEY)
                .env("UPSTREAM_KEY", UPSTREAM_KEY)
                .env("COLLECTOR_TOKEN", COLLECTOR_TOKEN)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!out.status.success(), "accepted:\n{text}");
            assert!(
                stderr.contains(expected) || stdout.contains(expected),
                "{expected:?} not in {stderr}{stdout}"
            );
            assert!(!stderr.contains("inline-secret") && !stdout.contains("inline-secret"));
            assert!(!stderr.contains(COLLECTOR_TOKEN) && !stdout.contains(COLLECTOR_TOKEN));
        }
    }
}
