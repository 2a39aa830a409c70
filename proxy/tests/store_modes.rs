//! The Redis store against the deployments besides one plain server: a
//! Sentinel setup, a three-primary Cluster and a TLS-only server, each
//! started per test by the testkit. Every mode runs the same checks with two
//! stores sharing the deployment, as two proxy replicas would: once-only
//! nonces (also under concurrent claims from both), nonce expiry, the rate
//! window, and `admit` (nonce and rate window in one script, which in a
//! Cluster needs both keys of a client in one slot).

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_relay_crds::config::RedisStoreConfig;
use claude_relay_proxy::store::keys::Keys;
use claude_relay_proxy::store::{RateDecision, RedisStore, Store};
use claude_relay_testkit::redis::{RedisCluster, RedisSentinel, RedisTlsServer};
use futures_util::future::join_all;
use serde_json::json;

const TTL: Duration = Duration::from_secs(60);
const RELAY: &str = "test/relay";
/// Bound on waiting for a condition that should hold within a second or two.
const PATIENCE: Duration = Duration::from_secs(10);

/// A store config: the deployment-specific fields plus generous timeouts,
/// since the machine running the tests may be busy.
fn config(deployment: serde_json::Value) -> RedisStoreConfig {
    let mut value = json!({
        "pool_size": 3,
        "connect_timeout": "3s",
        "command_timeout": "2s",
        "reconnect": {"min_delay": "50ms", "max_delay": "300ms"},
    });
    for (k, v) in deployment.as_object().expect("an object") {
        value[k] = v.clone();
    }
    serde_json::from_value(value).unwrap()
}

/// Two stores on one deployment, as two replicas of the proxy.
async fn replicas(config: &RedisStoreConfig) -> (Arc<RedisStore>, Arc<RedisStore>) {
    let a = RedisStore::connect(config, RELAY).await.unwrap();
    let b = RedisStore::connect(config, RELAY).await.unwrap();
    assert!(a.is_connected() && b.is_connected());
    (Arc::new(a), Arc::new(b))
}

fn sentinel_config(setup: &RedisSentinel) -> RedisStoreConfig {
    config(json!({
        "mode": "sentinel",
        "sentinel": {
            "service_name": RedisSentinel::SERVICE_NAME,
            "addresses": [setup.sentinel_addr()],
        },
    }))
}

fn cluster_config(cluster: &RedisCluster) -> RedisStoreConfig {
    // One node is enough: the client discovers the others.
    config(json!({
        "mode": "cluster",
        "cluster": {"nodes": [cluster.node_addrs()[0]]},
    }))
}

fn tls_config(url: &str, ca_file: Option<&std::path::Path>) -> RedisStoreConfig {
    config(json!({
        "url": url,
        "tls": {"enabled": true, "ca_file": ca_file},
    }))
}

/// Every check, each on its own clients so they do not interfere.
async fn conformance(a: Arc<RedisStore>, b: Arc<RedisStore>) {
    nonce_is_accepted_once_across_replicas(&a, &b).await;
    concurrent_claims_from_two_replicas_have_one_winner(&a, &b).await;
    nonce_is_forgotten_after_its_ttl(&a, &b).await;
    rate_window_is_shared_and_ends(&a, &b).await;
    rate_limit_holds_under_concurrency(&a, &b).await;
    admit_claims_and_counts_in_one_step(&a, &b).await;
    concurrent_admits_have_one_winner(&a, &b).await;
}

async fn nonce_is_accepted_once_across_replicas(a: &RedisStore, b: &RedisStore) {
    let n1 = "once-000000000000001";
    let n2 = "once-000000000000002";
    assert_eq!(a.claim_nonce("once", n1, TTL).await, Ok(true));
    assert_eq!(a.claim_nonce("once", n1, TTL).await, Ok(false));
    assert_eq!(b.claim_nonce("once", n1, TTL).await, Ok(false));
    assert_eq!(b.claim_nonce("once", n2, TTL).await, Ok(true));
    assert_eq!(a.claim_nonce("once", n2, TTL).await, Ok(false));
    // The same nonce of another client is another nonce.
    assert_eq!(b.claim_nonce("once-other", n1, TTL).await, Ok(true));
}

async fn concurrent_claims_from_two_replicas_have_one_winner(
    a: &Arc<RedisStore>,
    b: &Arc<RedisStore>,
) {
    for round in 0..10 {
        let nonce = format!("race-{round:016}");
        let claims = (0..20).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let nonce = nonce.clone();
            tokio::spawn(async move { store.claim_nonce("race", &nonce, TTL).await })
        });
        let winners = join_all(claims)
            .await
            .into_iter()
            .filter(|r| *r.as_ref().unwrap().as_ref().unwrap())
            .count();
        assert_eq!(winners, 1, "round {round}: {winners} claims won");
    }
}

async fn nonce_is_forgotten_after_its_ttl(a: &RedisStore, b: &RedisStore) {
    let ttl = Duration::from_secs(1);
    let nonce = "short-lived-00000001";
    let start = Instant::now();
    assert_eq!(a.claim_nonce("ttl", nonce, ttl).await, Ok(true));
    assert_eq!(b.claim_nonce("ttl", nonce, ttl).await, Ok(false));
    loop {
        if b.claim_nonce("ttl", nonce, ttl).await.unwrap() {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "the nonce never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not before its TTL (a little slack for Redis's and our clocks).
    assert!(
        start.elapsed() + Duration::from_millis(20) >= ttl,
        "forgotten after {:?}",
        start.elapsed()
    );
    // Claimed again: remembered again.
    assert_eq!(a.claim_nonce("ttl", nonce, ttl).await, Ok(false));
}

async fn rate_window_is_shared_and_ends(a: &RedisStore, b: &RedisStore) {
    let window = Duration::from_secs(1);
    let start = Instant::now();
    for (store, remaining) in [(a, 2), (b, 1), (a, 0)] {
        assert_eq!(
            store.hit_rate_limit("rate", 3, window).await.unwrap(),
            RateDecision {
                allowed: true,
                remaining,
                retry_after: None
            }
        );
    }
    let refused = b.hit_rate_limit("rate", 3, window).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry_after = refused.retry_after.expect("a refusal says when to retry");
    assert!(
        retry_after > Duration::ZERO && retry_after <= window,
        "{retry_after:?}"
    );
    // Another client has its own window.
    assert!(
        b.hit_rate_limit("rate-other", 3, window)
            .await
            .unwrap()
            .allowed
    );
    // Once the window is over, requests pass again, and not before.
    let again = loop {
        let decision = a.hit_rate_limit("rate", 3, window).await.unwrap();
        if decision.allowed {
            break decision;
        }
        assert!(start.elapsed() < PATIENCE, "the window never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(start.elapsed() + Duration::from_millis(20) >= window);
    assert_eq!(again.remaining, 2, "{again:?}");
}

async fn rate_limit_holds_under_concurrency(a: &Arc<RedisStore>, b: &Arc<RedisStore>) {
    let hits = (0..30).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { store.hit_rate_limit("busy", 10, TTL).await })
    });
    let allowed = join_all(hits)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().as_ref().unwrap().allowed)
        .count();
    assert_eq!(allowed, 10);
}

async fn admit_claims_and_counts_in_one_step(a: &RedisStore, b: &RedisStore) {
    let limit = Some((2, TTL));
    let first = a
        .admit("adm", Some(("adm-nonce-000000001", TTL)), limit, None)
        .await;
    let first = first.unwrap();
    assert_eq!(first.nonce_fresh, Some(true));
    assert_eq!(
        first.rate,
        Some(RateDecision {
            allowed: true,
            remaining: 1,
            retry_after: None
        })
    );
    // A replay, on the other replica: refused and not counted.
    let replay = b
        .admit("adm", Some(("adm-nonce-000000001", TTL)), limit, None)
        .await
        .unwrap();
    assert_eq!(replay.nonce_fresh, Some(false));
    assert_eq!(replay.rate, None);
    // `admit` and `hit_rate_limit` count in the same window.
    let hit = b.hit_rate_limit("adm", 2, TTL).await.unwrap();
    assert!(hit.allowed && hit.remaining == 0, "{hit:?}");
    let over = a
        .admit("adm", Some(("adm-nonce-000000002", TTL)), limit, None)
        .await
        .unwrap();
    assert_eq!(over.nonce_fresh, Some(true));
    let rate = over.rate.expect("a fresh nonce is counted");
    assert!(!rate.allowed);
    assert!(
        rate.retry_after
            .is_some_and(|d| d > Duration::ZERO && d <= TTL)
    );
    // Without a limit: the nonce only, the same key `claim_nonce` uses.
    let unlimited = a
        .admit("adm", Some(("adm-nonce-000000003", TTL)), None, None)
        .await
        .unwrap();
    assert_eq!(unlimited.nonce_fresh, Some(true));
    assert_eq!(unlimited.rate, None);
    assert_eq!(
        b.claim_nonce("adm", "adm-nonce-000000003", TTL).await,
        Ok(false)
    );
    assert_eq!(
        b.claim_nonce("adm", "adm-nonce-000000002", TTL).await,
        Ok(false)
    );
}

async fn concurrent_admits_have_one_winner(a: &Arc<RedisStore>, b: &Arc<RedisStore>) {
    for round in 0..5 {
        let nonce = format!("adm-race-{round:011}");
        let admits = (0..20).map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let nonce = nonce.clone();
            tokio::spawn(async move {
                store
                    .admit("adm-race", Some((&nonce, TTL)), Some((1000, TTL)), None)
                    .await
            })
        });
        let admissions: Vec<_> = join_all(admits)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let fresh = admissions
            .iter()
            .filter(|a| a.nonce_fresh == Some(true))
            .count();
        assert_eq!(fresh, 1, "round {round}");
        // Only the winner was counted.
        let counted = admissions.iter().filter(|a| a.rate.is_some()).count();
        assert_eq!(counted, 1, "round {round}");
    }
    let hit = a.hit_rate_limit("adm-race", 1000, TTL).await.unwrap();
    assert_eq!(hit.remaining, 1000 - 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_conformance() {
    let setup = RedisSentinel::start().unwrap();
    let (a, b) = replicas(&sentinel_config(&setup)).await;
    conformance(a, b).await;
    // Everything went to the primary the Sentinel names.
    assert_eq!(setup.primary_port().unwrap(), setup.primary().port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_nonces_and_windows() {
    let mut setup = RedisSentinel::start().unwrap();
    let (a, b) = replicas(&sentinel_config(&setup)).await;
    assert_eq!(
        a.claim_nonce("app", "before-failover-01", TTL).await,
        Ok(true)
    );
    let hit = a.hit_rate_limit("app", 5, TTL).await.unwrap();
    assert_eq!(hit.remaining, 4);
    setup.wait_for_replication().unwrap();

    setup.kill_primary_and_fail_over().unwrap();
    assert_eq!(setup.primary_port().unwrap(), setup.replica().port());

    // Both replicas find the new primary through the Sentinel, without a new store.
    for (name, store) in [("a", &a), ("b", &b)] {
        let start = Instant::now();
        loop {
            match store
                .claim_nonce("app", &format!("after-failover-{name}"), TTL)
                .await
            {
                Ok(fresh) => {
                    assert!(fresh);
                    break;
                }
                Err(e) => {
                    assert!(e.transient, "{e}");
                    assert!(start.elapsed() < PATIENCE, "{name} still failing: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // The promoted replica had every write: no replay, the window goes on.
    assert_eq!(
        b.claim_nonce("app", "before-failover-01", TTL).await,
        Ok(false)
    );
    assert_eq!(
        b.claim_nonce("app", "after-failover-a", TTL).await,
        Ok(false)
    );
    assert_eq!(b.hit_rate_limit("app", 5, TTL).await.unwrap().remaining, 3);
    let admission = a
        .admit(
            "app",
            Some(("after-failover-02", TTL)),
            Some((5, TTL)),
            None,
        )
        .await
        .unwrap();
    assert_eq!(admission.nonce_fresh, Some(true));
    assert_eq!(admission.rate.map(|r| r.remaining), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_conformance() {
    let cluster = RedisCluster::start().unwrap();
    let (a, b) = replicas(&cluster_config(&cluster)).await;
    conformance(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_the_keys_of_a_client_in_one_slot() {
    let cluster = RedisCluster::start().unwrap();
    let keys = Keys::new(RELAY);
    let mut slots = std::collections::HashSet::new();
    for i in 0..30 {
        let client = format!("client-{i}");
        let slot = cluster.key_slot(&keys.rate(&client)).unwrap();
        assert_eq!(
            cluster
                .key_slot(&keys.nonce(&client, "abc_DEF-0123456789"))
                .unwrap(),
            slot,
            "{client}: the nonce and rate keys must share a slot, or the admission script fails with CROSSSLOT"
        );
        slots.insert(slot);
    }
    // Clients still spread over the cluster.
    assert!(slots.len() > 10, "{} distinct slots", slots.len());

    // The admission script runs for clients on every node.
    let (a, _b) = replicas(&cluster_config(&cluster)).await;
    for i in 0..30 {
        let admission = a
            .admit(
                &format!("client-{i}"),
                Some(("spread-nonce-00000001", TTL)),
                Some((10, TTL)),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("client-{i}: {e}"));
        assert_eq!(admission.nonce_fresh, Some(true));
        assert_eq!(admission.rate.map(|r| r.remaining), Some(9));
    }
    for node in cluster.nodes() {
        let keys: u64 = node.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap();
        assert!(keys > 0, "node {} holds no key", node.port());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_conformance() {
    let server = RedisTlsServer::start().unwrap();
    let (a, b) = replicas(&tls_config(&server.url(), Some(server.ca_file()))).await;
    conformance(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_the_server_certificate() {
    let server = RedisTlsServer::start().unwrap();
    // By name, with `tls.enabled` and a redis:// URL.
    let by_name = config(json!({
        "url": format!("redis://localhost:{}", server.port()),
        "tls": {"enabled": true, "ca_file": server.ca_file()},
    }));
    let store = RedisStore::connect(&by_name, RELAY).await.unwrap();
    assert!(store.is_connected());
    assert_eq!(
        store.claim_nonce("app", "tls-by-name-000001", TTL).await,
        Ok(true)
    );

    // A server whose CA is not trusted (only the webpki roots) is never used.
    // It will not connect: no need to wait long for that.
    let untrusted = config(json!({
        "url": server.url(),
        "tls": {"enabled": true},
        "connect_timeout": "500ms",
    }));
    let untrusted = RedisStore::connect(&untrusted, RELAY).await.unwrap();
    assert!(!untrusted.is_connected());
    let err = untrusted
        .claim_nonce("app", "tls-untrusted-00001", TTL)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");
    // The nonce was not written by the failed attempt.
    assert_eq!(
        store.claim_nonce("app", "tls-untrusted-00001", TTL).await,
        Ok(true)
    );

    // Plain text to the TLS port never connects either.
    let plain = RedisStore::connect(
        &config(json!({
            "url": format!("redis://127.0.0.1:{}", server.port()),
            "connect_timeout": "500ms",
        })),
        RELAY,
    )
    .await
    .unwrap();
    assert!(!plain.is_connected());
    assert!(
        plain
            .claim_nonce("app", "tls-plain-0000001", TTL)
            .await
            .is_err()
    );
}
