//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never reconcile at once.
//!
//! The holder renews the Lease every `renew_every`; a candidate takes it over
//! once `renewTime + leaseDurationSeconds` has passed. Every write is a
//! replace with the Lease's resourceVersion, so of two candidates racing for
//! an expired Lease exactly one wins (the other gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

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
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
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
        if !held_by_me && !expired(&spec, now) {
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

/// A Lease nobody holds, or whose holder stopped renewing it.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(holder) = &spec.holder_identity else {
        return true;
    };
    if holder.is_empty() {
        return true;
    }
    let Some(renewed) = &spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    renewed
        .0
        .saturating_add(duration)
        .is_ok_and(|deadline| deadline < now)
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

    #[test]
    fn lease_expires_after_its_duration_or_without_holder() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(!expired(&spec(Some("a"), 990), now));
        assert!(expired(&spec(Some("a"), 980), now));
        assert!(expired(&spec(None, 999), now));
        assert!(expired(&spec(Some(""), 999), now));
    }
}
