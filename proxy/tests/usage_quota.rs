//! Usage accounting and quotas: real proxy replicas sharing a real Redis, an
//! upstream double that reports the usage each test tells it to.

mod common;

use std::time::Duration;

use bytes::Bytes;
use claude_relay_testkit::compress::decode_prefix;
use claude_relay_testkit::http::{next_chunk, request, send_streaming};
use common::*;
use http::Method;
use http_body_util::BodyExt;

/// Usage of JSON answers, streams and a cut stream, in `coding` as the
/// upstream sent it (the client asks as the SDKs do), adds up across two
/// replicas; the client gets the upstream's bytes unchanged.
async fn usage_adds_up_across_two_replicas(coding: &'static str) {
    let setup = Setup::with_redis().await;
    let config = setup.config("", "", "");
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);
    let asks = asking_for(coding);
    let with = |more: &[(&'static str, &'static str)]| [asks.as_slice(), more].concat();

    let json = setup
        .messages(&a, APP_KEY, BODY, &with(&[("x-mock-usage", "100,50,10,5")]))
        .await;
    assert_eq!(json.status, 200);
    assert!(decoded(coding, &json).contains("\"input_tokens\":100"));
    sent_unchanged(&setup, &json.body).await;
    let stream = setup
        .messages(
            &b,
            APP_KEY,
            STREAM_BODY,
            &with(&[("x-mock", "stream"), ("x-mock-usage", "200,70,0,30")]),
        )
        .await;
    assert_eq!(stream.status, 200);
    assert!(decoded(coding, &stream).ends_with("message_stop\"}\n\n"));
    sent_unchanged(&setup, &stream.body).await;

    // Cut off after message_start: input and the first output count only.
    let cut = send_streaming(
        &setup.client,
        messages_request(
            &a,
            APP_KEY,
            STREAM_BODY,
            // Spaced out, as a real stream is: the head goes out before the cut.
            &with(&[
                ("x-mock", "stream-cut"),
                ("x-mock-usage", "300,999,0,0"),
                ("x-mock-delay-ms", "5"),
            ]),
        ),
    )
    .await;
    let (cut, broke) = read_all(cut).await;
    assert_eq!(cut.status, 200);
    if coding == "identity" {
        let text = String::from_utf8_lossy(&cut.body);
        assert!(
            text.contains("message_start") && !text.contains("message_stop"),
            "{text}"
        );
        assert!(text.contains("event: error"), "the client is told: {text}");
    } else {
        // No plain error event inside a compressed stream: it would break
        // the client's decoding. The connection breaks off instead.
        assert!(broke, "a cut compressed stream ends in an error");
        let text = String::from_utf8(decode_prefix(coding, &cut.body)).unwrap();
        assert!(
            text.contains("message_start") && !text.contains("message_stop"),
            "{text}"
        );
        assert!(!text.contains("event: error"));
    }

    // The other client's usage is its own.
    setup
        .messages(&b, OTHER_KEY, BODY, &with(&[("x-mock-usage", "1,2,3,4")]))
        .await;

    settled(&setup, &a, "app", 3).await;
    let totals = setup.totals(&b, "app").await;
    assert_eq!(totals["input_tokens"], 600, "{totals}");
    assert_eq!(totals["output_tokens"], 50 + 70 + 1, "{totals}");
    assert_eq!(totals["cache_creation_input_tokens"], 10);
    assert_eq!(totals["cache_read_input_tokens"], 35);
    settled(&setup, &b, "other", 1).await;
    let usage = setup.usage(&a, "").await;
    let other = &usage["clients"][1];
    assert_eq!(other["client"], "other");
    assert_eq!(other["total"]["output_tokens"], 2);
    assert_eq!(other["models"]["claude-test"]["cache_read_input_tokens"], 4);
    let today = usage["from"].as_str().unwrap();
    assert_eq!(usage["clients"][0]["days"][0]["date"], today);
    assert_eq!(usage["clients"][0]["days"][0]["input_tokens"], 600);

    // Prometheus: each replica counts what it relayed.
    let metric = |kind: &str| {
        format!(r#"claude_relay_tokens_total{{client="app",model="claude-test",kind="{kind}"}}"#)
    };
    assert_eq!(a.metric(&metric("input_tokens")).await, Some(400.0));
    assert_eq!(a.metric(&metric("output_tokens")).await, Some(51.0));
    assert_eq!(b.metric(&metric("input_tokens")).await, Some(200.0));
    assert_eq!(
        b.metric(&metric("cache_read_input_tokens")).await,
        Some(30.0)
    );
    let log = a.log();
    assert!(
        log.contains("upstream_key=") && log.contains("complete=false"),
        "{log}"
    );
    assert!(log.contains("input_tokens=100"), "the usage line: {log}");
    // Each compressed answer was decoded for its usage.
    let decodes = r#"claude_relay_usage_decodes_total{encoding="#;
    if coding == "identity" {
        assert!(!a.metrics().await.contains(decodes));
    } else {
        let label = claude_relay_testkit::compress::label(coding);
        let line = format!(r#"{decodes}"{label}",result="decoded"}}"#);
        assert_eq!(a.metric(&line).await, Some(2.0));
        assert_eq!(b.metric(&line).await, Some(2.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_json_and_streams_adds_up_across_two_replicas() {
    usage_adds_up_across_two_replicas("identity").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_gzip_answers_adds_up() {
    usage_adds_up_across_two_replicas("gzip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_deflate_answers_adds_up() {
    usage_adds_up_across_two_replicas("deflate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_raw_deflate_answers_adds_up() {
    usage_adds_up_across_two_replicas("deflate-raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_brotli_answers_adds_up() {
    usage_adds_up_across_two_replicas("br").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_zstd_answers_adds_up() {
    usage_adds_up_across_two_replicas("zstd").await;
}

/// A client that goes away mid-stream: the usage reported until then is
/// recorded, though the relay reads each chunk only after passing it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_leaves_still_counts_what_was_reported() {
    let setup = Setup::with_redis().await;
    let a = setup.proxy(&setup.config("", "", ""));
    let request = messages_request(
        &a,
        APP_KEY,
        STREAM_BODY,
        &[
            ("x-mock", "stream-endless"),
            ("x-mock-delay-ms", "200"),
            ("x-mock-usage", "70,0,0,0"),
        ],
    );
    let response = send_streaming(&setup.client, request).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = next_chunk(&mut body, Duration::from_secs(5))
        .await
        .expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    drop(body);

    settled(&setup, &a, "app", 1).await;
    let totals = setup.totals(&a, "app").await;
    assert_eq!(totals["input_tokens"], 70, "{totals}");
    assert_eq!(totals["output_tokens"], 1, "{totals}");
    assert!(a.log().contains("complete=false"));
}

#[tokio::test]
async fn usage_admin_endpoint_checks_its_input() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config("", "", ""));
    for (query, status, says) in [
        ("from=2026-02-30", 400, "not a date"),
        (
            "from=2026-03-02&to=2026-03-01",
            400,
            "from must not be after to",
        ),
        ("from=2020-01-01&to=2026-01-01", 400, "at most 366 days"),
        ("client=nobody", 404, "no client"),
    ] {
        let answer = setup
            .admin(&proxy, Method::GET, &format!("/usage?{query}"))
            .await;
        assert_eq!(answer.status, status, "{query}: {:?}", answer.body);
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(says), "{query}: {message}");
    }
    // Standalone: the memory store counts too.
    setup.messages(&proxy, APP_KEY, BODY, &[]).await;
    settled(&setup, &proxy, "app", 1).await;
    assert_eq!(setup.totals(&proxy, "app").await["output_tokens"], 180);
    let empty = setup.usage(&proxy, "from=2001-01-01&to=2001-01-31").await;
    assert_eq!(empty["clients"][0]["total"]["requests"], 0);
    assert_eq!(empty["clients"][0]["days"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budgets_hold_across_two_replicas_with_retry_after() {
    not_near_a_minute_boundary(15).await;
    let setup = Setup::with_redis().await;
    let config = setup.config(
        "    quota: {tokens_per_minute: 1000, tokens_per_day: 100000}",
        "    quota: {tokens_per_day: 500, count_cache_reads: true}",
        "",
    );
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);
    // 300 in + 100 out = 400 per request; the budget is checked before a
    // request and charged after it, so the third one still passes.
    let usage = [("x-mock-usage", "300,100,0,1000")];
    for (n, proxy) in [&a, &b, &a].into_iter().enumerate() {
        let answer = setup.messages(proxy, APP_KEY, BODY, &usage).await;
        assert_eq!(answer.status, 200, "request {n}: {:?}", answer.body);
        settled(&setup, &a, "app", n as u64 + 1).await;
    }
    let upstream_calls = setup.upstream.messages_answered();
    let refused = setup.messages(&b, APP_KEY, BODY, &usage).await;
    let retry_after = assert_rate_limited(&refused, "1000 tokens per minute");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left_in_minute = 60 - now % 60;
    assert!(
        retry_after.abs_diff(left_in_minute) <= 1,
        "retry-after {retry_after}, {left_in_minute} s left in the minute"
    );
    assert_eq!(
        setup.upstream.messages_answered(),
        upstream_calls,
        "refused before the upstream"
    );
    assert_eq!(
        a.metric(r#"claude_relay_quota_rejected_total{client="app",reason="tokens_per_minute"}"#)
            .await
            .unwrap_or(0.0)
            + b.metric(
                r#"claude_relay_quota_rejected_total{client="app",reason="tokens_per_minute"}"#
            )
            .await
            .unwrap_or(0.0),
        1.0
    );

    // A day budget, with cache reads counted: 1 + 0 + 0 + 600 = 601 > 500.
    let answer = setup
        .messages(&a, OTHER_KEY, BODY, &[("x-mock-usage", "1,0,0,600")])
        .await;
    assert_eq!(answer.status, 200);
    settled(&setup, &a, "other", 1).await;
    let refused = setup.messages(&b, OTHER_KEY, BODY, &[]).await;
    let retry_after = assert_rate_limited(&refused, "500 tokens per day");
    let left_in_day = 86_400 - now % 86_400;
    assert!(
        retry_after.abs_diff(left_in_day) <= 2,
        "{retry_after} vs {left_in_day}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_across_two_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config("    quota: {max_concurrent: 2}", "", "");
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);
    let gated = |proxy: &claude_relay_testkit::proxy::ProxyProcess| {
        request(
            Method::POST,
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", APP_KEY),
                ("content-type", "application/json"),
                ("x-mock", "stream-gated"),
            ],
            STREAM_BODY,
        )
    };
    let mut first = send_streaming(&setup.client, gated(&a)).await;
    let mut second = send_streaming(&setup.client, gated(&b)).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let refused = setup.messages(&a, APP_KEY, BODY, &[]).await;
    assert_eq!(assert_rate_limited(&refused, "2 concurrent requests"), 1);
    let refused = setup.messages(&b, APP_KEY, BODY, &[]).await;
    assert_rate_limited(&refused, "2 concurrent requests");
    // Another client is not affected.
    assert_eq!(setup.messages(&b, OTHER_KEY, BODY, &[]).await.status, 200);

    // The streams end; their slots come back.
    setup.upstream.open_gate();
    setup.upstream.open_gate();
    for body in [first.body_mut(), second.body_mut()] {
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                all.extend_from_slice(&data);
            }
        }
        assert!(Bytes::from(all).ends_with(b"message_stop\"}\n\n"));
    }
    eventually(Duration::from_secs(5), "a slot is free again", || async {
        (setup.messages(&a, APP_KEY, BODY, &[]).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_fail_open_for_the_grace_then_hold_locally_while_redis_is_down() {
    let mut setup = Setup::with_redis().await;
    let config = setup.config(
        "    quota: {tokens_per_day: 500}",
        "",
        "quota: {fail_open_grace: 1s}",
    );
    let proxy = setup.proxy(&config);
    let usage = [("x-mock-usage", "300,100,0,0")];
    setup.redis.as_mut().unwrap().stop().unwrap();

    // Within the grace: let through, and counted.
    let answer = setup.messages(&proxy, APP_KEY, BODY, &usage).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let fail_open = r#"claude_relay_quota_store_unavailable_total{result="fail_open"}"#;
    assert_eq!(proxy.metric(fail_open).await, Some(1.0));
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Past it: this replica's own budget, which saw the 400 tokens above.
    let local = r#"claude_relay_quota_store_unavailable_total{result="local"}"#;
    let answer = setup.messages(&proxy, APP_KEY, BODY, &usage).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let passed = std::cell::Cell::new(2);
    eventually(Duration::from_secs(5), "a local refusal", || async {
        let answer = setup.messages(&proxy, APP_KEY, BODY, &usage).await;
        if answer.status == 200 {
            // Possible before the refusal: the outbox is flushed every 100 ms.
            passed.set(passed.get() + 1);
            return None;
        }
        Some(assert_rate_limited(&answer, "500 tokens per day"))
    })
    .await;
    let passed = passed.get();
    assert!(
        passed <= 3,
        "{passed} requests passed a budget of 500 at 400 each"
    );
    assert!(proxy.metric(local).await.unwrap() >= 2.0);
    assert!(proxy.log().contains("quota not checked"));
    // Clients without a quota never noticed.
    assert_eq!(
        setup.messages(&proxy, OTHER_KEY, BODY, &[]).await.status,
        200
    );

    // Redis is back: what the outage kept from it arrives (usage and
    // budget), and the shared budget refuses.
    setup.redis.as_mut().unwrap().restart().unwrap();
    settled(&setup, &proxy, "app", passed).await;
    assert_eq!(
        setup.totals(&proxy, "app").await["input_tokens"],
        300 * passed
    );
    let local_before = proxy.metric(local).await;
    let refused = setup.messages(&proxy, APP_KEY, BODY, &usage).await;
    assert_rate_limited(&refused, "500 tokens per day");
    assert_eq!(
        proxy.metric(local).await,
        local_before,
        "decided by the store"
    );
}

/// Token budgets are charged by compressed answers, JSON and streams alike
/// (before, every SDK client, which asks for gzip, went unbudgeted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_charged_by_compressed_answers() {
    let setup = Setup::standalone().await;
    let config = setup.config("    quota: {tokens_per_day: 500}", "", "");
    for coding in &ENCODINGS[1..] {
        let proxy = setup.proxy(&config);
        let asks = asking_for(coding);
        let with = |more: &[(&'static str, &'static str)]| [asks.as_slice(), more].concat();
        // 300 in + 100 out each; checked before a request, charged after it.
        let json = setup
            .messages(
                &proxy,
                APP_KEY,
                BODY,
                &with(&[("x-mock-usage", "300,100,0,0")]),
            )
            .await;
        assert_eq!(json.status, 200, "{coding}");
        assert!(json.headers.contains_key("content-encoding"), "{coding}");
        settled(&setup, &proxy, "app", 1).await;
        let stream = setup
            .messages(
                &proxy,
                APP_KEY,
                STREAM_BODY,
                &with(&[("x-mock", "stream"), ("x-mock-usage", "300,100,0,0")]),
            )
            .await;
        assert_eq!(stream.status, 200, "{coding}");
        assert!(stream.headers.contains_key("content-encoding"), "{coding}");
        settled(&setup, &proxy, "app", 2).await;
        let refused = setup.messages(&proxy, APP_KEY, BODY, &with(&[])).await;
        assert_rate_limited(&refused, "500 tokens per day");
    }
}

/// A small gzip body that expands far past what the relay inspects: the
/// client gets every byte as sent, the relay stops decoding at its cap
/// (counted), and reads no usage from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_reaches_the_client_whole_and_is_read_only_to_the_cap() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config("", "", ""));
    let past_the_cap =
        (claude_relay_proxy::accounting::usage::DECODED_JSON_CAP + (1 << 20)).to_string();
    let answer = setup
        .messages(
            &proxy,
            APP_KEY,
            BODY,
            &[("accept-encoding", "gzip"), ("x-mock-pad", &past_the_cap)],
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-encoding"], "gzip");
    assert!(answer.body.len() < 64 * 1024, "{} bytes", answer.body.len());
    sent_unchanged(&setup, &answer.body).await;
    assert!(
        decoded("gzip", &answer).len() > claude_relay_proxy::accounting::usage::DECODED_JSON_CAP
    );

    let capped = r#"claude_relay_usage_decodes_total{encoding="gzip",result="capped"}"#;
    eventually(Duration::from_secs(5), "the cap counted", || async {
        (proxy.metric(capped).await == Some(1.0)).then_some(())
    })
    .await;
    assert!(!proxy.log().contains("input_tokens="), "{}", proxy.log());
    // The next answer is read as usual.
    setup
        .messages(&proxy, APP_KEY, BODY, &[("accept-encoding", "gzip")])
        .await;
    settled(&setup, &proxy, "app", 1).await;
}

/// A compressed stream flushed per event reaches the client event by
/// event: each chunk decodes, as it arrives, to whole events, and the
/// first one long before the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_reaches_the_client_event_by_event() {
    use claude_relay_testkit::compress::StreamDecoder;
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config("", "", ""));
    for coding in &ENCODINGS[1..] {
        let headers = [
            asking_for(coding).as_slice(),
            &[("x-mock", "stream"), ("x-mock-delay-ms", "80")],
        ]
        .concat();
        let started = std::time::Instant::now();
        let response = send_streaming(
            &setup.client,
            messages_request(&proxy, APP_KEY, STREAM_BODY, &headers),
        )
        .await;
        assert_eq!(response.status(), 200);
        let mut decoder = StreamDecoder::new(coding);
        let mut body = response.into_body();
        let mut first_event = None;
        let mut events = 0;
        let mut text = String::new();
        while let Some(chunk) = next_chunk(&mut body, Duration::from_secs(5)).await {
            let decoded = String::from_utf8(decoder.chunk(&chunk)).unwrap();
            if decoded.is_empty() {
                continue; // the compressed stream's trailer
            }
            assert!(
                decoded.ends_with("\n\n"),
                "{coding}: {decoded:?} is not whole events"
            );
            events += decoded.matches("\n\n").count();
            first_event.get_or_insert(started.elapsed());
            text.push_str(&decoded);
        }
        let whole = started.elapsed();
        let first_event = first_event.unwrap();
        assert!(text.ends_with("message_stop\"}\n\n"), "{coding}: {text}");
        assert_eq!(events, 11, "{coding}");
        // Ten gaps of 80 ms: the first event came before most of them.
        assert!(whole >= Duration::from_millis(800), "{coding}: {whole:?}");
        assert!(
            first_event < Duration::from_millis(400),
            "{coding}: first event after {first_event:?}"
        );
    }
    settled(&setup, &proxy, "app", 5).await;
    assert_eq!(setup.totals(&proxy, "app").await["output_tokens"], 15 * 5);
}

/// An answer in a coding the relay cannot read, or labelled gzip but not
/// gzip: the client gets it as sent; no usage is read, and it is counted
/// (a decode error also logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_the_relay_cannot_decode_pass_unchanged_and_are_counted() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config("", "", ""));
    let unknown = setup
        .messages(&proxy, APP_KEY, BODY, &[("x-mock-encoding", "compress")])
        .await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.headers["content-encoding"], "compress");
    sent_unchanged(&setup, &unknown.body).await;
    let corrupt = claude_relay_testkit::compress::CORRUPT_GZIP;
    let json = setup
        .messages(&proxy, APP_KEY, BODY, &[("x-mock-encoding", corrupt)])
        .await;
    assert_eq!(json.headers["content-encoding"], "gzip");
    assert!(json.body.starts_with(b"{\""), "plain bytes, as sent");
    sent_unchanged(&setup, &json.body).await;
    let stream = setup
        .messages(
            &proxy,
            APP_KEY,
            STREAM_BODY,
            &[("x-mock", "stream"), ("x-mock-encoding", corrupt)],
        )
        .await;
    assert!(String::from_utf8_lossy(&stream.body).ends_with("message_stop\"}\n\n"));
    sent_unchanged(&setup, &stream.body).await;

    let unsupported = r#"claude_relay_usage_decodes_total{encoding="other",result="unsupported"}"#;
    let failed = r#"claude_relay_usage_decodes_total{encoding="gzip",result="error"}"#;
    eventually(Duration::from_secs(5), "both counted", || async {
        (proxy.metric(unsupported).await == Some(1.0) && proxy.metric(failed).await == Some(2.0))
            .then_some(())
    })
    .await;
    let log = proxy.log();
    assert!(log.contains("did not decode"), "{log}");
    assert!(!log.contains("input_tokens="), "no usage read: {log}");
}
