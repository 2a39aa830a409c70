//! Reconcile against a scripted API server: each request checked and answered.

mod common;

use std::time::Duration;

use claude_relay_crds::resources::ClaudeRelayStatus;
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_operator::render::{Defaults, render};
use common::*;
use http::Method;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

fn regions() -> Vec<UpstreamRegion> {
    vec![
        UpstreamRegion::test("us", "https://api.anthropic.com"),
        UpstreamRegion::test("eu", "https://eu.gateway.example").with_priority(10),
    ]
}

fn defaults() -> Defaults {
    Defaults {
        image: "ghcr.io/claude-relay/claude-relay-proxy:0.1.0".into(),
        pricing: Default::default(),
    }
}

async fn expect_region_list(handle: &mut Handle, regions: Vec<UpstreamRegion>) {
    let seen = expect(handle, Method::GET, REGIONS, 200, |_| region_list(&regions)).await;
    assert!(
        seen.query.contains("labelSelector=relay%3Dmain"),
        "{}",
        seen.query
    );
}

async fn expect_secrets(handle: &mut Handle, missing: &[&str]) {
    for (name, key) in [
        ("app-key", "key"),
        ("eu-keys", "api-key"),
        ("us-keys", "api-key"),
    ] {
        let path = format!("/api/v1/namespaces/team-a/secrets/{name}");
        if missing.contains(&name) {
            expect(handle, Method::GET, &path, 404, |_| not_found()).await;
        } else {
            expect(handle, Method::GET, &path, 200, |_| secret(name, &[key])).await;
        }
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

/// First reconcile of a new relay: every object applied, the leftover HPA
/// check made once, status written. Returns the applies and the status.
async fn first_pass(relay: &ClaudeRelay) -> (Vec<Seen>, ClaudeRelayStatus) {
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, &[]).await;
        let applies = expect_applies(&mut handle, 2).await;
        expect(
            &mut handle,
            Method::DELETE,
            "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
            404,
            |_| not_found(),
        )
        .await;
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        (applies, status)
    });
    let action = run(relay, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let (applies, status) = server.await.unwrap();
    assert_eq!(status.body["apiVersion"], "relay.claude-relay.dev/v1alpha1");
    assert_eq!(status.body["kind"], "ClaudeRelay");
    let status: ClaudeRelayStatus = serde_json::from_value(status.body["status"].clone()).unwrap();
    (applies, status)
}

#[tokio::test]
async fn create_path_applies_every_object_and_reports_ready() {
    let relay = ClaudeRelay::test();
    let (applies, status) = first_pass(&relay).await;

    // The bodies are exactly what the render functions produce.
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    let expected = [
        serde_json::to_value(&rendered.service_account).unwrap(),
        serde_json::to_value(&rendered.role).unwrap(),
        serde_json::to_value(&rendered.role_binding).unwrap(),
        serde_json::to_value(&rendered.config_map).unwrap(),
        serde_json::to_value(&rendered.deployment).unwrap(),
        serde_json::to_value(&rendered.service).unwrap(),
        serde_json::to_value(&rendered.pdb).unwrap(),
    ];
    for (seen, expected) in applies.iter().zip(expected) {
        assert_eq!(seen.body, expected, "{}", seen.path);
    }

    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(condition(&value, "Ready")["status"], "True");
    assert_eq!(condition(&value, "Ready")["reason"], "ProxiesReady");
    assert_eq!(condition(&value, "Degraded")["status"], "False");
    assert_eq!(
        condition(&value, "Ready")["lastTransitionTime"],
        "2025-11-26T06:00:00Z"
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.replicas_ready.as_deref(), Some("2/2"));
    assert_eq!(status.regions, ["us", "eu"]);
    assert_eq!(status.region_count, 2);
    assert_eq!(status.breaker_summary, None, "no Redis, no breakers");
}

#[tokio::test]
async fn second_pass_of_an_unchanged_relay_changes_nothing() {
    let relay = ClaudeRelay::test();
    let (first, status) = first_pass(&relay).await;

    // The relay as the watch delivers it after the first pass.
    let relay = relay.with_status(status);
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, &[]).await;
        // Same applies with the same bodies (server-side apply: no change),
        // no HPA delete, and no status write.
        expect_applies(&mut handle, 2).await
    });
    run(&relay, &ctx).await;
    let second = server.await.unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.body, b.body, "{}", a.path);
    }
}

#[tokio::test]
async fn update_path_applies_the_change_and_records_the_generation() {
    let relay = ClaudeRelay::test();
    let (_, status) = first_pass(&relay).await;
    let mut relay = relay.with_status(status).with_replicas(4);
    relay.metadata.generation = Some(2);

    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, &[]).await;
        let applies = expect_applies(&mut handle, 2).await;
        expect(
            &mut handle,
            Method::DELETE,
            "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
            404,
            |_| not_found(),
        )
        .await;
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        (applies, status)
    });
    run(&relay, &ctx).await;
    let (applies, status) = server.await.unwrap();
    assert_eq!(applies[4].body["spec"]["replicas"], 4);
    assert_eq!(status.body["status"]["observedGeneration"], 2);
    // The Deployment answered 2 ready of 4 wanted.
    assert_eq!(status.body["status"]["replicasReady"], "2/4");
    let degraded = condition(&status.body["status"], "Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("ReplicasUnavailable"))
    );
    // Ready did not flip, so its transition time is kept.
    assert_eq!(
        condition(&status.body["status"], "Ready")["lastTransitionTime"],
        "2025-11-26T06:00:00Z"
    );
}

/// Reconciles a relay the operator must refuse: it reads the regions and
/// the `missing` Secrets, applies nothing but the status (the running
/// proxies keep their config) and retries in 30 s. The status it wrote.
async fn refused(relay: &ClaudeRelay, missing: &'static [&'static str]) -> serde_json::Value {
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, missing).await;
        expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await
    });
    let action = run(relay, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    server.await.unwrap().body["status"].clone()
}

#[tokio::test]
async fn missing_secret_gives_a_condition_and_no_deployment() {
    let status = refused(&ClaudeRelay::test(), &["eu-keys"]).await;
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "MissingSecret");
    assert_eq!(ready["message"], "Secret eu-keys not found");
    assert_eq!(condition(&status, "Degraded")["status"], "True");
}

#[tokio::test]
async fn missing_secret_key_is_named() {
    let relay = ClaudeRelay::test();
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/app-key",
            200,
            |_| secret("app-key", &["other"]),
        )
        .await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/eu-keys",
            200,
            |_| secret("eu-keys", &["api-key"]),
        )
        .await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/us-keys",
            200,
            |_| secret("us-keys", &["api-key"]),
        )
        .await;
        expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await
    });
    run(&relay, &ctx).await;
    let status = server.await.unwrap().body["status"].clone();
    assert_eq!(
        condition(&status, "Ready")["message"],
        "Secret app-key has no key key"
    );
}

#[tokio::test]
async fn no_regions_gives_a_condition_and_no_deployment() {
    let relay = ClaudeRelay::test();
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, vec![]).await;
        expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await
    });
    let action = run(&relay, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let status = server.await.unwrap().body["status"].clone();
    let ready = condition(&status, "Ready");
    assert_eq!(ready["reason"], "NoRegionsSelected");
    assert_eq!(
        ready["message"],
        "no UpstreamRegion in namespace team-a matches regionSelector"
    );
    assert_eq!(status["regionCount"], 0);
}

#[tokio::test]
async fn token_budgets_with_usage_off_give_invalid_spec_and_no_deployment() {
    use claude_relay_crds::resources::{ClientQuota, UsageSettings};
    let mut relay = ClaudeRelay::test();
    relay.spec.usage = Some(UsageSettings {
        enabled: false,
        retention: None,
    });
    relay.spec.clients[0].quota = Some(ClientQuota {
        tokens_per_minute: Some(10_000),
        ..ClientQuota::default()
    });
    let status = refused(&relay, &[]).await;
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert_eq!(
        ready["message"],
        "invalid proxy config: clients[0].quota: token budgets need usage.enabled"
    );
    assert_eq!(condition(&status, "Degraded")["status"], "True");
}

#[tokio::test]
async fn autoscaling_applies_an_hpa_and_leaves_replicas_alone() {
    let relay = ClaudeRelay::test().with_autoscaling(2, 8);
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, &[]).await;
        // The HPA already scales the Deployment: nothing to hand over.
        let applies = expect_applies_with(&mut handle, 3, async |handle| {
            expect(handle, Method::GET, DEPLOYMENT, 200, |_| {
                deployment_with_replicas_of(3, "kube-controller-manager", "Update")
            })
            .await;
        })
        .await;
        let hpa = expect_apply(
            &mut handle,
            "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
            json!({}),
        )
        .await;
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        (applies, hpa, status)
    });
    run(&relay, &ctx).await;
    let (applies, hpa, status) = server.await.unwrap();
    assert!(
        applies[4].body["spec"].get("replicas").is_none(),
        "the HPA owns replicas"
    );
    assert_eq!(hpa.body["spec"]["minReplicas"], 2);
    assert_eq!(hpa.body["spec"]["maxReplicas"], 8);
    // Desired comes from the Deployment's status when the HPA owns spec.replicas.
    assert_eq!(status.body["status"]["replicasReady"], "3/2");
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/team-a/deployments/main";

/// A Deployment whose `spec.replicas` is `replicas`, owned by `manager`.
fn deployment_with_replicas_of(replicas: i32, manager: &str, operation: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "main", "namespace": "team-a", "managedFields": [{
            "manager": manager, "operation": operation, "apiVersion": "apps/v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}},
        }]},
        "spec": {"replicas": replicas, "selector": {}, "template": {}},
    })
}

/// Fixed replicas turned into autoscaling: before the operator's apply
/// drops `spec.replicas`, the handover field manager applies it alone at
/// max(minReplicas, current), so the server keeps the count.
#[tokio::test]
async fn switching_to_autoscaling_hands_the_replica_count_over_first() {
    for (current, handed_over) in [(5, 5), (1, 2)] {
        let relay = ClaudeRelay::test().with_autoscaling(2, 8);
        let (ctx, mut handle) = context();
        let server = tokio::spawn(async move {
            expect_region_list(&mut handle, regions()).await;
            expect_secrets(&mut handle, &[]).await;
            let mut handover = None;
            let applies = expect_applies_with(&mut handle, 3, async |handle| {
                expect(handle, Method::GET, DEPLOYMENT, 200, |_| {
                    deployment_with_replicas_of(current, "claude-relay-operator", "Apply")
                })
                .await;
                handover = Some(expect_apply(handle, DEPLOYMENT, json!({})).await);
            })
            .await;
            expect_apply(
                &mut handle,
                "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
                json!({}),
            )
            .await;
            expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
            (handover.expect("a hand-over apply"), applies)
        });
        run(&relay, &ctx).await;
        let (handover, applies) = server.await.unwrap();
        assert!(
            handover
                .query
                .contains("fieldManager=claude-relay-operator-handover"),
            "{}",
            handover.query
        );
        assert_eq!(
            handover.body["spec"],
            json!({"replicas": handed_over}),
            "only spec.replicas, at max(minReplicas, {current})"
        );
        assert!(applies[4].body["spec"].get("replicas").is_none());
    }
}

/// The relay is deleted while its reconcile runs: the status write finds
/// it gone, which is no failure (no error counted, no retry).
#[tokio::test]
async fn a_relay_deleted_during_its_reconcile_is_no_failure() {
    let relay = ClaudeRelay::test();
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        expect_region_list(&mut handle, regions()).await;
        expect_secrets(&mut handle, &[]).await;
        expect_applies(&mut handle, 2).await;
        expect(
            &mut handle,
            Method::DELETE,
            "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
            404,
            |_| not_found(),
        )
        .await;
        expect(
            &mut handle,
            Method::PATCH,
            &format!("{RELAYS}/main/status"),
            404,
            |_| not_found(),
        )
        .await;
    });
    let action = run(&relay, &ctx).await;
    server.await.unwrap();
    assert_eq!(action, Action::await_change());
    let errors = ctx
        .metrics
        .reconcile_errors
        .get_or_create(&claude_relay_operator::metrics::ErrorLabels { kind: "api".into() })
        .get();
    assert_eq!(errors, 0);
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    use claude_relay_operator::controller::{error_policy, reconcile};
    use std::sync::Arc;
    let relay = Arc::new(ClaudeRelay::test());
    let (ctx, mut handle) = context();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            expect(&mut handle, Method::GET, REGIONS, 500, |_| {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd down"})
            })
            .await;
        }
    });
    let mut delays = Vec::new();
    for _ in 0..2 {
        let err = reconcile(relay.clone(), ctx.clone()).await.unwrap_err();
        delays.push(error_policy(relay.clone(), &err, ctx.clone()));
    }
    server.await.unwrap();
    assert_eq!(
        delays,
        [
            Action::requeue(Duration::from_secs(5)),
            Action::requeue(Duration::from_secs(10))
        ]
    );
    let errors = ctx
        .metrics
        .reconcile_errors
        .get_or_create(&claude_relay_operator::metrics::ErrorLabels { kind: "api".into() })
        .get();
    assert_eq!(errors, 2);
}
