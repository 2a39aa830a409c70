//! An event stream the upstream frames with `Content-Length` and then cuts
//! (it closes early, falls silent past `timeouts.idle`, or runs past
//! `timeouts.total`): the client never gets more bytes than the relay
//! declared, gets no SSE error event inside the declared body, and sees the
//! connection close instead of a next response read as the rest of this
//! one; on the relay's own HTTP/1 loop and on hyper's. A chunked stream, or
//! one that ends with its connection, cut the same way still ends with the
//! relay's error event.

use std::time::Duration;

use claude_relay_testkit::proxy::ProxyProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const MESSAGE: &str = r#"{"model":"claude-test","max_tokens":8,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
const EVENT: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n";

/// How the upstream cuts its stream, asked by the request's `x-cut` header.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Two events, then the connection closes 5 bytes short of the length.
    Close,
    /// Two events, then silence (past the relay's idle timeout).
    Silence,
    /// An event every 100 ms, past the relay's total timeout.
    Endless,
    /// Chunked: two events, then the connection closes.
    ChunkedClose,
    /// Chunked JSON (no room for an error event): part of it, then the
    /// connection closes.
    ChunkedJsonClose,
    /// Neither length nor chunks (the body ends when the connection does):
    /// two events, then silence.
    UnframedSilence,
}

impl Cut {
    fn name(self) -> &'static str {
        match self {
            Cut::Close => "close",
            Cut::Silence => "silence",
            Cut::Endless => "endless",
            Cut::ChunkedClose => "chunked-close",
            Cut::ChunkedJsonClose => "chunked-json-close",
            Cut::UnframedSilence => "unframed-silence",
        }
    }

    /// The length the upstream declares.
    fn declared(self) -> usize {
        match self {
            // Room for less than an error event after what is sent.
            Cut::Close => 2 * EVENT.len() + 5,
            _ => 100 * EVENT.len(),
        }
    }
}

/// An upstream answering every request with an event stream cut as its
/// `x-cut` header says.
async fn cutting_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Some(head) = read_request(&mut stream).await else {
                    return;
                };
                let cut = [
                    Cut::Close,
                    Cut::Silence,
                    Cut::Endless,
                    Cut::ChunkedClose,
                    Cut::ChunkedJsonClose,
                    Cut::UnframedSilence,
                ]
                .into_iter()
                .find(|cut| head.contains(&format!("x-cut: {}\r\n", cut.name())))
                .expect("an x-cut header");
                if let Cut::ChunkedClose = cut {
                    let mut answer = String::from(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                    );
                    for _ in 0..2 {
                        answer.push_str(&format!("{:x}\r\n{EVENT}\r\n", EVENT.len()));
                    }
                    let _ = stream.write_all(answer.as_bytes()).await;
                    return;
                }
                if let Cut::ChunkedJsonClose = cut {
                    let part = r#"{"id":"msg_1","type":"message","content":["#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{part}\r\n",
                        part.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    return;
                }
                if let Cut::UnframedSilence = cut {
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{}",
                        EVENT.repeat(2)
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
                    cut.declared()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(EVENT.repeat(2).as_bytes()).await;
                match cut {
                    Cut::Close => {}
                    Cut::Silence => tokio::time::sleep(Duration::from_secs(10)).await,
                    Cut::Endless => {
                        for _ in 0..90 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if stream.write_all(EVENT.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                    Cut::ChunkedClose | Cut::ChunkedJsonClose | Cut::UnframedSilence => {
                        unreachable!()
                    }
                }
            });
        }
    });
    url
}

/// The request head (its body read and dropped).
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if seen.len() >= end + 4 + length {
                return Some(text[..end + 4].to_ascii_lowercase());
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&chunk[..n]);
    }
}

fn start(upstream: &str) -> ProxyProcess {
    start_with(upstream, "", "")
}

/// `store` a top-level section, `client_extra` more lines of the client.
fn start_with(upstream: &str, store: &str, client_extra: &str) -> ProxyProcess {
    let config = format!(
        r#"
server: {{listen: "{{listen}}", admin_listen: "{{admin}}"}}
{store}
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
{client_extra}
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{env: TEST_RELAY_KEY}}]
    timeouts: {{idle: 500ms, total: 1500ms}}
"#
    );
    ProxyProcess::start(BIN.as_ref(), &config, &[("TEST_RELAY_KEY", RELAY_KEY)])
}

/// A keep-alive streaming request, its body sent with `Content-Length`
/// (the relay's own loop) or chunked (handed to hyper).
fn request(cut: Cut, chunked: bool, extra: &str) -> String {
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: relay\r\nx-api-key: {RELAY_KEY}\r\n\
         content-type: application/json\r\nx-cut: {}\r\n{extra}",
        cut.name()
    );
    if chunked {
        format!(
            "{head}transfer-encoding: chunked\r\n\r\n{:x}\r\n{MESSAGE}\r\n0\r\n\r\n",
            MESSAGE.len()
        )
    } else {
        format!("{head}content-length: {}\r\n\r\n{MESSAGE}", MESSAGE.len())
    }
}

/// Sends `request` and reads until the relay closes the connection (at
/// most 10 s: a connection kept open fails the test).
async fn exchange(proxy: &ProxyProcess, request: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(proxy.api).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        read.is_ok(),
        "the connection was kept open after a cut length-framed body: {text:?}"
    );
    let end = text
        .find("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}\n{}", proxy.log()))
        + 4;
    (text[..end].to_string(), got[end..].to_vec())
}

async fn assert_cut_within_its_length(proxy: &ProxyProcess, cut: Cut, chunked: bool) {
    let (head, body) = exchange(proxy, &request(cut, chunked, "")).await;
    let context = format!("{cut:?}, chunked request: {chunked}");
    assert!(head.starts_with("HTTP/1.1 200"), "{context}: {head}");
    let declared = cut.declared();
    assert!(
        head.contains(&format!("content-length: {declared}\r\n")),
        "{context}: {head}"
    );
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.len() <= declared,
        "{context}: {} bytes written for {declared} declared: {body:?}",
        body.len()
    );
    assert!(
        !body.contains("event: error"),
        "{context}: an error event in a length-framed body: {body:?}"
    );
    assert!(body.starts_with(&EVENT.repeat(2)), "{context}: {body:?}");
}

#[tokio::test]
async fn a_length_framed_stream_cut_by_the_upstream_is_never_overrun_and_its_connection_closes() {
    let proxy = start(&cutting_upstream().await);
    for chunked in [false, true] {
        assert_cut_within_its_length(&proxy, Cut::Close, chunked).await;
    }
}

/// A client with a concurrency cap held in Redis: the end of its body waits
/// for the slot's release, and a break found in that same poll must still
/// reach the writer (else a short body would end as if complete, on a
/// connection kept open).
#[tokio::test]
async fn an_answer_broken_off_while_its_slot_is_released_still_ends_as_broken() {
    let redis = claude_relay_testkit::redis::RedisServer::start().unwrap();
    let store = format!("store:\n  redis: {{url: \"{}\"}}", redis.url());
    let proxy = start_with(
        &cutting_upstream().await,
        &store,
        "    quota: {max_concurrent: 1}",
    );
    for chunked in [false, true] {
        assert_cut_within_its_length(&proxy, Cut::Close, chunked).await;
        // A chunked answer broken off ends without its last chunk.
        let (head, body) = exchange(&proxy, &request(Cut::ChunkedJsonClose, chunked, "")).await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(r#""content":["#), "{body:?}");
        assert!(
            !body.ends_with("0\r\n\r\n"),
            "a broken-off answer ended as if complete: {body:?}"
        );
    }
}

#[tokio::test]
async fn a_length_framed_stream_cut_by_the_idle_timeout_is_never_overrun_and_its_connection_closes()
{
    let proxy = start(&cutting_upstream().await);
    for chunked in [false, true] {
        assert_cut_within_its_length(&proxy, Cut::Silence, chunked).await;
    }
}

#[tokio::test]
async fn a_length_framed_stream_cut_by_the_total_timeout_is_never_overrun_and_its_connection_closes()
 {
    let proxy = start(&cutting_upstream().await);
    for chunked in [false, true] {
        assert_cut_within_its_length(&proxy, Cut::Endless, chunked).await;
    }
}

#[tokio::test]
async fn a_chunked_or_unframed_stream_cut_still_ends_with_an_error_event() {
    let proxy = start(&cutting_upstream().await);
    for (cut, why) in [
        (Cut::ChunkedClose, "broke off"),
        (Cut::UnframedSilence, "idle timeout"),
    ] {
        for chunked in [false, true] {
            let (head, body) =
                exchange(&proxy, &request(cut, chunked, "connection: close\r\n")).await;
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("event: error\ndata: "), "{cut:?}: {body:?}");
            assert!(body.contains(why), "{cut:?}: {body:?}");
            assert!(body.ends_with("0\r\n\r\n"), "{cut:?}: {body:?}");
        }
    }
}
