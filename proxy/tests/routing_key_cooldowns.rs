//! Key cooldowns shared through Redis: a key rate limited on one replica is
//! skipped by the other after the next sync.

use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::config::KeyPoolConfig;
use claude_relay_proxy::base::metrics::Metrics;
use claude_relay_proxy::upstream::keypool::KeyPools;
use claude_relay_testkit::redis::RedisServer;
use fred::prelude::{Builder, ClientLike, Config};
use http::{HeaderMap, HeaderValue, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_on_one_replica_reaches_the_other() {
    let server = RedisServer::start().unwrap();
    let replica = || async {
        let pool = Builder::from_config(Config::from_url(&server.url()).unwrap())
            .build_pool(1)
            .unwrap();
        drop(pool.connect());
        pool.wait_for_connect().await.unwrap();
        let pools = KeyPools::new("test/relay", Some(pool), Arc::new(Metrics::new()));
        let keys = vec![
            HeaderValue::from_static("sk-ant-one"),
            HeaderValue::from_static("sk-ant-two"),
        ];
        let region = pools.build("us", keys, &KeyPoolConfig::default());
        pools.spawn_sync().unwrap();
        (pools, region)
    };
    let (_a_pools, a) = replica().await;
    let (_b_pools, b) = replica().await;

    let lease = a.pick().unwrap();
    let limited = lease.index();
    let mut headers = HeaderMap::new();
    headers.insert("retry-after", "2".parse().unwrap());
    lease.record(StatusCode::TOO_MANY_REQUESTS, &headers);
    drop(lease);

    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..4 {
        assert_ne!(b.pick().unwrap().index(), limited, "b used the resting key");
    }
    // After the cooldown, both use it again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let used: Vec<usize> = (0..4).map(|_| b.pick().unwrap().index()).collect();
    assert!(used.contains(&limited), "{used:?}");
}
