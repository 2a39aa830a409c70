//! `ClaudeRelay`: one relay, that is one set of proxy pods with their config.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, EmptyDirVolumeSource, ImageVolumeSource, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    BreakerState, COUNTRY_PATTERN, Continent, NAME_PATTERN, SecretKeyRef, Timeouts,
};
use crate::config::LogFormat;
use crate::duration::HumanDuration;

/// A relay of the Claude API: the operator runs its proxies and reports their health.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relay.claude-relay.dev",
    version = "v1alpha1",
    kind = "ClaudeRelay",
    doc = "A relay of the Claude API: a set of proxy pods, their config, and their health.",
    plural = "clauderelays",
    singular = "clauderelay",
    shortname = "relay",
    shortname = "relays",
    category = "claude-relay",
    namespaced,
    status = "ClaudeRelayStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicasReady",
        description = "ready/desired proxy pods"
    ),
    printcolumn(name = "Regions", type_ = "integer", json_path = ".status.regionCount"),
    printcolumn(name = "Breakers", type_ = "string", json_path = ".status.breakerSummary"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The Service carries the relay's name, so it must be a DNS-1035 label.
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("name must be a DNS-1035 label (at most 63 characters, starting with a letter): it names the relay's Service")
)]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))")
    .message("set replicas or autoscaling, not both"))]
// Budgets are charged from the usage the proxy reads; the proxy refuses this
// too, but here `kubectl apply` says it at once.
#[x_kube(validation = Rule::new("!has(self.usage) || self.usage.enabled || self.clients.all(c, !has(c.quota) || (!has(c.quota.tokensPerMinute) && !has(c.quota.tokensPerDay) && !has(c.quota.usdPerDay) && !has(c.quota.usdPerMonth)))")
    .message("token and dollar budgets (clients[].quota.tokensPerMinute, tokensPerDay, usdPerDay, usdPerMonth) need usage.enabled"))]
// Without the default table, dollar budgets need prices of the relay's own.
#[x_kube(validation = Rule::new("!has(self.pricing) || self.pricing.includeDefaults || (has(self.pricing.models) && size(self.pricing.models) > 0) || self.clients.all(c, !has(c.quota) || (!has(c.quota.usdPerDay) && !has(c.quota.usdPerMonth)))")
    .message("dollar budgets (clients[].quota.usdPerDay, usdPerMonth) need prices: set pricing.models or pricing.includeDefaults"))]
#[serde(rename_all = "camelCase")]
pub struct ClaudeRelaySpec {
    /// Fixed number of proxy pods (default 2). Leave unset when `autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// A HorizontalPodAutoscaler owns the number of pods instead of `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Proxy image; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Resources of the proxy container; the operator's defaults when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling and metadata of the proxy pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodSettings>,
    /// Which UpstreamRegions of this namespace the relay uses.
    pub region_selector: LabelSelector,
    /// Routing by the client's country or continent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    /// Who may use the relay.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["id".into()]))]
    pub clients: Vec<RelayClient>,
    /// Circuit breaker per region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerSettings>,
    /// How a region's pool of API keys is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pool: Option<KeyPoolSettings>,
    /// Signed requests: how far a timestamp may be from the relay's clock, and
    /// what happens when Redis cannot check a nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySettings>,
    /// Default timeouts of the regions that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Shared state (nonces, breakers, rate limits). Without it each pod keeps its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConnection>,
    /// GeoIP database for routing by country or continent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geoip: Option<GeoIp>,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DownstreamTls>,
    /// The Service in front of the proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSettings>,
    /// What token quotas do while Redis is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    /// The response cache (off unless a client, a route or a request enables it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSettings>,
    /// Usage accounting: token counts per client, model and UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSettings>,
    /// Prices per model: the cost of answers (metrics, `/usage`) and
    /// dollar budgets. Unset: the operator's default table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<PricingSettings>,
    /// OpenTelemetry traces sent to an OTLP/HTTP collector (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<TracesSettings>,
}

/// A model name, or a prefix ending in `*`.
pub const MODEL_PATTERN: &str = r"^(\*|[A-Za-z0-9._:@-]{1,128}\*?)$";

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PricingSettings {
    /// Start from the operator's default table (the chart's
    /// `pricing.models`, with the date it was taken); an entry of `models`
    /// replaces the default with the same `match` (default true).
    #[serde(default = "default_true")]
    pub include_defaults: bool,
    /// Prices of this relay. An exact model name wins over patterns; among
    /// patterns, the longest prefix wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 500))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["match".into()]))]
    pub models: Option<Vec<ModelPricing>>,
}

impl Default for PricingSettings {
    fn default() -> Self {
        Self {
            include_defaults: true,
            models: None,
        }
    }
}

/// US dollars per million tokens of each kind, for the models `match` names.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelPricing {
    /// A model name (`claude-opus-4-1-20250805`) or a prefix ending in `*`
    /// (`claude-sonnet-4-*`).
    #[serde(rename = "match")]
    #[schemars(pattern(MODEL_PATTERN))]
    pub pattern: String,
    #[schemars(range(min = 0, max = 100000))]
    pub input_usd_per_mtok: f64,
    #[schemars(range(min = 0, max = 100000))]
    pub output_usd_per_mtok: f64,
    /// Prompt cache reads.
    #[schemars(range(min = 0, max = 100000))]
    pub cache_read_usd_per_mtok: f64,
    /// Prompt cache writes that live 5 minutes.
    #[schemars(range(min = 0, max = 100000))]
    pub cache_write_5m_usd_per_mtok: f64,
    /// Prompt cache writes that live 1 hour.
    #[schemars(range(min = 0, max = 100000))]
    pub cache_write_1h_usd_per_mtok: f64,
}

/// OpenTelemetry traces: a span per request and per upstream attempt.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracesSettings {
    /// The collector's OTLP/HTTP URL: a base (`http://otel-collector:4318`,
    /// `/v1/traces` is added) or the full traces URL. No credentials in it:
    /// give them in `headers`.
    #[schemars(pattern(COLLECTOR_URL_PATTERN))]
    pub endpoint: String,
    /// Share of requests without a sampled parent `traceparent` that are
    /// traced, 0 to 1 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: Option<f64>,
    /// Headers sent with every export (a collector's token), each value
    /// from a key of a Secret, mounted into the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    pub headers: Option<Vec<TraceHeader>>,
    /// `service.name` of the spans (default `claude-relay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_name: Option<String>,
    /// How often queued spans are sent (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_interval: Option<HumanDuration>,
    /// Spans held for the next export; past it new spans are dropped and
    /// counted (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_queue_spans: Option<i64>,
}

/// An http(s) URL without user info, query or fragment.
pub const COLLECTOR_URL_PATTERN: &str = r"^https?://[^/@?#]+(/[^?#]*)?$";

/// One header of the trace exports, its value from a Secret.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceHeader {
    /// The header's name, such as `authorization`.
    #[schemars(pattern(HEADER_NAME_PATTERN))]
    pub name: String,
    pub value_secret_ref: SecretKeyRef,
}

/// An HTTP header name (a token).
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageSettings {
    /// Read the token usage of every response for metrics, the daily
    /// counters and token budgets (default true). Off, token budgets
    /// (`clients[].quota.tokensPerMinute`, `tokensPerDay`) are refused.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long the per-client daily usage counters are kept in Redis
    /// (default 90d, at least 1d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<HumanDuration>,
}

impl Default for UsageSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSettings {
    /// While Redis is unreachable, quotas are not checked for this long
    /// (default 5m); after that each pod enforces them from what it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open_grace: Option<HumanDuration>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheSettings {
    /// Bytes of responses each pod keeps in memory (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub memory_bytes: Option<i64>,
    /// Largest response cached (default 1 MiB, at most 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_entry_bytes: Option<i64>,
    /// Entry lifetime unless a route says otherwise (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
    /// Keep entries in Redis too, shared by the pods (default true, when
    /// `redis` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<bool>,
    /// Per-model settings; the first route matching the request's model applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub routes: Option<Vec<CacheRoute>>,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheRoute {
    #[schemars(pattern(NAME_PATTERN))]
    pub name: String,
    /// Model names, or prefixes ending in `*`; empty: every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub models: Option<Vec<String>>,
    /// Cache these requests for every client.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
    /// One entry serves every client (otherwise entries are per client).
    #[serde(default)]
    pub shared: bool,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas")
    .message("maxReplicas must be at least minReplicas (default 2)"))]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation to aim for, percent of the request.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// Average requests in flight per pod to aim for; needs a custom metrics
    /// adapter serving the proxy's `claude_relay_in_flight_requests` metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_in_flight_per_pod: Option<i32>,
}

fn default_min_replicas() -> i32 {
    2
}
fn default_target_cpu() -> i32 {
    70
}

#[derive(JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// Checked in order; the first rule matching the client's country or continent wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub rules: Option<Vec<RouteRule>>,
    /// Regions, in order, for clients no rule matches; all selected regions by priority when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 50), inner(pattern(NAME_PATTERN)))]
    pub default_regions: Option<Vec<String>>,
    /// CIDRs of load balancers whose `X-Forwarded-For` is trusted for the client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub trusted_proxies: Option<Vec<String>>,
    /// Regions tried for one request at most: the first and its failovers (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<i32>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("(has(self.countries) && size(self.countries) > 0) || (has(self.continents) && size(self.continents) > 0)")
    .message("a rule needs at least one country or continent"))]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// ISO 3166-1 alpha-2 codes, such as `DE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 250), inner(pattern(COUNTRY_PATTERN)))]
    pub countries: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 7))]
    pub continents: Option<Vec<Continent>>,
    /// UpstreamRegion names, tried in this order.
    #[schemars(length(min = 1, max = 50), inner(pattern(NAME_PATTERN)))]
    pub regions: Vec<String>,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.relayKeySecretRef) || (has(self.signingSecretRefs) && size(self.signingSecretRefs) > 0)")
    .message("a client needs relayKeySecretRef or signingSecretRefs to authenticate"))]
#[serde(rename_all = "camelCase")]
pub struct RelayClient {
    /// Name in logs and metrics; never the key.
    #[schemars(pattern(NAME_PATTERN))]
    pub id: String,
    /// The relay key the client presents as `x-api-key` or bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_key_secret_ref: Option<SecretKeyRef>,
    /// HMAC signing secrets; several allow rotation with overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10))]
    pub signing_secret_refs: Option<Vec<SecretKeyRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Token budgets and a concurrency cap, shared by the pods through Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ClientQuota>,
    /// The response cache for this client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ClientCache>,
}

/// Input plus output tokens (cache writes included; cache reads when
/// `countCacheReads`) per UTC minute and day, US dollars (at `pricing`) per
/// UTC day and calendar month, and requests in flight.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.tokensPerMinute) || has(self.tokensPerDay) || has(self.usdPerDay) || has(self.usdPerMonth) || has(self.maxConcurrent)")
    .message("a quota needs tokensPerMinute, tokensPerDay, usdPerDay, usdPerMonth or maxConcurrent"))]
#[x_kube(validation = Rule::new("(!has(self.usdPerDay) || double(self.usdPerDay) > 0.0) && (!has(self.usdPerMonth) || double(self.usdPerMonth) > 0.0)")
    .message("usdPerDay and usdPerMonth must be greater than 0 (leave them unset for no limit)"))]
#[serde(rename_all = "camelCase")]
pub struct ClientQuota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_day: Option<i64>,
    /// US dollars per UTC day, at the relay's prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000000))]
    pub usd_per_day: Option<f64>,
    /// US dollars per UTC calendar month, at the relay's prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000000))]
    pub usd_per_month: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<i32>,
    #[serde(default)]
    pub count_cache_reads: bool,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCache {
    /// Cache this client's non-streaming Messages requests.
    pub enabled: bool,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub requests: i32,
    #[serde(default = "default_rate_period")]
    pub per: RatePeriod,
}

fn default_rate_period() -> RatePeriod {
    RatePeriod::Minute
}

#[derive(JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RatePeriod {
    Second,
    Minute,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakerSettings {
    /// Sliding window over which the failure rate is measured.
    #[serde(default = "default_breaker_window")]
    pub window: HumanDuration,
    /// Requests needed in the window before the breaker may open.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: i32,
    /// Failure rate, in percent, above which the breaker opens.
    #[serde(default = "default_failure_rate")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_percent: i32,
    /// How long an open breaker stays open before probing.
    #[serde(default = "default_open_for")]
    pub open_for: HumanDuration,
    /// Probe requests in flight at once, across all pods, while half-open.
    #[serde(default = "default_half_open_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: i32,
}

fn default_breaker_window() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_min_requests() -> i32 {
    10
}
fn default_failure_rate() -> i32 {
    50
}
fn default_open_for() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_half_open_probes() -> i32 {
    1
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyPoolSettings {
    #[serde(default)]
    pub strategy: KeyStrategy,
    /// Requests in flight at once on one API key, per pod; unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight_per_key: Option<i32>,
}

#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStrategy {
    /// Each key in turn.
    #[default]
    RoundRobin,
    /// The key with the fewest requests in flight on the pod.
    LeastInFlight,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySettings {
    /// Accepted distance between a signed request's timestamp and the relay's clock (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<HumanDuration>,
    /// Accept signed requests whose nonce cannot be checked while Redis is
    /// unreachable (default false: they get 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<bool>,
}

/// Where Redis is. Credentials belong in the URL held by a Secret, not in `url`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)")
    .message("set exactly one of url and urlSecretRef"))]
#[x_kube(validation = Rule::new("self.mode != 'Sentinel' || has(self.sentinelMasterName)")
    .message("mode Sentinel needs sentinelMasterName"))]
#[x_kube(validation = Rule::new("self.mode == 'Standalone' || has(self.url)")
    .message("modes Sentinel and Cluster list their hosts in url; put the password in passwordSecretRef"))]
#[serde(rename_all = "camelCase")]
pub struct RedisConnection {
    /// `redis://host:port[/db]` or `rediss://` for TLS; several hosts separated
    /// by commas for Sentinel or Cluster. No credentials here: use `urlSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^rediss?://[^@\s/]+(/[0-9]+)?$"))]
    pub url: Option<String>,
    /// A Secret key holding the whole URL, credentials included (Standalone only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    #[serde(default = "default_redis_mode")]
    pub mode: RedisMode,
    /// Name of the primary that the sentinels monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel_master_name: Option<String>,
    /// Password; overrides one in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

fn default_redis_mode() -> RedisMode {
    RedisMode::Standalone
}

#[derive(JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RedisMode {
    Standalone,
    Sentinel,
    Cluster,
}

/// The GeoIP database: a MaxMind `.mmdb` file on a volume.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("!has(self.updater) || has(self.source.emptyDir) || (has(self.source.persistentVolumeClaim) && !(has(self.source.persistentVolumeClaim.readOnly) && self.source.persistentVolumeClaim.readOnly))")
    .message("the updater writes the database: use an emptyDir or a writable persistentVolumeClaim"))]
#[x_kube(validation = Rule::new("!has(self.source.emptyDir) || has(self.updater)")
    .message("an emptyDir starts empty: set updater to fill it"))]
#[serde(rename_all = "camelCase")]
pub struct GeoIp {
    pub source: GeoIpSource,
    /// Path of the database inside the volume.
    #[serde(default = "default_geoip_file")]
    #[schemars(pattern(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$"))]
    pub file: String,
    /// A sidecar that keeps the file fresh (MaxMind's geoipupdate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updater: Option<GeoIpUpdater>,
}

fn default_geoip_file() -> String {
    "GeoLite2-Country.mmdb".into()
}

/// Exactly one volume source. ConfigMaps and Secrets are not offered: they stop at
/// 1 MiB and GeoLite2 Country is about 9 MB.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[x_kube(validation = Rule::new("(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.image) ? 1 : 0) + (has(self.csi) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) == 1")
    .message("set exactly one of persistentVolumeClaim, image, csi and emptyDir"))]
#[serde(rename_all = "camelCase")]
pub struct GeoIpSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// An OCI image holding the file (Kubernetes 1.33+ image volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
    /// Only with `updater`, which downloads the file at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeoIpUpdater {
    #[serde(default = "default_updater_image")]
    pub image: String,
    /// A Secret with keys `GEOIPUPDATE_ACCOUNT_ID` and `GEOIPUPDATE_LICENSE_KEY`.
    #[schemars(length(min = 1, max = 253))]
    pub account_secret_name: String,
    /// Space-separated MaxMind edition ids.
    #[serde(default = "default_edition_ids")]
    pub edition_ids: String,
    #[serde(default = "default_frequency_hours")]
    #[schemars(range(min = 1, max = 720))]
    pub frequency_hours: i32,
}

fn default_updater_image() -> String {
    "ghcr.io/maxmind/geoipupdate:v7.1.1".into()
}
fn default_edition_ids() -> String {
    "GeoLite2-Country".into()
}
fn default_frequency_hours() -> i32 {
    24
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DownstreamTls {
    /// A `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`), re-read when it changes.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSettings {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Service port; 443 with `tls`, else 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogSettings {
    /// `text` or `json` (default json, for log collectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
    /// A tracing filter such as `info` or `claude_relay_proxy=debug,info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// What the operator last saw of the relay; `kubectl get relays` prints it.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeRelayStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Proxy pods wanted.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_ready: Option<String>,
    /// Names of the selected UpstreamRegions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default)]
    pub region_count: i32,
    /// Breaker per region, as the proxies last published it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<RegionBreaker>,
    /// `us:closed eu:open`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_summary: Option<String>,
}

#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionBreaker {
    pub region: String,
    pub state: BreakerState,
    /// Failures over requests in the breaker window, 0 to 1, as the proxy wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<String>,
    /// Last transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Kind of the last failure: connect, timeout, status_5xx, status_529 or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
