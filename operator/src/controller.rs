//! The ClaudeRelay controller: watches relays, their owned objects, the
//! UpstreamRegions they select and the Secrets they reference (all into
//! reflector caches, see [`crate::cache`]), and reconciles each relay.
//!
//! A reconcile reads only caches, applies an owned object only when its
//! rendered form changed or the live object drifted (see [`ensure_applied`]),
//! and writes the relay's status only when it changed. So a relay at rest
//! costs its periodic breaker read from Redis and no API writes.
//! UpstreamRegion status is kept by a second controller in [`crate::regions`].

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claude_relay_crds::resources::{BreakerState, ClaudeRelayStatus, RegionBreaker, SecretKeyRef};
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::breakers::{BreakerReader, RedisTarget};
use crate::cache::{self, Caches};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::handover;
use crate::metrics::Metrics;
use crate::regions;
use crate::render::{self, Defaults, Rendered};
use crate::status::{self, Observed, Problem};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "claude-relay-operator";
/// The User-Agent of the operator's API requests (audit logs and API
/// server metrics count requests per client by it).
pub const USER_AGENT: &str = concat!("claude-relay-operator/", env!("CARGO_PKG_VERSION"));
/// How often breaker state is re-read from Redis, unless the operator is
/// told otherwise (`--status-refresh`).
pub const BREAKER_REFRESH: Duration = Duration::from_secs(10);
/// How often a relay with a problem (missing Secret, ...) is looked at again,
/// besides when a watched object it depends on changes.
pub const PROBLEM_RETRY: Duration = Duration::from_secs(30);
/// Longest wait between retries of a failing reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The label on every owned object; the owned watches select by it.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=claude-relay-operator";

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub defaults: Defaults,
    pub metrics: Arc<Metrics>,
    pub breakers: BreakerReader,
    pub events: Events,
    pub caches: Caches,
    /// Consecutive failures per relay, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<ClaudeRelay>, u32>>,
    /// What this process last applied per owned object (see [`ensure_applied`]).
    applied: Mutex<HashMap<String, Applied>>,
    /// Values of the Secrets that hold Redis credentials, by Secret and
    /// resourceVersion: read again only when the Secret changes.
    redis_secrets: Mutex<HashMap<(String, String), VersionedSecretData>>,
    /// The clock of condition transition times; fixed in tests.
    now: fn() -> Timestamp,
    /// How often a healthy relay is looked at again (breaker state, replicas).
    status_refresh: Duration,
}

/// A Secret's data and the resourceVersion it was read at.
type VersionedSecretData = (String, BTreeMap<String, ByteString>);

/// One owned object as this process last applied it.
#[derive(Clone, Debug)]
struct Applied {
    /// Hash of the rendered object that was applied.
    desired: u64,
    /// Its version as the apply answered it, and as the cache had it just
    /// before (the cache may not have seen the apply yet).
    after: Option<String>,
    before: Option<String>,
}

impl Context {
    /// A context whose caches are empty until [`run`] fills them (or a
    /// test does, with [`Context::with_caches`]).
    pub fn new(
        client: Client,
        defaults: Defaults,
        metrics: Arc<Metrics>,
        reporter: Reporter,
    ) -> Self {
        Self {
            events: Events::new(Recorder::new(client.clone(), reporter)),
            caches: cache::caches().0,
            client,
            defaults,
            metrics,
            breakers: BreakerReader::default(),
            failures: Mutex::default(),
            applied: Mutex::default(),
            redis_secrets: Mutex::default(),
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

    /// Reads these caches (for tests; [`run`] brings its own).
    pub fn with_caches(mut self, caches: Caches) -> Self {
        self.caches = caches;
        self
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch of `K` feeding the cache `writer`; yields every object it
/// changes (deletions included) after the cache has it.
fn cached<K>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    watcher(api::<K>(client, namespace), config)
        .default_backoff()
        .reflect(writer)
        .touched_objects()
}

/// Runs the relay and region controllers until `shutdown` resolves;
/// reconciles in flight finish first.
pub async fn run(
    ctx: Context,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (caches, w) = cache::caches();
    let ctx = Arc::new(ctx.with_caches(caches.clone()));
    let owned = || watcher::Config::default().labels(MANAGED_BY);
    let shutdown = shutdown.shared();

    let relay_controller = Controller::new(
        api::<ClaudeRelay>(&client, namespace),
        watcher::Config::default(),
    );
    let relays = relay_controller.store();
    let (relays_for_regions, regions_for_secrets) = (relays.clone(), caches.regions.clone());
    let forget = ctx.clone();
    let secrets = watcher(
        api::<Secret>(&client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(cache::strip_secret)
    .reflect(w.secrets)
    .touched_objects();
    let relays_done = relay_controller
        .owns_stream(cached(&client, namespace, owned(), w.deployments))
        .owns_stream(cached(&client, namespace, owned(), w.config_maps))
        .owns_stream(cached(&client, namespace, owned(), w.services))
        .owns_stream(cached(&client, namespace, owned(), w.service_accounts))
        .owns_stream(cached(&client, namespace, owned(), w.roles))
        .owns_stream(cached(&client, namespace, owned(), w.role_bindings))
        .owns_stream(cached(&client, namespace, owned(), w.pdbs))
        .owns_stream(cached(&client, namespace, owned(), w.hpas))
        .watches_stream(
            cached(&client, namespace, watcher::Config::default(), w.regions),
            move |region| relays_using(&relays_for_regions, &region),
        )
        .watches_stream(secrets, move |secret| {
            relays_referencing(&relays, &regions_for_secrets, &secret)
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            // A relay gone from the cache (its owned objects' deletions
            // trigger it one last time): forget what was applied for it.
            if let Err(controller::Error::ObjectNotFound(relay)) = &result {
                let ns = relay.namespace.as_deref().unwrap_or_default();
                forget_applied(&forget, ns, &relay.name);
            }
            async move { log_result("relay", result) }
        });

    let regions_done = regions::controller(
        &client,
        namespace,
        cached(&client, namespace, watcher::Config::default(), w.relays),
        ctx.clone(),
    )
    .graceful_shutdown_on(shutdown)
    .run(regions::reconcile, regions::error_policy, ctx)
    .for_each(|result| async move { log_result("region", result) });

    tokio::join!(relays_done, regions_done);
}

/// Logs what a controller's stream yields. A trigger for an object already
/// gone from the cache (an owned object deleted with its relay) is normal.
pub fn log_result<K: Resource, E: std::fmt::Display>(
    what: &str,
    result: Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>,
) {
    match result {
        Ok((object, _)) => debug!(%object, "{what} reconciled"),
        Err(controller::Error::ObjectNotFound(object)) => {
            debug!(%object, "{what} gone before its reconcile")
        }
        // Already logged and counted by the error policy.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(e) => warn!(error = %e, "{what} controller"),
    }
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
            let used = relay
                .status
                .as_ref()
                .is_some_and(|s| s.regions.contains(&name));
            selects(relay, &labels) || used
        })
        .map(|relay| ObjectRef::from_obj(relay.as_ref()))
        .collect()
}

/// Whether `relay`'s region selector matches `labels`.
pub fn selects(relay: &ClaudeRelay, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(relay.spec.region_selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The relays that reference `secret` (directly or through a region).
fn relays_referencing(
    relays: &Store<ClaudeRelay>,
    regions: &Store<UpstreamRegion>,
    secret: &Secret,
) -> Vec<ObjectRef<ClaudeRelay>> {
    let name = secret.name_any();
    relays
        .state()
        .iter()
        .filter(|relay| relay.namespace() == secret.namespace())
        .filter(|relay| {
            let ns = relay.namespace().unwrap_or_default();
            let selected = selected_regions(regions, relay, &ns).unwrap_or_default();
            render::referenced_secret_keys(relay, &selected)
                .iter()
                .chain(&render::updater_secret_keys(relay))
                .any(|k| k.name == name)
        })
        .map(|relay| ObjectRef::from_obj(relay.as_ref()))
        .collect()
}

/// The cached regions of `ns` that `relay` selects, in config order; `Err`
/// with the message when its selector is invalid.
fn selected_regions(
    regions: &Store<UpstreamRegion>,
    relay: &ClaudeRelay,
    ns: &str,
) -> Result<Vec<UpstreamRegion>, String> {
    let selector = Selector::try_from(relay.spec.region_selector.clone())
        .map_err(|e| format!("regionSelector: {e}"))?;
    let mut selected: Vec<UpstreamRegion> = regions
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns) && selector.matches(r.labels()))
        .map(|r| r.as_ref().clone())
        .collect();
    selected.sort_by_key(|r| (r.spec.priority, r.name_any()));
    Ok(selected)
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
    let ns = relay.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = relay.name_any();
    if relay.metadata.deletion_timestamp.is_some() {
        // Owned objects go with the relay through their ownerReferences.
        forget_applied(ctx, &ns, &name);
        return Ok(Action::await_change());
    }
    if !ctx.caches.relay_inputs_ready() {
        debug!("caches not filled yet");
        return Ok(Action::requeue(cache::NOT_READY_RETRY));
    }
    let previous = relay.status.clone();
    let mut observed = Observed {
        generation: relay.metadata.generation,
        // Until the Deployment is seen, report what was last seen.
        desired: previous.as_ref().map_or(0, |s| s.replicas),
        ready: previous.as_ref().map_or(0, |s| s.ready_replicas),
        ..Observed::default()
    };

    let regions = match selected_regions(&ctx.caches.regions, relay, &ns) {
        Ok(regions) => regions,
        Err(message) => {
            observed.problem = Some((Problem::InvalidSpec, message));
            Vec::new()
        }
    };
    observed.regions = regions.iter().map(|r| r.name_any()).collect();
    if observed.problem.is_none() && regions.is_empty() {
        observed.problem = Some((
            Problem::NoRegionsSelected,
            format!("no UpstreamRegion in namespace {ns} matches regionSelector"),
        ));
    }
    if observed.problem.is_none() {
        let missing = missing_secret_keys(&ctx.caches.secrets, &ns, relay, &regions);
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
    let deployment = match &rendered {
        Some(rendered) => Some(ensure_all(ctx, &ns, relay, rendered).await?),
        None => {
            if let Some((problem, message)) = &observed.problem {
                info!(reason = problem.reason(), %message, "relay not rolled out");
            }
            cache::get(&ctx.caches.deployments, &ns, &name).map(|d| d.as_ref().clone())
        }
    };
    if let Some(deployment) = deployment {
        let spec_replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
        let deployment_status = deployment.status.unwrap_or_default();
        observed.desired = spec_replicas.or(deployment_status.replicas).unwrap_or(0);
        observed.ready = deployment_status.ready_replicas.unwrap_or(0);
    }

    if let Some(redis) = &relay.spec.redis
        && !regions.is_empty()
    {
        let values = redis_secret_values(ctx, &ns, redis).await?;
        let lookup = |r: &SecretKeyRef| {
            let bytes = values.get(&r.name)?.get(&r.key)?;
            String::from_utf8(bytes.0.clone()).ok()
        };
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
        let api: Api<ClaudeRelay> = Api::namespaced(ctx.client.clone(), &ns);
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
                forget_applied(ctx, &ns, &name);
                return Ok(Action::await_change());
            }
            Err(e) => return Err(e.into()),
        }
    }
    publish_status_events(ctx, relay, previous.as_ref(), &status).await;

    Ok(Action::requeue(if observed.problem.is_some() {
        PROBLEM_RETRY
    } else {
        ctx.status_refresh
    }))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// What tells a change of an object by someone else: its generation where
/// the kind has one (a status update does not move it), else its resourceVersion.
fn version(meta: &ObjectMeta) -> Option<String> {
    meta.generation
        .map(|g| format!("g{g}"))
        .or_else(|| meta.resource_version.clone())
}

fn applied_key<K: Resource<DynamicType = ()>>(ns: &str, name: &str) -> String {
    format!("{}/{ns}/{name}", K::kind(&()))
}

/// Forgets what was applied for relay `ns/name` (it is gone).
fn forget_applied(ctx: &Context, ns: &str, name: &str) {
    let names = render::Names::of_name(name);
    let owned = [&names.workload, &names.config_map, &names.proxy];
    ctx.applied
        .lock()
        .expect("applied map lock")
        .retain(|key, _| !owned.iter().any(|n| key.ends_with(&format!("/{ns}/{n}"))));
}

fn hash_of<K: Serialize>(object: &K) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// Applies `object` (server-side, as the operator's field manager) unless
/// this process already applied this very rendering and the cached live
/// object has not changed since: a relay at rest makes no writes. After a
/// restart everything is applied once (the map is in memory), which also
/// repairs drift made while no operator ran. Returns the object as the
/// server has it (from the apply, or from the cache when nothing was sent).
async fn ensure_applied<K>(
    ctx: &Context,
    store: &Store<K>,
    relay: &ClaudeRelay,
    object: &K,
) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let ns = object.meta().namespace.clone().unwrap_or_default();
    let name = object.name_any();
    let key = applied_key::<K>(&ns, &name);
    let desired = hash_of(object);
    let live = cache::get(store, &ns, &name);
    let live_version = live.as_ref().and_then(|o| version(o.meta()));
    let last = ctx
        .applied
        .lock()
        .expect("applied map lock")
        .get(&key)
        .cloned();
    if let (Some(live), Some(last)) = (&live, &last)
        && last.desired == desired
        && live_version.is_some()
        && (live_version == last.after || live_version == last.before)
    {
        return Ok(live.as_ref().clone());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let answer = api
        .patch(&name, &apply_params(), &Patch::Apply(object))
        .await?;
    let after = version(answer.meta());
    let changed = match &live {
        None => Some(("Created", "created")),
        Some(_) if after != live_version => Some(("Updated", "changed")),
        Some(_) => None,
    };
    if let Some((reason, verb)) = changed {
        info!(kind = K::kind(&()).as_ref(), %name, "{verb}");
        ctx.events
            .about_owned(
                relay,
                object.object_ref(&()),
                reason,
                "Apply",
                format!("{} {name} {verb}", K::kind(&())),
            )
            .await;
    }
    ctx.applied.lock().expect("applied map lock").insert(
        key,
        Applied {
            desired,
            after,
            before: live_version,
        },
    );
    Ok(answer)
}

/// Brings every owned object to its rendered form, access first so the pods
/// can read their config as soon as they start; returns the Deployment.
async fn ensure_all(
    ctx: &Context,
    ns: &str,
    relay: &ClaudeRelay,
    rendered: &Rendered,
) -> Result<Deployment> {
    let c = &ctx.caches;
    ensure_applied(ctx, &c.service_accounts, relay, &rendered.service_account).await?;
    ensure_applied(ctx, &c.roles, relay, &rendered.role).await?;
    ensure_applied(ctx, &c.role_bindings, relay, &rendered.role_binding).await?;
    ensure_applied(ctx, &c.config_maps, relay, &rendered.config_map).await?;
    // With an HPA, `spec.replicas` changes hands before the apply that
    // leaves it out, so the API server never defaults it to 1.
    let live = cache::get(&c.deployments, ns, &rendered.deployment.name_any());
    if handover::may_be_needed(live.as_deref(), rendered.hpa.as_ref()) {
        handover::prepare(&ctx.client, ns, &rendered.deployment, rendered.hpa.as_ref()).await?;
    }
    let deployment = ensure_applied(ctx, &c.deployments, relay, &rendered.deployment).await?;
    ensure_applied(ctx, &c.services, relay, &rendered.service).await?;
    ensure_applied(ctx, &c.pdbs, relay, &rendered.pdb).await?;
    match &rendered.hpa {
        Some(hpa) => {
            ensure_applied(ctx, &c.hpas, relay, hpa).await?;
        }
        // Autoscaling is off: remove an HPA left from when it was on.
        None => {
            let name = &rendered.deployment.name_any();
            if cache::get(&c.hpas, ns, name).is_some() {
                let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {
                        info!("autoscaling off: deleted the HorizontalPodAutoscaler");
                        let hpa = HorizontalPodAutoscaler {
                            metadata: ObjectMeta {
                                name: Some(name.clone()),
                                namespace: Some(ns.to_string()),
                                ..ObjectMeta::default()
                            },
                            ..HorizontalPodAutoscaler::default()
                        };
                        ctx.events
                            .about_owned(
                                relay,
                                hpa.object_ref(&()),
                                "Deleted",
                                "Delete",
                                format!(
                                    "HorizontalPodAutoscaler {name} deleted: autoscaling is off"
                                ),
                            )
                            .await;
                    }
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.applied
                    .lock()
                    .expect("applied map lock")
                    .remove(&applied_key::<HorizontalPodAutoscaler>(ns, name));
            }
        }
    }
    Ok(deployment)
}

/// A message per referenced Secret or key the cache does not have (names
/// only, never values).
fn missing_secret_keys(
    secrets: &Store<Secret>,
    ns: &str,
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
) -> Vec<String> {
    let mut keys: Vec<SecretKeyRef> = render::referenced_secret_keys(relay, regions)
        .into_iter()
        .collect();
    keys.extend(render::updater_secret_keys(relay));
    keys.sort();
    keys.dedup();
    let mut missing = Vec::new();
    let mut absent = std::collections::BTreeSet::new();
    for key in &keys {
        if absent.contains(&key.name) {
            continue;
        }
        let Some(secret) = cache::get(secrets, ns, &key.name) else {
            missing.push(format!("Secret {} not found", key.name));
            absent.insert(key.name.clone());
            continue;
        };
        let has_key = secret
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(&key.key));
        if !has_key {
            missing.push(format!("Secret {} has no key {}", key.name, key.key));
        }
    }
    missing
}

/// The values of the Secrets that hold the relay's Redis URL or password,
/// by Secret name. The cache keeps no values, so each such Secret is read
/// from the API, but only when its resourceVersion moved.
async fn redis_secret_values(
    ctx: &Context,
    ns: &str,
    redis: &claude_relay_crds::resources::RedisConnection,
) -> Result<BTreeMap<String, BTreeMap<String, ByteString>>> {
    let mut values = BTreeMap::new();
    let names = redis
        .url_secret_ref
        .iter()
        .chain(&redis.password_secret_ref)
        .map(|r| r.name.clone());
    for name in names {
        let Some(cached) = cache::get(&ctx.caches.secrets, ns, &name) else {
            continue;
        };
        let version = cached.resource_version().unwrap_or_default();
        let key = (ns.to_string(), name.clone());
        let known = ctx
            .redis_secrets
            .lock()
            .expect("redis secret lock")
            .get(&key)
            .filter(|(v, _)| *v == version)
            .map(|(_, data)| data.clone());
        let data = match known {
            Some(data) => data,
            None => {
                let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
                let data = api
                    .get_opt(&name)
                    .await?
                    .and_then(|s| s.data)
                    .unwrap_or_default();
                ctx.redis_secrets
                    .lock()
                    .expect("redis secret lock")
                    .insert(key, (version, data.clone()));
                data
            }
        };
        values.insert(name, data);
    }
    Ok(values)
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

/// Events for what changed between two statuses: a problem appearing or
/// changing, Redis becoming unreachable, breakers opening and closing.
async fn publish_status_events(
    ctx: &Context,
    relay: &ClaudeRelay,
    previous: Option<&ClaudeRelayStatus>,
    status: &ClaudeRelayStatus,
) {
    let condition = |s: Option<&ClaudeRelayStatus>, type_: &str| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let problems = [
        Problem::InvalidSpec,
        Problem::MissingSecret,
        Problem::NoRegionsSelected,
    ];
    if let Some((_, reason, message)) = condition(Some(status), "Ready")
        && problems.iter().any(|p| p.reason() == reason)
        && condition(previous, "Ready")
            .is_none_or(|(_, r, m)| (r, m) != (reason.clone(), message.clone()))
    {
        ctx.events
            .warning(relay, &reason, "Reconcile", message)
            .await;
    }
    if let Some((_, reason, message)) = condition(Some(status), "Degraded")
        && reason == "RedisUnreachable"
        && condition(previous, "Degraded").is_none_or(|(_, r, _)| r != reason)
    {
        ctx.events
            .warning(relay, &reason, "ReadBreakerState", message)
            .await;
    }
    let before = previous.map(|s| s.breakers.as_slice()).unwrap_or_default();
    for event in status::breaker_events(before, &status.breakers) {
        ctx.events.publish(relay, event).await;
    }
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

    #[test]
    fn versions_prefer_generation() {
        let mut meta = ObjectMeta {
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(version(&meta).as_deref(), Some("7"));
        meta.generation = Some(2);
        assert_eq!(version(&meta).as_deref(), Some("g2"));
    }
}
