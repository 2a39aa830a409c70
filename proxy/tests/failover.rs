//! Failover, the shared breaker and the key pool, driven through real proxy
//! processes against upstream doubles (and a real Redis where replicas share).

mod common;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use claude_relay_testkit::http::{self as th, request, send};
use claude_relay_testkit::proxy::{ProxyProcess, free_port};
use claude_relay_testkit::redis::RedisServer;
use claude_relay_testkit::upstream::MockUpstream;
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const BODY: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

fn region(name: &str, url: &str, priority: i32, keys: &[&str]) -> String {
    common::region_entry(
        name,
        url,
        priority,
        keys,
        "connect: 300ms, response_headers: 2s",
        "",
    )
}

fn config(regions: &str, extra: &str) -> String {
    common::relay_config("failover-test", "", regions, extra)
}

fn start(config: &str) -> ProxyProcess {
    ProxyProcess::start(
        BIN.as_ref(),
        config,
        &[
            ("TEST_RELAY_KEY", RELAY_KEY),
            ("KEY_A", "sk-ant-a"),
            ("KEY_B", "sk-ant-b"),
            ("KEY_C", "sk-ant-c"),
        ],
    )
}

fn message(
    proxy: &ProxyProcess,
    extra: &[(&str, &str)],
) -> http::Request<http_body_util::Full<Bytes>> {
    let mut headers = vec![
        ("x-api-key", RELAY_KEY),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    request(Method::POST, &proxy.url("/v1/messages"), &headers, BODY)
}

#[tokio::test]
async fn fails_over_on_connection_refused_and_on_529_before_the_body() {
    let good = MockUpstream::start().await;
    let overloaded = MockUpstream::start().await;
    overloaded.force(Some("status-529"));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let proxy = start(&config(
        &(region("dead", &dead, 0, &["KEY_A"])
            + &region("busy", &overloaded.base_url(), 1, &["KEY_B"])
            + &region("good", &good.base_url(), 2, &["KEY_C"])),
        "",
    ));
    let answer = send(&th::client(), message(&proxy, &[])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        overloaded.request_count(),
        1,
        "the 529 region was tried once"
    );
    assert_eq!(good.request_count(), 1);
    assert_eq!(good.requests()[0].headers["x-api-key"], "sk-ant-c");
    assert_eq!(
        good.requests()[0].body,
        BODY.as_bytes(),
        "the same body goes to the next region"
    );
    let text = proxy.metrics().await;
    assert!(
        text.contains("claude_relay_failovers_total{upstream=\"busy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("claude_relay_failovers_total{upstream=\"good\"} 1"),
        "{text}"
    );

    // The attempt budget (routing.max_attempts = 2) stops before the good region:
    // the last upstream answer passes through unchanged.
    let proxy = start(&config(
        &(region("dead", &dead, 0, &["KEY_A"])
            + &region("busy", &overloaded.base_url(), 1, &["KEY_B"])
            + &region("good", &good.base_url(), 2, &["KEY_C"])),
        "routing: {max_attempts: 2}\n",
    ));
    let answer = send(&th::client(), message(&proxy, &[])).await;
    assert_eq!(answer.status, 529);
    assert_eq!(answer.json()["error"]["type"], "overloaded_error");
    assert_eq!(
        good.request_count(),
        1,
        "the good region is past the budget"
    );
}

#[tokio::test]
async fn never_retries_a_4xx_or_a_stream_that_began() {
    let first = MockUpstream::start().await;
    let second = MockUpstream::start().await;
    let proxy = start(&config(
        &(region("first", &first.base_url(), 0, &["KEY_A"])
            + &region("second", &second.base_url(), 1, &["KEY_B"])),
        "",
    ));
    // A 200 whose stream then carries an error event: bytes went to the
    // client, so no other region is asked (no duplicated generation).
    let answer = send(
        &th::client(),
        message(&proxy, &[("x-mock", "stream-error")]),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&answer.body).contains("event: error"));
    // The client's own errors are not retried either.
    let answer = send(
        &th::client(),
        request(
            Method::POST,
            &proxy.url("/v1/unknown"),
            &[("x-api-key", RELAY_KEY)],
            BODY,
        ),
    )
    .await;
    assert_eq!(answer.status, 404);
    assert_eq!(first.request_count(), 2);
    assert_eq!(
        second.request_count(),
        0,
        "the upstream saw exactly one request each time"
    );
}

/// A region with keys A and B, where A's first answer is a 429 with this
/// `retry-after`: round robin starts with A, whose 429 sends the request on
/// to B, then A rests while four requests go to B.
async fn key_a_answers_429(retry_after: &str) -> (MockUpstream, ProxyProcess, th::TestClient) {
    let upstream = MockUpstream::start().await;
    upstream.force_for_key("sk-ant-a", Some(&format!("status-429:{retry_after}")));
    let proxy = start(&config(
        &region("only", &upstream.base_url(), 0, &["KEY_A", "KEY_B"]),
        "",
    ));
    let client = th::client();
    let first = send(&client, message(&proxy, &[])).await;
    assert_eq!(first.status, 200, "key B answers: {:?}", first.body);
    assert_eq!(
        (
            upstream.requests_with_key("sk-ant-a"),
            upstream.requests_with_key("sk-ant-b")
        ),
        (1, 1)
    );
    upstream.force_for_key("sk-ant-a", None);
    for _ in 0..4 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(
        upstream.requests_with_key("sk-ant-a"),
        1,
        "key A must rest after its 429 (retry-after: {retry_after})"
    );
    (upstream, proxy, client)
}

#[tokio::test]
async fn a_key_answered_429_rests_and_comes_back() {
    let (upstream, proxy, client) = key_a_answers_429("1").await;
    assert_eq!(upstream.requests_with_key("sk-ant-b"), 5);
    // After the 1 s cooldown key A is used again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..4 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert!(
        upstream.requests_with_key("sk-ant-a") >= 2,
        "key A never came back"
    );
    let text = proxy.metrics().await;
    assert!(!text.contains("sk-ant-"), "a key reached the metrics");
}

/// `retry-after` as an HTTP-date (whole seconds, so waits are up to a
/// second shorter than the offset asked for).
fn http_date_in(offset: Duration, past: bool) -> String {
    let now = SystemTime::now();
    httpdate::fmt_http_date(if past { now - offset } else { now + offset })
}

#[tokio::test]
async fn retry_after_as_an_http_date_rests_a_key_until_then_and_a_past_one_not_at_all() {
    let date = http_date_in(Duration::from_secs(3), false);
    let until = httpdate::parse_http_date(&date).unwrap();
    let (upstream, proxy, client) = key_a_answers_429(&date).await;
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(300)).await;
    for _ in 0..4 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert!(
        upstream.requests_with_key("sk-ant-a") >= 2,
        "key A never came back"
    );

    // A date already past: the only key does not rest (with the default
    // cooldown the next request would find no key). It is not asked twice
    // for one request: the client gets the relay's 429.
    let single = MockUpstream::start().await;
    let past = http_date_in(Duration::from_secs(60), true);
    single.force_for_key("sk-ant-a", Some(&format!("status-429:{past}")));
    let proxy = start(&config(
        &region("only", &single.base_url(), 0, &["KEY_A"]),
        "",
    ));
    assert_eq!(send(&client, message(&proxy, &[])).await.status, 429);
    assert_eq!(single.request_count(), 1);
    single.force_for_key("sk-ant-a", None);
    let answer = send(&client, message(&proxy, &[])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

#[tokio::test]
async fn retry_after_as_an_http_date_keeps_an_open_breaker_open_past_open_for() {
    let flaky = MockUpstream::start().await;
    let date = http_date_in(Duration::from_secs(60), false);
    flaky.force(Some(&format!("status-500:{date}")));
    let good = MockUpstream::start().await;
    let proxy = start(&config(
        &(region("flaky", &flaky.base_url(), 0, &["KEY_A"])
            + &region("good", &good.base_url(), 1, &["KEY_B"])),
        "breaker: {window: 10s, min_requests: 2, failure_rate: 0.5, open_for: 1s}\n",
    ));
    let client = th::client();
    for _ in 0..4 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(flaky.request_count(), 2, "two failures open the breaker");
    // Past `open_for` a probe would go out, were it not for the date.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(
        flaky.request_count(),
        2,
        "the breaker let a probe through before the date"
    );
    assert_eq!(
        proxy
            .metric("claude_relay_breaker_state{upstream=\"flaky\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_key_refused_with_401_is_disabled_until_the_config_changes() {
    let upstream = MockUpstream::start().await;
    upstream.force_for_key("sk-ant-a", Some("status-401"));
    let proxy = start(&config(
        &region("only", &upstream.base_url(), 0, &["KEY_A", "KEY_B"]),
        "",
    ));
    let client = th::client();
    let _ = send(&client, message(&proxy, &[])).await;
    for _ in 0..6 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert_eq!(upstream.requests_with_key("sk-ant-a"), 1);
    let log = proxy.log();
    assert!(!log.contains("sk-ant-a"), "the key itself reached the log");
}

/// A relay-made 429 (not the upstream's): the Claude envelope with the
/// relay's request id, and its `retry-after` in seconds.
fn relay_429(answer: &th::Answer) -> u64 {
    assert_eq!(answer.status, 429, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    assert!(
        json["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("relay_")),
        "{json}"
    );
    answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_stream_meeting_a_key_429_goes_on_with_the_next_key() {
    let upstream = MockUpstream::start().await;
    upstream.force_for_key("sk-ant-a", Some("status-429:30"));
    let proxy = start(&config(
        &region("only", &upstream.base_url(), 0, &["KEY_A", "KEY_B"]),
        "",
    ));
    let client = th::client();
    let answer = send(&client, message(&proxy, &[("x-mock", "stream")])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    assert!(String::from_utf8_lossy(&answer.body).contains("event: message_stop"));
    assert_eq!(
        (
            upstream.requests_with_key("sk-ant-a"),
            upstream.requests_with_key("sk-ant-b")
        ),
        (1, 1)
    );
    // A rests: the next streams go to B alone.
    for _ in 0..3 {
        let answer = send(&client, message(&proxy, &[("x-mock", "stream")])).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(upstream.requests_with_key("sk-ant-a"), 1);
    let text = proxy.metrics().await;
    assert!(
        text.contains("claude_relay_upstream_key_retries_total{upstream=\"only\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("claude_relay_failovers_total{"),
        "a key retry is not a failover: {text}"
    );
}

#[tokio::test]
async fn when_every_key_rests_the_client_gets_429_until_the_first_is_free() {
    let upstream = MockUpstream::start().await;
    upstream.force_for_key("sk-ant-a", Some("status-429:30"));
    upstream.force_for_key("sk-ant-b", Some("status-429:3"));
    let proxy = start(&config(
        &region("only", &upstream.base_url(), 0, &["KEY_A", "KEY_B"]),
        "breaker: {window: 10s, min_requests: 2, failure_rate: 0.1, open_for: 30s}\n",
    ));
    let client = th::client();
    let answer = send(&client, message(&proxy, &[("x-mock", "stream")])).await;
    let wait = relay_429(&answer);
    assert_eq!(wait, 3, "the soonest key (B) is free in 3 s");
    assert_eq!(upstream.request_count(), 2, "both keys were asked once");
    // Both rest: refused without an upstream call.
    for _ in 0..3 {
        let wait = relay_429(&send(&client, message(&proxy, &[])).await);
        assert!((1..=3).contains(&wait), "{wait}");
    }
    assert_eq!(upstream.request_count(), 2);
    // Key 429s are not the region's failures: the breaker stays closed, and
    // B serves as soon as its rest is over.
    upstream.force_for_key("sk-ant-b", None);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let answer = send(&client, message(&proxy, &[])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let text = proxy.metrics().await;
    assert!(
        !text.contains("claude_relay_breaker_transitions_total{upstream=\"only\""),
        "{text}"
    );
}

#[tokio::test]
async fn key_429s_leave_the_breaker_closed() {
    let upstream = MockUpstream::start().await;
    // `retry-after: 0`: A never rests, so every other request meets its 429.
    upstream.force_for_key("sk-ant-a", Some("status-429:0"));
    let proxy = start(&config(
        &region("only", &upstream.base_url(), 0, &["KEY_A", "KEY_B"]),
        "breaker: {window: 10s, min_requests: 2, failure_rate: 0.1, open_for: 30s}\n",
    ));
    let client = th::client();
    for _ in 0..8 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert!(upstream.requests_with_key("sk-ant-a") >= 3);
    assert_eq!(upstream.requests_with_key("sk-ant-b"), 8);
    assert_ne!(
        proxy
            .metric("claude_relay_breaker_state{upstream=\"only\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_region_whose_only_key_is_limited_hands_the_request_to_the_next() {
    let first = MockUpstream::start().await;
    first.force_for_key("sk-ant-a", Some("status-429:30"));
    let second = MockUpstream::start().await;
    let proxy = start(&config(
        &(region("first", &first.base_url(), 0, &["KEY_A"])
            + &region("second", &second.base_url(), 1, &["KEY_B"])),
        "",
    ));
    let client = th::client();
    for _ in 0..3 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert_eq!(first.request_count(), 1, "key A rests after its 429");
    assert_eq!(second.request_count(), 3);
    assert_eq!(
        proxy
            .metric("claude_relay_failovers_total{upstream=\"second\"}")
            .await,
        Some(1.0)
    );

    // Pinned to a region: the next key of that region, never another region.
    let pinned = MockUpstream::start().await;
    pinned.force_for_key("sk-ant-b", Some("status-429:30"));
    let other = MockUpstream::start().await;
    let proxy = start(&config(
        &(region("other", &other.base_url(), 0, &["KEY_A"])
            + &region("pinned", &pinned.base_url(), 1, &["KEY_B", "KEY_C"])),
        "",
    ));
    let answer = send(&client, message(&proxy, &[("x-relay-region", "pinned")])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        (
            pinned.requests_with_key("sk-ant-b"),
            pinned.requests_with_key("sk-ant-c")
        ),
        (1, 1)
    );
    pinned.force_for_key("sk-ant-c", Some("status-429:20"));
    let wait = relay_429(&send(&client, message(&proxy, &[("x-relay-region", "pinned")])).await);
    assert!((19..=20).contains(&wait), "{wait}");
    assert_eq!(
        other.request_count(),
        0,
        "a pinned request stays in its region"
    );
}

#[tokio::test]
async fn key_retries_count_toward_max_attempts() {
    let upstream = MockUpstream::start().await;
    for key in ["sk-ant-a", "sk-ant-b", "sk-ant-c"] {
        upstream.force_for_key(key, Some("status-429:30"));
    }
    let proxy = start(&config(
        &region(
            "only",
            &upstream.base_url(),
            0,
            &["KEY_A", "KEY_B", "KEY_C"],
        ),
        "routing: {max_attempts: 2}\n",
    ));
    let client = th::client();
    let answer = send(&client, message(&proxy, &[])).await;
    // The third key is free: try again at once.
    assert_eq!(relay_429(&answer), 1);
    assert_eq!(upstream.request_count(), 2, "two attempts, then no more");
    // The next request finds two keys resting and spends one attempt.
    let answer = send(&client, message(&proxy, &[])).await;
    assert!((29..=30).contains(&relay_429(&answer)));
    assert_eq!(upstream.request_count(), 3);
}

const BREAKER: &str = "breaker: {window: 10s, min_requests: 4, failure_rate: 0.5, open_for: 30s}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_replica_stops_the_other_within_a_second() {
    let redis = RedisServer::start().unwrap();
    let flaky = MockUpstream::start().await;
    flaky.force(Some("status-500"));
    let good = MockUpstream::start().await;
    let store = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    let config = config(
        &(region("flaky", &flaky.base_url(), 0, &["KEY_A"])
            + &region("good", &good.base_url(), 1, &["KEY_B"])),
        &(store + BREAKER),
    );
    let a = start(&config);
    let b = start(&config);
    let client = th::client();
    // Replica A sees the failures (each request still succeeds by failover).
    for _ in 0..6 {
        assert_eq!(send(&client, message(&a, &[])).await.status, 200);
    }
    let seen_by_flaky = flaky.request_count();
    assert!((4..=6).contains(&seen_by_flaky), "{seen_by_flaky}");
    assert!(
        a.metrics()
            .await
            .contains("claude_relay_breaker_state{upstream=\"flaky\"} 2")
    );
    // Within about a second replica B stops sending to the region too.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..5 {
        assert_eq!(send(&client, message(&b, &[])).await.status, 200);
    }
    assert_eq!(
        flaky.request_count(),
        seen_by_flaky,
        "replica B still sent to the open region"
    );
    // What the operator reads: the documented hash.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "HGET",
            "claude-relay:failover-test:breaker:flaky",
            "state",
        ])
        .output()
        .expect("redis-cli (Debian's redis-tools) runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_local_breakers_keep_protecting() {
    let mut redis = RedisServer::start().unwrap();
    let flaky = MockUpstream::start().await;
    flaky.force(Some("status-500"));
    let good = MockUpstream::start().await;
    let store = format!("store: {{redis: {{url: \"{}\"}}}}\n", redis.url());
    let proxy = start(&config(
        &(region("flaky", &flaky.base_url(), 0, &["KEY_A"])
            + &region("good", &good.base_url(), 1, &["KEY_B"])),
        &(store + BREAKER),
    ));
    redis.stop().unwrap();
    let client = th::client();
    let started = Instant::now();
    for _ in 0..12 {
        assert_eq!(send(&client, message(&proxy, &[])).await.status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        flaky.request_count() <= 6,
        "the local breaker did not open: {}",
        flaky.request_count()
    );
    assert_eq!(good.request_count(), 12);
}

#[tokio::test]
async fn forwarded_for_counts_only_from_a_trusted_peer() {
    let us = MockUpstream::start().await;
    let eu = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    let mut writer = mmdb_writer::Writer::new("GeoLite2-Country");
    let record = serde_json::json!({
        "continent": {"code": "EU", "names": {"en": "Europe"}},
        "country": {"iso_code": "DE", "names": {"en": "Germany"}},
    });
    writer
        .insert("198.51.100.0/24".parse::<ipnet::IpNet>().unwrap(), &record)
        .unwrap();
    std::fs::write(&db, writer.to_bytes().unwrap()).unwrap();
    let regions =
        region("us", &us.base_url(), 0, &["KEY_A"]) + &region("eu", &eu.base_url(), 1, &["KEY_B"]);
    let routing = |trusted: &str| {
        format!(
            "routing: {{geoip_db: {}, trusted_proxies: ['{trusted}'], rules: [{{countries: [DE], regions: [eu, us]}}], default: [us]}}\n",
            db.display()
        )
    };
    let trusted = start(&config(&regions, &routing("127.0.0.0/8")));
    let untrusted = start(&config(&regions, &routing("10.0.0.0/8")));
    let client = th::client();
    let german = [("x-forwarded-for", "198.51.100.7")];
    assert_eq!(send(&client, message(&trusted, &german)).await.status, 200);
    assert_eq!(
        (eu.request_count(), us.request_count()),
        (1, 0),
        "a trusted peer's header routes to eu"
    );
    assert_eq!(
        send(&client, message(&untrusted, &german)).await.status,
        200
    );
    assert_eq!(
        (eu.request_count(), us.request_count()),
        (1, 1),
        "an untrusted peer's header is ignored"
    );
    let forwarded = [("forwarded", "for=198.51.100.9;proto=https")];
    assert_eq!(
        send(&client, message(&trusted, &forwarded)).await.status,
        200
    );
    assert_eq!(eu.request_count(), 2);
}
