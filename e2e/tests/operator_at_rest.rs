//! The operator against the API double, without proxy pods: at rest it
//! makes no writes, each UpstreamRegion's status lists exactly the relays
//! that select it, and what happens to a relay shows as Events.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_e2e::cluster::Cluster;
use claude_relay_e2e::pods;
use claude_relay_testkit::redis::RedisServer;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams};

const REFRESH: Duration = Duration::from_millis(300);
const UPSTREAM_KEY: &str = "sk-ant-e2e-value-never-shown";
const RELAY_KEY: &str = "relay-key-value-never-shown";

/// The Secrets the relay refers to: its upstream key and its relay key.
async fn apply_secrets(cluster: &Cluster) {
    cluster
        .apply(&secret("upstream-keys", &[("api-key", UPSTREAM_KEY)]))
        .await
        .unwrap();
    cluster
        .apply(&secret("app-credentials", &[("relay-key", RELAY_KEY)]))
        .await
        .unwrap();
}

async fn base_objects(cluster: &Cluster) {
    apply_secrets(cluster).await;
    for (name, priority, labels) in [
        ("us", 0, &[("relay", "main"), ("tier", "gold")][..]),
        ("eu", 10, &[("relay", "main")][..]),
    ] {
        cluster
            .apply(&region(name, "https://api.anthropic.com", priority, labels))
            .await
            .unwrap();
    }
}

/// Waits for the relay's Deployment, reports its pods ready, and waits
/// until the relay is Ready.
async fn roll_out(world: &World, name: &str) {
    let deployments = world.cluster.api::<Deployment>();
    eventually("the Deployment", Duration::from_secs(20), async || {
        deployments.get_opt(name).await.ok().flatten()
    })
    .await;
    pods::report(&world.cluster, name, 2).await.unwrap();
    let relays = world.cluster.api::<ClaudeRelay>();
    eventually("the relay Ready", Duration::from_secs(20), async || {
        relays.get(name).await.ok().filter(is_ready)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rest_the_operator_writes_nothing() {
    let mut world = World::start().await;
    let redis = RedisServer::start().expect("redis-server");
    base_objects(&world.cluster).await;
    world
        .cluster
        .apply(&relay("main", &[("relay", "main")], Some(&redis.url())))
        .await
        .unwrap();
    world.start_operator(REFRESH);
    roll_out(&world, "main").await;
    // Let the region statuses and the last watch events settle.
    tokio::time::sleep(REFRESH * 4).await;

    let before = world.operator_writes();
    let calls_before = world.api().calls().len();
    // Ten status refreshes: breakers read from Redis, nothing changed.
    tokio::time::sleep(REFRESH * 10).await;
    let after = world.operator_writes();
    assert_eq!(
        after[before.len()..],
        [] as [String; 0],
        "writes at rest; operator log:\n{}",
        world.operator_log()
    );
    // Nor any reads: everything comes from the watches' caches.
    let reads: Vec<String> = world.api().calls()[calls_before..]
        .iter()
        .filter(|c| c.client.starts_with(OPERATOR_CLIENT))
        .filter(|c| matches!(c.verb, "get" | "list") && !c.target.contains("/leases/"))
        .map(|c| format!("{} {}", c.verb, c.target))
        .collect();
    assert_eq!(reads, [] as [String; 0], "reads at rest");
    // It did write before: the rollout (so the count above counts something).
    assert!(
        before.iter().any(|w| w.contains("/configmaps/main-config")),
        "{before:#?}"
    );
    world.cluster.cleanup().await;
}

/// The relays a region's status lists.
async fn listed(cluster: &Cluster, region: &str) -> BTreeSet<String> {
    let region = cluster.api::<UpstreamRegion>().get(region).await.unwrap();
    region
        .status
        .map(|s| s.relays.into_keys().collect())
        .unwrap_or_default()
}

async fn expect_listed(cluster: &Cluster, region: &str, relays: &[&str]) {
    let want: BTreeSet<String> = relays.iter().map(|r| r.to_string()).collect();
    let mut last = BTreeSet::new();
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            last = listed(cluster, region).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "region {region} lists {last:?}, want {want:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_status_lists_exactly_the_relays_that_select_it() {
    let mut world = World::start().await;
    base_objects(&world.cluster).await;
    world.start_operator(REFRESH);
    let cluster = &world.cluster;
    for name in ["a", "b"] {
        cluster
            .apply(&relay(name, &[("relay", "main")], None))
            .await
            .unwrap();
    }
    expect_listed(cluster, "us", &["a", "b"]).await;
    expect_listed(cluster, "eu", &["a", "b"]).await;

    // b now selects only the gold tier: eu drops it.
    cluster
        .apply(&relay("b", &[("tier", "gold")], None))
        .await
        .unwrap();
    expect_listed(cluster, "eu", &["a"]).await;
    expect_listed(cluster, "us", &["a", "b"]).await;

    // A relay deleted leaves every region.
    cluster
        .api::<ClaudeRelay>()
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    expect_listed(cluster, "us", &["b"]).await;
    expect_listed(cluster, "eu", &[]).await;

    // Region labels changed: us is no longer gold, so b leaves it.
    cluster
        .apply(&region(
            "us",
            "https://api.anthropic.com",
            0,
            &[("relay", "main")],
        ))
        .await
        .unwrap();
    expect_listed(cluster, "us", &[]).await;

    // Two relays changing at once: neither entry is lost.
    let (relay_c, relay_d) = (
        relay("c", &[("relay", "main")], None),
        relay("d", &[("relay", "main")], None),
    );
    let (c, d) = tokio::join!(cluster.apply(&relay_c), cluster.apply(&relay_d));
    c.unwrap();
    d.unwrap();
    expect_listed(cluster, "eu", &["c", "d"]).await;
    expect_listed(cluster, "us", &["c", "d"]).await;
    let relays = cluster.api::<ClaudeRelay>();
    let delete = DeleteParams::default();
    let relay_d = relay("d", &[("tier", "none")], None);
    let (c, d) = tokio::join!(relays.delete("c", &delete), cluster.apply(&relay_d));
    c.unwrap();
    d.unwrap();
    expect_listed(cluster, "eu", &[]).await;
    expect_listed(cluster, "us", &[]).await;

    // Written as the operator's own field manager, with server-side apply.
    let applied = world
        .api()
        .writes(OPERATOR_CLIENT)
        .into_iter()
        .filter(|c| c.target.contains("/upstreamregions/"))
        .collect::<Vec<_>>();
    assert!(!applied.is_empty());
    assert!(
        applied
            .iter()
            .all(|c| c.target.contains("fieldManager=claude-relay-operator")),
        "{applied:#?}"
    );
    let log = world.operator_log();
    assert!(!log.contains("not found in local store"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
    world.cluster.cleanup().await;
}

/// Events about relay `name`: (type, reason, note).
async fn events_of(cluster: &Cluster, name: &str) -> Vec<(String, String, String)> {
    cluster
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

async fn expect_event(world: &World, relay: &str, reason: &str, note: &str) {
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let events = events_of(&world.cluster, relay).await;
            if events
                .iter()
                .any(|(_, r, n)| r == reason && n.contains(note))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no event {reason}: {note}; events: {:#?}\noperator log:\n{}",
        events_of(&world.cluster, relay).await,
        world.operator_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_happens_to_a_relay_shows_as_events() {
    let mut world = World::start().await;
    let cluster = &world.cluster;
    // No Secrets yet: the relay cannot roll out.
    for (name, priority, labels) in [("us", 0, &[("relay", "main")][..])] {
        cluster
            .apply(&region(name, "https://api.anthropic.com", priority, labels))
            .await
            .unwrap();
    }
    // Nothing listens on this port.
    let dead_redis = format!(
        "redis://127.0.0.1:{}",
        claude_relay_testkit::proxy::free_addresses().0.port()
    );
    cluster
        .apply(&relay("main", &[("relay", "main")], Some(&dead_redis)))
        .await
        .unwrap();
    world.start_operator(REFRESH);
    let cluster = &world.cluster;
    expect_event(
        &world,
        "main",
        "MissingSecret",
        "Secret app-credentials not found",
    )
    .await;

    // The Secrets appear (the operator watches them): the objects are created.
    apply_secrets(cluster).await;
    expect_event(&world, "main", "Created", "ConfigMap main-config created").await;
    expect_event(&world, "main", "Created", "Deployment main created").await;
    expect_event(
        &world,
        "main",
        "RedisUnreachable",
        "cannot read breaker state from Redis",
    )
    .await;

    // A spec the operator refuses.
    let mut bad = relay("main", &[("relay", "main")], Some(&dead_redis));
    bad.spec.region_selector = serde_json::from_value(serde_json::json!({
        "matchExpressions": [{"key": "relay", "operator": "Near", "values": ["main"]}]
    }))
    .unwrap();
    cluster.apply(&bad).await.unwrap();
    expect_event(&world, "main", "InvalidSpec", "regionSelector").await;

    // Fixed, with one more replica: the Deployment changes.
    let mut fixed = relay("main", &[("relay", "main")], Some(&dead_redis));
    fixed.spec.replicas = Some(3);
    cluster.apply(&fixed).await.unwrap();
    expect_event(&world, "main", "Updated", "Deployment main changed").await;

    // Each event once (no repeats at every refresh), and never a secret value.
    tokio::time::sleep(REFRESH * 5).await;
    let events = events_of(cluster, "main").await;
    let reasons: Vec<&str> = events.iter().map(|(_, r, _)| r.as_str()).collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "RedisUnreachable").count(),
        1,
        "{events:#?}"
    );
    let all = serde_json::to_string(
        &cluster
            .api::<Event>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    for value in [UPSTREAM_KEY, RELAY_KEY] {
        assert!(!all.contains(value), "a secret value in an Event: {all}");
    }
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "InvalidSpec"),
        "{events:#?}"
    );
    world.cluster.cleanup().await;
}
