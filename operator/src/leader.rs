//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never reconcile at once.
//!
//! The holder renews the Lease every `renew_every`; a candidate takes it over
//! once it has seen the Lease unchanged for `leaseDurationSeconds`, measured
//! on its own monotonic clock from when it last saw the Lease change (as
//! client-go does). The holder's `renewTime` is never compared with the
//! local clock: a node whose clock is off neither steals a Lease that is
//! still renewed nor waits forever for one that is not. Every write is a
//! replace with the Lease's resourceVersion, so of two candidates racing for
//! an expired Lease exactly one wins (the other gets 409 Conflict).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease as last seen, and when (local clock) it last changed.
    observed: Mutex<Option<Observation>>,
}

/// What a candidate last saw of the Lease, and when it saw it change.
#[derive(Clone, Debug)]
pub struct Observation {
    spec: LeaseSpec,
    changed_at: Instant,
}

impl Observation {
    /// Notes `spec` as seen at `now`; the clock restarts only when it differs
    /// from what was seen before.
    pub fn update(previous: Option<Observation>, spec: &LeaseSpec, now: Instant) -> Observation {
        match previous {
            Some(seen) if seen.spec == *spec => seen,
            _ => Observation {
                spec: spec.clone(),
                changed_at: now,
            },
        }
    }

    /// A Lease nobody holds, or that nobody renewed for `leaseDurationSeconds`
    /// of this replica's time since it last saw it change.
    pub fn expired(&self, now: Instant) -> bool {
        if self
            .spec
            .holder_identity
            .as_deref()
            .is_none_or(str::is_empty)
        {
            return true;
        }
        let duration = self.spec.lease_duration_seconds.unwrap_or(15).max(0) as u64;
        now.saturating_duration_since(self.changed_at) > Duration::from_secs(duration)
    }
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::default(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Acquires or renews the Lease once; `Ok(true)` while this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let duration = self.config.lease_duration.as_secs() as i32;
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(me.as_str());
        let expired = {
            let mut observed = self.observed.lock().expect("lease observation lock");
            let seen = Observation::update(observed.take(), &spec, Instant::now());
            let expired = seen.expired(Instant::now());
            *observed = Some(seen);
            expired
        };
        if !held_by_me && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let renewed = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: Some(me.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: if held_by_me {
                    spec.acquire_time.clone()
                } else {
                    Some(MicroTime(now))
                },
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(if held_by_me {
                    transitions
                } else {
                    transitions + 1
                }),
                ..spec
            }),
        };
        conflict_is_false(
            self.api
                .replace(&self.config.name, &PostParams::default(), &renewed)
                .await,
        )
    }

    /// Gives the Lease up on shutdown so another replica takes over at once
    /// instead of waiting for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        conflict_is_false(
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await,
        )
        .map(|_| ())
    }
}

/// Records a `LeaderElection` Event on the Lease (as client-go does), so
/// `kubectl get events` shows which replica leads and since when. Best effort:
/// a failure is returned for logging, never fatal.
pub async fn publish_leader_event(
    recorder: &Recorder,
    config: &LeaseConfig,
    note: String,
) -> Result<(), kube::Error> {
    let lease = ObjectReference {
        api_version: Some(Lease::api_version(&()).into()),
        kind: Some(Lease::kind(&()).into()),
        name: Some(config.name.clone()),
        namespace: Some(config.namespace.clone()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "LeaderElection".into(),
        note: Some(note),
        action: "Lead".into(),
        secondary: None,
    };
    recorder.publish(&event, &lease).await
}

fn conflict_is_false<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }
    }

    /// The candidate's view after seeing `specs` one second apart; returns
    /// whether the Lease is expired at the last one.
    fn expired_after(specs: &[LeaseSpec]) -> bool {
        let start = Instant::now();
        let mut seen = None;
        let mut at = start;
        for (i, spec) in specs.iter().enumerate() {
            at = start + Duration::from_secs(i as u64);
            seen = Some(Observation::update(seen, spec, at));
        }
        seen.expect("at least one spec").expired(at)
    }

    #[test]
    fn a_lease_without_holder_is_free_at_once() {
        assert!(expired_after(&[spec(None, 999)]));
        assert!(expired_after(&[spec(Some(""), 999)]));
        assert!(!expired_after(&[spec(Some("a"), 999)]));
    }

    #[test]
    fn a_renewed_lease_stays_held_whatever_its_renew_time_says() {
        // The holder's clock is an hour behind: renewTime is always far in
        // the past, but it changes at every renewal.
        let hour_ago = Timestamp::now().as_second() - 3600;
        let renewals: Vec<LeaseSpec> = (0..60).map(|i| spec(Some("a"), hour_ago + i)).collect();
        assert!(!expired_after(&renewals));
    }

    #[test]
    fn an_unrenewed_lease_expires_after_its_duration_of_local_time() {
        // The holder's clock is an hour ahead and it stopped renewing: the
        // Lease expires after 15 s of this candidate's own time.
        let hour_ahead = Timestamp::now().as_second() + 3600;
        let stale = spec(Some("a"), hour_ahead);
        assert!(!expired_after(&vec![stale.clone(); 15]));
        assert!(expired_after(&vec![stale; 17]));
    }

    #[test]
    fn a_change_restarts_the_clock() {
        let mut specs = vec![spec(Some("a"), 100); 14];
        specs.extend(vec![spec(Some("a"), 101); 14]);
        assert!(!expired_after(&specs));
    }
}
