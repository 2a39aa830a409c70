//! Scale benchmark of the operator against the API double (ignored by
//! default; prints figures, asserts nothing about time):
//!
//! ```sh
//! cargo build -p claude-relay-operator
//! cargo test -p claude-relay-e2e --test operator_scale -- --ignored --nocapture
//! ```
//!
//! 200 ClaudeRelays sharing 3 UpstreamRegions: the time from applying them
//! to all Ready; the operator's API requests per minute at rest, by verb
//! (target: 0 writes); its resident memory (target < 100 MB); and the time
//! for an edit of a shared region to reach all 200 ConfigMaps (target < 10 s).
//! The harness plays the Deployment controller: it reports each new
//! Deployment's pods ready.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_e2e::pods;
use claude_relay_testkit::redis::RedisServer;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::ListParams;

const RELAYS: usize = 200;
const REGIONS: [&str; 3] = ["us", "eu", "ap"];
/// The operator's default status refresh.
const REFRESH: Duration = Duration::from_secs(10);
/// How long requests are counted at rest (three refreshes).
const AT_REST: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn operator_at_scale() {
    let mut world = World::start().await;
    let redis = RedisServer::start().expect("redis-server");
    let cluster = &world.cluster;
    cluster
        .apply(&secret("upstream-keys", &[("api-key", "sk-ant-scale")]))
        .await
        .unwrap();
    cluster
        .apply(&secret("app-credentials", &[("relay-key", "scale-key")]))
        .await
        .unwrap();
    for (i, name) in REGIONS.iter().enumerate() {
        let url = format!("https://{name}.gateway.example");
        cluster
            .apply(&region(name, &url, i as i32, &[("shared", "yes")]))
            .await
            .unwrap();
    }
    world.start_operator(REFRESH);
    let cluster = &world.cluster;

    let started = Instant::now();
    let relays: Vec<ClaudeRelay> = (0..RELAYS)
        .map(|i| {
            relay(
                &format!("relay-{i:03}"),
                &[("shared", "yes")],
                Some(&redis.url()),
            )
        })
        .collect();
    for relay in &relays {
        cluster.apply(relay).await.unwrap();
    }
    let applied = started.elapsed();
    let api = cluster.api::<ClaudeRelay>();
    let deployments = cluster.api::<Deployment>();
    eventually("every relay Ready", Duration::from_secs(600), async || {
        // The Deployment controller's part: pods of every new Deployment ready.
        for d in deployments.list(&ListParams::default()).await.ok()?.items {
            if d.status.as_ref().and_then(|s| s.ready_replicas).is_none() {
                let _ = pods::report(cluster, &d.name_any(), 2).await;
            }
        }
        let list = api.list(&ListParams::default()).await.ok()?;
        (list.items.iter().filter(|r| is_ready(r)).count() == RELAYS).then_some(())
    })
    .await;
    let all_ready = started.elapsed();

    // Let the region statuses and the last events settle, then count.
    tokio::time::sleep(REFRESH).await;
    let from = world.api().calls().len();
    let rss_before = world.operator.as_ref().and_then(|o| o.rss_bytes());
    tokio::time::sleep(AT_REST).await;
    let calls = world.api().calls();
    let mut by_verb: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls[from..]
        .iter()
        .filter(|c| c.client.starts_with(OPERATOR_CLIENT))
    {
        let what = if call.target.contains("/leases/") {
            format!("{} (leader Lease)", call.verb)
        } else {
            call.verb.to_string()
        };
        *by_verb.entry(what).or_default() += 1;
    }
    let per_minute = |n: usize| n as f64 * 60.0 / AT_REST.as_secs_f64();
    let rss = world.operator.as_ref().and_then(|o| o.rss_bytes());

    // An edit of a region all 200 relays share.
    let edited_url = "https://us-moved.gateway.example";
    let edit_started = Instant::now();
    cluster
        .apply(&region("us", edited_url, 0, &[("shared", "yes")]))
        .await
        .unwrap();
    let maps = cluster.api::<ConfigMap>();
    eventually(
        "the edit in every ConfigMap",
        Duration::from_secs(300),
        async || {
            let list = maps.list(&ListParams::default()).await.ok()?;
            let updated = list
                .items
                .iter()
                .filter(|m| {
                    m.data
                        .as_ref()
                        .and_then(|d| d.get("config.yaml"))
                        .is_some_and(|c| c.contains(edited_url))
                })
                .count();
            (updated == RELAYS).then_some(())
        },
    )
    .await;
    let edit_reached = edit_started.elapsed();
    let regions = cluster.api::<UpstreamRegion>().get("us").await.unwrap();
    let listed = regions.status.map(|s| s.relays.len()).unwrap_or(0);

    println!(
        "operator_scale: {RELAYS} ClaudeRelays x {} UpstreamRegions, status refresh {REFRESH:?}",
        REGIONS.len()
    );
    println!(
        "  applied in                         {:>8.2} s",
        applied.as_secs_f64()
    );
    println!(
        "  apply -> all Ready                 {:>8.2} s",
        all_ready.as_secs_f64()
    );
    // The harness's own applies through the double take most of the above.
    println!(
        "  last applied -> all Ready          {:>8.2} s",
        (all_ready - applied).as_secs_f64()
    );
    println!("  API requests/min at rest, by verb  (over {AT_REST:?})");
    if by_verb.is_empty() {
        println!("    (none)");
    }
    for (verb, n) in &by_verb {
        println!("    {verb:<28} {:>8.1}", per_minute(*n));
    }
    let writes: usize = by_verb
        .iter()
        .filter(|(v, _)| {
            !v.contains("Lease")
                && ["create", "update", "patch", "delete"]
                    .iter()
                    .any(|w| v.starts_with(w))
        })
        .map(|(_, n)| n)
        .sum();
    println!(
        "  writes/min at rest (target 0)      {:>8.1}",
        per_minute(writes)
    );
    println!(
        "  operator RSS (target < 100 MB)     {:>8.1} MB (at rest start {:.1} MB)",
        rss.unwrap_or(0) as f64 / 1e6,
        rss_before.unwrap_or(0) as f64 / 1e6
    );
    println!(
        "  region edit -> all ConfigMaps      {:>8.2} s (target < 10 s)",
        edit_reached.as_secs_f64()
    );
    println!("  region us lists                    {listed:>8} relays");
    world.cluster.cleanup().await;
}
