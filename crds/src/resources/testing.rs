//! Builders that keep tests short: `ClaudeRelay::test().with_replicas(3)`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::common::SecretKeyRef;
use super::region::{UpstreamRegion, UpstreamRegionSpec};
use super::relay::{
    Autoscaling, ClaudeRelay, ClaudeRelaySpec, ClaudeRelayStatus, DownstreamTls, RedisConnection,
    RedisMode, RelayClient,
};

/// Namespace of the test resources.
pub const TEST_NAMESPACE: &str = "team-a";

impl ClaudeRelay {
    /// A valid relay `team-a/main`, generation 1, with one client (`app`, key
    /// in Secret `app-key`) and selecting regions labelled `relay: main`.
    pub fn test() -> Self {
        let spec = ClaudeRelaySpec {
            replicas: None,
            autoscaling: None,
            image: None,
            image_pull_policy: None,
            resources: None,
            pod: None,
            region_selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("relay".into(), "main".into())])),
                match_expressions: None,
            },
            routing: None,
            clients: vec![RelayClient {
                id: "app".into(),
                relay_key_secret_ref: Some(SecretKeyRef::new("app-key", "key")),
                signing_secret_refs: None,
                rate_limit: None,
                quota: None,
                cache: None,
            }],
            breaker: None,
            key_pool: None,
            replay: None,
            timeouts: None,
            redis: None,
            geoip: None,
            tls: None,
            service: None,
            log: None,
            quota: None,
            cache: None,
            usage: None,
            pricing: None,
            traces: None,
        };
        let mut relay = ClaudeRelay::new("main", spec);
        relay.metadata = ObjectMeta {
            name: Some("main".into()),
            namespace: Some(TEST_NAMESPACE.into()),
            uid: Some("00000000-0000-0000-0000-00000000c1a0".into()),
            generation: Some(1),
            ..ObjectMeta::default()
        };
        relay
    }

    pub fn with_replicas(mut self, replicas: i32) -> Self {
        self.spec.replicas = Some(replicas);
        self
    }

    pub fn with_autoscaling(mut self, min: i32, max: i32) -> Self {
        self.spec.autoscaling = Some(Autoscaling {
            min_replicas: min,
            max_replicas: max,
            target_cpu_utilization_percentage: 70,
            target_in_flight_per_pod: None,
        });
        self
    }

    /// Adds a client authenticated by a relay key in `secret`/`key`.
    pub fn with_client(mut self, id: &str, secret: &str, key: &str) -> Self {
        self.spec.clients.push(RelayClient {
            id: id.into(),
            relay_key_secret_ref: Some(SecretKeyRef::new(secret, key)),
            signing_secret_refs: None,
            rate_limit: None,
            quota: None,
            cache: None,
        });
        self
    }

    pub fn with_redis_url(mut self, url: &str) -> Self {
        self.spec.redis = Some(RedisConnection {
            url: Some(url.into()),
            url_secret_ref: None,
            mode: RedisMode::Standalone,
            sentinel_master_name: None,
            password_secret_ref: None,
        });
        self
    }

    pub fn with_tls(mut self, secret_name: &str) -> Self {
        self.spec.tls = Some(DownstreamTls {
            secret_name: secret_name.into(),
        });
        self
    }

    pub fn with_status(mut self, status: ClaudeRelayStatus) -> Self {
        self.status = Some(status);
        self
    }
}

impl UpstreamRegion {
    /// A region in `team-a` labelled `relay: main`, with one API key in
    /// Secret `<name>-keys`, key `api-key`.
    pub fn test(name: &str, base_url: &str) -> Self {
        let mut region = UpstreamRegion::new(
            name,
            UpstreamRegionSpec {
                base_url: base_url.into(),
                priority: 0,
                weight: 1,
                countries: None,
                continents: None,
                api_key_secret_refs: vec![SecretKeyRef::new(format!("{name}-keys"), "api-key")],
                timeouts: None,
                ca_secret_ref: None,
                egress_proxy: None,
            },
        );
        region.metadata.namespace = Some(TEST_NAMESPACE.into());
        region.metadata.labels = Some(BTreeMap::from([("relay".into(), "main".into())]));
        region.metadata.generation = Some(1);
        region
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    pub fn with_labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self
    }

    pub fn with_key(mut self, secret: &str, key: &str) -> Self {
        self.spec
            .api_key_secret_refs
            .push(SecretKeyRef::new(secret, key));
        self
    }
}
