//! The UpstreamRegion status controller: each region's `status.relays`
//! lists exactly the relays of its namespace that select it now, with the
//! breaker state each relay last reported for it, and `status.breaker` the
//! worst of them.
//!
//! The whole status is computed from the relay cache and written with one
//! server-side apply under the operator's field manager, so an entry the
//! operator no longer applies (relay deleted, selector or region labels
//! changed) is removed by the API server, and two relays changing at once
//! cannot overwrite each other: the region's reconciles run one at a time
//! and each writes the state of every relay as the cache has it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use claude_relay_crds::resources::{BreakerState, UpstreamRegionStatus};
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Map, Value, json};
use tracing::Instrument;
use tracing::{info_span, warn};

use crate::controller::{Context, FIELD_MANAGER, selects};
use crate::error::{Error, Result};

/// Retry delay of a failed region status write.
const RETRY: Duration = Duration::from_secs(5);

/// The region controller, triggered by its regions and by `relays` (a
/// watch that fills the relay cache first).
pub fn controller(
    client: &Client,
    namespace: Option<&str>,
    relays: impl futures_util::Stream<Item = Result<ClaudeRelay, watcher::Error>> + Send + 'static,
    ctx: Arc<Context>,
) -> Controller<UpstreamRegion> {
    let api: Api<UpstreamRegion> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let regions = ctx.caches.regions.clone();
    Controller::new(api, watcher::Config::default())
        .watches_stream(relays, move |relay| regions_of(&regions, &relay))
}

/// The regions a relay change concerns: those it selects now and those
/// that list it (it may have been deleted or stopped selecting them).
pub fn regions_of(
    regions: &Store<UpstreamRegion>,
    relay: &ClaudeRelay,
) -> Vec<ObjectRef<UpstreamRegion>> {
    let name = relay.name_any();
    regions
        .state()
        .iter()
        .filter(|region| region.namespace() == relay.namespace())
        .filter(|region| {
            let listed = region
                .status
                .as_ref()
                .is_some_and(|s| s.relays.contains_key(&name));
            listed || selects(relay, region.labels())
        })
        .map(|region| ObjectRef::from_obj(region.as_ref()))
        .collect()
}

fn severity(state: BreakerState) -> u8 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::Unknown => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::Open => 3,
    }
}

/// The status `region` should have, given the relays of the cache: every
/// live relay of its namespace that selects it, with the state of its
/// breaker for the region (`unknown` until the relay has reported one).
pub fn region_status(relays: &Store<ClaudeRelay>, region: &UpstreamRegion) -> UpstreamRegionStatus {
    let name = region.name_any();
    let entries: BTreeMap<String, BreakerState> = relays
        .state()
        .iter()
        .filter(|relay| relay.namespace() == region.namespace())
        .filter(|relay| relay.metadata.deletion_timestamp.is_none())
        .filter(|relay| selects(relay, region.labels()))
        .map(|relay| {
            let state = relay
                .status
                .as_ref()
                .and_then(|s| s.breakers.iter().find(|b| b.region == name))
                .map_or(BreakerState::Unknown, |b| b.state);
            (relay.name_any(), state)
        })
        .collect();
    UpstreamRegionStatus {
        breaker: entries.values().copied().max_by_key(|s| severity(*s)),
        relays: entries,
    }
}

pub async fn reconcile(region: Arc<UpstreamRegion>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("region", region = %ObjectRef::from_obj(region.as_ref()));
    reconcile_region(&region, &ctx).instrument(span).await
}

async fn reconcile_region(region: &UpstreamRegion, ctx: &Context) -> Result<Action> {
    if region.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if !ctx.caches.region_inputs_ready() {
        return Ok(Action::requeue(crate::cache::NOT_READY_RETRY));
    }
    let ns = region.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = region.name_any();
    let desired = region_status(&ctx.caches.relays, region);
    let current = region.status.clone().unwrap_or_default();
    if current == desired {
        return Ok(Action::await_change());
    }
    let api: Api<UpstreamRegion> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": UpstreamRegion::api_version(&()),
        "kind": UpstreamRegion::kind(&()),
        "status": desired,
    });
    let written = match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
    {
        Ok(written) => written,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    };
    // Entries another field manager wrote (the merge patches of operator
    // versions before this one) survive the apply: remove them by name.
    let written = written.status.unwrap_or_default();
    let leftovers: Map<String, Value> = written
        .relays
        .keys()
        .filter(|relay| !desired.relays.contains_key(*relay))
        .map(|relay| (relay.clone(), Value::Null))
        .collect();
    if !leftovers.is_empty() || written.breaker != desired.breaker {
        let patch = json!({"status": {"relays": leftovers, "breaker": desired.breaker}});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

pub fn error_policy(region: Arc<UpstreamRegion>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    warn!(region = %ObjectRef::from_obj(region.as_ref()), error = %error, "region status not written");
    Action::requeue(RETRY)
}
