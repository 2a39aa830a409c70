//! The relay's life as an operator sees it: config reloads under load, bad
//! configs, `check-config`, graceful shutdown, TLS in and out, HTTP/2.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use claude_relay_testkit::http::{self as th, next_chunk, request, send, send_streaming, wait_for};
use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::upstream::{MockUpstream, stream_events};
use http::Method;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn write(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.display().to_string()
    }
}

fn config(upstream: &str, key_file: &str, max_body: u32) -> String {
    format!(
        r#"
server:
  listen: "{{listen}}"
  admin_listen: "{{admin}}"
  reload_interval: 50ms
  shutdown_grace: 10s
  max_body_bytes: {max_body}
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: local
    base_url: {upstream}
    api_keys: [{{file: {key_file}}}]
"#
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
    request(Method::POST, &proxy.url("/v1/messages"), &headers, MESSAGE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request_and_bad_configs_are_rejected() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key_file = files.write("upstream-key", "sk-ant-key-A\n");
    let proxy = ProxyProcess::start(
        BIN.as_ref(),
        &config(&upstream.base_url(), &key_file, 65536),
        &[("TEST_RELAY_KEY", RELAY_KEY)],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, sent, url) = (stop.clone(), sent.clone(), proxy.url("/v1/messages"));
        workers.push(tokio::spawn(async move {
            let client = th::client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = request(
                    Method::POST,
                    &url,
                    &[
                        ("x-api-key", RELAY_KEY),
                        ("content-type", "application/json"),
                    ],
                    MESSAGE,
                );
                let answer = send(&client, req).await;
                if answer.status != 200 {
                    failures.push(format!("{} {:?}", answer.status, answer.body));
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    // Alternate the upstream key (a secret file) and the config itself.
    for round in 0..10 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        if round % 2 == 0 {
            files.write("upstream-key", &format!("sk-ant-key-{round}\n"));
        } else {
            proxy.rewrite_config(&config(&upstream.base_url(), &key_file, 65536 + round));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let failures = worker.await.unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during reloads: {failures:?}"
        );
    }
    assert!(
        sent.load(Ordering::Relaxed) > 100,
        "too little load to mean anything"
    );
    let reloads = proxy
        .metric("claude_relay_config_reloads_total{result=\"ok\"}")
        .await
        .unwrap();
    assert!(reloads >= 8.0, "only {reloads} reloads");
    let keys: std::collections::HashSet<String> = upstream
        .requests()
        .iter()
        .map(|r| r.headers["x-api-key"].to_str().unwrap().to_string())
        .collect();
    assert!(
        keys.contains("sk-ant-key-A") && keys.contains("sk-ant-key-8"),
        "{keys:?}"
    );

    // A broken file is rejected and the last good config stays in force.
    proxy.rewrite_config("clients: [this is: not yaml");
    wait_for("a failed reload", Duration::from_secs(10), async || {
        proxy
            .metric("claude_relay_config_reloads_total{result=\"failed\"}")
            .await
            == Some(1.0)
    })
    .await;
    proxy.rewrite_config(
        &config(&upstream.base_url(), &key_file, 65536).replace("base_url", "base_uri"),
    );
    wait_for(
        "a second failed reload",
        Duration::from_secs(10),
        async || {
            proxy
                .metric("claude_relay_config_reloads_total{result=\"failed\"}")
                .await
                == Some(2.0)
        },
    )
    .await;
    // A secret that goes missing is rejected too.
    proxy.rewrite_config(&config(&upstream.base_url(), "/nonexistent/key", 65536));
    wait_for(
        "a third failed reload",
        Duration::from_secs(10),
        async || {
            proxy
                .metric("claude_relay_config_reloads_total{result=\"failed\"}")
                .await
                == Some(3.0)
        },
    )
    .await;
    let answer = send(&th::client(), message(&proxy, &[])).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests().last().unwrap().headers["x-api-key"],
        "sk-ant-key-8"
    );
    let log = proxy.log();
    assert!(log.contains("configuration rejected"), "{log}");
    assert!(
        log.contains("base_uri"),
        "the rejection should name the bad field:\n{log}"
    );
    assert!(!log.contains("sk-ant-key"), "a secret reached the log");
}

/// `--admin-listen` and `CLAUDE_RELAY_LISTEN` replace the config's listen
/// addresses (several replicas of one ConfigMap on one host), and a reload
/// of the config does not count that as a change of address.
#[tokio::test]
async fn listen_flags_replace_the_configs_addresses() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key = files.write("key", "sk-upstream");
    let (config_api, config_admin) = claude_relay_testkit::proxy::free_addresses();
    let text = config(&upstream.base_url(), &key, 1 << 20)
        .replace("{listen}", &config_api.to_string())
        .replace("{admin}", &config_admin.to_string());
    let path = files.write("config.yaml", &text);
    let any = claude_relay_testkit::proxy::ANY_PORT;
    let proxy = ProxyProcess::start_with_args(
        BIN.as_ref(),
        &["--config", &path, "--admin-listen", any],
        &[("TEST_RELAY_KEY", RELAY_KEY), ("CLAUDE_RELAY_LISTEN", any)],
    );
    let answer = send(&th::client(), message(&proxy, &[])).await;
    assert_eq!(answer.status, 200);
    for unused in [config_api, config_admin] {
        assert!(
            std::net::TcpStream::connect(unused).is_err(),
            "{unused} is not listened on"
        );
    }
    files.write(
        "config.yaml",
        &text.replace("reload_interval: 50ms", "reload_interval: 60ms"),
    );
    wait_for("the reload", Duration::from_secs(10), async || {
        proxy
            .metric("claude_relay_config_reloads_total{result=\"ok\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(
        !proxy.log().contains("listen addresses changed"),
        "{}",
        proxy.log()
    );
}

/// Port 0 in both addresses: the proxy binds free ports itself and writes
/// them to `--ready-file` once serving, so a harness never picks a port that
/// another process takes before the proxy binds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_port_0_the_proxy_reports_the_ports_it_bound_and_they_answer() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key = files.write("key", "sk-upstream");
    let text = config(&upstream.base_url(), &key, 1 << 20)
        .replace("{listen}", "127.0.0.1:0")
        .replace("{admin}", "127.0.0.1:0");
    let path = files.write("config.yaml", &text);
    let ready = files.dir.path().join("ready.json");
    let log = std::fs::File::create(files.dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["--config", &path, "--ready-file"])
        .arg(&ready)
        .env("TEST_RELAY_KEY", RELAY_KEY)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("the ready file", Duration::from_secs(20), async || {
        ready.exists()
    })
    .await;
    let text = std::fs::read_to_string(&ready).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let address =
        |name: &str| -> std::net::SocketAddr { json[name].as_str().unwrap().parse().unwrap() };
    let (api, admin) = (address("api"), address("admin"));
    assert!(
        api.port() != 0 && admin.port() != 0 && api != admin,
        "{text}"
    );
    let client = th::client();
    let ready_answer = send(
        &client,
        request(Method::GET, &format!("http://{admin}/readyz"), &[], ""),
    )
    .await;
    assert_eq!(ready_answer.status, 200);
    let answer = send(
        &client,
        request(
            Method::POST,
            &format!("http://{api}/v1/messages"),
            &[
                ("x-api-key", RELAY_KEY),
                ("content-type", "application/json"),
            ],
            MESSAGE,
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn check_config_validates_files_and_names_the_problem() {
    let files = Files::new();
    let config = |upstream: &str, key_file: &str, max_body: u32| {
        config(upstream, key_file, max_body)
            .replace("{listen}", "127.0.0.1:0")
            .replace("{admin}", "127.0.0.1:0")
    };
    let key_file = files.write("key", "sk-ant-x");
    let good = files.write(
        "good.yaml",
        &config("https://api.anthropic.com", &key_file, 1024),
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", &good])
        .env("TEST_RELAY_KEY", "k")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let cases = [
        (config("ftp://nope", &key_file, 1024), "regions[0].base_url"),
        (
            config("https://api.anthropic.com", &key_file, 0),
            "server.max_body_bytes",
        ),
        (
            config("https://api.anthropic.com", "/missing/key", 1024),
            "regions[0].api_keys[0]",
        ),
        (
            config("https://api.anthropic.com", &key_file, 1024)
                .replace("reload_interval", "reload_intervall"),
            "reload_intervall",
        ),
        ("regions: [".to_string(), "(document)"),
    ];
    for (text, expected) in cases {
        let bad = files.write("bad.yaml", &text);
        let out = std::process::Command::new(BIN)
            .args(["check-config", &bad])
            .env("TEST_RELAY_KEY", "k")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert!(!stderr.contains("sk-ant-x"));
    }
}

#[tokio::test]
async fn sigterm_drains_streams_in_flight_then_exits() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key_file = files.write("key", "sk-ant-x");
    let mut proxy = ProxyProcess::start(
        BIN.as_ref(),
        &config(&upstream.base_url(), &key_file, 65536),
        &[("TEST_RELAY_KEY", RELAY_KEY)],
    );
    let client = th::client();
    let response = send_streaming(&client, message(&proxy, &[("x-mock", "stream-gated")])).await;
    let mut body = response.into_body();
    let events = stream_events("claude-test");
    assert_eq!(
        next_chunk(&mut body, Duration::from_secs(5)).await.unwrap(),
        events[0]
    );

    proxy.terminate();
    // Not ready any more, and new connections are refused.
    let admin = proxy.admin;
    wait_for("readyz to fail", Duration::from_secs(10), async || {
        tokio::task::spawn_blocking(move || th::blocking_get_status(admin, "/readyz"))
            .await
            .unwrap()
            != Some(200)
    })
    .await;
    let api = proxy.api;
    wait_for(
        "the listener to close",
        Duration::from_secs(10),
        async || tokio::net::TcpStream::connect(api).await.is_err(),
    )
    .await;

    // The stream in flight still completes.
    upstream.open_gate();
    let mut rest = Vec::new();
    while let Some(chunk) = next_chunk(&mut body, Duration::from_secs(5)).await {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, events[1..].concat());
    assert_eq!(
        proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key_file = files.write("key", "sk-ant-x");
    let proxy = ProxyProcess::start(
        BIN.as_ref(),
        &config(&upstream.base_url(), &key_file, 65536),
        &[("TEST_RELAY_KEY", RELAY_KEY)],
    );
    let h2: th::TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let response = h2
        .request(message(&proxy, &[("x-mock", "stream")]))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, stream_events("claude-test").concat());
}

fn self_signed(days: i64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Relay B (plain HTTP) → relay A (HTTPS with a private CA, HTTP/2 by ALPN)
/// → the upstream: downstream TLS, upstream TLS with an extra CA, and
/// certificate reload with its expiry metric, in one chain.
#[tokio::test]
async fn tls_in_and_out_with_a_private_ca_and_certificate_reload() {
    let upstream = MockUpstream::start().await;
    let files = Files::new();
    let key_file = files.write("key", "sk-ant-x");
    let (cert, key) = self_signed(40);
    let cert_file = files.write("tls.crt", &cert);
    let old_cert_file = files.write("tls-first.crt", &cert);
    let tls_key_file = files.write("tls.key", &key);
    let a_config = config(&upstream.base_url(), &key_file, 65536).replace(
        "  max_body_bytes",
        &format!("  tls: {{cert_file: {cert_file}, key_file: {tls_key_file}}}\n  max_body_bytes"),
    );
    let a = ProxyProcess::start(BIN.as_ref(), &a_config, &[("TEST_RELAY_KEY", RELAY_KEY)]);
    let a_url = format!("https://localhost:{}", a.api.port());
    // B presents A's relay key as its upstream key.
    let relay_key_file = files.write("relay-key", RELAY_KEY);
    let b_config = config(&a_url, &relay_key_file, 65536).replace(
        "    api_keys",
        &format!("    tls: {{ca_file: {cert_file}}}\n    api_keys"),
    );
    let b = ProxyProcess::start(BIN.as_ref(), &b_config, &[("TEST_RELAY_KEY", RELAY_KEY)]);

    let answer = send(&th::client(), message(&b, &[("x-mock", "stream")])).await;
    assert_eq!(answer.status, 200, "{:?}\n{}", answer.body, b.log());
    assert_eq!(answer.body, stream_events("claude-test").concat());
    assert_eq!(upstream.requests()[0].headers["x-api-key"], "sk-ant-x");

    let days = a.metric("claude_relay_tls_cert_expiry_days").await.unwrap();
    assert!((39.0..=40.01).contains(&days), "{days}");

    // A renewed certificate is picked up without a restart.
    let (cert, key) = self_signed(90);
    files.write("tls.key", &key);
    files.write("tls.crt", &cert);
    wait_for(
        "the renewed certificate",
        Duration::from_secs(10),
        async || {
            a.metric("claude_relay_tls_cert_expiry_days")
                .await
                .is_some_and(|d| d > 89.0)
        },
    )
    .await;
    // Fresh relays (fresh connections): one trusting only the old
    // certificate is refused, one trusting the new one gets through.
    let old_ca = files.write(
        "old-ca.crt",
        &std::fs::read_to_string(&old_cert_file).unwrap(),
    );
    let new_ca = files.write("new-ca.crt", &cert);
    for (ca, expected) in [(old_ca, 502), (new_ca, 200)] {
        let c = ProxyProcess::start(
            BIN.as_ref(),
            &b_config.replace(&cert_file, &ca),
            &[("TEST_RELAY_KEY", RELAY_KEY)],
        );
        let answer = send(&th::client(), message(&c, &[])).await;
        assert_eq!(answer.status, expected, "{:?}", answer.body);
        if expected == 502 {
            assert!(String::from_utf8_lossy(&answer.body).contains("api_error"));
        }
    }
}

#[test]
fn the_example_config_in_the_readme_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/standalone.yaml");
    let out = std::process::Command::new(BIN)
        .args(["check-config", example])
        .env("ANTHROPIC_API_KEY", "sk-ant-example")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the documented key is the one it accepts.
    let mut child = std::process::Command::new(BIN)
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"dev-relay-key\n")
        .unwrap();
    let hash = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    let text = std::fs::read_to_string(example).unwrap();
    assert!(
        text.contains(hash.trim()),
        "hash of dev-relay-key not in the example"
    );
}
