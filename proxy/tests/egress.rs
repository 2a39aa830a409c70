//! Regions that leave through an egress proxy (HTTP CONNECT): a real
//! tinyproxy started per test, real relay processes, upstream doubles that
//! record who connected to them.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use claude_relay_testkit::egress::{TinyProxy, TinyProxyOptions};
use claude_relay_testkit::http::{self as th, request, send, wait_for};
use claude_relay_testkit::proxy::{ProxyProcess, free_port};
use claude_relay_testkit::upstream::{MockUpstream, stream_events};
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const BODY: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;
const PROXY_USER: &str = "relay";
const PROXY_PASSWORD: &str = "tunnel-pass-8cf1e2";
/// Where the proxy's tunnels leave from; the relay's direct connections
/// come from 127.0.0.1.
const PROXY_EXIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    /// Writes aside and renames over, as a Secret volume update does.
    fn write(&self, name: &str, content: &str) -> String {
        let path = self.0.path().join(name);
        let tmp = self.0.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.display().to_string()
    }
}

/// A region entry; `egress` is the YAML of its `egress_proxy`, if any.
fn region(name: &str, url: &str, priority: i32, egress: Option<&str>, extra: &str) -> String {
    let egress = egress.map_or(String::new(), |e| format!(", egress_proxy: {e}"));
    common::region_entry(
        name,
        url,
        priority,
        &["UPSTREAM_KEY"],
        "connect: 1s, response_headers: 5s",
        &format!("{egress}{extra}"),
    )
}

/// An `egress_proxy` value: the proxy at `url`, Basic auth from `file`.
fn with_credentials(url: &str, file: &str) -> String {
    format!("{{url: '{url}', credentials_from: {{file: {file}}}}}")
}

fn config(regions: &str, extra: &str) -> String {
    common::relay_config(
        "egress-test",
        ", workers: 1, reload_interval: 50ms",
        regions,
        extra,
    )
}

fn start(config: &str) -> ProxyProcess {
    ProxyProcess::start(
        BIN.as_ref(),
        config,
        &[("TEST_RELAY_KEY", RELAY_KEY), ("UPSTREAM_KEY", "sk-ant-up")],
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

fn authenticated_proxy() -> TinyProxy {
    TinyProxy::start_with(TinyProxyOptions {
        basic_auth: Some((PROXY_USER.into(), PROXY_PASSWORD.into())),
        outgoing: Some(PROXY_EXIT),
    })
    .unwrap()
}

/// Neither the password nor its Basic encoding may show.
fn assert_no_credentials(text: &str, password: &str) {
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{password}"));
    assert!(
        !text.contains(password),
        "the proxy password leaked:\n{text}"
    );
    assert!(
        !text.contains(&basic),
        "the Basic credentials leaked:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_with_an_egress_proxy_tunnels_through_it_and_the_others_go_direct() {
    let tunnelled = MockUpstream::start().await;
    let direct = MockUpstream::start().await;
    let egress = authenticated_proxy();
    let files = Files::new();
    let credentials = files.write(
        "proxy-credentials",
        &format!("{PROXY_USER}:{PROXY_PASSWORD}\n"),
    );
    let proxy = start(&config(
        &(region(
            "via-proxy",
            &tunnelled.base_url(),
            0,
            Some(&with_credentials(&egress.url(), &credentials)),
            "",
        ) + &region("direct", &direct.base_url(), 1, None, "")),
        "",
    ));
    let client = th::client();

    for _ in 0..3 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "{:?}\n{}", answer.body, proxy.log());
    }
    // Streaming through the tunnel: every event, in order, unchanged.
    let answer = send(&client, message(&proxy, &[("x-mock", "stream")])).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, stream_events("claude-test").concat());
    let answer = send(&client, message(&proxy, &[("x-relay-region", "direct")])).await;
    assert_eq!(answer.status, 200);

    // The upstream of the proxied region saw the proxy's exit address, the
    // other one the relay's own.
    let peers: Vec<IpAddr> = tunnelled.requests().iter().map(|r| r.peer.ip()).collect();
    assert_eq!(peers, vec![PROXY_EXIT; 4]);
    let peers: Vec<IpAddr> = direct.requests().iter().map(|r| r.peer.ip()).collect();
    assert_eq!(peers, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    // One tunnel, reused by the pool (one worker, requests in sequence);
    // none for the direct region. The credentials went to the proxy only.
    assert_eq!(egress.connect_targets(), vec![tunnelled.addr.to_string()]);
    assert!(
        tunnelled.requests()[0]
            .headers
            .get("proxy-authorization")
            .is_none()
    );
    assert_eq!(tunnelled.requests()[0].headers["x-api-key"], "sk-ant-up");

    let metrics = proxy.metrics().await;
    assert!(!metrics.contains("egress_proxy"), "{metrics}");
    assert_no_credentials(&(proxy.log() + &metrics), PROXY_PASSWORD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_over_and_fixed_ones_are_picked_up_on_reload() {
    const WRONG: &str = "wrong-pass-3e9d07";
    let tunnelled = MockUpstream::start().await;
    let direct = MockUpstream::start().await;
    let egress = authenticated_proxy();
    let files = Files::new();
    let credentials = files.write("proxy-credentials", &format!("{PROXY_USER}:{WRONG}"));
    let proxy = start(&config(
        &(region(
            "via-proxy",
            &tunnelled.base_url(),
            0,
            Some(&with_credentials(&egress.url(), &credentials)),
            "",
        ) + &region("direct", &direct.base_url(), 1, None, "")
            + &region(
                "no-credentials",
                &tunnelled.base_url(),
                2,
                Some(&format!("{{url: '{}'}}", egress.url())),
                "",
            )),
        // Keep the breaker out of the way: this test is about each attempt.
        "breaker: {min_requests: 1000}\n",
    ));
    let client = th::client();

    // The proxy refuses the wrong password (tinyproxy: 401): the request
    // fails over to the direct region.
    let answer = send(&client, message(&proxy, &[])).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(direct.request_count(), 1);
    assert_eq!(tunnelled.request_count(), 0);
    assert_eq!(egress.connect_targets(), vec![tunnelled.addr.to_string()]);
    let errors = "claude_relay_upstream_errors_total{upstream=\"via-proxy\",kind=\"egress_proxy\"}";
    assert_eq!(proxy.metric(errors).await, Some(1.0));
    assert_eq!(
        proxy
            .metric("claude_relay_failovers_total{upstream=\"direct\"}")
            .await,
        Some(1.0)
    );

    // Pinned to the region, the client gets a 502 in the API's shape that
    // says what happened.
    let answer = send(&client, message(&proxy, &[("x-relay-region", "via-proxy")])).await;
    assert_eq!(answer.status, 502);
    let error = answer.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error");
    let text = error["error"]["message"].as_str().unwrap();
    assert!(
        text.contains("egress proxy refused the tunnel: 401 Unauthorized"),
        "{text}"
    );
    assert_no_credentials(&String::from_utf8_lossy(&answer.body), WRONG);
    // Without credentials it asks for them.
    let answer = send(
        &client,
        message(&proxy, &[("x-relay-region", "no-credentials")]),
    )
    .await;
    assert_eq!(answer.status, 502);
    let text = answer.json()["error"]["message"].to_string();
    assert!(
        text.contains("egress proxy refused the tunnel: 407 Proxy Authentication Required"),
        "{text}"
    );
    let log = proxy.log();
    assert!(log.contains("401 Unauthorized"), "{log}");
    assert_no_credentials(&log, WRONG);

    // The credentials file is re-read on change, without a restart.
    files.write(
        "proxy-credentials",
        &format!("{PROXY_USER}:{PROXY_PASSWORD}"),
    );
    wait_for("the new credentials", Duration::from_secs(10), async || {
        send(&client, message(&proxy, &[("x-relay-region", "via-proxy")]))
            .await
            .status
            == 200
    })
    .await;
    assert_eq!(tunnelled.requests()[0].peer.ip(), PROXY_EXIT);
    let log = proxy.log() + &proxy.metrics().await;
    assert_no_credentials(&log, PROXY_PASSWORD);
    assert_no_credentials(&log, WRONG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_egress_proxy_is_a_connect_failure_that_opens_the_breaker() {
    let tunnelled = MockUpstream::start().await;
    let direct = MockUpstream::start().await;
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let proxy = start(&config(
        &(region(
            "via-proxy",
            &tunnelled.base_url(),
            0,
            Some(&format!("{{url: '{nobody}'}}")),
            "",
        ) + &region("direct", &direct.base_url(), 1, None, "")),
        "breaker: {window: 10s, min_requests: 3, failure_rate: 0.5, open_for: 30s}\n",
    ));
    let client = th::client();
    for _ in 0..8 {
        let answer = send(&client, message(&proxy, &[])).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert_eq!(direct.request_count(), 8);
    assert_eq!(tunnelled.request_count(), 0);
    let errors = "claude_relay_upstream_errors_total{upstream=\"via-proxy\",kind=\"egress_proxy\"}";
    assert_eq!(
        proxy.metric(errors).await,
        Some(3.0),
        "three failures open the breaker; later requests skip the region"
    );
    assert_eq!(
        proxy
            .metric("claude_relay_breaker_state{upstream=\"via-proxy\"}")
            .await,
        Some(2.0)
    );
    let log = proxy.log();
    assert!(log.contains("cannot reach the egress proxy"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_timeout_covers_a_proxy_that_never_answers_connect() {
    let tunnelled = MockUpstream::start().await;
    let direct = MockUpstream::start().await;
    // Never accepted: the kernel completes the handshake, nobody answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let proxy = start(&config(
        &(region(
            "via-proxy",
            &tunnelled.base_url(),
            0,
            Some(&format!("{{url: '{silent_url}'}}")),
            "",
        )
        .replace("connect: 1s", "connect: 300ms")
            + &region("direct", &direct.base_url(), 1, None, "")),
        "",
    ));
    let client = th::client();
    let started = std::time::Instant::now();
    let answer = send(&client, message(&proxy, &[("x-relay-region", "via-proxy")])).await;
    assert_eq!(answer.status, 504, "{:?}", answer.body);
    assert_eq!(answer.json()["error"]["type"], "api_error");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let answer = send(&client, message(&proxy, &[])).await;
    assert_eq!(answer.status, 200);
    assert_eq!(direct.request_count(), 1);
    let timeouts =
        "claude_relay_upstream_errors_total{upstream=\"via-proxy\",kind=\"connect_timeout\"}";
    assert_eq!(proxy.metric(timeouts).await, Some(2.0));
}

/// A relay serving HTTPS (a certificate for `localhost`) stands in for an
/// HTTPS upstream: TLS runs end to end inside the tunnel, SNI and
/// certificate checked against the upstream's name, not the proxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_through_the_tunnel() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_file = files.write("tls.crt", &cert.pem());
    let key_file = files.write("tls.key", &key.serialize_pem());
    let https_upstream = start(
        &config(&region("local", &upstream.base_url(), 0, None, ""), "").replace(
            "reload_interval: 50ms",
            &format!(
                "reload_interval: 50ms, tls: {{cert_file: {cert_file}, key_file: {key_file}}}"
            ),
        ),
    );
    let upstream_url = format!("https://localhost:{}", https_upstream.api.port());
    // Its relay key is what the relay in front presents upstream.
    let egress = TinyProxy::start().unwrap();
    let relay = ProxyProcess::start(
        BIN.as_ref(),
        &config(
            &region(
                "tls",
                &upstream_url,
                0,
                Some(&format!("{{url: '{}'}}", egress.url())),
                &format!(", tls: {{ca_file: {cert_file}}}"),
            ),
            "",
        ),
        &[("TEST_RELAY_KEY", RELAY_KEY), ("UPSTREAM_KEY", RELAY_KEY)],
    );

    let client = th::client();
    let answer = send(&client, message(&relay, &[("x-mock", "stream")])).await;
    assert_eq!(answer.status, 200, "{:?}\n{}", answer.body, relay.log());
    assert_eq!(answer.body, stream_events("claude-test").concat());
    let answer = send(&client, message(&relay, &[])).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        egress.connect_targets(),
        vec![format!("localhost:{}", https_upstream.api.port())]
    );
    assert_eq!(upstream.request_count(), 2);
}
