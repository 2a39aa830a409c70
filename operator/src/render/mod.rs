//! Pure functions from a ClaudeRelay and the UpstreamRegions it selects to the
//! objects the operator applies. No I/O: the reconciler fetches, these render.

mod config;
mod deployment;
mod objects;

use std::collections::{BTreeMap, BTreeSet};

use claude_relay_crds::config::PricingConfig;
use claude_relay_crds::resources::SecretKeyRef;
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

pub use config::render_config;

/// The key of the config document in the ConfigMap (the proxy's `--config-map-key`).
pub const CONFIG_KEY: &str = "config.yaml";
/// Each referenced Secret is mounted at `SECRETS_DIR/<secret-name>/`.
pub const SECRETS_DIR: &str = "/etc/claude-relay/secrets";
/// The GeoIP volume's mount point.
pub const GEOIP_DIR: &str = "/etc/claude-relay/geoip";
pub const HTTP_PORT: i32 = 8080;
pub const ADMIN_PORT: i32 = 9090;
/// Same uid as the distroless `nonroot` user the image runs as.
pub const PROXY_UID: i64 = 65532;

/// What the operator supplies when a relay leaves it unset.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub image: String,
    /// The default price table (the chart's `pricing`), for relays whose
    /// `pricing.includeDefaults` is on (or that set no `pricing`).
    pub pricing: PricingConfig,
}

/// Everything applied for one relay.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// Present when the relay autoscales; then the Deployment has no `replicas`.
    pub hpa: Option<HorizontalPodAutoscaler>,
}

/// A relay the operator cannot turn into a working config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Renders every object of `relay`. `regions` are the selected UpstreamRegions.
pub fn render(
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
    defaults: &Defaults,
) -> Result<Rendered, InvalidSpec> {
    let config = render_config(relay, regions, &defaults.pricing)?;
    let yaml = config::to_yaml(&config);
    let names = Names::of(relay);
    Ok(Rendered {
        service_account: objects::service_account(relay, &names),
        role: objects::role(relay, &names),
        role_binding: objects::role_binding(relay, &names),
        config_map: objects::config_map(relay, &names, yaml),
        deployment: deployment::deployment(relay, regions, &names, defaults),
        service: objects::service(relay, &names),
        pdb: objects::pdb(relay, &names),
        hpa: objects::hpa(relay, &names),
    })
}

/// Names of the owned objects.
#[derive(Clone, Debug)]
pub struct Names {
    /// Deployment, Service, HPA and PDB.
    pub workload: String,
    pub config_map: String,
    /// ServiceAccount, Role and RoleBinding.
    pub proxy: String,
}

impl Names {
    pub fn of(relay: &ClaudeRelay) -> Self {
        Self::of_name(&relay.name_any())
    }

    /// The names for a relay called `name`.
    pub fn of_name(name: &str) -> Self {
        let name = name.to_string();
        Self {
            config_map: format!("{name}-config"),
            proxy: format!("{name}-proxy"),
            workload: name,
        }
    }
}

/// Labels that select the proxy pods of one relay.
pub fn selector_labels(relay: &ClaudeRelay) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "claude-relay".into()),
        ("app.kubernetes.io/instance".into(), relay.name_any()),
        ("app.kubernetes.io/component".into(), "proxy".into()),
    ])
}

/// Labels of every owned object.
pub fn labels(relay: &ClaudeRelay) -> BTreeMap<String, String> {
    let mut labels = selector_labels(relay);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "claude-relay-operator".into(),
    );
    labels
}

fn owner_reference(relay: &ClaudeRelay) -> OwnerReference {
    OwnerReference {
        api_version: ClaudeRelay::api_version(&()).into_owned(),
        kind: ClaudeRelay::kind(&()).into_owned(),
        name: relay.name_any(),
        uid: relay.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Metadata of an owned object named `name`.
fn owned_meta(relay: &ClaudeRelay, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: relay.namespace(),
        labels: Some(labels(relay)),
        owner_references: Some(vec![owner_reference(relay)]),
        ..ObjectMeta::default()
    }
}

/// `/etc/claude-relay/secrets/<name>/<key>`: how the config refers to a Secret key.
pub fn secret_path(secret: &SecretKeyRef) -> String {
    format!("{SECRETS_DIR}/{}/{}", secret.name, secret.key)
}

/// Every Secret key the proxy pods read, sorted and without duplicates.
pub fn referenced_secret_keys(
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
) -> BTreeSet<SecretKeyRef> {
    let mut keys = BTreeSet::new();
    for client in &relay.spec.clients {
        keys.extend(client.relay_key_secret_ref.iter().cloned());
        keys.extend(client.signing_secret_refs.iter().flatten().cloned());
    }
    if let Some(tls) = &relay.spec.tls {
        keys.insert(SecretKeyRef::new(&tls.secret_name, "tls.crt"));
        keys.insert(SecretKeyRef::new(&tls.secret_name, "tls.key"));
    }
    if let Some(redis) = &relay.spec.redis {
        keys.extend(redis.url_secret_ref.iter().cloned());
        keys.extend(redis.password_secret_ref.iter().cloned());
    }
    if let Some(traces) = &relay.spec.traces {
        keys.extend(
            traces
                .headers
                .iter()
                .flatten()
                .map(|h| h.value_secret_ref.clone()),
        );
    }
    for region in regions {
        keys.extend(region.spec.api_key_secret_refs.iter().cloned());
        keys.extend(region.spec.ca_secret_ref.iter().cloned());
        if let Some(proxy) = &region.spec.egress_proxy {
            keys.extend(proxy.credentials_secret_ref.iter().cloned());
        }
    }
    keys
}

/// Secret keys read by the GeoIP updater sidecar through its environment.
pub fn updater_secret_keys(relay: &ClaudeRelay) -> Vec<SecretKeyRef> {
    let Some(updater) = relay.spec.geoip.as_ref().and_then(|g| g.updater.as_ref()) else {
        return vec![];
    };
    ["GEOIPUPDATE_ACCOUNT_ID", "GEOIPUPDATE_LICENSE_KEY"]
        .into_iter()
        .map(|key| SecretKeyRef::new(&updater.account_secret_name, key))
        .collect()
}

#[cfg(test)]
mod tests;
