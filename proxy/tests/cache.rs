//! The response cache: real proxy replicas, a real Redis (level 2), the
//! upstream double counting the calls that reach it.

mod common;

use std::time::Duration;

use claude_relay_testkit::http::{Answer, request, send, send_streaming};
use claude_relay_testkit::proxy::ProxyProcess;
use common::*;
use http::Method;
use http_body_util::BodyExt;

const CACHED: &str = "    cache: {enabled: true}";

fn cache_header(answer: &Answer) -> &str {
    cache_header_of(&answer.headers)
}

fn cache_header_of(headers: &http::HeaderMap) -> &str {
    headers
        .get("x-relay-cache")
        .map_or("-", |v| v.to_str().unwrap())
}

/// Waits until `proxy` has stored `n` responses (the fill runs after the
/// response, in the background).
async fn stored(proxy: &ProxyProcess, n: f64) {
    eventually(Duration::from_secs(5), "response stored", || async {
        (proxy
            .metric(r#"claude_relay_cache_requests_total{result="stored"}"#)
            .await
            >= Some(n))
        .then_some(())
    })
    .await;
}

async fn purge(setup: &Setup, proxy: &ProxyProcess, query: &str) -> serde_json::Value {
    let answer = setup
        .admin(proxy, Method::POST, &format!("/cache/purge{query}"))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    answer.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_are_served_from_the_cache_and_others_miss() {
    let setup = Setup::with_redis().await;
    let a = setup.proxy(&setup.config(CACHED, CACHED, ""));

    let first = setup
        .messages(&a, APP_KEY, BODY, &[("x-mock-usage", "10,20,0,0")])
        .await;
    assert_eq!((first.status.as_u16(), cache_header(&first)), (200, "miss"));
    stored(&a, 1.0).await;
    let calls = setup.upstream.messages_answered();

    let second = setup.messages(&a, APP_KEY, BODY, &[]).await;
    assert_eq!(
        (second.status.as_u16(), cache_header(&second)),
        (200, "hit")
    );
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["content-type"], "application/json");
    // Formatting and key order do not make another request.
    let reordered = r#"{ "messages": [{"content": "Hi", "role": "user"}], "max_tokens": 8, "model": "claude-test" }"#;
    assert_eq!(
        cache_header(&setup.messages(&a, APP_KEY, reordered, &[]).await),
        "hit"
    );
    assert_eq!(
        setup.upstream.messages_answered(),
        calls,
        "hits cost no upstream call"
    );

    // A different beta header, body or client: misses.
    let beta = setup
        .messages(
            &a,
            APP_KEY,
            BODY,
            &[("anthropic-beta", "prompt-caching-2024-07-31")],
        )
        .await;
    assert_eq!(cache_header(&beta), "miss");
    let other_body = BODY.replace("Hi", "Hello");
    assert_eq!(
        cache_header(&setup.messages(&a, APP_KEY, &other_body, &[]).await),
        "miss"
    );
    assert_eq!(
        cache_header(&setup.messages(&a, OTHER_KEY, BODY, &[]).await),
        "miss"
    );
    assert_eq!(setup.upstream.messages_answered(), calls + 3);

    // Hits cost no quota: only the upstream calls are in the usage.
    settled(&setup, &a, "app", 3).await;
    assert_eq!(
        a.metric(r#"claude_relay_cache_requests_total{result="hit_l1"}"#)
            .await,
        Some(2.0)
    );
    assert!(a.log().contains("cache=\"hit_l1\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_two_serves_other_replicas_and_survives_a_restart() {
    let setup = Setup::with_redis().await;
    let config = setup.config(CACHED, "", "");
    let a = setup.proxy(&config);
    assert_eq!(
        cache_header(&setup.messages(&a, APP_KEY, BODY, &[]).await),
        "miss"
    );
    stored(&a, 1.0).await;
    let calls = setup.upstream.messages_answered();

    let b = setup.proxy(&config);
    let from_b = setup.messages(&b, APP_KEY, BODY, &[]).await;
    assert_eq!(cache_header(&from_b), "hit");
    assert_eq!(
        b.metric(r#"claude_relay_cache_requests_total{result="hit_l2"}"#)
            .await,
        Some(1.0)
    );
    // The level-2 hit filled level 1.
    setup.messages(&b, APP_KEY, BODY, &[]).await;
    assert_eq!(
        b.metric(r#"claude_relay_cache_requests_total{result="hit_l1"}"#)
            .await,
        Some(1.0)
    );

    drop(a);
    let restarted = setup.proxy(&config);
    let answer = setup.messages(&restarted, APP_KEY, BODY, &[]).await;
    assert_eq!(cache_header(&answer), "hit");
    assert_eq!(
        restarted
            .metric(r#"claude_relay_cache_requests_total{result="hit_l2"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(setup.upstream.messages_answered(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_and_purges_reach_every_replica() {
    let setup = Setup::with_redis().await;
    let config = setup.config(CACHED, CACHED, "cache: {ttl: 1s}");
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);

    // TTL: a hit within it, a miss after it.
    setup.messages(&a, APP_KEY, BODY, &[]).await;
    stored(&a, 1.0).await;
    assert_eq!(
        cache_header(&setup.messages(&a, APP_KEY, BODY, &[]).await),
        "hit"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Gone from both levels (b has never seen it; a's own copy expired).
    assert_eq!(
        cache_header(&setup.messages(&a, APP_KEY, BODY, &[]).await),
        "miss"
    );

    // Purge by client, on one replica: gone from both levels everywhere,
    // and the other client's entries stay.
    let config = setup.config(CACHED, CACHED, "cache: {ttl: 10m}");
    a.rewrite_config(&config);
    b.rewrite_config(&config);
    for proxy in [&a, &b] {
        eventually(Duration::from_secs(5), "config reloaded", || async {
            (proxy
                .metric(r#"claude_relay_config_reloads_total{result="ok"}"#)
                .await
                >= Some(1.0))
            .then_some(())
        })
        .await;
    }
    let other_body = BODY.replace("Hi", "Other");
    for (proxy, key, body) in [(&a, APP_KEY, BODY), (&a, OTHER_KEY, other_body.as_str())] {
        assert_eq!(
            cache_header(&setup.messages(proxy, key, body, &[]).await),
            "miss"
        );
    }
    stored(&a, 4.0).await;
    // b takes both into its level 1.
    assert_eq!(
        cache_header(&setup.messages(&b, APP_KEY, BODY, &[]).await),
        "hit"
    );
    assert_eq!(
        cache_header(&setup.messages(&b, OTHER_KEY, &other_body, &[]).await),
        "hit"
    );
    let purged = purge(&setup, &a, "?client=app").await;
    // The new entry, and maybe the one of the 1 s TTL not yet expired.
    assert!(
        purged["purged_redis_entries"].as_u64() >= Some(1),
        "{purged}"
    );
    // Level 1 likewise: the 1 s entry may not have been swept yet.
    assert!(
        (1..=2).contains(&purged["purged_memory_entries"].as_u64().unwrap_or(0)),
        "{purged}"
    );
    eventually(Duration::from_secs(3), "b forgets app's entry", || async {
        (cache_header(&setup.messages(&b, APP_KEY, BODY, &[]).await) == "miss").then_some(())
    })
    .await;
    assert_eq!(
        cache_header(&setup.messages(&b, OTHER_KEY, &other_body, &[]).await),
        "hit"
    );
    purge(&setup, &b, "").await;
    eventually(Duration::from_secs(3), "a forgets everything", || async {
        (cache_header(&setup.messages(&a, OTHER_KEY, &other_body, &[]).await) == "miss")
            .then_some(())
    })
    .await;
    let unknown = send(
        &setup.client,
        request(
            Method::POST,
            &a.admin_url("/cache/purge?client=nobody"),
            &[],
            "",
        ),
    )
    .await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_headers_and_config_changes() {
    let setup = Setup::standalone().await;
    // Accounting off: the cache still stores (and nothing is counted).
    let route = |ttl: &str| {
        format!(
            "usage: {{enabled: false}}\ncache:\n  routes:\n    - {{name: test-models, models: ['claude-test*'], enabled: true, shared: true, ttl: {ttl}}}"
        )
    };
    let proxy = setup.proxy(&setup.config("", "", &route("10m")));

    // A shared route: one client's answer serves the other; standalone,
    // level 1 alone.
    assert_eq!(
        cache_header(&setup.messages(&proxy, APP_KEY, BODY, &[]).await),
        "miss"
    );
    stored(&proxy, 1.0).await;
    assert_eq!(
        cache_header(&setup.messages(&proxy, OTHER_KEY, BODY, &[]).await),
        "hit"
    );
    // Off for one request; never for streams or other models.
    let off = setup
        .messages(&proxy, APP_KEY, BODY, &[("x-relay-cache", "off")])
        .await;
    assert_eq!(cache_header(&off), "-");
    let stream = setup
        .messages(&proxy, APP_KEY, STREAM_BODY, &[("x-mock", "stream")])
        .await;
    assert_eq!(cache_header(&stream), "-");
    let other_model = BODY.replace("claude-test", "claude-other");
    assert_eq!(
        cache_header(&setup.messages(&proxy, APP_KEY, &other_model, &[]).await),
        "-"
    );
    // ... unless the request asks.
    let asked = setup
        .messages(&proxy, APP_KEY, &other_model, &[("x-relay-cache", "on")])
        .await;
    assert_eq!(cache_header(&asked), "miss");
    let bad = setup
        .messages(&proxy, APP_KEY, BODY, &[("x-relay-cache", "maybe")])
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    // Errors are not stored.
    let failed = setup
        .messages(
            &proxy,
            APP_KEY,
            &BODY.replace("Hi", "fail"),
            &[("x-mock", "status-500")],
        )
        .await;
    assert_eq!(
        (failed.status.as_u16(), cache_header(&failed)),
        (500, "miss")
    );
    let again = setup
        .messages(&proxy, APP_KEY, &BODY.replace("Hi", "fail"), &[])
        .await;
    assert_eq!((again.status.as_u16(), cache_header(&again)), (200, "miss"));

    assert_eq!(setup.totals(&proxy, "app").await["requests"], 0);
    assert!(!proxy.metrics().await.contains("claude_relay_tokens_total{"));

    // A change of the route empties its entries.
    proxy.rewrite_config(&setup.config("", "", &route("20m")));
    eventually(
        Duration::from_secs(5),
        "the new route is in force",
        || async {
            (cache_header(&setup.messages(&proxy, OTHER_KEY, BODY, &[]).await) == "miss")
                .then_some(())
        },
    )
    .await;
}

/// DESIGN: at most one round trip to the store per request. A cacheable
/// request that level 1 does not answer asks the store everything at once
/// (rate window, quota with a concurrency slot, the level-2 read), so
/// through a link where each round trip takes `DELAY` it is answered in
/// about one `DELAY`, where asking one thing after the other took three.
/// A level-2 hit costs no quota: the slot the store gave goes back. The
/// slot's release is the one other round trip, at the end of the answer
/// (the client's next request must find it free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_one_miss_costs_one_round_trip_to_the_store() {
    const DELAY: Duration = Duration::from_millis(300);
    let setup = Setup::with_redis().await;
    let redis = setup.redis.as_ref().unwrap();
    let link = claude_relay_testkit::redis::SlowLink::start(redis.addr(), DELAY)
        .await
        .unwrap();
    let config = setup
        .config(
            "    cache: {enabled: true}\n    rate_limit: {requests: 100, per: minute}\n    quota: {tokens_per_minute: 100000, max_concurrent: 5}",
            "",
            "",
        )
        .replace(&redis.url(), &link.url())
        .replace("command_timeout: 200ms", "command_timeout: 3s");
    assert!(config.contains(&link.url()));
    let setup = &setup;
    // Time to the answer's head: the admission; then the whole answer,
    // which waits for the slot's release too.
    let timed = |proxy| async move {
        let started = std::time::Instant::now();
        let response =
            send_streaming(&setup.client, messages_request(proxy, APP_KEY, BODY, &[])).await;
        let head = started.elapsed();
        assert_eq!(response.status(), 200);
        let cache = cache_header_of(response.headers()).to_owned();
        response.into_body().collect().await.unwrap();
        let whole = started.elapsed();
        assert!(
            whole < head + DELAY * 2,
            "the end took {:?} after the head: more than the slot's release",
            whole - head
        );
        (cache, head)
    };

    let a = setup.proxy(&config);
    // A fresh Redis has no scripts cached: the first call loads it (EVAL
    // after NOSCRIPT), a second round trip that later requests never pay.
    let other_body = BODY.replace("Hi", "Hello");
    let warm_up = setup.messages(&a, APP_KEY, &other_body, &[]).await;
    assert_eq!(warm_up.status, 200);
    let (cache, took) = timed(&a).await;
    assert_eq!(cache, "miss");
    assert!(
        took >= DELAY && took < DELAY * 2,
        "a miss took {took:?}: not one round trip of {DELAY:?}"
    );
    eventually(
        Duration::from_secs(5),
        "both answers in level 2",
        || async {
            let keys = redis
                .cli(&["KEYS", "claude-relay:usage-test:cache:*"])
                .unwrap();
            (keys.lines().count() == 2).then_some(())
        },
    )
    .await;

    // Another replica: level 1 empty, level 2 answers, in one round trip.
    // Its connections to the store come up through the slow link after it
    // is ready: until then level 2 is out of reach.
    let b = setup.proxy(&config);
    eventually(
        Duration::from_secs(10),
        "level 2 reachable from b",
        || async {
            let answer = setup.messages(&b, APP_KEY, &other_body, &[]).await;
            (cache_header(&answer) == "hit").then_some(())
        },
    )
    .await;
    let calls = setup.upstream.messages_answered();
    let level2_hits = r#"claude_relay_cache_requests_total{result="hit_l2"}"#;
    let before = b.metric(level2_hits).await.unwrap_or(0.0);
    let (cache, took) = timed(&b).await;
    assert_eq!(cache, "hit");
    assert!(
        took >= DELAY && took < DELAY * 2,
        "a level-2 hit took {took:?}: not one round trip of {DELAY:?}"
    );
    assert_eq!(b.metric(level2_hits).await, Some(before + 1.0));
    // The hit's concurrency slot is released: only the miss's was ever
    // held, and it too is gone once settled.
    let in_flight = "claude-relay:usage-test:{app}:inflight";
    eventually(Duration::from_secs(5), "slots released", || async {
        (redis.cli(&["ZCARD", in_flight]).unwrap().trim() == "0").then_some(())
    })
    .await;
    // Only misses reached the upstream, and only they are charged.
    assert_eq!(setup.upstream.messages_answered(), calls);
    settled(setup, &b, "app", calls as u64).await;
}

/// Compressed answers are stored decoded, and hits are served uncoded with
/// their length, to whatever the client accepts: the SDK's second identical
/// call (it asks for gzip) decodes what it gets, a client that asks for no
/// coding never gets one, and a client that refuses identity goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answers_are_cached_decoded_and_hits_are_uncoded() {
    let setup = Setup::with_redis().await;
    let config = setup.config(CACHED, "", "");
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);
    for (n, coding) in ENCODINGS[1..].iter().enumerate() {
        let body = BODY.replace("Hi", &format!("Hi {coding}"));
        let asks = asking_for(coding);
        let first = setup.messages(&a, APP_KEY, &body, &asks).await;
        assert_eq!((first.status.as_u16(), cache_header(&first)), (200, "miss"));
        let plain = decoded(coding, &first);
        sent_unchanged(&setup, &first.body).await;
        stored(&a, (n + 1) as f64).await;
        let calls = setup.upstream.messages_answered();

        let hit_on = |proxy, headers: Vec<(&'static str, &'static str)>| {
            let (body, plain) = (&body, &plain);
            let setup = &setup;
            async move {
                let hit = setup.messages(proxy, APP_KEY, body, &headers).await;
                assert_eq!(
                    (hit.status.as_u16(), cache_header(&hit)),
                    (200, "hit"),
                    "{coding}"
                );
                assert!(!hit.headers.contains_key("content-encoding"), "{coding}");
                assert_eq!(hit.headers["content-length"], hit.body.len().to_string());
                assert_eq!(hit.body, plain.as_bytes(), "{coding}");
                assert_eq!(hit.json()["type"], "message");
            }
        };
        hit_on(&a, asks.clone()).await;
        hit_on(&a, Vec::new()).await;
        hit_on(&a, vec![("accept-encoding", "gzip, deflate, br, zstd")]).await;
        // Level 2, on the other replica, the same.
        hit_on(&b, asks.clone()).await;
        assert_eq!(setup.upstream.messages_answered(), calls, "{coding}");
    }

    // Refusing identity: no hit; the upstream answers in what is accepted.
    let calls = setup.upstream.messages_answered();
    let refuses = setup
        .messages(
            &a,
            APP_KEY,
            &BODY.replace("Hi", "Hi gzip"),
            &[("accept-encoding", "gzip, identity;q=0")],
        )
        .await;
    assert_eq!(
        (refuses.status.as_u16(), cache_header(&refuses)),
        (200, "-")
    );
    assert_eq!(refuses.headers["content-encoding"], "gzip");
    assert_eq!(setup.upstream.messages_answered(), calls + 1);

    // An answer that decodes past the relay's cap is relayed, not stored
    // (the same request answered small then is).
    let stored_before = a
        .metric(r#"claude_relay_cache_requests_total{result="stored"}"#)
        .await;
    let pad = (claude_relay_proxy::accounting::usage::DECODED_JSON_CAP + 1).to_string();
    let bomb_body = BODY.replace("Hi", "Hi bomb");
    let bomb = setup
        .messages(
            &a,
            APP_KEY,
            &bomb_body,
            &[("accept-encoding", "gzip"), ("x-mock-pad", &pad)],
        )
        .await;
    assert_eq!(cache_header(&bomb), "miss");
    let capped = r#"claude_relay_usage_decodes_total{encoding="gzip",result="capped"}"#;
    eventually(Duration::from_secs(5), "the cap counted", || async {
        (a.metric(capped).await == Some(1.0)).then_some(())
    })
    .await;
    let again = setup.messages(&a, APP_KEY, &bomb_body, &[]).await;
    assert_eq!(cache_header(&again), "miss", "the bomb was not stored");
    stored(&a, stored_before.unwrap() + 1.0).await;
}
