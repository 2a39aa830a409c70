//! The whole system, end to end: a ClaudeRelay and two UpstreamRegions
//! applied to the Kubernetes API (the double, or a real cluster when
//! `KUBECONFIG` is set), the operator as a process, proxy replicas started
//! as its Deployment says, a real Redis and Claude API doubles as upstreams.
//! One relay's life in order: rollout, traffic, a region edited under load,
//! an operator restart that must change nothing, a breaker opening and
//! closing, a replayed signed request, and deletion.

mod common;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use claude_relay_crds::config::ProxyConfig;
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_e2e::cluster::{Cluster, printer_columns, work_dir};
use claude_relay_e2e::operator::{OperatorProcess, binary};
use claude_relay_e2e::pods::{self, Pod};
use claude_relay_testkit::http::{self as th, next_chunk, request, send, send_streaming};
use claude_relay_testkit::redis::RedisServer;
use claude_relay_testkit::upstream::MockUpstream;
use common::{eventually, secret};
use futures_util::FutureExt;
use http::{Method, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, CustomResourceExt, ResourceExt};
use serde_json::{Value, json};

const RELAY_KEY: &str = "relay-key-of-the-e2e-app";
const SIGNING_SECRET: &str = "signing-secret-of-the-e2e-app-0123456789";
const US_KEY: &str = "sk-ant-e2e-us";
const EU_KEY: &str = "sk-ant-e2e-eu";
const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;
/// How often the operator refreshes status in these tests (10 s by default).
const STATUS_REFRESH: Duration = Duration::from_secs(1);
const REPLICAS: usize = 2;

struct World {
    dir: tempfile::TempDir,
    cluster: Cluster,
    redis: RedisServer,
    us: MockUpstream,
    eu: MockUpstream,
    /// Where region `us` moves when it is edited.
    us_moved: MockUpstream,
    operator: Option<OperatorProcess>,
    operators_started: usize,
    pods: Vec<Pod>,
}

impl World {
    async fn start() -> Self {
        let dir = work_dir();
        let cluster = Cluster::start(dir.path()).await.expect("a Kubernetes API");
        Self {
            cluster,
            redis: RedisServer::start().expect("redis-server"),
            us: MockUpstream::start().await,
            eu: MockUpstream::start().await,
            us_moved: MockUpstream::start().await,
            operator: None,
            operators_started: 0,
            pods: Vec::new(),
            dir,
        }
    }

    fn start_operator(&mut self) {
        self.operators_started += 1;
        // In a real cluster other relays may exist: watch only ours. The
        // double serves the operator's cluster-wide watches (the chart's default).
        let watch = (!self.cluster.is_local()).then_some(self.cluster.namespace.as_str());
        self.operator = Some(OperatorProcess::start(
            &self.cluster.kubeconfig,
            &self.cluster.namespace,
            watch,
            &format!("operator-{}", self.operators_started),
            STATUS_REFRESH,
            self.dir.path(),
        ));
    }

    async fn dump(&self) -> String {
        let mut out = self.cluster.dump().await;
        if let Some(operator) = &self.operator {
            out.push_str(&format!(
                "=== operator log\n{}\n",
                tail(&operator.log(), 80)
            ));
        }
        for pod in &self.pods {
            out.push_str(&format!(
                "=== pod {} log\n{}\n",
                pod.name,
                tail(&pod.proxy.log(), 40)
            ));
        }
        out
    }

    fn relays(&self) -> Api<ClaudeRelay> {
        self.cluster.api()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn region(name: &str, base_url: &str, priority: i32, key: &str) -> UpstreamRegion {
    serde_json::from_value(json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "UpstreamRegion",
        "metadata": {"name": name, "labels": {"relay": "main"}},
        "spec": {
            "baseUrl": base_url,
            "priority": priority,
            "apiKeySecretRefs": [{"name": "upstream-keys", "key": key}],
            "timeouts": {"connect": "1s", "responseHeaders": "10s"},
        },
    }))
    .expect("an UpstreamRegion")
}

fn relay(redis_url: &str) -> Value {
    let mut spec = json!({
        "autoscaling": {"minReplicas": REPLICAS, "maxReplicas": 4},
        "regionSelector": {"matchLabels": {"relay": "main"}},
        "clients": [{
            "id": "app",
            "relayKeySecretRef": {"name": "app-credentials", "key": "relay-key"},
            "signingSecretRefs": [{"name": "app-credentials", "key": "signing-secret"}],
        }],
        "breaker": {"window": "5s", "minRequests": 4, "failureRatePercent": 50, "openFor": "4s", "halfOpenProbes": 1},
        "redis": {"url": redis_url},
        "log": {"format": "text"},
    });
    // A real cluster runs the Deployment's pods too: they need an image it can pull.
    if let Ok(image) = std::env::var("E2E_PROXY_IMAGE") {
        spec["image"] = json!(image);
    }
    json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "ClaudeRelay",
        "metadata": {"name": "main"},
        "spec": spec,
    })
}

async fn message(pod: &Pod, extra: &[(&str, &str)]) -> th::Answer {
    let mut headers = vec![
        ("x-api-key", RELAY_KEY),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(
        &th::client(),
        request(
            Method::POST,
            &pod.proxy.url("/v1/messages"),
            &headers,
            MESSAGE,
        ),
    )
    .await
}

/// The `kubectl get clauderelays` line of the relay, as (column, value).
async fn relay_columns(world: &World) -> BTreeMap<String, String> {
    let relay = world.relays().get("main").await.expect("the relay");
    let crd = ClaudeRelay::crd();
    printer_columns(&crd, &serde_json::to_value(&relay).expect("json"), true)
        .into_iter()
        .collect()
}

async fn region_breaker(world: &World, name: &str) -> Option<String> {
    let region = world.cluster.api::<UpstreamRegion>().get(name).await.ok()?;
    let crd: CustomResourceDefinition = UpstreamRegion::crd();
    printer_columns(&crd, &serde_json::to_value(&region).ok()?, false)
        .into_iter()
        .find(|(k, _)| k == "BREAKER")
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_lifecycle() {
    let mut world = World::start().await;
    let outcome = AssertUnwindSafe(lifecycle(&mut world)).catch_unwind().await;
    if let Err(panic) = outcome {
        eprintln!(
            "e2e state at the failure (namespace {}):\n{}",
            world.cluster.namespace,
            world.dump().await
        );
        world.cluster.cleanup().await;
        std::panic::resume_unwind(panic);
    }
    world.cluster.cleanup().await;
}

async fn lifecycle(world: &mut World) {
    rollout(world).await;
    traffic(world).await;
    region_edit_under_load(world).await;
    operator_restart_changes_nothing(world).await;
    breaker_opens_and_closes(world).await;
    replay_across_replicas(world).await;
    deletion_removes_what_the_relay_owned(world).await;
    if let Some(api) = &world.cluster.api {
        // Whatever the operator and the proxies wrote was valid and allowed
        // (a status the CRD schema refuses would be a 422); only lookups of
        // absent objects failed.
        let failed: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| {
                let code = r.rsplit(" -> ").next().unwrap_or("");
                !code.starts_with('2') && !code.starts_with("404")
            })
            .collect();
        assert!(failed.is_empty(), "requests the API refused: {failed:#?}");
    }
    let log = world
        .operator
        .as_ref()
        .map(OperatorProcess::log)
        .unwrap_or_default();
    assert!(!log.contains("reconcile failed"), "{log}");
}

/// Apply a relay and two regions: the operator renders every object, the
/// pods start as the Deployment says, and the relay becomes Ready.
async fn rollout(world: &mut World) {
    let secrets = world.cluster.api::<Secret>();
    for s in [
        secret(
            "app-credentials",
            &[("relay-key", RELAY_KEY), ("signing-secret", SIGNING_SECRET)],
        ),
        secret("upstream-keys", &[("us", US_KEY), ("eu", EU_KEY)]),
    ] {
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create a Secret");
    }
    world
        .cluster
        .apply(&region("us", &world.us.base_url(), 0, "us"))
        .await
        .expect("apply region us");
    world
        .cluster
        .apply(&region("eu", &world.eu.base_url(), 1, "eu"))
        .await
        .expect("apply region eu");
    let relay: ClaudeRelay =
        serde_json::from_value(relay(&world.redis.url())).expect("a ClaudeRelay");
    let relay = world.cluster.apply(&relay).await.expect("apply the relay");
    let uid = relay.uid().expect("a uid");
    world.start_operator();

    let ns = world.cluster.namespace.clone();
    let config_map = eventually("the ConfigMap", Duration::from_secs(20), async || {
        world
            .cluster
            .api::<ConfigMap>()
            .get_opt("main-config")
            .await
            .ok()
            .flatten()
    })
    .await;
    let deployment = eventually("the Deployment", Duration::from_secs(20), async || {
        world
            .cluster
            .api::<Deployment>()
            .get_opt("main")
            .await
            .ok()
            .flatten()
    })
    .await;
    // NB: the operator applies the HPA last, after the Deployment: wait for it
    // before reading the objects applied in between.
    let hpa = eventually("the HPA", Duration::from_secs(20), async || {
        world
            .cluster
            .api::<HorizontalPodAutoscaler>()
            .get_opt("main")
            .await
            .ok()
            .flatten()
    })
    .await;
    let service = world
        .cluster
        .api::<Service>()
        .get("main")
        .await
        .expect("the Service");
    let pdb = world
        .cluster
        .api::<PodDisruptionBudget>()
        .get("main")
        .await
        .expect("the PDB");
    world
        .cluster
        .api::<ServiceAccount>()
        .get("main-proxy")
        .await
        .expect("the ServiceAccount");
    world
        .cluster
        .api::<Role>()
        .get("main-proxy")
        .await
        .expect("the Role");
    world
        .cluster
        .api::<RoleBinding>()
        .get("main-proxy")
        .await
        .expect("the RoleBinding");

    // Every object is owned by the relay, so it goes with it.
    for owners in [
        config_map.owner_references(),
        deployment.owner_references(),
        service.owner_references(),
        hpa.owner_references(),
        pdb.owner_references(),
    ] {
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, uid);
        assert_eq!(owners[0].controller, Some(true));
    }

    // The config: both regions by priority, keys as mounted files, Redis, the breaker.
    let text = &config_map.data.as_ref().expect("data")["config.yaml"];
    let config: ProxyConfig =
        serde_json::from_value(serde_yaml_ng::from_str::<Value>(text).expect("YAML"))
            .expect("a proxy config");
    config.validate().expect("a valid config");
    assert_eq!(config.relay_name, format!("{ns}/main"));
    let regions: Vec<(&str, String)> = config
        .regions
        .iter()
        .map(|r| (r.name.as_str(), r.base_url.to_string()))
        .collect();
    assert_eq!(
        regions,
        [("us", world.us.base_url()), ("eu", world.eu.base_url())]
    );
    assert!(
        text.contains("/etc/claude-relay/secrets/upstream-keys/us"),
        "{text}"
    );
    assert!(
        !text.contains(US_KEY) && !text.contains(RELAY_KEY),
        "no secret in the ConfigMap"
    );
    assert!(text.contains(&world.redis.url()), "{text}");
    assert_eq!(config.breaker.min_requests, 4);
    assert_eq!(
        config.breaker.open_for,
        claude_relay_crds::HumanDuration::from_secs(4)
    );

    // The Deployment: the proxy follows its ConfigMap; replicas are the
    // HPA's: created at minReplicas, then not the operator's own field.
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(
        spec.replicas,
        Some(REPLICAS as i32),
        "starts at minReplicas"
    );
    assert!(
        !claude_relay_operator::handover::owns_replicas(
            &deployment,
            claude_relay_operator::controller::FIELD_MANAGER
        ),
        "the operator leaves the replica count to the HPA"
    );
    let pod_spec = spec.template.spec.as_ref().expect("pod spec");
    let container = &pod_spec.containers[0];
    assert_eq!(
        container.args.as_deref().unwrap_or_default(),
        [
            "--config-map",
            "$(POD_NAMESPACE)/main-config",
            "--config-map-key",
            "config.yaml"
        ]
    );
    let mounted: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for path in [
        "/etc/claude-relay/secrets/upstream-keys",
        "/etc/claude-relay/secrets/app-credentials",
    ] {
        assert!(mounted.contains(&path), "{path} not in {mounted:?}");
    }
    assert_eq!(pod_spec.service_account_name.as_deref(), Some("main-proxy"));

    let service_spec = service.spec.expect("spec");
    assert_eq!(service_spec.selector, spec.selector.match_labels);
    assert_eq!(service_spec.ports.expect("ports")[0].port, 80);
    let hpa_spec = hpa.spec.expect("spec");
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(2), 4));
    assert_eq!(hpa_spec.scale_target_ref.name, "main");
    assert_eq!(
        pdb.spec.expect("spec").max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // No pod yet: not Ready.
    let columns = eventually("the first status", Duration::from_secs(20), async || {
        let c = relay_columns(world).await;
        (c["REGIONS"] == "2").then_some(c)
    })
    .await;
    assert_eq!(columns["READY"], "False", "{columns:?}");

    world.pods = pods::start(&world.cluster, &deployment, REPLICAS, world.dir.path())
        .await
        .expect("start the pods");
    if world.cluster.is_local() {
        pods::report(&world.cluster, "main", REPLICAS as i32)
            .await
            .expect("report the pods");
    }
    let columns = eventually(
        "the relay to be Ready",
        Duration::from_secs(if world.cluster.is_local() { 20 } else { 180 }),
        async || {
            let c = relay_columns(world).await;
            (c["READY"] == "True").then_some(c)
        },
    )
    .await;
    if world.cluster.is_local() {
        assert_eq!(columns["REPLICAS"], format!("{REPLICAS}/{REPLICAS}"));
    } else {
        // The cluster's HPA and Deployment controllers decide the count.
        let (ready, desired) = columns["REPLICAS"].split_once('/').expect("ready/desired");
        assert_eq!(ready, desired, "{columns:?}");
    }
    assert_eq!(columns["REASON"], "ProxiesReady");
    if let Some(api) = &world.cluster.api {
        // The pods read their config as their service account, which the
        // operator's Role allows to watch that one ConfigMap by name.
        let sa = format!("[system:serviceaccount:{ns}:main-proxy]");
        let watches: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| r.contains(&sa))
            .collect();
        assert!(
            !watches.is_empty(),
            "the pods made no request as their service account"
        );
        assert!(
            watches.iter().all(|r| r.contains("/configmaps?")
                && r.contains("fieldSelector=metadata.name=main-config")
                && r.ends_with("-> 200")),
            "{watches:#?}"
        );
        assert!(
            watches.iter().any(|r| r.contains("watch=true")),
            "{watches:#?}"
        );
    }
}

/// Each replica relays to the preferred region with the region's key,
/// JSON and streams, events as they come.
async fn traffic(world: &mut World) {
    for pod in &world.pods {
        let answer = message(pod, &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["type"], "message");
    }
    assert_eq!(world.us.requests_with_key(US_KEY), REPLICAS);
    assert_eq!(world.eu.request_count(), 0);
    assert!(
        world.us.requests().iter().all(
            |r| !r.headers.contains_key("authorization") && r.headers["x-api-key"] != RELAY_KEY
        )
    );

    for pod in &world.pods {
        let response = send_streaming(
            &th::client(),
            request(
                Method::POST,
                &pod.proxy.url("/v1/messages"),
                &[
                    ("x-api-key", RELAY_KEY),
                    ("content-type", "application/json"),
                    ("x-mock", "stream"),
                    ("x-mock-delay-ms", "150"),
                ],
                MESSAGE,
            ),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let started = Instant::now();
        let first = next_chunk(&mut body, Duration::from_secs(5))
            .await
            .expect("a first event");
        let first_at = started.elapsed();
        let mut text = String::from_utf8_lossy(&first).into_owned();
        assert!(text.contains("message_start"), "{text}");
        assert!(
            !text.contains("message_stop"),
            "the first event came alone: {text}"
        );
        while let Some(chunk) = next_chunk(&mut body, Duration::from_secs(5)).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains("message_stop"), "{text}");
        assert!(
            started.elapsed() > first_at + Duration::from_millis(300),
            "the stream came event by event"
        );
    }
}

/// Requests keep flowing while region `us` moves to another URL: the
/// proxies use the new one within seconds and no request fails.
async fn region_edit_under_load(world: &mut World) {
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = world
        .pods
        .iter()
        .map(|p| p.proxy.url("/v1/messages"))
        .collect();
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let client = th::client();
            let mut statuses = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let answer = send(
                    &client,
                    request(
                        Method::POST,
                        &urls[i % urls.len()],
                        &[
                            ("x-api-key", RELAY_KEY),
                            ("content-type", "application/json"),
                        ],
                        MESSAGE,
                    ),
                )
                .await;
                statuses.push(answer.status);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edited = Instant::now();
    world
        .cluster
        .apply(&region("us", &world.us_moved.base_url(), 0, "us"))
        .await
        .expect("edit region us");
    let took = eventually(
        "every replica to use the edited region",
        Duration::from_secs(10),
        async || {
            let seen = world.us_moved.requests().len();
            // Each replica sends there: the load alternates between them.
            (seen >= 2 * world.pods.len()).then(|| edited.elapsed())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let statuses = load.await.expect("the load task");
    let failed: Vec<&StatusCode> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    assert!(statuses.len() > 20, "the load ran: {}", statuses.len());
    eprintln!(
        "region edit in force on every replica after {took:?} ({} requests, none failed)",
        statuses.len()
    );
    let moved_keys = world.us_moved.requests_with_key(US_KEY);
    assert_eq!(
        moved_keys,
        world.us_moved.request_count(),
        "the region keeps its key"
    );
}

async fn metadata_of<K>(cluster: &Cluster, name: &str) -> Option<kube::api::ObjectMeta>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    cluster
        .api::<K>()
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .map(|o| o.meta().clone())
}

/// What would show a write to the relay, its regions or what it owns: the
/// resourceVersion; in a real cluster, the generation of the objects whose
/// status its controllers keep writing (Deployment, HPA, PDB).
async fn versions(world: &World) -> BTreeMap<String, String> {
    let c = &world.cluster;
    let by_generation = !c.is_local();
    let mut out = BTreeMap::new();
    let objects = [
        (
            "ClaudeRelay",
            metadata_of::<ClaudeRelay>(c, "main").await,
            false,
        ),
        (
            "UpstreamRegion/us",
            metadata_of::<UpstreamRegion>(c, "us").await,
            false,
        ),
        (
            "UpstreamRegion/eu",
            metadata_of::<UpstreamRegion>(c, "eu").await,
            false,
        ),
        (
            "ConfigMap",
            metadata_of::<ConfigMap>(c, "main-config").await,
            false,
        ),
        ("Service", metadata_of::<Service>(c, "main").await, false),
        (
            "ServiceAccount",
            metadata_of::<ServiceAccount>(c, "main-proxy").await,
            false,
        ),
        ("Role", metadata_of::<Role>(c, "main-proxy").await, false),
        (
            "RoleBinding",
            metadata_of::<RoleBinding>(c, "main-proxy").await,
            false,
        ),
        (
            "Deployment",
            metadata_of::<Deployment>(c, "main").await,
            by_generation,
        ),
        (
            "HPA",
            metadata_of::<HorizontalPodAutoscaler>(c, "main").await,
            by_generation,
        ),
        (
            "PDB",
            metadata_of::<PodDisruptionBudget>(c, "main").await,
            by_generation,
        ),
    ];
    for (kind, meta, generation) in objects {
        let version = match meta {
            None => "absent".to_string(),
            Some(m) if generation => format!("generation {}", m.generation.unwrap_or_default()),
            Some(m) => m.resource_version.unwrap_or_default(),
        };
        out.insert(kind.to_string(), version);
    }
    out
}

/// A new operator replica re-applies everything it renders and rewrites
/// nothing: no object changes its resourceVersion.
async fn operator_restart_changes_nothing(world: &mut World) {
    // Let the status settle (breakers reported, the window of the last load drained).
    let mut before = versions(world).await;
    let settle = Instant::now();
    loop {
        tokio::time::sleep(STATUS_REFRESH * 3).await;
        let now = versions(world).await;
        if now == before {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(30),
            "the objects never settled: {before:?} -> {now:?}"
        );
        before = now;
    }
    assert!(!before.values().any(|v| v == "absent"), "{before:?}");

    let mut old = world.operator.take().expect("an operator");
    assert_eq!(
        old.stop(Duration::from_secs(20)),
        Some(0),
        "the operator stops cleanly:\n{}",
        old.log()
    );
    let requests_before = world.cluster.api.as_ref().map(|a| a.requests().len());
    world.start_operator();
    let operator = world.operator.as_ref().expect("the new operator");
    // Several reconciles of the relay: the one at start and status refreshes.
    eventually(
        "the new operator to reconcile",
        Duration::from_secs(20),
        async || {
            (operator
                .metric("claude_relay_operator_reconciles_total")
                .await?
                >= 3.0)
                .then_some(())
        },
    )
    .await;
    let after = versions(world).await;
    assert_eq!(before, after, "a restarted operator changed objects");
    if let (Some(api), Some(from)) = (&world.cluster.api, requests_before) {
        // It did apply them again: what stayed the same was compared, not skipped.
        let applies: Vec<String> = api.requests()[from..]
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("fieldManager=claude-relay-operator"))
            .cloned()
            .collect();
        for object in [
            "configmaps/main-config?",
            "deployments/main?",
            "services/main?",
            "horizontalpodautoscalers/main?",
        ] {
            assert!(
                applies.iter().any(|r| r.contains(object)),
                "no apply of {object} in {applies:#?}"
            );
        }
    }
}

/// The preferred region fails: requests fail over, its breaker opens
/// (shown by `kubectl get relays` and `kubectl get upstreamregions`), and
/// closes once it answers again.
async fn breaker_opens_and_closes(world: &mut World) {
    world.us_moved.force(Some("status-500"));
    let mut sent = 0;
    let columns = eventually(
        "the breaker of us to open in the relay's status",
        Duration::from_secs(20),
        async || {
            for pod in &world.pods {
                let answer = message(pod, &[]).await;
                assert_eq!(
                    answer.status,
                    StatusCode::OK,
                    "failover hides the failing region"
                );
                sent += 1;
            }
            let c = relay_columns(world).await;
            (c["BREAKERS"] == "us:open eu:closed").then_some(c)
        },
    )
    .await;
    assert!(
        world.eu.requests_with_key(EU_KEY) >= sent,
        "every request was answered by eu"
    );
    assert_eq!(columns["READY"], "True", "{columns:?}");
    let relay = world.relays().get("main").await.expect("the relay");
    let status = relay.status.expect("status");
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "BreakerOpen")
    );
    let us = status
        .breakers
        .iter()
        .find(|b| b.region == "us")
        .expect("us breaker");
    assert_eq!(us.last_error.as_deref(), Some("status_5xx"));
    eventually(
        "`kubectl get upstreamregions` to show it",
        Duration::from_secs(10),
        async || (region_breaker(world, "us").await.as_deref() == Some("open")).then_some(()),
    )
    .await;

    // While open, on every replica (shared through Redis), the failing
    // region is not even tried.
    for pod in &world.pods {
        let state = pod
            .proxy
            .metric("claude_relay_breaker_state{upstream=\"us\"}")
            .await;
        assert_eq!(state, Some(2.0), "{} sees the breaker open", pod.name);
        let tried = world.us_moved.request_count();
        assert_eq!(message(pod, &[]).await.status, StatusCode::OK);
        assert_eq!(
            world.us_moved.request_count(),
            tried,
            "an open breaker skips the region"
        );
    }

    world.us_moved.force(None);
    eventually(
        "the breaker to close after recovery",
        Duration::from_secs(20),
        async || {
            for pod in &world.pods {
                assert_eq!(message(pod, &[]).await.status, StatusCode::OK);
            }
            let c = relay_columns(world).await;
            (c["BREAKERS"] == "us:closed eu:closed").then_some(())
        },
    )
    .await;
    let relay = world.relays().get("main").await.expect("the relay");
    let degraded = relay
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded.status, "False", "{degraded:?}");
}

/// A signed request is accepted once: the same request replayed to another
/// replica is refused, since the nonce is shared through Redis.
async fn replay_across_replicas(world: &mut World) {
    let dir = world.dir.path();
    let secret_file = dir.join("signing-secret");
    let body_file = dir.join("body.json");
    std::fs::write(&secret_file, SIGNING_SECRET).expect("write the secret");
    std::fs::write(&body_file, MESSAGE).expect("write the body");
    let signed = std::process::Command::new(binary("claude-relay-proxy"))
        .args([
            "sign",
            "--key-id",
            "app",
            "--method",
            "POST",
            "--path",
            "/v1/messages",
        ])
        .arg("--secret-file")
        .arg(&secret_file)
        .arg("--body-file")
        .arg(&body_file)
        .output()
        .expect("run claude-relay-proxy sign");
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let headers: Vec<(String, String)> = String::from_utf8(signed.stdout)
        .expect("text")
        .lines()
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(headers.len(), 4, "{headers:?}");
    let send_to = |pod: &Pod| {
        let mut all: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.push(("content-type", "application/json"));
        let req = request(Method::POST, &pod.proxy.url("/v1/messages"), &all, MESSAGE);
        async move { send(&th::client(), req).await }
    };
    let first = send_to(&world.pods[0]).await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let upstream_before = world.us_moved.request_count();
    let replayed = send_to(&world.pods[1]).await;
    assert_eq!(
        replayed.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(&replayed.body)
    );
    let error = replayed.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "authentication_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("replay"),
        "{error}"
    );
    assert_eq!(
        world.us_moved.request_count(),
        upstream_before,
        "nothing went upstream"
    );
}

/// Deleting the relay deletes everything it owned; the regions stay.
async fn deletion_removes_what_the_relay_owned(world: &mut World) {
    world
        .relays()
        .delete("main", &DeleteParams::default())
        .await
        .expect("delete the relay");
    let within = Duration::from_secs(if world.cluster.is_local() { 10 } else { 120 });
    eventually("the owned objects to go", within, async || {
        let left: Vec<(String, String)> = versions(world)
            .await
            .into_iter()
            .filter(|(kind, rv)| rv != "absent" && !kind.starts_with("UpstreamRegion"))
            .collect();
        left.is_empty().then_some(())
    })
    .await;
    let regions = world
        .cluster
        .api::<UpstreamRegion>()
        .list(&Default::default())
        .await
        .expect("list regions");
    assert_eq!(regions.items.len(), 2, "regions are not owned by the relay");
    // What a kubelet would do once the pods are gone.
    world.pods.clear();
}

/// The API refuses invalid relays with 422, as a cluster with the CRDs does
/// (schema and CEL rules), and nothing is rolled out for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_relays_are_rejected() {
    let dir = work_dir();
    let cluster = Cluster::start(dir.path()).await.expect("a Kubernetes API");
    let outcome = AssertUnwindSafe(async {
        let relays = cluster.api::<ClaudeRelay>();
        let cases = [
            (
                json!({"replicas": 3, "autoscaling": {"minReplicas": 2, "maxReplicas": 4}}),
                "set replicas or autoscaling, not both",
            ),
            (json!({"replicas": 5000}), "less than or equal to 1000"),
            (json!({"clients": []}), "spec.clients"),
            (
                json!({"redis": {"url": "redis://user:password@redis:6379"}}),
                "spec.redis.url",
            ),
            (
                json!({"breaker": {"failureRatePercent": 0}}),
                "spec.breaker.failureRatePercent",
            ),
            (
                json!({
                    "usage": {"enabled": false},
                    "clients": [{
                        "id": "app",
                        "relayKeySecretRef": {"name": "app-credentials", "key": "relay-key"},
                        "quota": {"tokensPerDay": 100000},
                    }],
                }),
                "token and dollar budgets (clients[].quota.tokensPerMinute, tokensPerDay, usdPerDay, usdPerMonth) need usage.enabled",
            ),
        ];
        for (change, expected) in cases {
            let mut object = relay("redis://127.0.0.1:6379");
            object["metadata"]["name"] = json!("bad");
            for (k, v) in change.as_object().expect("an object") {
                object["spec"][k] = v.clone();
            }
            if object["spec"].get("replicas").is_some() && change.get("autoscaling").is_none() {
                object["spec"]
                    .as_object_mut()
                    .expect("spec")
                    .remove("autoscaling");
            }
            let relay: ClaudeRelay = serde_json::from_value(object).expect("a ClaudeRelay");
            match cluster.apply(&relay).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{status:?}");
                    assert!(
                        status.message.contains(expected),
                        "{expected:?} not in {:?}",
                        status.message
                    );
                }
                other => panic!("{change} was not rejected: {other:?}"),
            }
        }
        assert!(relays.get_opt("bad").await.expect("get").is_none());
        // The same relay, valid, is taken.
        let good: ClaudeRelay =
            serde_json::from_value(relay("redis://127.0.0.1:6379")).expect("a ClaudeRelay");
        let stored = cluster
            .apply(&good)
            .await
            .expect("a valid relay is accepted");
        assert_eq!(stored.spec.breaker.expect("breaker").half_open_probes, 1);
        // Defaults from the schema are filled in by the API server.
        assert_eq!(
            stored
                .spec
                .autoscaling
                .expect("autoscaling")
                .target_cpu_utilization_percentage,
            70
        );
        assert_eq!(stored.metadata.generation, Some(1));
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        eprintln!("e2e state at the failure:\n{}", cluster.dump().await);
        cluster.cleanup().await;
        std::panic::resume_unwind(panic);
    }
    cluster.cleanup().await;
}
