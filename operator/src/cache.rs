//! The operator's view of the cluster: reflector caches that watches keep
//! current. Reconciles read relays, regions, referenced Secrets and owned
//! objects from here instead of GETting or LISTing them on every pass.

use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use futures_util::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Resource;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use std::sync::Arc;

/// How soon a reconcile that found the caches not yet filled runs again.
pub const NOT_READY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Read sides of the caches.
#[derive(Clone)]
pub struct Caches {
    /// Relays, for the region status controller.
    pub relays: Store<ClaudeRelay>,
    pub regions: Store<UpstreamRegion>,
    /// Secrets of the watched namespaces with their values removed: a
    /// reconcile only checks which keys exist (see [`strip_secret`]).
    pub secrets: Store<Secret>,
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
    pub config_maps: Store<ConfigMap>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub hpas: Store<HorizontalPodAutoscaler>,
}

/// Write sides of the caches: each goes to the reflector of its watch (or,
/// in tests, is filled by hand).
pub struct Writers {
    pub relays: Writer<ClaudeRelay>,
    pub regions: Writer<UpstreamRegion>,
    pub secrets: Writer<Secret>,
    pub service_accounts: Writer<ServiceAccount>,
    pub roles: Writer<Role>,
    pub role_bindings: Writer<RoleBinding>,
    pub config_maps: Writer<ConfigMap>,
    pub deployments: Writer<Deployment>,
    pub services: Writer<Service>,
    pub pdbs: Writer<PodDisruptionBudget>,
    pub hpas: Writer<HorizontalPodAutoscaler>,
}

/// Empty caches and the writers that fill them.
pub fn caches() -> (Caches, Writers) {
    let (relays, relays_w) = reflector::store();
    let (regions, regions_w) = reflector::store();
    let (secrets, secrets_w) = reflector::store();
    let (service_accounts, service_accounts_w) = reflector::store();
    let (roles, roles_w) = reflector::store();
    let (role_bindings, role_bindings_w) = reflector::store();
    let (config_maps, config_maps_w) = reflector::store();
    let (deployments, deployments_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (pdbs, pdbs_w) = reflector::store();
    let (hpas, hpas_w) = reflector::store();
    (
        Caches {
            relays,
            regions,
            secrets,
            service_accounts,
            roles,
            role_bindings,
            config_maps,
            deployments,
            services,
            pdbs,
            hpas,
        },
        Writers {
            relays: relays_w,
            regions: regions_w,
            secrets: secrets_w,
            service_accounts: service_accounts_w,
            roles: roles_w,
            role_bindings: role_bindings_w,
            config_maps: config_maps_w,
            deployments: deployments_w,
            services: services_w,
            pdbs: pdbs_w,
            hpas: hpas_w,
        },
    )
}

impl Caches {
    /// Whether everything a relay's reconcile reads has been listed once,
    /// so a starting operator never mistakes an unfilled cache for a missing
    /// region or Secret. Never waits: the watches that fill the caches are
    /// driven by the same controller as the reconcile.
    pub fn relay_inputs_ready(&self) -> bool {
        ready(&self.regions)
            && ready(&self.secrets)
            && ready(&self.service_accounts)
            && ready(&self.roles)
            && ready(&self.role_bindings)
            && ready(&self.config_maps)
            && ready(&self.deployments)
            && ready(&self.services)
            && ready(&self.pdbs)
            && ready(&self.hpas)
    }

    /// Whether relays and regions have been listed once.
    pub fn region_inputs_ready(&self) -> bool {
        ready(&self.relays) && ready(&self.regions)
    }
}

fn ready<K>(store: &Store<K>) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// The cached object `namespace/name` of a store.
pub fn get<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// Removes a Secret's values (keeping the names of its keys) and anything
/// else that may copy them, before it enters the cache: the operator keeps
/// no credentials in memory beyond the Redis ones it connects with.
pub fn strip_secret(secret: &mut Secret) {
    if let Some(data) = &mut secret.data {
        for value in data.values_mut() {
            value.0.clear();
        }
    }
    secret.string_data = None;
    secret.metadata.managed_fields = None;
    if let Some(annotations) = &mut secret.metadata.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Fills `writer` with `objects` as a first list would (for tests).
pub fn fill<K>(writer: &mut Writer<K>, objects: impl IntoIterator<Item = K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    use kube::runtime::watcher::Event;
    writer.apply_watcher_event(&Event::Init);
    for object in objects {
        writer.apply_watcher_event(&Event::InitApply(object));
    }
    writer.apply_watcher_event(&Event::InitDone);
}
