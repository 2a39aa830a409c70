//! Reconcile against a scripted API server: each request checked and answered.

mod common;

use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::resources::ClaudeRelayStatus;
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_operator::cache::{self, Writers};
use claude_relay_operator::controller::Context;
use claude_relay_operator::render::render;
use common::*;
use http::Method;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

fn regions() -> Vec<UpstreamRegion> {
    Cluster::default().regions
}

/// The cluster with every object of relay `main` already there as rendered.
fn rolled_out() -> Cluster {
    Cluster {
        rendered_for: Some(ClaudeRelay::test()),
        ..Cluster::default()
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

/// First reconcile of a new relay: every object applied (each a Created
/// Event), status written. Returns the context (to reconcile again with
/// what it remembers), the applies and the status.
async fn first_pass(
    relay: &ClaudeRelay,
) -> (Arc<Context>, Writers, Handle, Vec<Seen>, ClaudeRelayStatus) {
    let (ctx, mut handle, writers) = context_with(&Cluster::default());
    let server = tokio::spawn(async move {
        let applies = expect_applies_creating(&mut handle, 2, true).await;
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        (applies, status, handle)
    });
    let action = run(relay, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let (applies, status, mut handle) = server.await.unwrap();
    expect_no_request(&mut handle).await;
    assert_eq!(status.body["apiVersion"], "relay.claude-relay.dev/v1alpha1");
    assert_eq!(status.body["kind"], "ClaudeRelay");
    let status: ClaudeRelayStatus = serde_json::from_value(status.body["status"].clone()).unwrap();
    (ctx, writers, handle, applies, status)
}

#[tokio::test]
async fn create_path_applies_every_object_and_reports_ready() {
    let relay = ClaudeRelay::test();
    let (_, _, _, applies, status) = first_pass(&relay).await;

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

/// Reconciles `relay` and checks that it made no request at all.
async fn quiet_pass(relay: &ClaudeRelay, ctx: &Arc<Context>, handle: &mut Handle) -> Action {
    let done = tokio::time::timeout(
        Duration::from_secs(2),
        claude_relay_operator::controller::reconcile(Arc::new(relay.clone()), ctx.clone()),
    )
    .await;
    expect_no_request(handle).await;
    done.expect("the reconcile waits for an answer")
        .expect("reconcile")
}

#[tokio::test]
async fn second_pass_of_an_unchanged_relay_changes_nothing() {
    let relay = ClaudeRelay::test();
    let (ctx, mut writers, mut handle, _, status) = first_pass(&relay).await;
    // The watches have seen what the first pass applied.
    fill_caches(&mut writers, &rolled_out());
    // The relay as the watch delivers it after the first pass: no apply,
    // no status write, no GET.
    let relay = relay.with_status(status);
    let action = quiet_pass(&relay, &ctx, &mut handle).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn an_owned_object_changed_by_someone_else_is_applied_again() {
    let relay = ClaudeRelay::test();
    let (ctx, mut writers, mut handle, _, status) = first_pass(&relay).await;
    fill_caches(&mut writers, &rolled_out());
    let relay = relay.with_status(status);
    quiet_pass(&relay, &ctx, &mut handle).await;

    // Someone edits the ConfigMap: the watch brings a new resourceVersion.
    let mut edited = render(&relay, &regions(), &defaults()).unwrap().config_map;
    edited.metadata.resource_version = Some("2".into());
    edited.data = Some([("config.yaml".to_string(), "edited".to_string())].into());
    cache::fill(&mut writers.config_maps, [edited]);
    let server = tokio::spawn(async move {
        let seen = expect_apply(
            &mut handle,
            "/api/v1/namespaces/team-a/configmaps/main-config",
            json!({}),
        )
        .await;
        // The answer has another resourceVersion: changed back, an Updated Event.
        let event = expect_event(&mut handle).await;
        (seen, event, handle)
    });
    run(&relay, &ctx).await;
    let (seen, event, mut handle) = server.await.unwrap();
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    assert_eq!(
        seen.body,
        serde_json::to_value(&rendered.config_map).unwrap()
    );
    assert_eq!(event["reason"], "Updated");
    assert_eq!(event["note"], "ConfigMap main-config changed");
    assert_eq!(event["related"]["name"], "main-config");
    expect_no_request(&mut handle).await;
}

#[tokio::test]
async fn update_path_applies_only_the_change_and_records_the_generation() {
    let relay = ClaudeRelay::test();
    let (ctx, mut writers, mut handle, _, status) = first_pass(&relay).await;
    fill_caches(&mut writers, &rolled_out());
    let mut relay = relay.with_status(status).with_replicas(4);
    relay.metadata.generation = Some(2);

    let server = tokio::spawn(async move {
        // Only the Deployment renders differently.
        let deployment = expect_apply(
            &mut handle,
            "/apis/apps/v1/namespaces/team-a/deployments/main",
            json!({"status": {"replicas": 4, "readyReplicas": 2}}),
        )
        .await;
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        (deployment, status, handle)
    });
    run(&relay, &ctx).await;
    let (deployment, status, mut handle) = server.await.unwrap();
    expect_no_request(&mut handle).await;
    assert_eq!(deployment.body["spec"]["replicas"], 4);
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

/// Reconciles a relay the operator must refuse, with the Secrets named in
/// `missing` absent: it applies nothing but the status (the running proxies
/// keep their config), publishes the problem as an Event, and retries in
/// 30 s. The status it wrote.
async fn refused(relay: &ClaudeRelay, missing: &'static [&'static str]) -> serde_json::Value {
    let mut cluster = Cluster::default();
    cluster
        .secrets
        .retain(|s| !missing.contains(&s.metadata.name.as_deref().unwrap_or_default()));
    let (status, _) = refused_in(relay, &cluster).await;
    status
}

/// [`refused`] in `cluster`; the status and the Event.
async fn refused_in(relay: &ClaudeRelay, cluster: &Cluster) -> (Value, Value) {
    let (ctx, mut handle, _writers) = context_with(cluster);
    let server = tokio::spawn(async move {
        let status = expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
        let event = expect_event(&mut handle).await;
        (status.body["status"].clone(), event)
    });
    let action = run(relay, &ctx).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    server.await.unwrap()
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
    let mut cluster = Cluster::default();
    cluster.secrets[0] = secret_object("app-key", &["other"]);
    let (status, event) = refused_in(&ClaudeRelay::test(), &cluster).await;
    assert_eq!(
        condition(&status, "Ready")["message"],
        "Secret app-key has no key key"
    );
    assert_eq!(event["reason"], "MissingSecret");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["note"], "Secret app-key has no key key");
}

#[tokio::test]
async fn no_regions_gives_a_condition_and_no_deployment() {
    let cluster = Cluster {
        regions: vec![],
        ..Cluster::default()
    };
    let (status, _) = refused_in(&ClaudeRelay::test(), &cluster).await;
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
    let (ctx, mut handle, _writers) = context_with(&Cluster {
        rendered_for: Some(relay.clone()),
        ..Cluster::default()
    });
    let server = tokio::spawn(async move {
        let applies = expect_applies(&mut handle, 3).await;
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
        "metadata": {"name": "main", "namespace": "team-a", "resourceVersion": "1", "managedFields": [{
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
        let (ctx, mut handle, mut writers) = context_with(&rolled_out());
        // The cache sees the operator's own apply owning the count.
        let live = deployment_with_replicas_of(current, "claude-relay-operator", "Apply");
        cache::fill(
            &mut writers.deployments,
            [serde_json::from_value(live.clone()).unwrap()],
        );
        let server = tokio::spawn(async move {
            let mut applies = Vec::new();
            for path in [
                "/api/v1/namespaces/team-a/serviceaccounts/main-proxy",
                "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles/main-proxy",
                "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/main-proxy",
                "/api/v1/namespaces/team-a/configmaps/main-config",
            ] {
                expect_apply(&mut handle, path, json!({})).await;
            }
            expect(&mut handle, Method::GET, DEPLOYMENT, 200, |_| live).await;
            let handover = expect_apply(&mut handle, DEPLOYMENT, json!({})).await;
            applies.push(expect_apply(&mut handle, DEPLOYMENT, json!({})).await);
            for path in [
                "/api/v1/namespaces/team-a/services/main",
                "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/main",
                "/apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/main",
            ] {
                expect_apply(&mut handle, path, json!({})).await;
            }
            // The HPA is new (the relay had fixed replicas).
            assert_eq!(expect_event(&mut handle).await["reason"], "Created");
            expect_apply(&mut handle, &format!("{RELAYS}/main/status"), json!({})).await;
            (handover, applies)
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
        assert!(
            !applies[0].query.contains("handover")
                && applies[0].body["spec"].get("replicas").is_none(),
            "the operator's own apply leaves the count out"
        );
    }
}

/// The relay is deleted while its reconcile runs: the status write finds
/// it gone, which is no failure (no error counted, no retry).
#[tokio::test]
async fn a_relay_deleted_during_its_reconcile_is_no_failure() {
    let relay = ClaudeRelay::test();
    let (ctx, mut handle, _writers) = context_with(&rolled_out());
    let server = tokio::spawn(async move {
        expect_applies(&mut handle, 2).await;
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
            let path = "/api/v1/namespaces/team-a/serviceaccounts/main-proxy";
            expect(&mut handle, Method::PATCH, path, 500, |_| {
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
