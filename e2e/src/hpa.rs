//! What kube-controller-manager's HorizontalPodAutoscaler controller does to
//! a Deployment, for tests against the API double: once an HPA has existed
//! for `delay` (the real one syncs every 15 s), it sets the Deployment's
//! `spec.replicas` to its recommendation kept within [minReplicas,
//! maxReplicas], as an Update by the field manager `kube-controller-manager`
//! (the real one writes through the scale subresource), which takes
//! ownership of the field from whoever held it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::apiserver::{ApiServer, Key};

/// The field manager of the HPA controller's writes.
pub const HPA_MANAGER: &str = "kube-controller-manager";

/// The field managers owning a Deployment's `spec.replicas`, each as
/// "manager Operation", from its `metadata.managedFields`.
pub fn replica_owners(deployment: &Value) -> Vec<String> {
    deployment["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.pointer("/fieldsV1/f:spec/f:replicas").is_some())
        .map(|e| {
            format!(
                "{} {}",
                e["manager"].as_str().unwrap_or_default(),
                e["operation"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

pub struct HpaController {
    delay: Duration,
    /// The replica count the metrics call for (no load metrics here).
    recommendation: i64,
    /// When each HPA was first seen.
    seen: HashMap<Key, Instant>,
}

impl HpaController {
    pub fn new(delay: Duration, recommendation: i64) -> Self {
        Self {
            delay,
            recommendation,
            seen: HashMap::new(),
        }
    }

    /// One sync of every HPA; returns how many Deployments it scaled.
    pub fn sync(&mut self, api: &ApiServer) -> usize {
        let now = Instant::now();
        api.with_store(|store| {
            let hpas: Vec<(Key, Value)> = store
                .all()
                .filter(|(k, _)| k.resource == "autoscaling/horizontalpodautoscalers")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            self.seen
                .retain(|key, _| hpas.iter().any(|(present, _)| present == key));
            let deployments = store
                .resource("apps", "v1", "deployments")
                .expect("deployments are served");
            let mut scaled = 0;
            for (key, hpa) in hpas {
                let first_seen = *self.seen.entry(key.clone()).or_insert(now);
                if now.duration_since(first_seen) < self.delay {
                    continue;
                }
                let spec = &hpa["spec"];
                if spec["scaleTargetRef"]["kind"] != "Deployment" {
                    continue;
                }
                let target = spec["scaleTargetRef"]["name"].as_str().unwrap_or_default();
                let min = spec["minReplicas"].as_i64().unwrap_or(1);
                let max = spec["maxReplicas"].as_i64().unwrap_or(min).max(min);
                let wanted = self.recommendation.clamp(min, max);
                let Ok(current) = store.get(&deployments, &key.namespace, target) else {
                    continue;
                };
                if current["spec"]["replicas"].as_i64() == Some(wanted) {
                    continue;
                }
                store
                    .update(
                        &deployments,
                        &key.namespace,
                        target,
                        HPA_MANAGER,
                        json!({"spec": {"replicas": wanted}}),
                    )
                    .expect("the HPA controller scales the Deployment");
                scaled += 1;
            }
            scaled
        })
    }
}
