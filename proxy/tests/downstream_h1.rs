//! The relay's own HTTP/1.1 server loop, driven over raw TCP: pipelined
//! requests answered in order on one connection, `Connection: close`
//! honoured, and the requests the loop leaves to hyper (chunked bodies,
//! `Expect: 100-continue`, HTTP/1.0, malformed heads) served or refused as
//! before, even after the loop has served the same connection; a client
//! leaving before its answer cancels the request; HTTPS HTTP/1.1 clients
//! go through the same loop; at SIGTERM idle connections close at once
//! while a request in flight finishes; once the loop has served a request,
//! an HTTP/2 preface on the connection is a bad request.

mod common;

use std::sync::Arc;
use std::time::Duration;

use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::upstream::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = common::ONE_CLIENT_KEY;
const MESSAGE: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}"#;

fn start(upstream: &MockUpstream) -> ProxyProcess {
    start_with(upstream, "max_body_bytes: 65536")
}

/// A relay to `upstream`, with `server` settings besides its addresses.
fn start_with(upstream: &MockUpstream, server: &str) -> ProxyProcess {
    common::one_client_relay(BIN.as_ref(), &upstream.base_url(), server)
}

/// A Messages request head with a `Content-Length` body.
fn message(extra_headers: &str) -> String {
    format!(
        "POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: {RELAY_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{MESSAGE}",
        MESSAGE.len()
    )
}

/// Writes `bytes` on a fresh connection and reads until the relay closes
/// it (at most 10 s).
async fn exchange(proxy: &ProxyProcess, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.api).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .expect("the relay did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

fn statuses(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_close_is_honoured() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    // Three requests in one write; the last asks to close.
    let requests = format!(
        "{}{}{}",
        message(""),
        message("anthropic-version: 2023-06-01\r\n"),
        message("connection: close\r\n")
    );
    let text = exchange(&proxy, requests.as_bytes()).await;
    assert_eq!(statuses(&text), ["200", "200", "200"], "{text}");
    assert_eq!(text.matches("x-relay-request-id: ").count(), 3, "{text}");
    assert_eq!(text.matches("\r\ndate: ").count(), 3, "{text}");
    assert_eq!(text.matches("\r\ncontent-length: ").count(), 3, "{text}");
    assert_eq!(text.matches("connection: close").count(), 1, "{text}");
    assert_eq!(upstream.request_count(), 3);
}

#[tokio::test]
async fn requests_left_to_hyper_are_served_after_the_loop_served_the_connection() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);

    // A plain request first, then a chunked body on the same connection.
    let chunked = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: {RELAY_KEY}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         {:x}\r\n{MESSAGE}\r\n0\r\n\r\n",
        MESSAGE.len()
    );
    let text = exchange(&proxy, format!("{}{chunked}", message("")).as_bytes()).await;
    assert_eq!(statuses(&text), ["200", "200"], "{text}");

    // Expect: 100-continue: the interim answer, then the response.
    let mut stream = TcpStream::connect(proxy.api).await.unwrap();
    let head = message("expect: 100-continue\r\nconnection: close\r\n");
    let (head, body) = head.split_at(head.len() - MESSAGE.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).await.unwrap();
    let text = read_to_close(&mut stream).await;
    assert_eq!(statuses(&text), ["200"], "{text}");

    // HTTP/1.0: served, then closed.
    let text = exchange(
        &proxy,
        message("").replacen("HTTP/1.1", "HTTP/1.0", 1).as_bytes(),
    )
    .await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );

    // A head that is not HTTP: refused, the connection closed.
    let text = exchange(&proxy, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n").await;
    assert_eq!(statuses(&text), ["400"], "{text}");

    assert_eq!(upstream.request_count(), 4);
}

#[tokio::test]
async fn an_http2_preface_after_an_http1_request_is_a_bad_request() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let text = exchange(
        &proxy,
        format!("{}PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", message("")).as_bytes(),
    )
    .await;
    assert_eq!(statuses(&text), ["200", "400"], "{text}");
    assert!(text.contains(r#""type":"invalid_request_error""#), "{text}");
    // On a fresh connection the preface still starts HTTP/2 (prior knowledge).
    let mut stream = TcpStream::connect(proxy.api).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut frame_head = [0u8; 9];
    stream.read_exact(&mut frame_head).await.unwrap();
    assert_eq!(frame_head[3], 0x4, "the server's first frame is SETTINGS");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_in_the_claude_envelope_without_going_upstream() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    // Over max_body_bytes (64 KiB), under what the loop reads itself.
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100_000));
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: {RELAY_KEY}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let text = exchange(&proxy, request.as_bytes()).await;
    assert_eq!(statuses(&text), ["413"], "{text}");
    assert!(text.contains(r#""type":"request_too_large""#), "{text}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_client_that_goes_away_before_the_answer_cancels_the_request() {
    let upstream = MockUpstream::start().await;
    let proxy = start(&upstream);
    let mut stream = TcpStream::connect(proxy.api).await.unwrap();
    // The upstream takes 5 s to answer; the client leaves after 300 ms.
    stream
        .write_all(message("x-mock-delay-ms: 5000\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !proxy.log().contains("client_gone") {
        assert!(
            std::time::Instant::now() < deadline,
            "the request was not given up: {}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HTTPS with HTTP/1.1 (no ALPN, as curl --http1.1 and many SDKs): the
/// same loop over TLS, keep-alive and all.
#[tokio::test]
async fn https_http1_clients_are_served_by_the_same_loop() {
    use rustls_pki_types::{CertificateDer, ServerName};
    let upstream = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let proxy = start_with(
        &upstream,
        &format!(
            "tls: {{cert_file: {}, key_file: {}}}",
            cert_file.display(),
            key_file.display()
        ),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(proxy.api).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let requests = format!("{}{}", message(""), message("connection: close\r\n"));
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // Closed with a close_notify: a clean end for the TLS client.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .expect("the relay did not close the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(statuses(&text), ["200", "200"], "{text}");
    assert_eq!(upstream.request_count(), 2);
}

/// Reads one response with a `content-length` body off `stream`.
async fn read_one(stream: &mut TcpStream) -> String {
    let text = common::read_response(stream, Duration::from_secs(10))
        .await
        .expect("no whole response within 10 s");
    let head = &text[..text.find("\r\n\r\n").unwrap()];
    assert!(
        head.contains("\r\ncontent-length: "),
        "a content-length: {head}"
    );
    text
}

#[tokio::test]
async fn at_sigterm_idle_connections_close_and_a_request_in_flight_finishes() {
    let upstream = MockUpstream::start().await;
    let mut proxy = start_with(&upstream, "shutdown_grace: 20s");
    // An idle keep-alive connection, after one answer.
    let mut idle = TcpStream::connect(proxy.api).await.unwrap();
    idle.write_all(message("").as_bytes()).await.unwrap();
    assert!(read_one(&mut idle).await.starts_with("HTTP/1.1 200"));
    // A request in flight: its upstream takes 1.5 s to answer.
    let mut busy = TcpStream::connect(proxy.api).await.unwrap();
    busy.write_all(message("x-mock-delay-ms: 1500\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stopped_at = std::time::Instant::now();
    proxy.terminate();
    // The idle connection is closed at once, not held for the grace period.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle connection stayed open");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // The one in flight gets its whole answer, told that the connection ends.
    let text = read_to_close(&mut busy).await;
    assert_eq!(statuses(&text), ["200"], "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        proxy.log()
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(8),
        "the relay waited for its grace period: {:?}",
        stopped_at.elapsed()
    );
}
