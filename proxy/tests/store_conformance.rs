//! One conformance suite for every store backend: each property is a generic
//! async fn over `Store`, run against the in-memory store and against a real
//! `redis-server` started per test. Redis-only tests (outage, restart) follow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_relay_crds::config::RedisStoreConfig;
use claude_relay_proxy::store::{MemoryStore, RateDecision, RedisStore, Store};
use claude_relay_testkit::redis::RedisServer;
use futures_util::future::join_all;

const TTL: Duration = Duration::from_secs(60);

fn redis_config(url: &str) -> RedisStoreConfig {
    serde_json::from_value(serde_json::json!({
        "url": url,
        "pool_size": 4,
        "connect_timeout": "1s",
        "command_timeout": "250ms",
        "reconnect": {"min_delay": "50ms", "max_delay": "300ms"},
    }))
    .unwrap()
}

async fn redis_store(server: &RedisServer) -> RedisStore {
    let store = RedisStore::connect(&redis_config(&server.url()), "test/relay")
        .await
        .unwrap();
    assert!(store.is_connected());
    store
}

async fn nonce_is_accepted_once<S: Store>(store: Arc<S>) {
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(true)
    );
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(false)
    );
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(false)
    );
    // Another nonce, and the same nonce of another client, are fresh.
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000002", TTL)
            .await,
        Ok(true)
    );
    assert_eq!(
        store
            .claim_nonce("other", "nonce-0000000000000001", TTL)
            .await,
        Ok(true)
    );
}

async fn concurrent_claims_have_exactly_one_winner<S: Store + 'static>(store: Arc<S>) {
    for round in 0..20 {
        let nonce = format!("race-{round:016}");
        let claims = (0..50).map(|_| {
            let store = store.clone();
            let nonce = nonce.clone();
            // Spawned, so claims run in parallel on the runtime's threads.
            tokio::spawn(async move { store.claim_nonce("app", &nonce, TTL).await })
        });
        let results: Vec<bool> = join_all(claims)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let winners = results.iter().filter(|fresh| **fresh).count();
        assert_eq!(winners, 1, "round {round}: {winners} claims won");
    }
}

async fn nonce_is_forgotten_after_its_ttl<S: Store>(store: Arc<S>) {
    let ttl = Duration::from_millis(300);
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(true)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(false)
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(true)
    );
}

async fn rate_limit_window_and_retry_after<S: Store>(store: Arc<S>) {
    let window = Duration::from_millis(800);
    let start = Instant::now();
    for remaining in [2, 1, 0] {
        let decision = store.hit_rate_limit("app", 3, window).await.unwrap();
        assert_eq!(
            decision,
            RateDecision {
                allowed: true,
                remaining,
                retry_after: None
            }
        );
    }
    let refused = store.hit_rate_limit("app", 3, window).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry_after = refused.retry_after.expect("a refusal says when to retry");
    assert!(
        retry_after > Duration::ZERO && retry_after <= window,
        "{retry_after:?}"
    );
    assert!(retry_after + start.elapsed() >= window - Duration::from_millis(50));
    // Another client has its own window.
    assert!(
        store
            .hit_rate_limit("other", 3, window)
            .await
            .unwrap()
            .allowed
    );
    // Once the window is over, requests pass again.
    tokio::time::sleep(retry_after + Duration::from_millis(50)).await;
    let again = store.hit_rate_limit("app", 3, window).await.unwrap();
    assert!(again.allowed, "{again:?}");
    assert_eq!(again.remaining, 2);
}

async fn rate_limit_holds_under_concurrency<S: Store + 'static>(store: Arc<S>) {
    let hits = (0..40).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .hit_rate_limit("busy", 10, Duration::from_secs(30))
                .await
        })
    });
    let allowed = join_all(hits)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().as_ref().unwrap().allowed)
        .count();
    assert_eq!(allowed, 10);
}

/// Instantiates each property as a test for the memory store and for Redis.
macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    super::$property(std::sync::Arc::new(super::MemoryStore::new(10_000))).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let server = super::RedisServer::start().unwrap();
                    let store = super::redis_store(&server).await;
                    super::$property(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    nonce_is_accepted_once,
    concurrent_claims_have_exactly_one_winner,
    nonce_is_forgotten_after_its_ttl,
    rate_limit_window_and_retry_after,
    rate_limit_holds_under_concurrency,
);

/// Waits until the store answers again after Redis came back.
async fn until_it_works(store: &RedisStore, nonce: &str) -> Duration {
    let start = Instant::now();
    loop {
        match store.claim_nonce("app", nonce, TTL).await {
            Ok(fresh) => {
                assert!(fresh);
                return start.elapsed();
            }
            Err(e) => {
                assert!(e.transient, "{e}");
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "still failing: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers_without_a_new_store() {
    let mut server = RedisServer::start().unwrap();
    let store = redis_store(&server).await;
    assert_eq!(
        store.claim_nonce("app", "before-outage-00001", TTL).await,
        Ok(true)
    );
    assert!(store.hit_rate_limit("app", 5, TTL).await.unwrap().allowed);

    server.stop().unwrap();
    for i in 0..5 {
        let start = Instant::now();
        let err = store
            .claim_nonce("app", &format!("during-outage-{i:04}"), TTL)
            .await
            .unwrap_err();
        assert!(err.transient, "{err}");
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "took {:?}",
            start.elapsed()
        );
        let err = store.hit_rate_limit("app", 5, TTL).await.unwrap_err();
        assert!(err.transient, "{err}");
    }

    server.restart().unwrap();
    until_it_works(&store, "after-outage-000001").await;
    assert!(store.is_connected());
    // The restarted Redis has an empty script cache: the rate-limit script
    // must load itself again.
    let decision = store.hit_rate_limit("app", 5, TTL).await.unwrap();
    assert_eq!(decision.remaining, 4);
    assert_eq!(
        store.claim_nonce("app", "after-outage-000001", TTL).await,
        Ok(false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_created_while_redis_is_down_connects_later() {
    let mut server = RedisServer::start().unwrap();
    server.stop().unwrap();
    let start = Instant::now();
    let store = RedisStore::connect(&redis_config(&server.url()), "test/relay")
        .await
        .expect("an unreachable Redis is not a config error");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(!store.is_connected());
    let err = store
        .claim_nonce("app", "early-nonce-000001", TTL)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");

    server.restart().unwrap();
    until_it_works(&store, "late-nonce-0000001").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_share_nonces_and_limits() {
    let server = RedisServer::start().unwrap();
    let a = Arc::new(redis_store(&server).await);
    let b = Arc::new(redis_store(&server).await);
    for round in 0..20 {
        let nonce = format!("shared-{round:016}");
        let (x, y) = tokio::join!(
            a.claim_nonce("app", &nonce, TTL),
            b.claim_nonce("app", &nonce, TTL)
        );
        assert!(
            x.unwrap() ^ y.unwrap(),
            "round {round}: not exactly one winner"
        );
    }
    let mut allowed = 0;
    for i in 0..10 {
        let store = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(store.hit_rate_limit("app", 4, TTL).await.unwrap().allowed);
    }
    assert_eq!(allowed, 4);

    // Another relay name is another key space.
    let other = RedisStore::connect(&redis_config(&server.url()), "other/relay")
        .await
        .unwrap();
    assert_eq!(
        other
            .claim_nonce("app", "shared-0000000000000000", TTL)
            .await,
        Ok(true)
    );
}
