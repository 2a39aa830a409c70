//! Signed requests and replay protection across replicas: real proxy
//! processes sharing a real Redis, an upstream that speaks the Claude API.

use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_relay_proxy::admission::signing::{self, Request, SigningSecret, Stamp};
use claude_relay_testkit::http::{self as th, Answer, request, send};
use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::redis::RedisServer;
use claude_relay_testkit::upstream::MockUpstream;
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const SECRET_OLD: &str = "old-secret-0123456789abcdefghijklmnopqrstuv";
const SECRET_NEW: &str = "new-secret-0123456789abcdefghijklmnopqrstuv";
const BODY: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

struct Setup {
    upstream: MockUpstream,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old"), SECRET_OLD).unwrap();
        std::fs::write(dir.path().join("new"), SECRET_NEW).unwrap();
        Self {
            upstream: MockUpstream::start().await,
            redis: RedisServer::start().unwrap(),
            dir,
        }
    }

    /// `secrets`: which signing secret files the signer client has.
    fn config(&self, secrets: &[&str], extra_client: &str, replay: &str) -> String {
        let secrets: Vec<String> = secrets
            .iter()
            .map(|s| format!("{{file: {}}}", self.dir.path().join(s).display()))
            .collect();
        format!(
            r#"
relay_name: signed-test
server: {{listen: "{{listen}}", admin_listen: "{{admin}}", reload_interval: 50ms}}
replay: {replay}
store:
  redis: {{url: "{redis}", command_timeout: 200ms}}
clients:
  - id: signer
    signing_secrets: [{secrets}]
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
{extra_client}
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{env: TEST_UPSTREAM_KEY}}]
"#,
            redis = self.redis.url(),
            secrets = secrets.join(", "),
            upstream = self.upstream.base_url(),
        )
    }

    fn proxy(&self, config: &str) -> ProxyProcess {
        ProxyProcess::start(
            BIN.as_ref(),
            config,
            &[
                ("TEST_RELAY_KEY", RELAY_KEY),
                ("TEST_UPSTREAM_KEY", "sk-ant-up"),
            ],
        )
    }
}

fn default_replay() -> &'static str {
    "{window: 300s}"
}

/// A signed request as a client builds it.
fn signed(
    proxy: &ProxyProcess,
    key_id: &str,
    secret: &str,
    path: &str,
    body: &str,
    timestamp: u64,
    nonce: &str,
) -> http::Request<http_body_util::Full<Bytes>> {
    let secret = SigningSecret::new(secret.as_bytes()).unwrap();
    let stamp = Stamp {
        key_id,
        timestamp,
        nonce,
    };
    let headers = signing::signature_headers(
        &secret,
        &stamp,
        &Request {
            method: "POST",
            path_and_query: path,
            body: body.as_bytes(),
        },
    );
    let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("content-type", "application/json"));
    request(Method::POST, &proxy.url(path), &all, body.to_string())
}

/// The signer's usual request, signed now with a fresh nonce.
fn signed_now(proxy: &ProxyProcess, secret: &str) -> http::Request<http_body_util::Full<Bytes>> {
    signed(
        proxy,
        "signer",
        secret,
        "/v1/messages",
        BODY,
        signing::unix_now(),
        &fresh_nonce(),
    )
}

/// The signer's usual request under the old secret, at `timestamp`.
fn signed_at(
    proxy: &ProxyProcess,
    timestamp: u64,
    nonce: &str,
) -> http::Request<http_body_util::Full<Bytes>> {
    signed(
        proxy,
        "signer",
        SECRET_OLD,
        "/v1/messages",
        BODY,
        timestamp,
        nonce,
    )
}

fn fresh_nonce() -> String {
    signing::generate_nonce().unwrap()
}

fn relay_key_request(proxy: &ProxyProcess) -> http::Request<http_body_util::Full<Bytes>> {
    request(
        Method::POST,
        &proxy.url("/v1/messages"),
        &[
            ("x-api-key", RELAY_KEY),
            ("content-type", "application/json"),
        ],
        BODY,
    )
}

fn assert_refused(answer: &Answer, status: u16, kind: &str, says: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["error"]["type"], kind);
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{says:?} not in {message:?}");
    assert!(!message.contains(SECRET_OLD) && !message.contains(SECRET_NEW));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_signed_request_on_two_replicas_succeeds_exactly_once() {
    let setup = Setup::new().await;
    let config = setup.config(&["old"], "", default_replay());
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);
    let client = th::client();
    for round in 0..40 {
        let nonce = fresh_nonce();
        let now = signing::unix_now();
        let to_a = signed(&a, "signer", SECRET_OLD, "/v1/messages", BODY, now, &nonce);
        let to_b = signed(&b, "signer", SECRET_OLD, "/v1/messages", BODY, now, &nonce);
        let (ra, rb) = tokio::join!(send(&client, to_a), send(&client, to_b));
        let mut statuses = [ra.status.as_u16(), rb.status.as_u16()];
        statuses.sort();
        assert_eq!(
            statuses,
            [200, 401],
            "round {round}: {:?} {:?}",
            ra.body,
            rb.body
        );
        let refused = if ra.status == 401 { &ra } else { &rb };
        assert_refused(refused, 401, "authentication_error", "replayed nonce");
    }
    assert_eq!(setup.upstream.request_count(), 40);
}

/// A signed client that asks for compressed answers (as the SDKs do) gets
/// the upstream's bytes, and its usage is counted: streams and JSON, every
/// coding the relay reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_compressed_answers_are_relayed_as_sent_and_counted() {
    use claude_relay_testkit::compress;
    let setup = Setup::new().await;
    let proxy = setup.proxy(&setup.config(&["old"], "", default_replay()));
    let client = th::client();
    let stream_body = BODY.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
    for coding in ["gzip", "deflate", "br", "zstd"] {
        for (body, mode) in [(BODY, "json"), (stream_body.as_str(), "stream")] {
            let mut signed_request = signed(
                &proxy,
                "signer",
                SECRET_OLD,
                "/v1/messages",
                body,
                signing::unix_now(),
                &fresh_nonce(),
            );
            let headers = signed_request.headers_mut();
            // Not signed over: the signature covers the body as sent.
            headers.insert("accept-encoding", coding.parse().unwrap());
            headers.insert("x-mock", mode.parse().unwrap());
            let answer = send(&client, signed_request).await;
            assert_eq!(answer.status, 200, "{coding} {mode}");
            assert_eq!(answer.headers["content-encoding"], coding);
            let sent = setup.upstream.bodies_sent();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !setup.upstream.bodies_sent().contains(&answer.body) {
                assert!(Instant::now() < deadline, "{coding} {mode}: {sent:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let text = String::from_utf8(compress::decode(coding, &answer.body)).unwrap();
            assert!(text.contains("\"usage\""), "{coding} {mode}: {text}");
        }
    }
    // Four JSON answers (180 out each) and four streams (15 each).
    let output =
        r#"claude_relay_tokens_total{client="signer",model="claude-test",kind="output_tokens"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric(output).await != Some(4.0 * 195.0) {
        assert!(Instant::now() < deadline, "{}", proxy.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn replays_stale_timestamps_and_tampering_are_refused_before_the_upstream() {
    let setup = Setup::new().await;
    let proxy = setup.proxy(&setup.config(&["old"], "", default_replay()));
    let client = th::client();
    let now = signing::unix_now();

    let nonce = fresh_nonce();
    let first = send(&client, signed_at(&proxy, now, &nonce)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let again = send(&client, signed_at(&proxy, now, &nonce)).await;
    assert_refused(&again, 401, "authentication_error", "replayed nonce");

    // The window holds on both sides: 300 s is in, 301 s is out.
    for (timestamp, ok) in [
        (now - 295, true),
        (now + 295, true),
        (now - 310, false),
        (now + 310, false),
    ] {
        let answer = send(&client, signed_at(&proxy, timestamp, &fresh_nonce())).await;
        if ok {
            assert_eq!(answer.status, 200, "{timestamp}: {:?}", answer.body);
        } else {
            assert_refused(&answer, 401, "authentication_error", "stale timestamp");
        }
    }

    // Tampering: the body, the path or query, or the method changed after signing.
    let mut tampered = signed_at(&proxy, now, &fresh_nonce());
    *tampered.body_mut() = http_body_util::Full::new(Bytes::from(BODY.replace("Hi", "Hi!")));
    tampered.headers_mut().remove("content-length");
    assert_refused(
        &send(&client, tampered).await,
        401,
        "authentication_error",
        "bad signature",
    );
    let mut tampered = signed(
        &proxy,
        "signer",
        SECRET_OLD,
        "/v1/messages?beta=true",
        BODY,
        now,
        &fresh_nonce(),
    );
    *tampered.uri_mut() = proxy.url("/v1/messages?beta=false").parse().unwrap();
    assert_refused(
        &send(&client, tampered).await,
        401,
        "authentication_error",
        "bad signature",
    );
    let mut tampered = signed_at(&proxy, now, &fresh_nonce());
    *tampered.method_mut() = Method::PUT;
    assert_refused(
        &send(&client, tampered).await,
        401,
        "authentication_error",
        "bad signature",
    );
    let mut tampered = signed_at(&proxy, now, &fresh_nonce());
    tampered
        .headers_mut()
        .insert("x-relay-nonce", fresh_nonce().parse().unwrap());
    assert_refused(
        &send(&client, tampered).await,
        401,
        "authentication_error",
        "bad signature",
    );
    let mut tampered = signed_at(&proxy, now, &fresh_nonce());
    tampered
        .headers_mut()
        .insert("x-relay-timestamp", (now - 1).to_string().parse().unwrap());
    assert_refused(
        &send(&client, tampered).await,
        401,
        "authentication_error",
        "bad signature",
    );

    // Wrong secret, unknown key id, malformed header, a relay-key client signing.
    assert_refused(
        &send(
            &client,
            signed(
                &proxy,
                "signer",
                SECRET_NEW,
                "/v1/messages",
                BODY,
                now,
                &fresh_nonce(),
            ),
        )
        .await,
        401,
        "authentication_error",
        "bad signature",
    );
    assert_refused(
        &send(
            &client,
            signed(
                &proxy,
                "nobody",
                SECRET_OLD,
                "/v1/messages",
                BODY,
                now,
                &fresh_nonce(),
            ),
        )
        .await,
        401,
        "authentication_error",
        "unknown key id",
    );
    assert_refused(
        &send(
            &client,
            signed(
                &proxy,
                "app",
                SECRET_OLD,
                "/v1/messages",
                BODY,
                now,
                &fresh_nonce(),
            ),
        )
        .await,
        401,
        "authentication_error",
        "not enabled",
    );
    assert_refused(
        &send(&client, signed_at(&proxy, now, "short")).await,
        401,
        "authentication_error",
        "malformed",
    );
    // A signing client cannot fall back to a relay key it does not have.
    let no_sig = request(
        Method::POST,
        &proxy.url("/v1/messages"),
        &[("x-api-key", "signer")],
        BODY,
    );
    assert_refused(
        &send(&client, no_sig).await,
        401,
        "authentication_error",
        "invalid relay key",
    );

    // Only the accepted requests reached the upstream.
    assert_eq!(setup.upstream.request_count(), 3);
    let metrics = send(
        &client,
        request(Method::GET, &proxy.admin_url("/metrics"), &[], ""),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("claude_relay_auth_failures_total{result=\"replayed_nonce\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("claude_relay_auth_failures_total{result=\"bad_signature\"} 6"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_signed_requests_closed_and_relay_keys_keep_working() {
    let mut setup = Setup::new().await;
    let proxy = setup.proxy(&setup.config(&["old"], "", default_replay()));
    let client = th::client();
    assert_eq!(
        send(&client, signed_now(&proxy, SECRET_OLD)).await.status,
        200
    );

    setup.redis.stop().unwrap();
    let started = Instant::now();
    let answer = send(&client, signed_now(&proxy, SECRET_OLD)).await;
    assert_refused(
        &answer,
        503,
        "overloaded_error",
        "replay protection is unavailable",
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the store call must fail fast"
    );
    assert_eq!(send(&client, relay_key_request(&proxy)).await.status, 200);

    setup.redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = send(&client, signed_now(&proxy, SECRET_OLD)).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.status, 503, "{:?}", answer.body);
        assert!(
            Instant::now() < deadline,
            "signed requests did not recover after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = send(
        &client,
        request(Method::GET, &proxy.admin_url("/metrics"), &[], ""),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains("claude_relay_store_errors_total{result=\"unavailable\"}")
    );
}

/// Each worker thread claims nonces over a Redis connection of its own,
/// driven by its own runtime (no hop to another thread per request); the
/// shared pool keeps its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_checks_nonces_over_its_own_connection() {
    let setup = Setup::new().await;
    let config = setup
        .config(&["old"], "", default_replay())
        .replace(
            "reload_interval: 50ms}",
            "reload_interval: 50ms, workers: 2}",
        )
        .replace(
            "command_timeout: 200ms}",
            "command_timeout: 200ms, pool_size: 1}",
        );
    let proxy = setup.proxy(&config);
    let connections = || {
        let list = setup.redis.cli(&["CLIENT", "LIST"]).unwrap();
        // Every connection but the one asking.
        list.lines()
            .filter(|line| !line.trim().is_empty() && !line.contains("cmd=client|list"))
            .count()
    };
    assert_eq!(connections(), 1, "before any request: the shared pool only");

    // A fresh client connection per request: the kernel spreads them over
    // the two workers' listeners, so both workers serve some of the 40.
    for _ in 0..40 {
        let answer = send(&th::client(), signed_now(&proxy, SECRET_OLD)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    // A worker's connection is made on its first request (that request
    // and those until it is up take the shared pool).
    th::wait_for(
        "the shared pool and one connection per worker",
        Duration::from_secs(5),
        async || connections() == 3,
    )
    .await;
    // More requests open nothing more.
    for _ in 0..10 {
        assert_eq!(
            send(&th::client(), signed_now(&proxy, SECRET_OLD))
                .await
                .status,
            200
        );
    }
    assert_eq!(connections(), 3);
    // And a replay is still caught, whichever worker takes it.
    let nonce = fresh_nonce();
    let now = signing::unix_now();
    let first = signed_at(&proxy, now, &nonce);
    assert_eq!(send(&th::client(), first).await.status, 200);
    for _ in 0..6 {
        let again = signed_at(&proxy, now, &nonce);
        let answer = send(&th::client(), again).await;
        assert_refused(&answer, 401, "authentication_error", "replayed nonce");
    }
    assert_eq!(setup.upstream.request_count(), 51);
}

#[tokio::test]
async fn fail_open_lets_signed_requests_through_loudly() {
    let mut setup = Setup::new().await;
    let proxy = setup.proxy(&setup.config(&["old"], "", "{window: 300s, fail_open: true}"));
    setup.redis.stop().unwrap();
    let answer = send(&th::client(), signed_now(&proxy, SECRET_OLD)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(
        proxy.log().contains("REPLAY PROTECTION OFF"),
        "{}",
        proxy.log()
    );
    // A bad signature is still refused: only the nonce check is skipped.
    let answer = send(&th::client(), signed_now(&proxy, SECRET_NEW)).await;
    assert_eq!(answer.status, 401);
}

#[tokio::test]
async fn secrets_rotate_with_overlap() {
    let setup = Setup::new().await;
    let proxy = setup.proxy(&setup.config(&["old", "new"], "", default_replay()));
    let client = th::client();
    let with = |secret: &str| signed_now(&proxy, secret);
    assert_eq!(send(&client, with(SECRET_OLD)).await.status, 200);
    assert_eq!(send(&client, with(SECRET_NEW)).await.status, 200);

    // The old secret is removed from the config: it stops working.
    proxy.rewrite_config(&setup.config(&["new"], "", default_replay()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&client, with(SECRET_OLD)).await.status == 200 {
        assert!(Instant::now() < deadline, "the old secret still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_refused(
        &send(&client, with(SECRET_OLD)).await,
        401,
        "authentication_error",
        "bad signature",
    );
    assert_eq!(send(&client, with(SECRET_NEW)).await.status, 200);

    // A secret file rewritten in place (a rotated Secret) is re-read too.
    std::fs::write(setup.dir.path().join("new"), SECRET_OLD).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&client, with(SECRET_OLD)).await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "the rewritten secret file was not re-read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_rate_limit_holds_across_two_replicas() {
    let setup = Setup::new().await;
    let limited = "  - id: limited\n    relay_keys: [{env: TEST_LIMITED_KEY}]\n    rate_limit: {requests: 5, per: minute}\n";
    let config = setup.config(&["old"], limited, default_replay());
    let start = |config: &str| {
        ProxyProcess::start(
            BIN.as_ref(),
            config,
            &[
                ("TEST_RELAY_KEY", RELAY_KEY),
                ("TEST_UPSTREAM_KEY", "sk-ant-up"),
                ("TEST_LIMITED_KEY", "limited-key"),
            ],
        )
    };
    let (a, b) = (start(&config), start(&config));
    let client = th::client();
    let mut ok = 0;
    let mut refused = Vec::new();
    for i in 0..12 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let answer = send(
            &client,
            request(
                Method::POST,
                &proxy.url("/v1/messages"),
                &[("x-api-key", "limited-key")],
                BODY,
            ),
        )
        .await;
        match answer.status.as_u16() {
            200 => ok += 1,
            429 => refused.push(answer),
            other => panic!("unexpected {other}: {:?}", answer.body),
        }
    }
    assert_eq!(ok, 5, "the limit is 5 per minute across both replicas");
    assert_eq!(refused.len(), 7);
    for answer in &refused {
        assert_refused(answer, 429, "rate_limit_error", "rate limit");
        let retry: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "retry-after {retry}");
    }
    // Other clients are not limited.
    for _ in 0..8 {
        assert_eq!(send(&client, relay_key_request(&a)).await.status, 200);
    }
}

/// `store.redis.pipeline: false` keeps one command at a time on each Redis
/// connection: while Redis holds writes back (`CLIENT PAUSE WRITE`), the
/// concurrent requests of a worker leave one nonce in Redis's hands and
/// wait in the relay; pipelined, they pile up in the connection's query
/// buffer. Either way every request is served once its nonce is claimed,
/// and a replayed nonce is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_a_connection_carries_one_nonce_at_a_time() {
    const CONCURRENT: usize = 8;
    let setup = Setup::new().await;
    let config = |pipeline: bool| {
        setup
            .config(&["old"], "", default_replay())
            .replace(
                "reload_interval: 50ms}",
                "reload_interval: 50ms, workers: 1}",
            )
            .replace(
                "command_timeout: 200ms}",
                // Long enough for commands held back by the pause.
                &format!("command_timeout: 5s, pool_size: 1, pipeline: {pipeline}}}"),
            )
    };
    // The nonce SETs Redis holds back, with the bytes queued behind each.
    let held_nonces = || -> Vec<usize> {
        let list = setup.redis.cli(&["CLIENT", "LIST"]).unwrap();
        list.lines()
            .filter(|line| line.contains(" flags=b ") && line.contains(" cmd=set "))
            .map(|line| {
                let qbuf = line.split(' ').find_map(|f| f.strip_prefix("qbuf="));
                qbuf.unwrap().parse().unwrap()
            })
            .collect()
    };
    let mut served = 0;
    for pipeline in [true, false] {
        let proxy = setup.proxy(&config(pipeline));
        let client = th::client();
        // The worker's own connection comes up on its first requests.
        let relay_connections = || {
            let list = setup.redis.cli(&["CLIENT", "LIST"]).unwrap();
            list.lines()
                .filter(|line| !line.trim().is_empty() && !line.contains("cmd=client|list"))
                .count()
        };
        let mut warm = 0;
        th::wait_for(
            "the shared connection and the worker's",
            Duration::from_secs(5),
            async || {
                let answer = send(&client, signed_now(&proxy, SECRET_OLD)).await;
                assert_eq!(answer.status, 200, "{:?}", answer.body);
                warm += 1;
                relay_connections() == 2
            },
        )
        .await;
        let nonce = fresh_nonce();
        let now = signing::unix_now();
        let once = || signed_at(&proxy, now, &nonce);
        assert_eq!(send(&client, once()).await.status, 200);
        assert_refused(
            &send(&client, once()).await,
            401,
            "authentication_error",
            "replayed nonce",
        );

        setup
            .redis
            .cli(&["CLIENT", "PAUSE", "3000", "WRITE"])
            .unwrap();
        let requests: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let (client, request) = (client.clone(), signed_now(&proxy, SECRET_OLD));
                tokio::spawn(async move { send(&client, request).await })
            })
            .collect();
        if pipeline {
            th::wait_for(
                "nonces queued behind the held one",
                Duration::from_secs(2),
                async || held_nonces().iter().any(|&queued| queued > 0),
            )
            .await;
        } else {
            th::wait_for("a nonce held back", Duration::from_secs(2), async || {
                !held_nonces().is_empty()
            })
            .await;
            // Time for the others to be written, were they to be.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                held_nonces(),
                [0],
                "one command on the connection, none behind it"
            );
            assert!(requests.iter().all(|r| !r.is_finished()));
        }
        setup.redis.cli(&["CLIENT", "UNPAUSE"]).unwrap();
        for request in requests {
            let answer = request.await.unwrap();
            assert_eq!(answer.status, 200, "pipeline {pipeline}: {:?}", answer.body);
        }
        served += warm + 1 + CONCURRENT;
    }
    assert_eq!(setup.upstream.request_count(), served);
}
