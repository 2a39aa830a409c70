//! A scripted Kubernetes API for reconcile tests (tower-test mock pair):
//! each expected request is checked (method, path, query, body) and answered
//! in order. A request the script does not expect never gets an answer, so
//! the reconcile hangs and the test fails by timeout.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_operator::cache::{self, Writers};
use claude_relay_operator::controller::Context;
use claude_relay_operator::metrics::Metrics;
use claude_relay_operator::render::{Defaults, render};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::{Client, Resource};
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub const APPLY_QUERY: &str = "fieldManager=claude-relay-operator";
pub const RELAYS: &str = "/apis/relay.claude-relay.dev/v1alpha1/namespaces/team-a/clauderelays";
pub const REGIONS: &str = "/apis/relay.claude-relay.dev/v1alpha1/namespaces/team-a/upstreamregions";

pub fn fixed_now() -> Timestamp {
    Timestamp::from_second(1_764_136_800).unwrap()
}

pub fn mock_client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

pub fn context() -> (Arc<Context>, Handle) {
    let (ctx, handle, _) = context_with(&Cluster::default());
    (ctx, handle)
}

/// What the operator's caches hold when a test's reconcile starts.
#[derive(Clone)]
pub struct Cluster {
    pub regions: Vec<UpstreamRegion>,
    pub secrets: Vec<Secret>,
    /// Owned objects already there, as rendered for this relay (with resourceVersion 1).
    pub rendered_for: Option<ClaudeRelay>,
}

impl Default for Cluster {
    /// The two test regions and every Secret the test relay references.
    fn default() -> Self {
        Self {
            regions: vec![
                UpstreamRegion::test("us", "https://api.anthropic.com"),
                UpstreamRegion::test("eu", "https://eu.gateway.example").with_priority(10),
            ],
            secrets: vec![
                secret_object("app-key", &["key"]),
                secret_object("eu-keys", &["api-key"]),
                secret_object("us-keys", &["api-key"]),
            ],
            rendered_for: None,
        }
    }
}

pub fn defaults() -> Defaults {
    Defaults {
        image: "ghcr.io/claude-relay/claude-relay-proxy:0.1.0".into(),
        pricing: Default::default(),
    }
}

/// A context whose caches hold `cluster`, the mock API, and the cache
/// writers (to change what the caches hold between reconciles).
pub fn context_with(cluster: &Cluster) -> (Arc<Context>, Handle, Writers) {
    let (client, handle) = mock_client();
    let reporter = Reporter {
        controller: "claude-relay-operator".into(),
        instance: Some("test".into()),
    };
    let (caches, mut writers) = cache::caches();
    fill_caches(&mut writers, cluster);
    let ctx = Context::new(client, defaults(), Arc::new(Metrics::default()), reporter)
        .with_clock(fixed_now)
        .with_caches(caches);
    (Arc::new(ctx), handle, writers)
}

pub fn fill_caches(w: &mut Writers, cluster: &Cluster) {
    cache::fill(&mut w.regions, cluster.regions.clone());
    cache::fill(&mut w.secrets, cluster.secrets.clone());
    cache::fill(&mut w.relays, Vec::<ClaudeRelay>::new());
    let rendered = cluster
        .rendered_for
        .as_ref()
        .map(|relay| render(relay, &cluster.regions, &defaults()).expect("renders"));
    fn existing<K: Resource<DynamicType = ()> + Clone + 'static>(object: &K) -> Vec<K> {
        let mut object = object.clone();
        object.meta_mut().resource_version = Some("1".into());
        vec![object]
    }
    let r = rendered.as_ref();
    cache::fill(
        &mut w.service_accounts,
        r.map(|r| existing(&r.service_account)).unwrap_or_default(),
    );
    cache::fill(
        &mut w.roles,
        r.map(|r| existing(&r.role)).unwrap_or_default(),
    );
    cache::fill(
        &mut w.role_bindings,
        r.map(|r| existing(&r.role_binding)).unwrap_or_default(),
    );
    cache::fill(
        &mut w.config_maps,
        r.map(|r| existing(&r.config_map)).unwrap_or_default(),
    );
    // Its pods as the first pass's apply answered: 2 of 2 ready.
    let deployment = r.map(|r| {
        let mut d = existing(&r.deployment);
        d[0].status = serde_json::from_value(json!({"replicas": 2, "readyReplicas": 2})).ok();
        d
    });
    cache::fill(&mut w.deployments, deployment.unwrap_or_default());
    cache::fill(
        &mut w.services,
        r.map(|r| existing(&r.service)).unwrap_or_default(),
    );
    cache::fill(&mut w.pdbs, r.map(|r| existing(&r.pdb)).unwrap_or_default());
    cache::fill(
        &mut w.hpas,
        r.and_then(|r| r.hpa.as_ref())
            .map(existing)
            .unwrap_or_default(),
    );
}

/// No request comes within a short while.
pub async fn expect_no_request(handle: &mut Handle) {
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
    {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

/// One request as the mock saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Value,
}

/// Takes the next request, checks method and path, answers with `status` and `reply(&seen)`.
pub async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: u16,
    reply: impl FnOnce(&Seen) -> Value,
) -> Seen {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
        .expect("the client hung up");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    let seen = Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string()),
        body: if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        },
    };
    assert_eq!(
        (&seen.method, seen.path.as_str()),
        (&method, path),
        "unexpected request {seen:?}"
    );
    let answer = reply(&seen);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    seen
}

/// Expects a server-side apply of `kind_path/name` by the operator; answers
/// with the applied object (plus `extra` merged at top level).
pub async fn expect_apply(handle: &mut Handle, path: &str, extra: Value) -> Seen {
    let seen = expect(handle, Method::PATCH, path, 200, |seen| {
        let mut obj = seen.body.clone();
        if let (Some(obj), Some(extra)) = (obj.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
            // A status apply carries no metadata; the server answers with the whole object.
            let metadata = obj
                .entry("metadata")
                .or_insert_with(|| json!({"name": "main", "namespace": "team-a"}));
            metadata["resourceVersion"] = json!("1");
            obj.entry("spec")
                .or_insert_with(|| serde_json::to_value(&ClaudeRelay::test().spec).unwrap());
        }
        obj
    })
    .await;
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "{path}"
    );
    assert!(seen.query.contains(APPLY_QUERY), "{path}: {}", seen.query);
    assert!(seen.query.contains("force=true"), "{path}: {}", seen.query);
    seen
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

pub fn region_list(regions: &[UpstreamRegion]) -> Value {
    json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "UpstreamRegionList",
        "metadata": {"resourceVersion": "1"},
        "items": regions,
    })
}

/// A Secret with the given keys (values are placeholders).
pub fn secret(name: &str, keys: &[&str]) -> Value {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| (k.to_string(), json!("c2VjcmV0")))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "team-a"}, "data": data})
}

/// A Secret with the given keys as the cache keeps it (no values).
pub fn secret_object(name: &str, keys: &[&str]) -> Secret {
    let mut secret: Secret = serde_json::from_value(secret(name, keys)).unwrap();
    cache::strip_secret(&mut secret);
    secret
}

pub fn ns_path(kind_path: &str, name: &str) -> String {
    format!("{kind_path}/{name}")
}

/// The requests of applying every owned object of relay `main` (no HPA);
/// returns what was applied, in order. The Deployment answers with `ready` ready pods.
pub async fn expect_applies(handle: &mut Handle, ready: i32) -> Vec<Seen> {
    expect_applies_creating(handle, ready, false).await
}

/// Expects an Event about the relay (its body).
pub async fn expect_event(handle: &mut Handle) -> Value {
    expect(
        handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/team-a/events",
        201,
        |seen| seen.body.clone(),
    )
    .await
    .body
}

/// Like [`expect_applies`]; with `created`, each object is new and its
/// apply is followed by a `Created` Event.
pub async fn expect_applies_creating(handle: &mut Handle, ready: i32, created: bool) -> Vec<Seen> {
    let objects = [
        "/api/v1/namespaces/team-a/serviceaccounts/main-proxy",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles/main-proxy",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/main-proxy",
        "/api/v1/namespaces/team-a/configmaps/main-config",
        "/apis/apps/v1/namespaces/team-a/deployments/main",
        "/api/v1/namespaces/team-a/services/main",
        "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/main",
    ];
    let mut seen = Vec::new();
    for path in objects {
        let extra = if path.contains("/deployments/") {
            json!({"status": {"replicas": 2, "readyReplicas": ready}})
        } else {
            json!({})
        };
        seen.push(expect_apply(handle, path, extra).await);
        if created {
            let event = expect_event(handle).await;
            assert_eq!(event["reason"], "Created", "{path}");
        }
    }
    seen
}

/// Runs one reconcile to completion (or fails after 10 s).
pub async fn run(relay: &ClaudeRelay, ctx: &Arc<Context>) -> Action {
    tokio::time::timeout(
        Duration::from_secs(10),
        claude_relay_operator::controller::reconcile(Arc::new(relay.clone()), ctx.clone()),
    )
    .await
    .expect("reconcile did not finish: a request was not answered")
    .expect("reconcile failed")
}
