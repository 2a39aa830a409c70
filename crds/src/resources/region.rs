//! `UpstreamRegion`: one upstream of the Claude API and its pool of API keys.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    BASE_URL_PATTERN, BreakerState, COUNTRY_PATTERN, Continent, EGRESS_PROXY_URL_PATTERN,
    SecretKeyRef, Timeouts,
};

/// An upstream region; ClaudeRelays select it by label.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relay.claude-relay.dev",
    version = "v1alpha1",
    kind = "UpstreamRegion",
    doc = "An upstream of the Claude API (a region or gateway) with its pool of API keys.",
    plural = "upstreamregions",
    singular = "upstreamregion",
    shortname = "ur",
    category = "claude-relay",
    namespaced,
    status = "UpstreamRegionStatus",
    derive = "PartialEq",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.baseUrl"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Breaker", type_ = "string", json_path = ".status.breaker"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The name is the region's name in the proxy config, metrics and Redis keys.
    validation = Rule::new("self.metadata.name.size() <= 63")
        .message("name must be at most 63 characters: it names the region in the proxy config")
)]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || self.baseUrl.startsWith('https://')")
    .message("caSecretRef only applies to an https baseUrl"))]
#[serde(rename_all = "camelCase")]
pub struct UpstreamRegionSpec {
    /// `https://api.anthropic.com`, or a gateway, optionally with a path prefix.
    #[schemars(pattern(BASE_URL_PATTERN))]
    pub base_url: String,
    /// Lower is preferred.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// Share of traffic among regions of equal priority.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
    /// Countries (ISO 3166-1 alpha-2) this region serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 250), inner(pattern(COUNTRY_PATTERN)))]
    pub countries: Option<Vec<String>>,
    /// Continents this region serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 7))]
    pub continents: Option<Vec<Continent>>,
    /// The pool of upstream API keys, used in turn.
    #[schemars(length(min = 1, max = 100))]
    pub api_key_secret_refs: Vec<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Extra PEM CA certificates trusted besides the webpki roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Leave through this HTTP CONNECT proxy, so regions can use different addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxy>,
}

fn default_weight() -> i32 {
    1
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxy {
    /// `http://host:port` (TLS to the proxy itself is not supported; TLS to
    /// the upstream runs inside the tunnel); credentials belong in
    /// `credentialsSecretRef`.
    #[schemars(pattern(EGRESS_PROXY_URL_PATTERN))]
    pub url: String,
    /// `user:password` for Proxy-Authorization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamRegionStatus {
    /// The worst breaker state among the relays using this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerState>,
    /// Breaker state per relay (by relay name): exactly the relays of this
    /// namespace that select the region now (`unknown` until a relay has
    /// reported its breaker), written by the operator with server-side apply.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub relays: BTreeMap<String, BreakerState>,
}
