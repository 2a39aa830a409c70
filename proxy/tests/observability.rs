//! The chart's Grafana dashboard and alerts against what a running relay
//! really exports: every dashboard query parses (promtool) and names only
//! metrics and labels the relay's `/metrics` shows after traffic of every
//! kind; and Debian's `prometheus`, started here, scrapes a relay, answers
//! a dashboard query and the prometheus-adapter example's rule (the HPA's
//! in-flight metric), and fires an alert of the chart's rule file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claude_relay_testkit::http::{self as th, request};
use claude_relay_testkit::proxy::{ProxyProcess, free_port};
use common::{APP_KEY, BODY, OTHER_KEY, STREAM_BODY, Setup, eventually, settled};
use http::Method;

/// Labels Prometheus adds to every series of a proxy target: the chart's
/// PodMonitor (`namespace`, `pod`, `relay`, ...), and `le` of histograms.
const TARGET_LABELS: [&str; 8] = [
    "namespace",
    "pod",
    "relay",
    "job",
    "instance",
    "container",
    "endpoint",
    "le",
];

fn chart_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/claude-relay")
        .join(path)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(chart_file("dashboards/claude-relay.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every panel query of the dashboard, with its panel's title.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// A query as Grafana sends it: its variables replaced by what they hold
/// when "All" is picked, its intervals by durations.
fn as_sent(expr: &str, rate_interval: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__range", "1h");
    for variable in ["$namespace", "$relay", "$client", "$model"] {
        out = out.replace(variable, ".*");
    }
    assert!(!out.contains('$'), "an unknown variable in {expr}");
    out
}

/// Metric names (as sampled: `_total`, `_bucket`, ...) and the label names
/// each carries, from a Prometheus text exposition.
fn exported(exposition: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = families.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let mut rest = &line[name_end + 1..];
            // name="value", with backslash escapes in the value
            while let Some(eq) = rest.find('=') {
                labels.insert(rest[..eq].trim_start_matches(',').to_string());
                let mut chars = rest[eq + 2..].char_indices();
                let mut end = 0;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = eq + 2 + i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &rest[end..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    families
}

/// What a PromQL expression names: each metric with the labels its
/// matchers name, and the labels of `by`, `without`, `on`, `ignoring` and
/// `group_*` clauses.
#[derive(Debug, Default)]
struct Names {
    metrics: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

fn promql_names(expr: &str) -> Names {
    const KEYWORDS: [&str; 24] = [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "inf",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let word_at = |i: &mut usize| {
        let start = *i;
        while *i < chars.len()
            && (chars[*i].is_alphanumeric() || chars[*i] == '_' || chars[*i] == ':')
        {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        (i, chars.get(i).copied())
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            skip_string(&mut i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '$' {
            i += 1;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let word = word_at(&mut i);
            let (after, next) = next_non_space(i);
            let grouping = matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            );
            if grouping && next == Some('(') {
                i = after + 1;
                while i < chars.len() && chars[i] != ')' {
                    if chars[i].is_alphabetic() || chars[i] == '_' {
                        names.grouping.push(word_at(&mut i));
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            } else if next == Some('(') || KEYWORDS.contains(&word.as_str()) {
                // a function or an aggregation
            } else {
                let mut matchers = Vec::new();
                if next == Some('{') {
                    i = after + 1;
                    while i < chars.len() && chars[i] != '}' {
                        if chars[i] == '"' {
                            skip_string(&mut i);
                        } else if chars[i].is_alphabetic() || chars[i] == '_' {
                            matchers.push(word_at(&mut i));
                        } else {
                            i += 1;
                        }
                    }
                    i += 1;
                }
                names.metrics.push((word, matchers));
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Checks that `expr` names only exported metrics, and labels they carry.
fn check_names(
    what: &str,
    expr: &str,
    families: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let names = promql_names(expr);
    let mut problems = Vec::new();
    if names.metrics.is_empty() {
        problems.push(format!("{what}: names no metric: {expr}"));
    }
    let mut labels_of_expr: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for (metric, matchers) in &names.metrics {
        let Some(labels) = families.get(metric) else {
            problems.push(format!("{what}: the relay exports no {metric}"));
            continue;
        };
        labels_of_expr.extend(labels.iter().map(String::as_str));
        for label in matchers {
            if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!(
                    "{what}: {metric} has no label {label} (it has {labels:?})"
                ));
            }
        }
    }
    for label in &names.grouping {
        if !labels_of_expr.contains(label.as_str()) {
            problems.push(format!(
                "{what}: groups by {label}, which no metric of it has"
            ));
        }
    }
    problems
}

/// A relay with two regions (the first one dead: failovers, connect errors,
/// its breaker opening), keys answering 429 and 401, the cache, a rate
/// limit and a quota, and Redis, then traffic that makes each of them count.
async fn relay_after_traffic_of_every_kind() -> (Setup, ProxyProcess) {
    let mut setup = Setup::with_redis().await;
    let dead_port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = format!(
        r#"
relay_name: observability-test
server: {{listen: "{{listen}}", admin_listen: "{{admin}}", reload_interval: 50ms}}
store:
  redis: {{url: "{redis}", command_timeout: 200ms}}
breaker: {{window: 10s, min_requests: 2, failure_rate: 0.5, open_for: 30s}}
quota: {{fail_open_grace: 1m}}
pricing:
  models:
    - {{match: "claude-test*", input_usd_per_mtok: 3, output_usd_per_mtok: 15, cache_read_usd_per_mtok: 0.3, cache_write_5m_usd_per_mtok: 3.75, cache_write_1h_usd_per_mtok: 6}}
clients:
  - id: app
    relay_keys: [{{env: TEST_APP_KEY}}]
    cache: {{enabled: true}}
    quota: {{tokens_per_day: 1000000}}
  - id: other
    relay_keys: [{{env: TEST_OTHER_KEY}}]
    rate_limit: {{requests: 2, per: minute}}
    quota: {{tokens_per_day: 1}}
regions:
  - {{name: gone, base_url: 'http://127.0.0.1:{dead_port}', priority: 0, api_keys: [{{env: TEST_UPSTREAM_KEY}}], timeouts: {{connect: 300ms}}}}
  - name: local
    base_url: '{upstream}'
    priority: 1
    api_keys: [{{env: TEST_LIMITED_KEY}}, {{env: TEST_REVOKED_KEY}}, {{env: TEST_UPSTREAM_KEY}}]
"#,
        redis = setup.redis.as_ref().unwrap().url(),
        upstream = setup.upstream.base_url(),
    );
    let proxy = ProxyProcess::start(
        common::BIN.as_ref(),
        &config,
        &[
            ("TEST_APP_KEY", APP_KEY),
            ("TEST_OTHER_KEY", OTHER_KEY),
            ("TEST_UPSTREAM_KEY", "sk-ant-up"),
            ("TEST_LIMITED_KEY", "sk-ant-limited"),
            ("TEST_REVOKED_KEY", "sk-ant-revoked"),
        ],
    );
    setup
        .upstream
        .force_for_key("sk-ant-limited", Some("status-429"));
    setup
        .upstream
        .force_for_key("sk-ant-revoked", Some("status-401"));

    // Answers, streams, compressed answers; failovers past the dead region
    // until its breaker opens; keys retried after 429 and 401.
    // The revoked key's 401 reaches the one request it answers (the relay
    // cannot tell a key's refusal from the request's); the key is then off.
    let mut answered = Vec::new();
    for _ in 0..5 {
        let answer = setup.messages(&proxy, APP_KEY, BODY, &[]).await;
        answered.push(answer.status.as_u16());
    }
    assert_eq!(
        answered.iter().filter(|s| **s == 200).count(),
        4,
        "{answered:?}\n{}",
        proxy.log()
    );
    let stream = setup.messages(&proxy, APP_KEY, STREAM_BODY, &[]).await;
    assert_eq!(stream.status, 200);
    let gzip = setup
        .messages(
            &proxy,
            APP_KEY,
            &BODY.replace("Hi", "compressed"),
            &[("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(gzip.status, 200);
    // An answer of a model without a price (the others have one).
    let unpriced = setup
        .messages(
            &proxy,
            APP_KEY,
            &BODY.replace("claude-test", "mystery-model"),
            &[],
        )
        .await;
    assert_eq!(unpriced.status, 200);
    // Refusals: a bad key, the rate limit, the quota.
    let refused = setup.messages(&proxy, "not-a-relay-key", BODY, &[]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        setup.messages(&proxy, OTHER_KEY, BODY, &[]).await.status,
        200
    );
    settled(&setup, &proxy, "other", 1).await;
    assert_eq!(
        setup.messages(&proxy, OTHER_KEY, BODY, &[]).await.status,
        429,
        "over its quota"
    );
    assert_eq!(
        setup.messages(&proxy, OTHER_KEY, BODY, &[]).await.status,
        429,
        "over its rate limit"
    );
    // Redis going away under a quota check, and a reload (which re-enables
    // the revoked key: after it, no more requests).
    setup.redis.as_mut().unwrap().stop().unwrap();
    // A body not cached yet, so that the quota is asked.
    let without_store = setup
        .messages(&proxy, APP_KEY, &BODY.replace("Hi", "no store"), &[])
        .await;
    assert_eq!(without_store.status, 200, "{:?}", without_store.body);
    proxy.rewrite_config(&format!("{config}\n# touched\n"));
    eventually(Duration::from_secs(5), "a config reload", || async {
        (proxy
            .metric("claude_relay_config_reloads_total{result=\"ok\"}")
            .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
    (setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_parses_and_names_only_what_the_relay_exports() {
    let (_setup, proxy) = relay_after_traffic_of_every_kind().await;
    let exposition = proxy.metrics().await;
    // Spend, and answers without a price, have series for the dashboard.
    for series in [
        r#"claude_relay_cost_usd_total{client="app",model="claude-test"}"#,
        r#"claude_relay_unpriced_answers_total{model="mystery-model"} 1"#,
    ] {
        assert!(exposition.contains(series), "{series} in {exposition}");
    }
    let families = exported(&exposition);
    let dashboard = dashboard();
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    let mut problems = Vec::new();
    for (title, expr) in &queries {
        problems.extend(check_names(title, expr, &families));
    }
    // The variables' `label_values(metric{...}, label)` name metrics and labels too.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let Some(inner) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let what = format!("variable {}", variable["name"]);
        problems.extend(check_names(&what, selector, &families));
        let metric = promql_names(selector).metrics[0].0.clone();
        let label = label.trim();
        if !TARGET_LABELS.contains(&label) && !families[&metric].contains(label) {
            problems.push(format!("{what}: {metric} has no label {label}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nexported: {families:#?}",
        problems.join("\n")
    );

    // promtool parses them, as recording rules (the real PromQL parser).
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("dashboard.rules.yaml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let expr = serde_json::to_string(&as_sent(expr, "1m")).unwrap();
        text.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {expr}\n"
        ));
    }
    std::fs::write(&rules, text).unwrap();
    let checked = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/install-test-deps.sh installs it)");
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// The checker itself: it must see a metric or a label the relay lacks.
#[test]
fn the_name_check_finds_unknown_metrics_and_labels() {
    let families = exported(
        "# TYPE claude_relay_requests counter\nclaude_relay_requests_total{route=\"messages\",status=\"200\",upstream=\"a,b=\\\"c\\\"\"} 3\n",
    );
    assert_eq!(
        families["claude_relay_requests_total"],
        BTreeSet::from(["route".into(), "status".into(), "upstream".into()])
    );
    let fine = r#"sum by (status, pod) (rate(claude_relay_requests_total{namespace=~"$namespace", route="messages"}[$__rate_interval]))"#;
    assert_eq!(check_names("fine", fine, &families), Vec::<String>::new());
    let problems = check_names(
        "bad",
        r#"sum by (region) (rate(claude_relay_request_total{model="x"}[5m])) / sum(claude_relay_requests_total{kind="y"})"#,
        &families,
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].contains("no claude_relay_request_total"));
    assert!(problems[1].contains("no label kind"));
    assert!(problems[2].contains("groups by region"));
}

/// Debian's prometheus, scraping `targets` every second with the chart's
/// alert rules loaded; stopped on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str, rules: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n\
                 \x20 - job_name: relay\n\
                 \x20   static_configs:\n\
                 \x20     - targets: ['{target}']\n\
                 \x20       labels: {{namespace: relays, relay: claude, pod: claude-0}}\n",
                rules.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package; scripts/install-test-deps.sh installs it)");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// A GET of Prometheus' HTTP API; `None` until it listens and answers 200.
    async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = th::client()
            .request(request(Method::GET, &url, &[], ""))
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// The vector an instant query gives, or `None` before Prometheus answers.
    async fn query(&self, expr: &str) -> Option<Vec<serde_json::Value>> {
        let answer = self
            .api(&format!("/api/v1/query?query={}", percent_encoded(expr)))
            .await?;
        Some(answer["data"]["result"].as_array().unwrap().clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The custom-metrics rule of examples/prometheus-adapter/values.yaml, which
/// serves the gauge the operator's HPA scales on (`targetInFlightPerPod`).
fn adapter_rule() -> serde_yaml_ng::Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus-adapter/values.yaml");
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules = values["rules"]["custom"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "one rule: the in-flight gauge");
    rules[0].clone()
}

fn alert_expr(name: &str) -> String {
    let text = std::fs::read_to_string(chart_file("rules/claude-relay-alerts.yaml")).unwrap();
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"].as_str() == Some(name))
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_relay_for_the_dashboard_the_adapter_and_an_alert() {
    let setup = Setup::standalone().await;
    let config = setup.config("", "", "");
    let proxy = setup.proxy(&config);
    let admin = proxy.admin_url("");
    let target = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let prometheus = Prometheus::start(&target, &chart_file("rules/claude-relay-alerts.yaml"));
    eventually(
        Duration::from_secs(20),
        "prometheus scraping the relay",
        || async {
            let up = prometheus.query("up{job=\"relay\"} == 1").await?;
            (!up.is_empty()).then_some(())
        },
    )
    .await;

    // A dashboard panel's own query, as Grafana would send it.
    let by_status = panel_queries(&dashboard())
        .into_iter()
        .find(|(title, _)| title == "Requests by status")
        .map(|(_, expr)| as_sent(&expr, "30s"))
        .unwrap();
    let reload_alert = alert_expr("ClaudeRelayConfigReloadFailing");
    assert_eq!(
        prometheus.query(&reload_alert).await,
        Some(vec![]),
        "no reload failed yet"
    );
    // Traffic while Prometheus scrapes: a rate needs the counter to move
    // between two scrapes.
    let series = eventually(Duration::from_secs(20), "requests by status", || async {
        let answer = setup.messages(&proxy, APP_KEY, BODY, &[]).await;
        assert_eq!(answer.status, 200);
        let result = prometheus.query(&by_status).await?;
        let ok = result
            .into_iter()
            .find(|s| s["metric"]["status"] == "200")?;
        let rate: f64 = ok["value"][1].as_str()?.parse().ok()?;
        (rate > 0.0).then_some(ok)
    })
    .await;
    assert_eq!(series["metric"].as_object().unwrap().len(), 1, "{series}");

    // The prometheus-adapter example: its series query finds the relay's
    // gauge with the pod labels it maps to resources, and its metrics query,
    // filled in as the adapter does for a namespace's pods, gives one value
    // per pod under the name the HPA asks for.
    let rule = adapter_rule();
    let served_as = rule["name"]["as"].as_str().unwrap();
    assert_eq!(served_as, "claude_relay_in_flight_requests");
    let found = prometheus
        .api(&format!(
            "/api/v1/series?match[]={}",
            percent_encoded(rule["seriesQuery"].as_str().unwrap())
        ))
        .await
        .unwrap();
    let found = found["data"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["__name__"], served_as);
    for (label, resource) in [("namespace", "namespace"), ("pod", "pod")] {
        assert_eq!(
            rule["resources"]["overrides"][label]["resource"].as_str(),
            Some(resource)
        );
        assert!(found[0][label].is_string(), "{label} missing: {found:?}");
    }
    let per_pod = rule["metricsQuery"]
        .as_str()
        .unwrap()
        .replace("<<.Series>>", found[0]["__name__"].as_str().unwrap())
        .replace(
            "<<.LabelMatchers>>",
            r#"namespace="relays",pod=~"claude-0|claude-1""#,
        )
        .replace("<<.GroupBy>>", "pod");
    let per_pod = prometheus.query(&per_pod).await.unwrap();
    assert_eq!(per_pod.len(), 1, "{per_pod:?}");
    assert_eq!(per_pod[0]["metric"]["pod"], "claude-0");
    let in_flight: f64 = per_pod[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(in_flight >= 0.0, "{per_pod:?}");

    // A config the relay refuses: the alert's expression turns non-empty,
    // then the alert fires, with the relay's labels.
    proxy.rewrite_config("regions: [not a config");
    let fired = eventually(
        Duration::from_secs(30),
        "the reload alert firing",
        || async {
            let alerts = prometheus.api("/api/v1/alerts").await?;
            alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "ClaudeRelayConfigReloadFailing"
                        && a["state"] == "firing"
                })
                .cloned()
        },
    )
    .await;
    assert_eq!(fired["labels"]["relay"], "claude", "{fired}");
    assert_eq!(fired["labels"]["namespace"], "relays");
    assert_eq!(
        fired["annotations"]["summary"],
        "Relay relays/claude refused a new config"
    );
    let evaluated = prometheus.query(&reload_alert).await.unwrap();
    assert_eq!(evaluated.len(), 1, "{evaluated:?}\n{}", prometheus.log());
}
