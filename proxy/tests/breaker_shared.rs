//! Breakers of two replicas sharing one real Redis: one opens, the other
//! stops within about a second; half open, only N probes in total; the
//! operator's hash is written; with Redis gone each keeps a local breaker.

use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::config::BreakerConfig;
use claude_relay_proxy::base::metrics::Metrics;
use claude_relay_proxy::upstream::breaker::{Breakers, FailureKind, Outcome, State};
use claude_relay_testkit::http::wait_for;
use claude_relay_testkit::redis::RedisServer;
use fred::prelude::{Builder, ClientLike, Config, HashesInterface, Pool};
use std::collections::HashMap;

const FAIL: Outcome = Outcome::Failure {
    kind: FailureKind::Connect,
    retry_after: None,
};

async fn pool(server: &RedisServer) -> Pool {
    let pool = Builder::from_config(Config::from_url(&server.url()).unwrap())
        .with_connection_config(|c| c.connection_timeout = Duration::from_millis(500))
        .set_policy(fred::types::config::ReconnectPolicy::new_constant(0, 100))
        .build_pool(2)
        .unwrap();
    drop(pool.connect());
    pool.wait_for_connect().await.unwrap();
    pool
}

fn config(open_for: &str, probes: u32) -> BreakerConfig {
    serde_json::from_value(serde_json::json!({
        "window": "10s", "min_requests": 4, "failure_rate": 0.5,
        "open_for": open_for, "half_open_probes": probes,
    }))
    .unwrap()
}

async fn replica(pool: Pool, open_for: &str, probes: u32) -> Arc<Breakers> {
    let b = Breakers::new(
        &config(open_for, probes),
        "test/relay",
        Some(pool),
        Arc::new(Metrics::new()),
    );
    b.region("us");
    b.spawn_sync().unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_opens_the_other_stops_within_a_second() {
    let server = RedisServer::start().unwrap();
    let redis = pool(&server).await;
    let a = replica(redis.clone(), "30s", 1).await;
    let b = replica(pool(&server).await, "30s", 1).await;
    wait_for("first sync", Duration::from_secs(2), async || {
        a.shared() && b.shared()
    })
    .await;

    for _ in 0..4 {
        a.region("us").admit().await.unwrap().record(FAIL);
    }
    assert_eq!(a.region("us").state(), State::Open);
    let opened = tokio::time::Instant::now();
    wait_for("b sees open", Duration::from_secs(1), async || {
        b.region("us").state() == State::Open
    })
    .await;
    assert!(b.region("us").admit().await.is_err());
    eprintln!("replica b stopped after {:?}", opened.elapsed());

    // The operator's view, as documented in docs/redis-keys.md.
    let hash: HashMap<String, String> = redis
        .hgetall("claude-relay:test/relay:breaker:us")
        .await
        .unwrap();
    assert_eq!(hash["state"], "open");
    assert_eq!(hash["last_error"], "connect");
    assert!(hash["failure_rate"].parse::<f64>().is_ok());
    assert!(hash["since"].parse::<u64>().unwrap() > 1_600_000_000);
    assert!(hash["updated_at"].parse::<u64>().unwrap() > 1_600_000_000_000);

    // A restarted replica takes the open state up from Redis.
    let c = replica(pool(&server).await, "30s", 1).await;
    wait_for("restart sees open", Duration::from_secs(1), async || {
        c.region("us").state() == State::Open
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_spread_over_replicas_add_up() {
    let server = RedisServer::start().unwrap();
    let a = replica(pool(&server).await, "30s", 1).await;
    let b = replica(pool(&server).await, "30s", 1).await;
    wait_for("first sync", Duration::from_secs(2), async || {
        a.shared() && b.shared()
    })
    .await;
    // Two failures each: neither replica alone reaches min_requests (4).
    for r in [&a, &b] {
        for _ in 0..2 {
            r.region("us").admit().await.unwrap().record(FAIL);
        }
        assert_eq!(r.region("us").state(), State::Closed);
    }
    wait_for(
        "shared window opens both",
        Duration::from_secs(2),
        async || a.region("us").state() == State::Open && b.region("us").state() == State::Open,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_n_probes_across_replicas() {
    let server = RedisServer::start().unwrap();
    let a = replica(pool(&server).await, "1s", 2).await;
    let b = replica(pool(&server).await, "1s", 2).await;
    wait_for("first sync", Duration::from_secs(2), async || {
        a.shared() && b.shared()
    })
    .await;
    for _ in 0..4 {
        a.region("us").admit().await.unwrap().record(FAIL);
    }
    wait_for("b open", Duration::from_secs(1), async || {
        b.region("us").state() == State::Open
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Both replicas ask for many probes at once: two in total get through.
    let mut tickets = Vec::new();
    for _ in 0..5 {
        for r in [&a, &b] {
            if let Ok(t) = r.region("us").admit().await {
                assert!(t.is_probe());
                tickets.push(t);
            }
        }
    }
    assert_eq!(tickets.len(), 2, "probes admitted across replicas");

    // A failed probe opens the breaker again, on both replicas.
    tickets.pop().unwrap().record(FAIL);
    drop(tickets);
    wait_for("reopened on both", Duration::from_secs(1), async || {
        a.region("us").state() == State::Open && b.region("us").state() == State::Open
    })
    .await;

    // Next round: a successful probe closes it, on both replicas.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let probe = loop {
        if let Ok(t) = b.region("us").admit().await {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(probe.is_probe());
    probe.record(Outcome::Success);
    wait_for("closed on both", Duration::from_secs(1), async || {
        a.region("us").state() == State::Closed && b.region("us").state() == State::Closed
    })
    .await;
    assert!(!a.region("us").admit().await.unwrap().is_probe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_each_replica_keeps_a_local_breaker() {
    let mut server = RedisServer::start().unwrap();
    let a = replica(pool(&server).await, "30s", 1).await;
    let b = replica(pool(&server).await, "30s", 1).await;
    wait_for("first sync", Duration::from_secs(2), async || {
        a.shared() && b.shared()
    })
    .await;
    server.stop().unwrap();
    wait_for("redis seen gone", Duration::from_secs(4), async || {
        !a.shared() && !b.shared()
    })
    .await;

    // Requests keep flowing on both...
    for r in [&a, &b] {
        let t = tokio::time::timeout(Duration::from_millis(100), r.region("us").admit())
            .await
            .expect("admit must not wait for redis")
            .unwrap();
        t.record(Outcome::Success);
    }
    // ...and a's local breaker still protects a.
    for _ in 0..6 {
        if let Ok(t) = a.region("us").admit().await {
            t.record(FAIL);
        }
    }
    assert_eq!(a.region("us").state(), State::Open);
    assert_eq!(b.region("us").state(), State::Closed);

    // Redis back (empty): a's transition reaches it and b follows.
    server.restart().unwrap();
    wait_for("b follows a", Duration::from_secs(8), async || {
        b.region("us").state() == State::Open
    })
    .await;
}
