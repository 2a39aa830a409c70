//! Status from a real Redis holding breaker hashes as the proxy writes them
//! (`docs/redis-keys.md`).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claude_relay_crds::resources::{BreakerState, ClaudeRelayStatus, RegionBreaker};
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use common::*;
use fred::prelude::{Builder, ClientLike, Config, HashesInterface};
use serde_json::{Value, json};

/// A `redis-server` on a free loopback port, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let port = free_port();
        // Owned by `Redis` at once, so Drop stops it even if the wait below panics.
        let redis = Self {
            child: Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (apt-get install -y redis-server)"),
            port,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes one breaker hash the way a proxy replica does.
async fn publish(url: &str, region: &str, state: &str, failure_rate: &str, last_error: &str) {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let fields = [
        ("state", state.to_string()),
        ("failure_rate", failure_rate.to_string()),
        ("since", "1764136800".to_string()),
        ("last_error", last_error.to_string()),
        ("updated_at", now_ms.to_string()),
    ];
    let _: () = client
        .hset(
            format!("claude-relay:team-a/main:breaker:{region}"),
            fields.to_vec(),
        )
        .await
        .unwrap();
    client.quit().await.unwrap();
}

fn regions() -> Vec<UpstreamRegion> {
    vec![
        UpstreamRegion::test("us", "https://api.anthropic.com"),
        UpstreamRegion::test("eu", "https://eu.gateway.example").with_priority(10),
    ]
}

fn closed(region: &str) -> RegionBreaker {
    RegionBreaker {
        region: region.into(),
        state: BreakerState::Closed,
        failure_rate: None,
        since: None,
        last_error: None,
    }
}

/// A relay already rolled out (generation observed), with both breakers closed.
fn relay_with_redis(url: &str) -> ClaudeRelay {
    ClaudeRelay::test()
        .with_redis_url(url)
        .with_status(ClaudeRelayStatus {
            observed_generation: Some(1),
            breakers: vec![closed("us"), closed("eu")],
            ..ClaudeRelayStatus::default()
        })
}

async fn expect_until_status(handle: &mut Handle) -> Value {
    expect_applies(handle, 2).await;
    expect_apply(handle, &format!("{RELAYS}/main/status"), json!({}))
        .await
        .body["status"]
        .clone()
}

/// A context whose caches hold the test regions, Secrets and the relay's
/// objects as rendered.
fn context_for(
    relay: &ClaudeRelay,
) -> (
    std::sync::Arc<claude_relay_operator::controller::Context>,
    Handle,
) {
    let (ctx, handle, _) = context_with(&Cluster {
        regions: regions(),
        rendered_for: Some(relay.clone()),
        ..Cluster::default()
    });
    (ctx, handle)
}

#[tokio::test]
async fn breakers_from_redis_reach_status_and_events() {
    let redis = Redis::start();
    publish(&redis.url(), "us", "closed", "0.01", "none").await;
    publish(&redis.url(), "eu", "open", "0.62", "status_529").await;

    let relay = relay_with_redis(&redis.url());
    let (ctx, mut handle) = context_for(&relay);
    let server = tokio::spawn(async move {
        let status = expect_until_status(&mut handle).await;
        let event = expect_event(&mut handle).await;
        (status, event)
    });
    run(&relay, &ctx).await;
    let (status, event) = server.await.unwrap();

    assert_eq!(status["breakerSummary"], "us:closed eu:open");
    assert_eq!(
        status["breakers"][1],
        json!({"region": "eu", "state": "open", "failureRate": "0.62", "since": "2025-11-26T06:00:00Z", "lastError": "status_529"})
    );
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["reason"], "BreakerOpen");
    assert_eq!(degraded["message"], "breaker open for eu");

    assert_eq!(event["reason"], "BreakerOpened");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["name"], "main");
    assert_eq!(
        event["note"],
        "breaker of region eu opened (last error: status_529)"
    );
}

#[tokio::test]
async fn unreachable_redis_is_reported_and_breakers_unknown() {
    // Nothing listens on this port.
    let relay = relay_with_redis(&format!("redis://127.0.0.1:{}", free_port()));
    let (ctx, mut handle) = context_for(&relay);
    let server = tokio::spawn(async move {
        let status = expect_until_status(&mut handle).await;
        let event = expect_event(&mut handle).await;
        assert_eq!(event["reason"], "RedisUnreachable");
        assert_eq!(event["type"], "Warning");
        status
    });
    run(&relay, &ctx).await;
    let status = server.await.unwrap();
    assert_eq!(status["breakerSummary"], "us:unknown eu:unknown");
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["reason"], "RedisUnreachable");
    // Redis being down does not make the relay unready: the proxies fall back to local breakers.
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True");
}
