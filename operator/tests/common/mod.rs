//! A scripted Kubernetes API for reconcile tests (tower-test mock pair):
//! each expected request is checked (method, path, query, body) and answered
//! in order. A request the script does not expect never gets an answer, so
//! the reconcile hangs and the test fails by timeout.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_operator::controller::Context;
use claude_relay_operator::metrics::Metrics;
use claude_relay_operator::render::Defaults;
use http::{Method, Request, Response};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
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
    let (client, handle) = mock_client();
    let reporter = Reporter {
        controller: "claude-relay-operator".into(),
        instance: Some("test".into()),
    };
    let defaults = Defaults {
        image: "ghcr.io/claude-relay/claude-relay-proxy:0.1.0".into(),
        pricing: Default::default(),
    };
    let ctx = Context::new(client, defaults, Arc::new(Metrics::default()), reporter)
        .with_clock(fixed_now);
    (Arc::new(ctx), handle)
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
            obj.entry("metadata")
                .or_insert_with(|| json!({"name": "main", "namespace": "team-a"}));
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

pub fn ns_path(kind_path: &str, name: &str) -> String {
    format!("{kind_path}/{name}")
}

/// The requests of applying every owned object of relay `main` (no HPA);
/// returns what was applied, in order. The Deployment answers with `ready` ready pods.
pub async fn expect_applies(handle: &mut Handle, ready: i32) -> Vec<Seen> {
    expect_applies_with(handle, ready, async |_| {}).await
}

/// [`expect_applies`] with `before_deployment` answering what comes between
/// the ConfigMap's apply and the Deployment's (an autoscaled relay's
/// replica hand-over).
pub async fn expect_applies_with(
    handle: &mut Handle,
    ready: i32,
    before_deployment: impl AsyncFnOnce(&mut Handle),
) -> Vec<Seen> {
    let mut seen = Vec::new();
    seen.push(
        expect_apply(
            handle,
            "/api/v1/namespaces/team-a/serviceaccounts/main-proxy",
            json!({}),
        )
        .await,
    );
    seen.push(
        expect_apply(
            handle,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles/main-proxy",
            json!({}),
        )
        .await,
    );
    seen.push(
        expect_apply(
            handle,
            "/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/main-proxy",
            json!({}),
        )
        .await,
    );
    seen.push(
        expect_apply(
            handle,
            "/api/v1/namespaces/team-a/configmaps/main-config",
            json!({}),
        )
        .await,
    );
    before_deployment(handle).await;
    seen.push(
        expect_apply(
            handle,
            "/apis/apps/v1/namespaces/team-a/deployments/main",
            json!({"status": {"replicas": 2, "readyReplicas": ready}}),
        )
        .await,
    );
    seen.push(expect_apply(handle, "/api/v1/namespaces/team-a/services/main", json!({})).await);
    seen.push(
        expect_apply(
            handle,
            "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/main",
            json!({}),
        )
        .await,
    );
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
