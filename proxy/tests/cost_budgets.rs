//! What answers cost and budgets in dollars: real proxy replicas sharing a
//! real Redis (or one standalone), the Claude API double reporting the
//! usage each test sets, cache writes of both lifetimes included.

mod common;

use std::time::Duration;

use claude_relay_proxy::store::{day_of, month_of, unix_ms};
use common::*;

/// $3 input, $15 output, $0.30 cache reads, $3.75 and $6 cache writes of 5
/// minutes and an hour, per million tokens.
const PRICING: &str = r#"
pricing:
  as_of: "2026-12-06"
  models:
    - {match: "claude-test*", input_usd_per_mtok: 3, output_usd_per_mtok: 15, cache_read_usd_per_mtok: 0.3, cache_write_5m_usd_per_mtok: 3.75, cache_write_1h_usd_per_mtok: 6}
"#;

/// A model the table has no price for.
const UNPRICED_BODY: &str =
    r#"{"model":"mystery-model","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

/// 100 000 input tokens: $0.30.
const THIRTY_CENTS: (&str, &str) = ("x-mock-usage", "100000,0,0,0");

fn close(got: Option<f64>, want: f64) -> bool {
    got.is_some_and(|got| (got - want).abs() < 1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_priced_in_usage_metrics_and_logs_across_two_replicas() {
    let setup = Setup::with_redis().await;
    let config = setup.config("", "", PRICING);
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);

    // JSON: 1000 input, 2000 output, 3000 cache writes (1000 of them for an
    // hour), 10 000 cache reads: $0.003 + $0.03 + $0.0075 + $0.006 + $0.003.
    let json = setup
        .messages(
            &a,
            APP_KEY,
            BODY,
            &[("x-mock-usage", "1000,2000,3000,10000,1000")],
        )
        .await;
    assert_eq!(json.status, 200);
    let text = decoded("identity", &json);
    assert!(
        text.contains(r#""ephemeral_1h_input_tokens":1000"#),
        "the double splits cache writes like the API: {text}"
    );
    // A gzip stream, as the SDKs ask: 100 000 input, 1000 output: $0.315.
    let stream = setup
        .messages(
            &b,
            APP_KEY,
            STREAM_BODY,
            &[
                ("accept-encoding", "gzip, deflate"),
                ("x-mock", "stream"),
                ("x-mock-usage", "100000,1000,0,0"),
            ],
        )
        .await;
    assert_eq!(stream.status, 200);
    assert!(decoded("gzip", &stream).ends_with("message_stop\"}\n\n"));
    sent_unchanged(&setup, &stream.body).await;
    // A gzip JSON answer: 2000 input, $0.006.
    let gzip = setup
        .messages(
            &a,
            APP_KEY,
            BODY,
            &[("accept-encoding", "gzip"), ("x-mock-usage", "2000,0,0,0")],
        )
        .await;
    assert!(decoded("gzip", &gzip).contains("\"input_tokens\":2000"));
    // A model without a price: its tokens count, its cost is not guessed.
    let unpriced = setup
        .messages(&b, APP_KEY, UNPRICED_BODY, &[THIRTY_CENTS])
        .await;
    assert_eq!(unpriced.status, 200);

    settled(&setup, &a, "app", 4).await;
    let usage = setup.usage(&b, "client=app").await;
    let app = &usage["clients"][0];
    let priced = 0.0495 + 0.315 + 0.006;
    assert!(close(app["total"]["cost_usd"].as_f64(), priced), "{app}");
    assert!(close(
        app["models"]["claude-test"]["cost_usd"].as_f64(),
        priced
    ));
    assert_eq!(app["models"]["mystery-model"]["cost_usd"], 0.0, "{app}");
    assert_eq!(app["models"]["mystery-model"]["input_tokens"], 100_000);
    assert!(close(app["days"][0]["cost_usd"].as_f64(), priced), "{app}");
    assert_eq!(
        app["total"]["input_tokens"],
        1000 + 100_000 + 2000 + 100_000
    );
    // The other client spent nothing, and says so.
    let other = setup.usage(&a, "client=other").await;
    assert_eq!(other["clients"][0]["total"]["cost_usd"], 0.0);

    // Each replica counts what it relayed.
    let cost = r#"claude_relay_cost_usd_total{client="app",model="claude-test"}"#;
    assert!(
        close(a.metric(cost).await, 0.0495 + 0.006),
        "{}",
        a.metrics().await
    );
    assert!(close(b.metric(cost).await, 0.315), "{}", b.metrics().await);
    let unpriced_metric = r#"claude_relay_unpriced_answers_total{model="mystery-model"}"#;
    assert_eq!(b.metric(unpriced_metric).await, Some(1.0));
    assert_eq!(a.metric(unpriced_metric).await, None);
    assert_eq!(
        b.metric(r#"claude_relay_cost_usd_total{client="app",model="mystery-model"}"#)
            .await,
        None,
        "an unpriced answer is no spend"
    );
    let log_a = a.log();
    assert!(log_a.contains("cost_usd=0.0495"), "the usage line: {log_a}");
    assert!(
        log_a.contains("cache_creation_1h_input_tokens=1000"),
        "{log_a}"
    );
    let log_b = b.log();
    assert!(log_b.contains("cost_usd=0.315"), "{log_b}");
    assert!(
        log_b.contains("answer not priced") && log_b.contains("mystery-model"),
        "{log_b}"
    );
}

/// Seconds of a `retry-after` against the time left in a window, measured
/// around the request.
fn within_a_few_seconds(retry_after: u64, left: Duration) {
    let left = left.as_secs();
    assert!(
        retry_after + 3 >= left && retry_after <= left + 3,
        "retry-after {retry_after}s, {left}s left in the window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_dollar_budgets_until_the_day_and_month_end() {
    let setup = Setup::with_redis().await;
    let config = setup.config(
        "    quota: {usd_per_day: 0.5}",
        "    quota: {usd_per_month: 0.2}",
        PRICING,
    );
    let a = setup.proxy(&config);
    let b = setup.proxy(&config);

    // $0.30 on each replica: $0.60 of $0.50 spent, known to both.
    for proxy in [&a, &b] {
        let answer = setup.messages(proxy, APP_KEY, BODY, &[THIRTY_CENTS]).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    settled(&setup, &a, "app", 2).await;
    for proxy in [&a, &b] {
        let refused = setup
            .messages(proxy, APP_KEY, STREAM_BODY, &[("x-mock", "stream")])
            .await;
        let retry_after = assert_rate_limited(&refused, "spending budget of $0.5 per day");
        within_a_few_seconds(retry_after, day_of(unix_ms()).1);
        assert!(refused.headers.contains_key("request-id"));
    }
    assert_eq!(
        a.metric(r#"claude_relay_quota_rejected_total{client="app",reason="usd_per_day"}"#)
            .await,
        Some(1.0)
    );
    // Refused requests never reached the upstream.
    assert_eq!(setup.upstream.messages_answered(), 2);

    // The month's budget: one answer over it, then refusals until the
    // month ends; the day's budget of the other client is not its own.
    let first = setup.messages(&b, OTHER_KEY, BODY, &[THIRTY_CENTS]).await;
    assert_eq!(first.status, 200);
    settled(&setup, &b, "other", 1).await;
    let refused = setup.messages(&a, OTHER_KEY, BODY, &[]).await;
    let retry_after = assert_rate_limited(&refused, "per calendar month (UTC)");
    within_a_few_seconds(retry_after, month_of(unix_ms()).1);
    assert_eq!(
        a.metric(r#"claude_relay_quota_rejected_total{client="other",reason="usd_per_month"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_relay_keeps_dollar_budgets_in_memory() {
    let setup = Setup::standalone().await;
    let config = setup.config("    quota: {usd_per_day: 0.5}", "", PRICING);
    let proxy = setup.proxy(&config);
    for _ in 0..2 {
        let answer = setup.messages(&proxy, APP_KEY, BODY, &[THIRTY_CENTS]).await;
        assert_eq!(answer.status, 200);
    }
    settled(&setup, &proxy, "app", 2).await;
    let refused = setup.messages(&proxy, APP_KEY, BODY, &[]).await;
    assert_rate_limited(&refused, "per day (UTC)");
    // Unpriced answers cost the budget nothing: another client's are let on.
    let other = setup
        .messages(&proxy, OTHER_KEY, UNPRICED_BODY, &[THIRTY_CENTS])
        .await;
    assert_eq!(other.status, 200);
}

#[tokio::test]
async fn a_bad_price_table_is_refused_with_its_paths_and_the_last_good_one_stays() {
    let setup = Setup::standalone().await;
    let good = setup.config("", "", PRICING);
    let bad = setup.config(
        "",
        "",
        &PRICING
            .replace("input_usd_per_mtok: 3,", "input_usd_per_mtok: -3,")
            .replace("\"claude-test*\"", "\"claude-*-test\""),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        bad.replace("{listen}", "127.0.0.1:0")
            .replace("{admin}", "127.0.0.1:0"),
    )
    .unwrap();
    let checked = std::process::Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success());
    assert!(
        stderr.contains("pricing.models[0].match: a model name, or a prefix ending in '*'")
            && stderr.contains("pricing.models[0].input_usd_per_mtok: must be a price from 0"),
        "{stderr}"
    );

    // The shipped default table is one the proxy takes.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/pricing.yaml"
    ))
    .unwrap();
    let with_defaults = format!(
        "{}\npricing:\n{}",
        good.replace(PRICING, "")
            .replace("{listen}", "127.0.0.1:0")
            .replace("{admin}", "127.0.0.1:0"),
        shipped
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    std::fs::write(&file, with_defaults).unwrap();
    let checked = std::process::Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env("TEST_APP_KEY", APP_KEY)
        .env("TEST_OTHER_KEY", OTHER_KEY)
        .env("TEST_UPSTREAM_KEY", "sk-ant-up")
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // On a running relay, a bad table is a failed reload: answers are still
    // priced with the last good one.
    let proxy = setup.proxy(&good);
    proxy.rewrite_config(&bad);
    eventually(Duration::from_secs(10), "a failed reload", || async {
        (proxy
            .metric(r#"claude_relay_config_reloads_total{result="failed"}"#)
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    assert!(proxy.log().contains("pricing.models[0].input_usd_per_mtok"));
    let answer = setup.messages(&proxy, APP_KEY, BODY, &[THIRTY_CENTS]).await;
    assert_eq!(answer.status, 200);
    settled(&setup, &proxy, "app", 1).await;
    let totals = setup.totals(&proxy, "app").await;
    assert!(close(totals["cost_usd"].as_f64(), 0.3), "{totals}");
}
