//! What the operator-only e2e tests share: the double, the operator process
//! and small builders of regions, relays and Secrets. No proxy pods: the
//! harness reports the Deployments' pods ready as their controller would.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_e2e::apiserver::ApiServer;
use claude_relay_e2e::cluster::{Cluster, work_dir};
use claude_relay_e2e::operator::OperatorProcess;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};

/// The operator's User-Agent prefix in the double's request log.
pub const OPERATOR_CLIENT: &str = "claude-relay-operator/";

pub struct World {
    pub dir: tempfile::TempDir,
    pub cluster: Cluster,
    pub operator: Option<OperatorProcess>,
}

impl World {
    /// The double (these tests count its requests, so always the double).
    pub async fn start() -> Self {
        let dir = work_dir();
        let api = ApiServer::start().await;
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path, "default").expect("kubeconfig");
        let client = claude_relay_e2e::cluster::client_for(&path)
            .await
            .expect("client");
        let cluster = Cluster::connect(client, path, Some(api))
            .await
            .expect("the API double");
        Self {
            dir,
            cluster,
            operator: None,
        }
    }

    pub fn api(&self) -> &ApiServer {
        self.cluster.api.as_ref().expect("the double")
    }

    pub fn start_operator(&mut self, status_refresh: Duration) {
        self.operator = Some(OperatorProcess::start(
            &self.cluster.kubeconfig,
            &self.cluster.namespace,
            None,
            "operator-1",
            status_refresh,
            self.dir.path(),
        ));
    }

    pub fn operator_log(&self) -> String {
        self.operator.as_ref().map(|o| o.log()).unwrap_or_default()
    }

    /// Writes of the operator so far, leader election left out (renewing
    /// the Lease is its job at rest).
    pub fn operator_writes(&self) -> Vec<String> {
        self.api()
            .writes(OPERATOR_CLIENT)
            .into_iter()
            .filter(|c| !c.target.contains("/leases/"))
            .map(|c| format!("{} {} -> {}", c.verb, c.target, c.code))
            .collect()
    }
}

/// Polls `check` every 50 ms until it gives a value, for at most `within`.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.into());
    secret.string_data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    secret
}

/// A region labelled `labels`, its key in Secret `upstream-keys`.
pub fn region(
    name: &str,
    base_url: &str,
    priority: i32,
    labels: &[(&str, &str)],
) -> UpstreamRegion {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "UpstreamRegion",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "baseUrl": base_url,
            "priority": priority,
            "apiKeySecretRefs": [{"name": "upstream-keys", "key": "api-key"}],
        },
    }))
    .expect("an UpstreamRegion")
}

/// A relay with fixed replicas selecting regions by `selector` labels,
/// its client key in Secret `app-credentials`.
pub fn relay(name: &str, selector: &[(&str, &str)], redis_url: Option<&str>) -> ClaudeRelay {
    let mut settings = json!({"replicas": 2});
    if let Some(url) = redis_url {
        settings["redis"] = json!({"url": url});
    }
    relay_with(name, selector, settings)
}

/// A relay selecting regions by `selector` labels, its client key in Secret
/// `app-credentials`, with the spec's other fields from `settings`.
pub fn relay_with(name: &str, selector: &[(&str, &str)], settings: Value) -> ClaudeRelay {
    let selector: serde_json::Map<String, Value> = selector
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = json!({
        "regionSelector": {"matchLabels": selector},
        "clients": [{
            "id": "app",
            "relayKeySecretRef": {"name": "app-credentials", "key": "relay-key"},
        }],
    });
    for (key, value) in settings.as_object().expect("an object") {
        spec[key] = value.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "relay.claude-relay.dev/v1alpha1",
        "kind": "ClaudeRelay",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a ClaudeRelay")
}

/// Whether the relay's Ready condition is True.
pub fn is_ready(relay: &ClaudeRelay) -> bool {
    relay.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}
