//! The proxy Deployment.

use std::collections::{BTreeMap, BTreeSet};

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::{
    ADMIN_PORT, CONFIG_KEY, Defaults, GEOIP_DIR, HTTP_PORT, Names, PROXY_UID, SECRETS_DIR,
    owned_meta, referenced_secret_keys, selector_labels,
};

/// Replicas when the relay sets neither `replicas` nor `autoscaling`: two, so
/// one pod can restart without an outage.
const DEFAULT_REPLICAS: i32 = 2;
/// The proxy's default `shutdown_grace` (30 s) plus time for the endpoints to
/// drop the pod before SIGTERM's grace runs out.
const TERMINATION_GRACE_SECONDS: i64 = 40;

pub fn deployment(
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
    names: &Names,
    defaults: &Defaults,
) -> Deployment {
    let spec = &relay.spec;
    let pod_settings = spec.pod.clone().unwrap_or_default();

    // No ConfigMap volume: the proxy watches its ConfigMap through the API
    // (see `proxy_args`), so a change reaches it within seconds, not after
    // kubelet's sync period, and without a restart.
    let mut volumes = vec![
        // The root filesystem is read-only; anything that needs scratch space gets this.
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![mount("tmp", "/tmp", false)];

    // One volume per Secret, mounted whole, so a key added to the Secret later
    // (key rotation) shows up in the pod without a new Deployment.
    let secrets: BTreeSet<String> = referenced_secret_keys(relay, regions)
        .into_iter()
        .map(|k| k.name)
        .collect();
    for secret in &secrets {
        let volume = secret_volume_name(secret);
        volumes.push(Volume {
            name: volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                // Readable by the pod's group (fsGroup) only, not by the world.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount(&volume, &format!("{SECRETS_DIR}/{secret}"), true));
    }

    let mut sidecars = Vec::new();
    if let Some(geoip) = &spec.geoip {
        let source = &geoip.source;
        volumes.push(Volume {
            name: "geoip".into(),
            persistent_volume_claim: source.persistent_volume_claim.clone(),
            image: source.image.clone(),
            csi: source.csi.clone(),
            empty_dir: source.empty_dir.clone(),
            ..Volume::default()
        });
        mounts.push(mount("geoip", GEOIP_DIR, true));
        if let Some(updater) = &geoip.updater {
            let env_secret = |name: &str| EnvVar {
                name: name.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: updater.account_secret_name.clone(),
                        key: name.into(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            };
            let env_value = |name: &str, value: String| EnvVar {
                name: name.into(),
                value: Some(value),
                ..EnvVar::default()
            };
            sidecars.push(Container {
                name: "geoipupdate".into(),
                image: Some(updater.image.clone()),
                env: Some(vec![
                    env_secret("GEOIPUPDATE_ACCOUNT_ID"),
                    env_secret("GEOIPUPDATE_LICENSE_KEY"),
                    env_value("GEOIPUPDATE_EDITION_IDS", updater.edition_ids.clone()),
                    env_value("GEOIPUPDATE_FREQUENCY", updater.frequency_hours.to_string()),
                    env_value("GEOIPUPDATE_DB_DIR", GEOIP_DIR.into()),
                ]),
                volume_mounts: Some(vec![mount("geoip", GEOIP_DIR, false)]),
                resources: Some(ResourceRequirements {
                    requests: Some(quantities(&[("cpu", "10m"), ("memory", "32Mi")])),
                    limits: Some(quantities(&[("memory", "64Mi")])),
                    ..ResourceRequirements::default()
                }),
                security_context: Some(container_security()),
                ..Container::default()
            });
        }
    }

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };

    let proxy = Container {
        name: "proxy".into(),
        image: Some(spec.image.clone().unwrap_or_else(|| defaults.image.clone())),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().into()),
        args: Some(proxy_args(names)),
        // POD_NAMESPACE names the namespace in `--config-map $(POD_NAMESPACE)/<name>`.
        env: Some(vec![
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_NAME", "metadata.name"),
        ]),
        ports: Some(vec![port("http", HTTP_PORT), port("admin", ADMIN_PORT)]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let selector = selector_labels(relay);
    let mut pod_labels = pod_settings.labels.clone().unwrap_or_default();
    pod_labels.extend(selector.clone());
    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        // Spread when possible, but a single-node or single-zone cluster still schedules.
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector.clone()),
            match_expressions: None,
        }),
        // Count only pods of the same rollout, so a rolling update does not skew.
        match_label_keys: Some(vec!["pod-template-hash".into()]),
        ..TopologySpreadConstraint::default()
    };

    let replicas = match (&spec.autoscaling, spec.replicas) {
        // The HPA owns the count; leaving the field out of the apply means
        // the operator never resets what the HPA chose.
        (Some(_), _) => None,
        (None, replicas) => Some(replicas.unwrap_or(DEFAULT_REPLICAS)),
    };

    let mut containers = vec![proxy];
    containers.extend(sidecars);

    Deployment {
        metadata: owned_meta(relay, &names.workload),
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            // Surge before removing a pod: capacity never drops during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: pod_settings.annotations.clone(),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names.proxy.clone()),
                    // The proxy needs its token to watch its ConfigMap.
                    automount_service_account_token: Some(true),
                    containers,
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(PROXY_UID),
                        run_as_group: Some(PROXY_UID),
                        fs_group: Some(PROXY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    topology_spread_constraints: Some(vec![
                        spread("kubernetes.io/hostname"),
                        spread("topology.kubernetes.io/zone"),
                    ]),
                    node_selector: pod_settings.node_selector,
                    tolerations: pod_settings.tolerations,
                    affinity: pod_settings.affinity,
                    priority_class_name: pod_settings.priority_class_name,
                    image_pull_secrets: pod_settings.image_pull_secrets,
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The proxy's command line: it follows its ConfigMap through the API,
/// reading it with the rights of the Role rendered beside it. Kubernetes
/// expands `$(POD_NAMESPACE)` from the container's environment.
pub fn proxy_args(names: &Names) -> Vec<String> {
    vec![
        "--config-map".into(),
        format!("$(POD_NAMESPACE)/{}", names.config_map),
        "--config-map-key".into(),
        CONFIG_KEY.into(),
    ]
}

/// Volume name of a mounted Secret: `secret-<name>` when that is a valid
/// volume name (a DNS label), else a hash, since Secret names may be longer
/// and contain dots.
pub fn secret_volume_name(secret: &str) -> String {
    let plain = format!("secret-{secret}");
    if plain.len() <= 63 && !secret.contains('.') {
        plain
    } else {
        let digest = Sha256::digest(secret.as_bytes());
        format!("secret-{}", &hex::encode(digest)[..16])
    }
}

/// The proxy's resources unless the ClaudeRelay sets its own; they follow the
/// README's sizing table. Memory goes with open streams and the response
/// cache: ~16 MB idle and ~7 KB per open stream, so the request holds the
/// ~2,000 streams per pod the README suggests for `targetInFlightPerPod` with
/// the 64 MiB response cache on top, and the limit the ~9,900 streams a
/// replica's open files allow. CPU goes with requests (21-23 us per 1 KB JSON
/// request): 100m serves ~4,300-4,800 requests/s.
fn default_resources() -> ResourceRequirements {
    // No CPU limit: throttling adds latency to every request; memory is capped.
    ResourceRequirements {
        requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
        limits: Some(quantities(&[("memory", "512Mi")])),
        ..ResourceRequirements::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}
