//! The ClaudeRelay controller: watches relays, their owned objects and the
//! UpstreamRegions they select, and reconciles each relay.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claude_relay_crds::resources::{BreakerState, ClaudeRelayStatus, RegionBreaker, SecretKeyRef};
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use futures_util::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::breakers::{BreakerReader, RedisTarget};
use crate::error::{Error, Result};
use crate::handover;
use crate::metrics::Metrics;
use crate::render::{self, Defaults, Names, Rendered};
use crate::status::{self, Observed, Problem};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "claude-relay-operator";
/// How often breaker state is re-read from Redis, unless the operator is
/// told otherwise (`--status-refresh`).
pub const BREAKER_REFRESH: Duration = Duration::from_secs(10);
/// How often a relay with a problem (missing Secret, ...) is looked at again;
/// Secrets are not watched, to keep them out of the operator's memory.
pub const PROBLEM_RETRY: Duration = Duration::from_secs(30);
/// Longest wait between retries of a failing reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub defaults: Defaults,
    pub metrics: Arc<Metrics>,
    pub breakers: BreakerReader,
    pub recorder: Recorder,
    /// Consecutive failures per relay, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<ClaudeRelay>, u32>>,
    /// The clock of condition transition times; fixed in tests.
    now: fn() -> Timestamp,
    /// How often a healthy relay is looked at again (breaker state, replicas).
    status_refresh: Duration,
}

impl Context {
    pub fn new(
        client: Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            breakers: BreakerReader::default(),
            failures: Mutex::default(),
            now: Timestamp::now,
            status_refresh: BREAKER_REFRESH,
        }
    }

    /// Re-reads breaker state and replicas every `every` instead of [`BREAKER_REFRESH`].
    pub fn with_status_refresh(mut self, every: Duration) -> Self {
        self.status_refresh = every;
        self
    }

    /// Uses `now` instead of the system clock (for tests).
    pub fn with_clock(mut self, now: fn() -> Timestamp) -> Self {
        self.now = now;
        self
    }
}

/// Runs the controller until `shutdown` resolves; reconciles in flight finish first.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=claude-relay-operator");
    let controller = Controller::new(
        api::<ClaudeRelay>(&client, namespace),
        watcher::Config::default(),
    );
    let relays = controller.store();
    controller
        .owns(api::<Deployment>(&client, namespace), owned.clone())
        .owns(api::<ConfigMap>(&client, namespace), owned.clone())
        .owns(api::<Service>(&client, namespace), owned.clone())
        .owns(api::<ServiceAccount>(&client, namespace), owned.clone())
        .owns(api::<Role>(&client, namespace), owned.clone())
        .owns(api::<RoleBinding>(&client, namespace), owned.clone())
        .owns(
            api::<PodDisruptionBudget>(&client, namespace),
            owned.clone(),
        )
        .owns(api::<HorizontalPodAutoscaler>(&client, namespace), owned)
        .watches(
            api::<UpstreamRegion>(&client, namespace),
            watcher::Config::default(),
            move |region| relays_using(&relays, &region),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((relay, _)) => debug!(relay = %relay, "reconciled"),
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .await;
}

/// The relays a region change concerns: those whose selector matches it now,
/// and those that used it before (its labels may have changed).
pub fn relays_using(
    relays: &Store<ClaudeRelay>,
    region: &UpstreamRegion,
) -> Vec<ObjectRef<ClaudeRelay>> {
    let labels = region.labels().clone();
    let name = region.name_any();
    relays
        .state()
        .iter()
        .filter(|relay| relay.namespace() == region.namespace())
        .filter(|relay| {
            let selects = Selector::try_from(relay.spec.region_selector.clone())
                .is_ok_and(|s| s.matches(&labels));
            let used = relay
                .status
                .as_ref()
                .is_some_and(|s| s.regions.contains(&name));
            selects || used
        })
        .map(|relay| ObjectRef::from_obj(relay.as_ref()))
        .collect()
}

/// Reconciles one relay: the thin wrapper that keeps metrics and backoff.
pub async fn reconcile(relay: Arc<ClaudeRelay>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", relay = %ObjectRef::from_obj(relay.as_ref()));
    ctx.metrics.reconciles.inc();
    let started = Instant::now();
    let result = reconcile_relay(&relay, &ctx).instrument(span).await;
    ctx.metrics.observe(started.elapsed());
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failure map lock")
            .remove(&ObjectRef::from_obj(relay.as_ref()));
    }
    result
}

/// Counts the error and retries with exponential backoff per relay, so one
/// broken object never hot-loops.
pub fn error_policy(relay: Arc<ClaudeRelay>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    let mut failures = ctx.failures.lock().expect("failure map lock");
    let count = failures
        .entry(ObjectRef::from_obj(relay.as_ref()))
        .or_default();
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    warn!(relay = %ObjectRef::from_obj(relay.as_ref()), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// 5 s, 10 s, 20 s, ... up to five minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    (Duration::from_secs(5) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

async fn reconcile_relay(relay: &ClaudeRelay, ctx: &Context) -> Result<Action> {
    if relay.metadata.deletion_timestamp.is_some() {
        // Owned objects go with the relay through their ownerReferences.
        return Ok(Action::await_change());
    }
    let ns = relay.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = relay.name_any();
    let client = &ctx.client;
    let previous = relay.status.clone();
    let mut observed = Observed {
        generation: relay.metadata.generation,
        // Until a Deployment is applied, report what was last seen.
        desired: previous.as_ref().map_or(0, |s| s.replicas),
        ready: previous.as_ref().map_or(0, |s| s.ready_replicas),
        ..Observed::default()
    };

    let mut regions = Vec::new();
    match Selector::try_from(relay.spec.region_selector.clone()) {
        Ok(selector) => {
            let api: Api<UpstreamRegion> = Api::namespaced(client.clone(), &ns);
            regions = api
                .list(&ListParams::default().labels_from(&selector))
                .await?
                .items;
            regions.sort_by_key(|r| (r.spec.priority, r.name_any()));
        }
        Err(e) => observed.problem = Some((Problem::InvalidSpec, format!("regionSelector: {e}"))),
    }
    observed.regions = regions.iter().map(|r| r.name_any()).collect();

    let mut secrets = BTreeMap::new();
    if observed.problem.is_none() && regions.is_empty() {
        observed.problem = Some((
            Problem::NoRegionsSelected,
            format!("no UpstreamRegion in namespace {ns} matches regionSelector"),
        ));
    }
    if observed.problem.is_none() {
        let (found, missing) = fetch_secrets(client, &ns, relay, &regions).await?;
        secrets = found;
        if !missing.is_empty() {
            observed.problem = Some((Problem::MissingSecret, missing.join("; ")));
        }
    }
    let rendered = match observed.problem {
        None => match render::render(relay, &regions, &ctx.defaults) {
            Ok(rendered) => Some(rendered),
            Err(e) => {
                observed.problem = Some((Problem::InvalidSpec, e.0));
                None
            }
        },
        Some(_) => None,
    };
    if let Some(rendered) = &rendered {
        let deployment = apply_all(client, &ns, relay, rendered).await?;
        let spec_replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
        let deployment_status = deployment.status.unwrap_or_default();
        observed.desired = spec_replicas.or(deployment_status.replicas).unwrap_or(0);
        observed.ready = deployment_status.ready_replicas.unwrap_or(0);
    } else if let Some((problem, message)) = &observed.problem {
        info!(reason = problem.reason(), %message, "relay not rolled out");
    }

    if let Some(redis) = &relay.spec.redis
        && !regions.is_empty()
    {
        let lookup = |r: &SecretKeyRef| secret_value(&secrets, r);
        match RedisTarget::resolve(redis, lookup) {
            Ok(target) => {
                let relay_name = format!("{ns}/{name}");
                match ctx
                    .breakers
                    .read(&target, &relay_name, &observed.regions)
                    .await
                {
                    Ok(breakers) => observed.breakers = Some(breakers),
                    Err(e) => {
                        observed.redis_error = Some(format!(
                            "cannot read breaker state from Redis: {}",
                            e.kind().to_str()
                        ));
                        observed.breakers = Some(unknown_breakers(&observed.regions));
                    }
                }
            }
            // The Secret is missing: already reported as MissingSecret.
            Err(_) => observed.breakers = Some(unknown_breakers(&observed.regions)),
        }
    }

    let now = Time((ctx.now)());
    let status = status::status(previous.as_ref(), &observed, &now);
    if previous.as_ref() != Some(&status) {
        let api: Api<ClaudeRelay> = Api::namespaced(client.clone(), &ns);
        let body = json!({
            "apiVersion": ClaudeRelay::api_version(&()),
            "kind": ClaudeRelay::kind(&()),
            "status": status,
        });
        match api
            .patch_status(&name, &apply_params(), &Patch::Apply(body))
            .await
        {
            Ok(_) => {}
            // Deleted while this reconcile ran: not a failure; what it owns
            // goes with it (anything applied meanwhile included).
            Err(kube::Error::Api(status)) if status.code == 404 => {
                info!("the relay was deleted during its reconcile");
                return Ok(Action::await_change());
            }
            Err(e) => return Err(e.into()),
        }
    }
    publish_breaker_events(ctx, relay, previous.as_ref(), &status).await;
    update_region_status(client, &ns, &name, &regions, observed.breakers.as_deref()).await?;

    Ok(Action::requeue(if observed.problem.is_some() {
        PROBLEM_RETRY
    } else {
        ctx.status_refresh
    }))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply<K>(client: &Client, ns: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(&object.name_any(), &apply_params(), &Patch::Apply(object))
        .await?)
}

/// Applies every owned object, access first so the pods can read their
/// config as soon as they start; returns the Deployment as the server has it.
async fn apply_all(
    client: &Client,
    ns: &str,
    relay: &ClaudeRelay,
    rendered: &Rendered,
) -> Result<Deployment> {
    apply(client, ns, &rendered.service_account).await?;
    apply(client, ns, &rendered.role).await?;
    apply(client, ns, &rendered.role_binding).await?;
    apply(client, ns, &rendered.config_map).await?;
    let deployment =
        handover::apply_deployment(client, ns, &rendered.deployment, rendered.hpa.as_ref()).await?;
    apply(client, ns, &rendered.service).await?;
    apply(client, ns, &rendered.pdb).await?;
    match &rendered.hpa {
        Some(hpa) => {
            apply(client, ns, hpa).await?;
        }
        // Autoscaling may just have been turned off: remove the HPA once per
        // spec change rather than on every refresh.
        None if relay.status.as_ref().and_then(|s| s.observed_generation)
            != relay.metadata.generation =>
        {
            let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
            match api
                .delete(&Names::of(relay).workload, &DeleteParams::default())
                .await
            {
                Ok(_) => info!("autoscaling off: deleted the HorizontalPodAutoscaler"),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        None => {}
    }
    Ok(deployment)
}

/// Fetches each referenced Secret once. Returns the Secrets found and a
/// message per missing Secret or key (names only, never values).
async fn fetch_secrets(
    client: &Client,
    ns: &str,
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
) -> Result<(BTreeMap<String, Secret>, Vec<String>)> {
    let mut keys: Vec<SecretKeyRef> = render::referenced_secret_keys(relay, regions)
        .into_iter()
        .collect();
    keys.extend(render::updater_secret_keys(relay));
    keys.sort();
    keys.dedup();
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut found = BTreeMap::new();
    let mut absent = std::collections::BTreeSet::new();
    let mut missing = Vec::new();
    for key in &keys {
        if absent.contains(&key.name) {
            continue;
        }
        if !found.contains_key(&key.name) {
            match api.get_opt(&key.name).await? {
                Some(secret) => {
                    found.insert(key.name.clone(), secret);
                }
                None => {
                    missing.push(format!("Secret {} not found", key.name));
                    absent.insert(key.name.clone());
                    continue;
                }
            }
        }
        let has_key = found[&key.name]
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(&key.key));
        if !has_key {
            missing.push(format!("Secret {} has no key {}", key.name, key.key));
        }
    }
    Ok((found, missing))
}

fn secret_value(secrets: &BTreeMap<String, Secret>, key: &SecretKeyRef) -> Option<String> {
    let secret = secrets.get(&key.name)?;
    let bytes = secret.data.as_ref()?.get(&key.key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn unknown_breakers(regions: &[String]) -> Vec<RegionBreaker> {
    regions
        .iter()
        .map(|region| RegionBreaker {
            region: region.clone(),
            state: BreakerState::Unknown,
            failure_rate: None,
            since: None,
            last_error: None,
        })
        .collect()
}

async fn publish_breaker_events(
    ctx: &Context,
    relay: &ClaudeRelay,
    previous: Option<&ClaudeRelayStatus>,
    status: &ClaudeRelayStatus,
) {
    let before = previous.map(|s| s.breakers.as_slice()).unwrap_or_default();
    for event in status::breaker_events(before, &status.breakers) {
        // Events are best effort: a failure to record one must not fail the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &relay.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "cannot publish event");
        }
    }
}

fn severity(state: BreakerState) -> u8 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Unknown => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::Open => 3,
    }
}

/// Writes this relay's view of each region's breaker into the region's
/// status, with a merge patch of this relay's key only (several relays may
/// share a region), and only when it changed.
async fn update_region_status(
    client: &Client,
    ns: &str,
    relay: &str,
    regions: &[UpstreamRegion],
    breakers: Option<&[RegionBreaker]>,
) -> Result<()> {
    let Some(breakers) = breakers else {
        return Ok(());
    };
    let api: Api<UpstreamRegion> = Api::namespaced(client.clone(), ns);
    for region in regions {
        let Some(breaker) = breakers.iter().find(|b| b.region == region.name_any()) else {
            continue;
        };
        let mut relays = region
            .status
            .as_ref()
            .map(|s| s.relays.clone())
            .unwrap_or_default();
        if relays.get(relay) == Some(&breaker.state) {
            continue;
        }
        relays.insert(relay.into(), breaker.state);
        let worst = relays
            .values()
            .copied()
            .max_by_key(|s| severity(*s))
            .unwrap_or(breaker.state);
        let body = json!({ "status": { "relays": { relay: breaker.state }, "breaker": worst } });
        api.patch_status(
            &region.name_any(),
            &PatchParams::default(),
            &Patch::Merge(body),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
