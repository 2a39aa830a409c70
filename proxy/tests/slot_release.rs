//! Concurrency slots come back when the answer ends: with
//! `max_concurrent: 1`, a client that sends its requests strictly one after
//! another is never refused, on one replica with the memory store and
//! across replicas sharing Redis; a client that leaves frees its slot at
//! once; and the limit still holds for requests truly at the same time.

mod common;

use std::time::{Duration, Instant};

use claude_relay_testkit::http::{TestClient, next_chunk, request, send, send_streaming};
use claude_relay_testkit::proxy::ProxyProcess;
use common::*;
use http::Method;
use http_body_util::BodyExt;

const ONE_AT_A_TIME: &str = "    quota: {max_concurrent: 1}";

/// 20 requests, each sent once the answer before it was read to its end,
/// JSON and streams in turn, to the replicas in turn: every one passes.
async fn sequential_requests_all_pass(client: &TestClient, replicas: &[&ProxyProcess]) {
    sequential_requests_all_pass_as(client, replicas, "identity").await;
}

/// The same, asking for answers in `accept_encoding` (the official SDKs
/// ask for gzip, and the API double then compresses as the API does).
async fn sequential_requests_all_pass_as(
    client: &TestClient,
    replicas: &[&ProxyProcess],
    accept_encoding: &str,
) {
    for i in 0..20 {
        let proxy = replicas[i % replicas.len()];
        let (body, mock) = if i % 4 < 2 {
            (BODY, "json")
        } else {
            (STREAM_BODY, "stream")
        };
        let answer = send(
            client,
            messages_request(
                proxy,
                APP_KEY,
                body,
                &[("x-mock", mock), ("accept-encoding", accept_encoding)],
            ),
        )
        .await;
        assert_eq!(
            answer.status, 200,
            "request {i} ({}) refused: {:?}",
            mock, answer.body
        );
        let coding = answer
            .headers
            .get("content-encoding")
            .map_or("identity", |v| v.to_str().unwrap());
        assert_eq!(coding, accept_encoding, "request {i} ({mock})");
        if mock == "stream" && accept_encoding == "identity" {
            assert!(answer.body.ends_with(b"message_stop\"}\n\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_never_meet_their_own_slot_with_the_memory_store() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config(ONE_AT_A_TIME, "", ""));
    sequential_requests_all_pass(&setup.client, &[&proxy]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_never_meet_their_own_slot_across_replicas_sharing_redis() {
    let setup = Setup::with_redis().await;
    let config = setup.config(ONE_AT_A_TIME, "", "");
    let (a, b) = (setup.proxy(&config), setup.proxy(&config));
    sequential_requests_all_pass(&setup.client, &[&a, &b]).await;
    // One replica alone, too: the release is not left to a batch.
    sequential_requests_all_pass(&setup.client, &[&a]).await;
}

/// Compressed answers, whose last chunk is decoded for usage only once the
/// server is done with the body, release their slot before the end too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_with_compressed_answers_never_meet_their_own_slot_across_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config(ONE_AT_A_TIME, "", "");
    let (a, b) = (setup.proxy(&config), setup.proxy(&config));
    for coding in ["gzip", "br"] {
        sequential_requests_all_pass_as(&setup.client, &[&a, &b], coding).await;
    }
}

/// The same over HTTP/2, which hyper serves (the relay's own loop serves
/// the HTTP/1 requests above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_http2_requests_never_meet_their_own_slot_across_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config(ONE_AT_A_TIME, "", "");
    let (a, b) = (setup.proxy(&config), setup.proxy(&config));
    let h2: TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    sequential_requests_all_pass(&h2, &[&a, &b]).await;
}

/// A client that leaves mid-stream: its slot is free well within the
/// outbox's flush interval, on whichever replica asks next.
async fn a_client_that_leaves_frees_its_slot_at_once(
    setup: &Setup,
    first: &ProxyProcess,
    next: &ProxyProcess,
) {
    let stream = messages_request(
        first,
        APP_KEY,
        STREAM_BODY,
        &[("x-mock", "stream-endless"), ("x-mock-delay-ms", "100")],
    );
    let response = send_streaming(&setup.client, stream).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    next_chunk(&mut body, Duration::from_secs(5))
        .await
        .expect("the first event");
    // Held: the limit holds while the stream runs.
    let refused = setup.messages(next, APP_KEY, BODY, &[]).await;
    assert_rate_limited(&refused, "1 concurrent requests");
    drop(body);
    let left = Instant::now();
    eventually(Duration::from_secs(2), "the slot is free again", || async {
        (setup.messages(next, APP_KEY, BODY, &[]).await.status == 200).then_some(())
    })
    .await;
    let waited = left.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "the slot came back {waited:?} after the client left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_slot_with_the_memory_store() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config(ONE_AT_A_TIME, "", ""));
    a_client_that_leaves_frees_its_slot_at_once(&setup, &proxy, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_slot_across_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config(ONE_AT_A_TIME, "", "");
    let (a, b) = (setup.proxy(&config), setup.proxy(&config));
    a_client_that_leaves_frees_its_slot_at_once(&setup, &a, &b).await;
}

/// Two requests at the same time with room for one: one is refused, and
/// once the other ends the next passes.
async fn the_limit_holds_for_requests_at_once(setup: &Setup, a: &ProxyProcess, b: &ProxyProcess) {
    let slow = |proxy: &ProxyProcess| {
        request(
            Method::POST,
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", APP_KEY),
                ("content-type", "application/json"),
                ("x-mock-delay-ms", "800"),
            ],
            BODY,
        )
    };
    let (one, two) = tokio::join!(
        claude_relay_testkit::http::send(&setup.client, slow(a)),
        claude_relay_testkit::http::send(&setup.client, slow(b)),
    );
    let mut statuses = [one.status.as_u16(), two.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429], "{:?} {:?}", one.body, two.body);
    let refused = if one.status == 429 { &one } else { &two };
    assert_eq!(assert_rate_limited(refused, "1 concurrent requests"), 1);
    assert_eq!(setup.messages(b, APP_KEY, BODY, &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_for_requests_at_once_with_the_memory_store() {
    let setup = Setup::standalone().await;
    let proxy = setup.proxy(&setup.config(ONE_AT_A_TIME, "", ""));
    the_limit_holds_for_requests_at_once(&setup, &proxy, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_for_requests_at_once_across_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config(ONE_AT_A_TIME, "", "");
    let (a, b) = (setup.proxy(&config), setup.proxy(&config));
    the_limit_holds_for_requests_at_once(&setup, &a, &b).await;
}

/// Redis stalls as an answer ends: the end waits for the release no longer
/// than the store's command timeout (200 ms here), and the release, left to
/// the outbox, reaches Redis once it answers again, long before the slot's
/// 60 s lease would lapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_redis_does_not_answer_is_bounded_and_retried() {
    let setup = Setup::with_redis().await;
    let redis = setup.redis.as_ref().unwrap();
    let proxy = setup.proxy(&setup.config(ONE_AT_A_TIME, "", ""));
    let gated = messages_request(&proxy, APP_KEY, STREAM_BODY, &[("x-mock", "stream-gated")]);
    let response = send_streaming(&setup.client, gated).await;
    assert_eq!(response.status(), 200);
    let in_flight = "claude-relay:usage-test:{app}:inflight";
    assert_eq!(redis.cli(&["ZCARD", in_flight]).unwrap().trim(), "1");

    // Writes (the release's ZREM among them) wait for 1.5 s.
    redis.cli(&["CLIENT", "PAUSE", "1500", "WRITE"]).unwrap();
    let paused = Instant::now();
    setup.upstream.open_gate();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let ended = paused.elapsed();
    assert!(body.ends_with(b"message_stop\"}\n\n"));
    assert!(
        ended < Duration::from_millis(1000),
        "the end waited {ended:?} for a stalled release"
    );
    let failed = proxy
        .metric(r#"claude_relay_store_errors_total{result="unavailable"}"#)
        .await;
    assert!(failed >= Some(1.0), "the release did not meet the stall");
    eventually(Duration::from_secs(10), "the slot released", || async {
        (redis.cli(&["ZCARD", in_flight]).unwrap().trim() == "0").then_some(())
    })
    .await;
    assert_eq!(setup.messages(&proxy, APP_KEY, BODY, &[]).await.status, 200);
}
