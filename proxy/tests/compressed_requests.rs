//! Request bodies sent with `Content-Encoding: gzip` (as the Claude API
//! accepts them): the real proxy reads them decoded (JSON check, cache key)
//! and forwards the bytes as sent; signatures are over those bytes.

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use claude_relay_proxy::admission::signing::{self, SigningSecret, Stamp};
use claude_relay_testkit::http::{Answer, request, send};
use claude_relay_testkit::proxy::ProxyProcess;
use common::*;
use http::Method;

const SECRET: &str = "gzip-secret-0123456789abcdefghijklmnopqrstu";
const MAX_BODY: usize = 65536;

fn gzip(data: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    Bytes::from(encoder.finish().unwrap())
}

/// `app` uses its relay key (and the cache); `other` signs with [`SECRET`].
fn config(setup: &Setup, secret_file: &std::path::Path, max_body: usize) -> String {
    format!(
        r#"
relay_name: gzip-test
server: {{listen: "{{listen}}", admin_listen: "{{admin}}", max_body_bytes: {max_body}}}
clients:
  - id: app
    relay_keys: [{{env: TEST_APP_KEY}}]
    cache: {{enabled: true}}
  - id: other
    signing_secrets: [{{file: {secret}}}]
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{env: TEST_UPSTREAM_KEY}}]
"#,
        secret = secret_file.display(),
        upstream = setup.upstream.base_url(),
    )
}

async fn start() -> (Setup, ProxyProcess, tempfile::TempDir) {
    start_with(MAX_BODY).await
}

async fn start_with(max_body: usize) -> (Setup, ProxyProcess, tempfile::TempDir) {
    let setup = Setup::standalone().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let proxy = setup.proxy(&config(&setup, &secret, max_body));
    (setup, proxy, dir)
}

/// The most memory the process has held (`VmHWM`), in bytes.
fn peak_memory(proxy: &ProxyProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid().unwrap())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// `POST /v1/messages` by `app` with `body` sent as `encoding`.
async fn post_encoded(setup: &Setup, proxy: &ProxyProcess, encoding: &str, body: Bytes) -> Answer {
    send(
        &setup.client,
        request(
            Method::POST,
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", APP_KEY),
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
                ("content-encoding", encoding),
            ],
            body,
        ),
    )
    .await
}

fn assert_refused(answer: &Answer, status: u16, kind: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], kind, "{json}");
}

#[tokio::test]
async fn a_gzip_body_is_read_decoded_and_forwarded_as_sent() {
    let (setup, proxy, _dir) = start().await;
    let sent = gzip(BODY.as_bytes());
    let answer = post_encoded(&setup, &proxy, "gzip", sent.clone()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = setup.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, sent, "the upstream gets the bytes as sent");
    assert_eq!(seen[0].headers["content-encoding"], "gzip");
    assert_eq!(
        seen[0].headers["content-length"],
        sent.len().to_string().as_str()
    );

    // HTTP's deflate (zlib) is read too (another body: the first is cached).
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    zlib.write_all(BODY.replace("Hi", "Hello").as_bytes())
        .unwrap();
    let zlib = Bytes::from(zlib.finish().unwrap());
    let answer = post_encoded(&setup, &proxy, "deflate", zlib.clone()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(setup.upstream.requests()[1].body, zlib);
}

#[tokio::test]
async fn bad_gzip_bodies_are_refused_before_the_upstream() {
    let (setup, proxy, _dir) = start().await;
    // Well-formed gzip of something that is not JSON: the JSON check sees it.
    let answer = post_encoded(&setup, &proxy, "gzip", gzip(b"model=claude&max_tokens=8")).await;
    assert_refused(&answer, 400, "invalid_request_error");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // Cut short, and plain JSON claiming to be gzip.
    let whole = gzip(BODY.as_bytes());
    let cut = whole.slice(..whole.len() - 8);
    assert_refused(
        &post_encoded(&setup, &proxy, "gzip", cut).await,
        400,
        "invalid_request_error",
    );
    assert_refused(
        &post_encoded(&setup, &proxy, "gzip", Bytes::from_static(BODY.as_bytes())).await,
        400,
        "invalid_request_error",
    );
    // A coding the relay cannot read (nor the API): 415 naming the ones it can.
    let answer = post_encoded(
        &setup,
        &proxy,
        "br",
        Bytes::from_static(b"\x0b\x02\x80{}\x03"),
    )
    .await;
    assert_refused(&answer, 415, "invalid_request_error");
    assert_eq!(answer.headers["accept-encoding"], "gzip, deflate");
    assert_eq!(setup.upstream.request_count(), 0);
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_at_max_body_bytes_decoded() {
    let (setup, proxy, _dir) = start().await;
    // 4 MiB of JSON in a few KB: under the cap on the wire, 64 times it inside.
    let mut inflated = Vec::with_capacity(4 << 20);
    inflated.extend_from_slice(
        br#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":""#,
    );
    inflated.resize((4 << 20) - 8, b'a');
    inflated.extend_from_slice(br#""}]}"#);
    let bomb = gzip(&inflated);
    assert!(bomb.len() < MAX_BODY / 2, "{}", bomb.len());
    let answer = post_encoded(&setup, &proxy, "gzip", bomb).await;
    assert_refused(&answer, 413, "request_too_large");
    assert_eq!(setup.upstream.request_count(), 0, "nothing went upstream");

    // Just under the cap decoded is fine.
    let mut fits =
        br#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":""#.to_vec();
    fits.resize(MAX_BODY - 8, b'a');
    fits.extend_from_slice(br#""}]}"#);
    let answer = post_encoded(&setup, &proxy, "gzip", gzip(&fits)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_gzip_bombs_leaves_the_relay_its_size() {
    const CAP: usize = 4 << 20;
    let (setup, proxy, _dir) = start_with(CAP).await;
    // 1 GiB inside, 1 MB on the wire: one compressed MiB, as 1024 gzip members.
    let member = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![b'a'; 1 << 20]).unwrap();
        e.finish().unwrap()
    };
    let bomb = Bytes::from(member.repeat(1024));
    assert!(bomb.len() < CAP / 2, "{}", bomb.len());
    assert_eq!(setup.messages(&proxy, APP_KEY, BODY, &[]).await.status, 200);
    let before = peak_memory(&proxy);
    let floods = (0..8).map(|_| post_encoded(&setup, &proxy, "gzip", bomb.clone()));
    for answer in futures_util::future::join_all(floods).await {
        assert_refused(&answer, 413, "request_too_large");
    }
    let grown = peak_memory(&proxy).saturating_sub(before);
    // Eight 1 MB bodies and a few 4 MiB decodings at a time, not 8 GiB.
    assert!(grown < 96 << 20, "the relay grew by {} MiB", grown >> 20);
    assert_eq!(setup.upstream.messages_answered(), 1);
}

/// A request signed by `other` over `signed_body`, sending `sent` gzipped.
fn signed_gzip(
    proxy: &ProxyProcess,
    signed_body: &[u8],
    sent: Bytes,
) -> http::Request<http_body_util::Full<Bytes>> {
    let secret = SigningSecret::new(SECRET.as_bytes()).unwrap();
    let nonce = signing::generate_nonce().unwrap();
    let stamp = Stamp {
        key_id: "other",
        timestamp: signing::unix_now(),
        nonce: &nonce,
    };
    let headers = signing::signature_headers(
        &secret,
        &stamp,
        &signing::Request {
            method: "POST",
            path_and_query: "/v1/messages",
            body: signed_body,
        },
    );
    let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("content-type", "application/json"));
    all.push(("content-encoding", "gzip"));
    request(Method::POST, &proxy.url("/v1/messages"), &all, sent)
}

#[tokio::test]
async fn a_signature_covers_the_compressed_bytes_as_sent() {
    let (setup, proxy, _dir) = start().await;
    let sent = gzip(BODY.as_bytes());
    let answer = send(&setup.client, signed_gzip(&proxy, &sent, sent.clone())).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(setup.upstream.requests()[0].body, sent);

    // Signed over the decoded JSON: not what was sent, refused.
    let answer = send(
        &setup.client,
        signed_gzip(&proxy, BODY.as_bytes(), sent.clone()),
    )
    .await;
    assert_refused(&answer, 401, "authentication_error");
    assert_eq!(setup.upstream.request_count(), 1);
}

#[tokio::test]
async fn a_gzip_request_and_a_plain_one_share_a_cache_key() {
    let (setup, proxy, _dir) = start().await;
    let first = post_encoded(&setup, &proxy, "gzip", gzip(BODY.as_bytes())).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.headers["x-relay-cache"], "miss");
    eventually(Duration::from_secs(5), "response stored", || async {
        (proxy
            .metric(r#"claude_relay_cache_requests_total{result="stored"}"#)
            .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
    let second = setup.messages(&proxy, APP_KEY, BODY, &[]).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.headers["x-relay-cache"], "hit");
    assert_eq!(second.body, first.body);
    let third = post_encoded(&setup, &proxy, "gzip", gzip(BODY.as_bytes())).await;
    assert_eq!(third.headers["x-relay-cache"], "hit");
    assert_eq!(setup.upstream.messages_answered(), 1);
}
