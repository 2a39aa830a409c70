//! The official Anthropic Python SDK through the relay: base URL and key
//! changed, nothing else. `scripts/install-test-deps.sh` installs the SDK in
//! `target/sdk-venv`; `CLAUDE_RELAY_TEST_PYTHON` may name another interpreter.

use claude_relay_testkit::proxy::ProxyProcess;
use claude_relay_testkit::upstream::MockUpstream;

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");

fn python() -> String {
    if let Ok(python) = std::env::var("CLAUDE_RELAY_TEST_PYTHON") {
        return python;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/sdk-venv/bin/python");
    if std::path::Path::new(venv).exists() {
        venv.to_string()
    } else {
        "python3".to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_through_the_relay() {
    let upstream = MockUpstream::start().await;
    let config = format!(
        r#"
server: {{listen: "{{listen}}", admin_listen: "{{admin}}"}}
clients:
  - id: sdk
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: local
    base_url: {}
    api_keys: [{{env: TEST_UPSTREAM_KEY}}]
    timeouts: {{response_headers: 1s}}
"#,
        upstream.base_url()
    );
    let proxy = ProxyProcess::start(
        BIN.as_ref(),
        &config,
        &[
            ("TEST_RELAY_KEY", "relay-key-for-tests"),
            ("TEST_UPSTREAM_KEY", "sk-ant-upstream"),
        ],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/python_sdk_check.py");
    let relay_url = proxy.url("");
    let python = python();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .env("RELAY_URL", relay_url)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {python}: {e}; run scripts/install-test-deps.sh")
            })
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK check failed (is the SDK installed? scripts/install-test-deps.sh)\n{stdout}\n{stderr}\n--- proxy log ---\n{}",
        proxy.log()
    );
    assert!(stdout.contains("all checks passed"));
    // Every request the SDK made reached the upstream with the relay's key.
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.headers["x-api-key"] == "sk-ant-upstream")
    );
    // The SDK asks for compressed answers and got them gzip-encoded (the
    // checks above decoded them); their usage was read all the same: the
    // message (180 out), the stream (15) and the stream that ended in an
    // error event (message_start's 1), 25 in each.
    assert!(upstream.requests().iter().all(|r| {
        r.headers
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap().contains("gzip"))
    }));
    let tokens = |kind: &str| {
        format!(r#"claude_relay_tokens_total{{client="sdk",model="claude-test",kind="{kind}"}}"#)
    };
    let decoded = r#"claude_relay_usage_decodes_total{encoding="gzip",result="decoded"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while proxy.metric(decoded).await != Some(3.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            proxy.metrics().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.metric(&tokens("output_tokens")).await, Some(196.0));
    assert_eq!(proxy.metric(&tokens("input_tokens")).await, Some(75.0));
}
