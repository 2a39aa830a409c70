//! The operator against API server behaviours that a real cluster has and
//! that the relay lifecycle test does not exercise: the hand-over of
//! `spec.replicas` to an HPA under server-side apply field ownership, a
//! namespaced install with only the chart's namespaced RBAC, and leader
//! election against a Lease whose holder's clock is skewed.
//!
//! The first two need the API double (its HPA controller and its service
//! account tokens) and are skipped against a real cluster.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_e2e::apiserver::ApiServer;
use claude_relay_e2e::cluster::{Cluster, work_dir};
use claude_relay_e2e::hpa::{HPA_MANAGER, HpaController, replica_owners};
use claude_relay_e2e::operator::OperatorProcess;
use claude_relay_operator::controller::FIELD_MANAGER;
use claude_relay_operator::handover::HANDOVER_MANAGER;
use claude_relay_operator::leader::{Elector, LeaseConfig};
use common::secret;
use futures_util::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{PostParams, ResourceExt};
use serde_json::{Value, json};

const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// The Secrets and the one UpstreamRegion every relay here selects.
async fn upstream(cluster: &Cluster) {
    let secrets = cluster.api::<Secret>();
    for s in [
        secret("app-credentials", &[("relay-key", "relay-key-of-the-app")]),
        secret("upstream-keys", &[("us", "sk-ant-us")]),
    ] {
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create a Secret");
    }
    let region: UpstreamRegion = serde_json::from_value(json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "UpstreamRegion",
        "metadata": {"name": "us", "labels": {"relay": "main"}},
        "spec": {
            "baseUrl": "http://127.0.0.1:9",
            "priority": 0,
            "apiKeySecretRefs": [{"name": "upstream-keys", "key": "us"}],
        },
    }))
    .expect("an UpstreamRegion");
    cluster.apply(&region).await.expect("apply the region");
}

/// A relay whose scaling is `scaling` (`replicas` or `autoscaling`).
fn relay(name: &str, scaling: Value) -> ClaudeRelay {
    common::relay_with(name, &[("relay", "main")], scaling)
}

/// The Deployment as the double stores it (no request: sampling must not
/// wait on the operator's traffic).
fn stored_deployment(api: &ApiServer, ns: &str, name: &str) -> Option<Value> {
    api.with_store(|store| {
        let rt = store.resource("apps", "v1", "deployments").ok()?;
        store.get(&rt, ns, name).ok()
    })
}

/// Samples as runs, "3 x12, 1 x250, 4 x1", to keep a failure message short.
fn runs(samples: &[Option<i64>]) -> String {
    let mut out: Vec<(Option<i64>, usize)> = Vec::new();
    for sample in samples {
        match out.last_mut() {
            Some((last, count)) if last == sample => *count += 1,
            _ => out.push((*sample, 1)),
        }
    }
    out.iter()
        .map(|(r, n)| format!("{} x{n}", r.map_or("none".into(), |r| r.to_string())))
        .collect::<Vec<_>>()
        .join(", ")
}

fn replicas_of(deployment: &Value) -> Option<i64> {
    deployment["spec"]["replicas"].as_i64()
}

/// Runs `body`; on a panic prints the operator's log and the double's requests first.
async fn reporting<F: Future<Output = ()>>(
    cluster: &Cluster,
    operator: &std::sync::Mutex<Option<OperatorProcess>>,
    body: F,
) {
    if let Err(panic) = AssertUnwindSafe(body).catch_unwind().await {
        let log = operator
            .lock()
            .unwrap()
            .as_ref()
            .map(OperatorProcess::log)
            .unwrap_or_default();
        eprintln!(
            "state at the failure (namespace {}):\n{}\n=== operator log\n{log}",
            cluster.namespace,
            cluster.dump().await
        );
        cluster.cleanup().await;
        std::panic::resume_unwind(panic);
    }
    cluster.cleanup().await;
}

/// A relay switched from `replicas: 3` to autoscaling {2..5} never runs
/// fewer than 3 replicas until the HPA takes over (the HPA here wants 4); a
/// relay created with autoscaling starts at minReplicas 2, not the default
/// 1; and switching back to `replicas: 3` takes the count back from the HPA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_hand_over_never_drops_replicas() {
    let dir = work_dir();
    let cluster = Cluster::start(dir.path()).await.expect("a Kubernetes API");
    let Some(api) = cluster.api.as_ref() else {
        eprintln!("skipped: needs the API double's HPA controller");
        return;
    };
    let operator = std::sync::Mutex::new(None);
    reporting(&cluster, &operator, async {
        let ns = cluster.namespace.clone();
        upstream(&cluster).await;
        cluster
            .apply(&relay("fixed", json!({"replicas": 3})))
            .await
            .expect("apply the fixed relay");
        *operator.lock().unwrap() = Some(OperatorProcess::start(
            &cluster.kubeconfig,
            &ns,
            Some(&ns),
            "operator-hpa",
            STATUS_REFRESH,
            dir.path(),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored_deployment(api, &ns, "fixed")
            .as_ref()
            .and_then(replicas_of)
            != Some(3)
        {
            assert!(Instant::now() < deadline, "no Deployment with 3 replicas");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let autoscaling = json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}});
        let mut hpa = HpaController::new(Duration::from_secs(3), 4);
        cluster
            .apply(&relay("fixed", autoscaling.clone()))
            .await
            .expect("switch to autoscaling");
        cluster
            .apply(&relay("auto", autoscaling))
            .await
            .expect("apply the autoscaled relay");
        let mut fixed_samples = Vec::new();
        let mut auto_samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            hpa.sync(api);
            let fixed = stored_deployment(api, &ns, "fixed").expect("the Deployment");
            fixed_samples.push(replicas_of(&fixed));
            let auto = stored_deployment(api, &ns, "auto");
            if let Some(auto) = &auto {
                auto_samples.push(replicas_of(auto));
            }
            let taken_over = |d: &Value| {
                replicas_of(d) == Some(4) && replica_owners(d) == [format!("{HPA_MANAGER} Update")]
            };
            if taken_over(&fixed) && auto.as_ref().is_some_and(taken_over) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the HPA did not take over: fixed {}, auto {}",
                runs(&fixed_samples),
                runs(&auto_samples)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            fixed_samples.iter().all(|r| r.is_some_and(|r| r >= 3)),
            "the switched relay ran fewer than 3 replicas: {}",
            runs(&fixed_samples)
        );
        assert_eq!(
            auto_samples.first(),
            Some(&Some(2)),
            "a new autoscaled relay starts at minReplicas: {}",
            runs(&auto_samples)
        );
        assert!(
            auto_samples.iter().all(|r| r.is_some_and(|r| r >= 2)),
            "the new relay ran fewer than minReplicas: {}",
            runs(&auto_samples)
        );

        // Back to fixed replicas: the operator's forced apply takes the
        // count back, the HPA goes, and the count stays.
        cluster
            .apply(&relay("fixed", json!({"replicas": 3})))
            .await
            .expect("switch back to fixed replicas");
        let hpa_gone = |api: &ApiServer| {
            api.with_store(|store| {
                let rt = store
                    .resource("autoscaling", "v2", "horizontalpodautoscalers")
                    .expect("HPAs are served");
                store.get(&rt, &ns, "fixed").is_err()
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            hpa.sync(api);
            let fixed = stored_deployment(api, &ns, "fixed").expect("the Deployment");
            if replicas_of(&fixed) == Some(3)
                && replica_owners(&fixed) == [format!("{FIELD_MANAGER} Apply")]
                && hpa_gone(api)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not back to 3 fixed replicas: {fixed}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let settle = Instant::now() + Duration::from_secs(3);
        while Instant::now() < settle {
            hpa.sync(api);
            let fixed = stored_deployment(api, &ns, "fixed").expect("the Deployment");
            assert_eq!(replicas_of(&fixed), Some(3), "{fixed}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The handover manager held the count only in between.
        let fixed = stored_deployment(api, &ns, "fixed").expect("the Deployment");
        assert!(
            !replica_owners(&fixed).contains(&format!("{HANDOVER_MANAGER} Apply")),
            "{fixed}"
        );
    })
    .await;
}

/// The chart's RBAC with `watchNamespace` (e2e/fixtures, kept equal to
/// `helm template` by scripts/check-chart.sh): a Role and RoleBinding, no
/// ClusterRole. The operator, authenticated as the chart's service account,
/// rolls a relay out with exactly those permissions, every request it makes
/// is namespaced and allowed, and it records a LeaderElection Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_install_works_with_its_role_only() {
    let dir = work_dir();
    let cluster = Cluster::start(dir.path()).await.expect("a Kubernetes API");
    let Some(api) = cluster.api.as_ref() else {
        eprintln!("skipped: needs the API double's service account tokens");
        return;
    };
    let operator = std::sync::Mutex::new(None);
    reporting(&cluster, &operator, async {
        let ns = cluster.namespace.clone();
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chart-rbac-watch-namespace.yaml");
        let text = std::fs::read_to_string(&fixture).expect("the RBAC fixture");
        let mut service_account = None;
        let mut lease_name = None;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut object: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if object.is_null() {
                continue;
            }
            let kind = object["kind"].as_str().unwrap_or_default().to_string();
            // The release namespace and the watched one both become the test's.
            object["metadata"]["namespace"] = json!(ns);
            match kind.as_str() {
                "Role" => {
                    for rule in object["rules"].as_array().into_iter().flatten() {
                        if rule["resources"] == json!(["leases"])
                            && rule.get("resourceNames").is_some()
                        {
                            lease_name = rule["resourceNames"][0].as_str().map(String::from);
                        }
                    }
                    let role: Role = serde_json::from_value(object).expect("a Role");
                    cluster.apply(&role).await.expect("apply the Role");
                }
                "RoleBinding" => {
                    for subject in object["subjects"].as_array_mut().into_iter().flatten() {
                        subject["namespace"] = json!(ns);
                        service_account = subject["name"].as_str().map(String::from);
                    }
                    let binding: RoleBinding =
                        serde_json::from_value(object).expect("a RoleBinding");
                    cluster
                        .apply(&binding)
                        .await
                        .expect("apply the RoleBinding");
                }
                other => panic!("a namespaced install renders a {other}"),
            }
        }
        let service_account = service_account.expect("a RoleBinding subject");
        let lease_name = lease_name.expect("the Lease rule");
        let kubeconfig = dir.path().join("operator-kubeconfig");
        api.write_service_account_kubeconfig(&kubeconfig, &ns, &service_account)
            .expect("write the kubeconfig");

        upstream(&cluster).await;
        cluster
            .apply(&relay("main", json!({"replicas": 2})))
            .await
            .expect("apply the relay");
        *operator.lock().unwrap() = Some(OperatorProcess::start_with_env(
            &kubeconfig,
            &ns,
            Some(&ns),
            "operator-namespaced",
            STATUS_REFRESH,
            dir.path(),
            &[("LEASE_NAME", &lease_name)],
        ));
        let relays = cluster.api::<ClaudeRelay>();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let relay = relays.get("main").await.expect("the relay");
            let rolled_out = stored_deployment(api, &ns, "main")
                .as_ref()
                .and_then(replicas_of)
                == Some(2)
                && relay.status.as_ref().and_then(|s| s.observed_generation)
                    == relay.metadata.generation;
            if rolled_out {
                break;
            }
            assert!(Instant::now() < deadline, "the relay was not rolled out");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A few status refreshes more, then look at what it asked for.
        tokio::time::sleep(STATUS_REFRESH * 3).await;
        let who = format!("[system:serviceaccount:{ns}:{service_account}]");
        let requests: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| r.contains(&who))
            .collect();
        assert!(!requests.is_empty(), "no request of the operator's account");
        let refused: Vec<&String> = requests.iter().filter(|r| r.contains("-> 403")).collect();
        assert!(refused.is_empty(), "refused: {refused:#?}");
        let cluster_wide: Vec<&String> = requests
            .iter()
            .filter(|r| !r.contains(&format!("/namespaces/{ns}/")))
            .collect();
        assert!(
            cluster_wide.is_empty(),
            "requests outside the namespace: {cluster_wide:#?}"
        );
        let leader_events = api.with_store(|store| {
            let rt = store
                .resource("events.k8s.io", "v1", "events")
                .expect("events are served");
            store
                .list(&rt, Some(ns.as_str()), |_| true)
                .into_iter()
                .filter(|e| e["reason"] == "LeaderElection" && e["regarding"]["kind"] == "Lease")
                .map(|e| e["note"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        });
        assert_eq!(
            leader_events,
            ["operator-namespaced became leader"],
            "LeaderElection Events on the Lease"
        );
    })
    .await;
}

fn lease(name: &str, holder: &str, renewed: Timestamp) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 2,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed),
            "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed),
            "leaseTransitions": 0,
        },
    }))
    .expect("a Lease")
}

fn candidate(cluster: &Cluster, lease: &str) -> Elector {
    Elector::new(
        cluster.client.clone(),
        LeaseConfig {
            name: lease.into(),
            namespace: cluster.namespace.clone(),
            identity: "candidate".into(),
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(200),
        },
    )
}

/// Tries for the Lease every 200 ms for at most `within`; how long it took.
async fn acquire_within(elector: &Elector, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if elector.try_acquire().await.expect("the Lease API") {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Lease expiry is measured on the candidate's clock from when it saw the
/// Lease change: a holder whose clock is an hour behind (renewTime always
/// far in the past) keeps its Lease while it renews, and loses it about one
/// lease duration after it stops; a dead holder whose clock was an hour
/// ahead (renewTime far in the future) loses it after one lease duration,
/// not an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_ignores_the_holders_clock() {
    let dir = work_dir();
    let cluster = Cluster::start(dir.path()).await.expect("a Kubernetes API");
    let nothing = std::sync::Mutex::new(None);
    reporting(&cluster, &nothing, async {
        let leases = cluster.api::<Lease>();
        let hour = SignedDuration::from_hours(1);

        // The holder's clock is behind: it renews with renewTime an hour ago.
        leases
            .create(
                &PostParams::default(),
                &lease("behind", "holder", Timestamp::now() - hour),
            )
            .await
            .expect("create the Lease");
        let renewing = Arc::new(AtomicBool::new(true));
        let holder = tokio::spawn({
            let leases = leases.clone();
            let renewing = renewing.clone();
            async move {
                while renewing.load(Ordering::SeqCst) {
                    let mut current = leases.get("behind").await.expect("the Lease");
                    let spec = current.spec.as_mut().expect("spec");
                    spec.renew_time =
                        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                            Timestamp::now() - hour,
                        ));
                    // A conflict with the candidate's write only means "try again".
                    let _ = leases
                        .replace("behind", &PostParams::default(), &current)
                        .await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        let elector = candidate(&cluster, "behind");
        let stolen = acquire_within(&elector, Duration::from_secs(5)).await;
        assert_eq!(stolen, None, "took a Lease that is renewed");
        renewing.store(false, Ordering::SeqCst);
        holder.await.expect("the holder stops");
        let taken = acquire_within(&elector, Duration::from_secs(6))
            .await
            .expect("a Lease no longer renewed is taken");
        assert!(
            taken >= Duration::from_secs(1),
            "taken {taken:?} after the last renewal, before it expired"
        );
        let held = leases.get("behind").await.expect("the Lease");
        assert_eq!(
            held.spec.and_then(|s| s.holder_identity).as_deref(),
            Some("candidate")
        );

        // The dead holder's clock was ahead: renewTime an hour from now.
        leases
            .create(
                &PostParams::default(),
                &lease("ahead", "holder", Timestamp::now() + hour),
            )
            .await
            .expect("create the Lease");
        let elector = candidate(&cluster, "ahead");
        let taken = acquire_within(&elector, Duration::from_secs(6))
            .await
            .expect("a Lease with renewTime in the future, never renewed, is taken");
        assert!(
            taken >= Duration::from_millis(1800),
            "taken after {taken:?}, before one lease duration"
        );
        let held = leases.get("ahead").await.expect("the Lease");
        assert_eq!(held.name_any(), "ahead");
        assert_eq!(
            held.spec.and_then(|s| s.holder_identity).as_deref(),
            Some("candidate")
        );
    })
    .await;
}
