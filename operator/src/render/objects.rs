//! The small owned objects: access, config, Service, PDB and HPA.

use std::collections::BTreeMap;

use claude_relay_crds::ClaudeRelay;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{CONFIG_KEY, Names, owned_meta, selector_labels};

/// The metric a custom metrics adapter must serve for `targetInFlightPerPod`.
pub const IN_FLIGHT_METRIC: &str = "claude_relay_in_flight_requests";

pub fn service_account(relay: &ClaudeRelay, names: &Names) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(relay, &names.proxy),
        ..ServiceAccount::default()
    }
}

/// Read access to the relay's own ConfigMap and nothing else.
pub fn role(relay: &ClaudeRelay, names: &Names) -> Role {
    Role {
        metadata: owned_meta(relay, &names.proxy),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            // NB: list and watch honour resourceNames only with a
            // `metadata.name` field selector, which is how the proxy watches.
            resource_names: Some(vec![names.config_map.clone()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            non_resource_urls: None,
        }]),
    }
}

pub fn role_binding(relay: &ClaudeRelay, names: &Names) -> RoleBinding {
    RoleBinding {
        metadata: owned_meta(relay, &names.proxy),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: names.proxy.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.proxy.clone(),
            namespace: relay.metadata.namespace.clone(),
            api_group: None,
        }]),
    }
}

pub fn config_map(relay: &ClaudeRelay, names: &Names, yaml: String) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(relay, &names.config_map),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
        ..ConfigMap::default()
    }
}

pub fn service(relay: &ClaudeRelay, names: &Names) -> Service {
    let settings = relay.spec.service.clone().unwrap_or_default();
    let default_port = if relay.spec.tls.is_some() { 443 } else { 80 };
    let mut metadata = owned_meta(relay, &names.workload);
    metadata.annotations = settings.annotations.clone();
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(settings.type_.as_str().into()),
            selector: Some(selector_labels(relay)),
            // Only the API port: the admin port (metrics) is scraped from the
            // pods and must not reach a LoadBalancer.
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: settings.port.unwrap_or(default_port),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

pub fn pdb(relay: &ClaudeRelay, names: &Names) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(relay, &names.workload),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time, whatever the replica count: drains proceed
            // even with one replica, and never take the whole relay down.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(relay)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

pub fn hpa(relay: &ClaudeRelay, names: &Names) -> Option<HorizontalPodAutoscaler> {
    let autoscaling = relay.spec.autoscaling.as_ref()?;
    let mut metrics = vec![MetricSpec {
        type_: "Resource".into(),
        resource: Some(ResourceMetricSource {
            name: "cpu".into(),
            target: MetricTarget {
                type_: "Utilization".into(),
                average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }];
    if let Some(in_flight) = autoscaling.target_in_flight_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: IN_FLIGHT_METRIC.into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(in_flight.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: owned_meta(relay, &names.workload),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: names.workload.clone(),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(metrics),
            behavior: None,
        }),
        status: None,
    })
}
