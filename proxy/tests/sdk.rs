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
}
