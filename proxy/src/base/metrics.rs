//! Prometheus metrics of the proxy. Labels are low-cardinality: route
//! (a fixed set), status, region name, result. Never a key, never a client secret.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value shared without copying (region and client names).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
    pub upstream: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub upstream: Name,
    pub kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TokenLabels {
    pub client: Name,
    /// A bounded set of model names (see `usage::Accounting`).
    pub model: Name,
    /// input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens
    pub kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CostLabels {
    pub client: Name,
    /// A bounded set of model names, as for tokens.
    pub model: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: Name,
}

/// A counter of US dollars.
pub type CostCounter = Counter<f64, AtomicU64>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecodeLabels {
    /// gzip, deflate, br, zstd, or other (a coding the relay cannot read)
    pub encoding: &'static str,
    /// decoded, capped, error or unsupported
    pub result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QuotaLabels {
    pub client: Name,
    /// tokens_per_minute, tokens_per_day, usd_per_day, usd_per_month or max_concurrent
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransitionLabels {
    pub upstream: Name,
    pub from: &'static str,
    pub to: &'static str,
}

/// Every value of the `route` label.
pub const ROUTES: [&str; 6] = [
    "messages",
    "count_tokens",
    "batches",
    "models",
    "files",
    "other",
];

/// A map on the request path, keyed by label values and names: foldhash
/// instead of SipHash, whose cost showed per request.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub struct Metrics {
    registry: Registry,
    /// `requests` counters handed out, so a finished request finds its own
    /// without the family's lock and SipHash of the labels.
    request_counters: std::sync::Mutex<FastMap<RequestLabels, Counter>>,
    /// The duration histogram of each route, looked up once.
    route_durations: Vec<Histogram>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub upstream_ttfb: Family<UpstreamLabels, Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub in_flight: Gauge,
    /// Client connections holding a `server.max_connections` slot.
    pub client_connections: Gauge,
    pub pool_open: Family<UpstreamLabels, Gauge>,
    pub pool_idle: Family<UpstreamLabels, Gauge>,
    pub pool_in_use: Family<UpstreamLabels, Gauge>,
    pub pool_waiting: Family<UpstreamLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub auth_failures: Family<ResultLabels, Counter>,
    pub client_requests: Family<ClientLabels, Counter>,
    pub tls_cert_expiry_days: Gauge<f64, AtomicU64>,
    pub breaker_state: Family<UpstreamLabels, Gauge>,
    pub breaker_transitions: Family<TransitionLabels, Counter>,
    pub failovers: Family<UpstreamLabels, Counter>,
    pub key_retries: Family<UpstreamLabels, Counter>,
    pub key_cooldowns: Family<UpstreamLabels, Counter>,
    pub keys_disabled: Family<UpstreamLabels, Counter>,
    pub store_errors: Family<ResultLabels, Counter>,
    pub replay_unprotected: Counter,
    pub rate_limited: Family<ClientLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, CostCounter>,
    pub unpriced_answers: Family<ModelLabels, Counter>,
    pub usage_decodes: Family<DecodeLabels, Counter>,
    pub quota_rejected: Family<QuotaLabels, Counter>,
    pub quota_unchecked: Family<ResultLabels, Counter>,
    pub cache_requests: Family<ResultLabels, Counter>,
    pub cache_memory_bytes: Gauge,
    pub cache_memory_entries: Gauge,
    /// Trace spans by fate (`crate::trace`).
    pub trace_spans: Family<ResultLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0, 300.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("claude_relay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, status and upstream region",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "request_duration_seconds",
            "Time from request to the last byte of the response",
            request_duration.clone(),
        );
        let upstream_ttfb = Family::<UpstreamLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        registry.register(
            "upstream_time_to_first_byte_seconds",
            "Time from sending upstream to its response headers",
            upstream_ttfb.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream exchanges that failed, by kind (connect, connect_timeout, egress_proxy, timeout, body, idle_timeout)",
            upstream_errors.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being served, streams included",
            in_flight.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open on the API port (at most server.max_connections)",
            client_connections.clone(),
        );
        let pool_open = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_pool_open_connections",
            "Open connections to the upstream region",
            pool_open.clone(),
        );
        let pool_idle = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_pool_idle_connections",
            "Open connections not carrying a request (HTTP/1 view)",
            pool_idle.clone(),
        );
        let pool_in_use = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_pool_in_flight",
            "Requests in flight to the upstream region",
            pool_in_use.clone(),
        );
        let pool_waiting = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_pool_waiting",
            "Requests waiting because the region's max_in_flight is reached",
            pool_waiting.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (ok, failed, watch_error)",
            config_reloads.clone(),
        );
        let auth_failures = Family::<ResultLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by authentication, by reason",
            auth_failures.clone(),
        );
        let client_requests = Family::<ClientLabels, Counter>::default();
        registry.register(
            "client_requests",
            "Authenticated requests by client id",
            client_requests.clone(),
        );
        let tls_cert_expiry_days = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "tls_cert_expiry_days",
            "Days until the downstream TLS certificate expires (negative: expired)",
            tls_cert_expiry_days.clone(),
        );
        let store_errors = Family::<ResultLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Calls to the shared store that failed, by kind (unavailable, error)",
            store_errors.clone(),
        );
        let replay_unprotected = Counter::default();
        registry.register(
            "replay_unprotected",
            "Signed requests let through without the nonce check because the store was down and replay.fail_open is set",
            replay_unprotected.clone(),
        );
        let rate_limited = Family::<ClientLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by the client's rate limit",
            rate_limited.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens the upstream reported, by client, model and kind",
            tokens.clone(),
        );
        let cost = Family::<CostLabels, CostCounter>::default();
        registry.register(
            "cost_usd",
            "What answers cost in US dollars at the configured prices (pricing.models), by client and model",
            cost.clone(),
        );
        let unpriced_answers = Family::<ModelLabels, Counter>::default();
        registry.register(
            "unpriced_answers",
            "Answers whose model no pricing.models entry matches: their cost is unknown and not counted, by model",
            unpriced_answers.clone(),
        );
        let usage_decodes = Family::<DecodeLabels, Counter>::default();
        registry.register(
            "usage_decodes",
            "Compressed answers read for usage and the cache, by coding and result: decoded, capped (more than the relay inspects; the client got it all), error (did not decode; the client got it as sent), unsupported (a coding the relay cannot read)",
            usage_decodes.clone(),
        );
        let quota_rejected = Family::<QuotaLabels, Counter>::default();
        registry.register(
            "quota_rejected",
            "Requests refused by the client's quota, by reason",
            quota_rejected.clone(),
        );
        let quota_unchecked = Family::<ResultLabels, Counter>::default();
        registry.register(
            "quota_store_unavailable",
            "Quota checks the store could not answer: let through (fail_open, within quota.fail_open_grace) or decided by this replica alone (local)",
            quota_unchecked.clone(),
        );
        let cache_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Response cache events: hit_l1, hit_l2, miss, stored, too_large, l2_unavailable, l2_store_failed",
            cache_requests.clone(),
        );
        let cache_memory_bytes = Gauge::default();
        registry.register(
            "cache_memory_bytes",
            "Bytes of responses in the level-1 (process memory) cache",
            cache_memory_bytes.clone(),
        );
        let cache_memory_entries = Gauge::default();
        registry.register(
            "cache_memory_entries",
            "Responses in the level-1 (process memory) cache",
            cache_memory_entries.clone(),
        );
        let trace_spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Trace spans, by result (exported, dropped_queue_full, dropped_export_failed)",
            trace_spans.clone(),
        );
        let breaker_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker of the region as this replica sees it: 0 closed, 1 half open, 2 open",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "breaker_transitions",
            "Circuit breaker state changes seen by this replica, by region, from and to",
            breaker_transitions.clone(),
        );
        let failovers = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "failovers",
            "Requests moved on to the next region, by the region moved to",
            failovers.clone(),
        );
        let key_retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_key_retries",
            "Attempts moved on to another key of the same region after a key's 429, by region",
            key_retries.clone(),
        );
        let key_cooldowns = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_key_cooldowns",
            "Upstream keys put to rest after a 429, by region",
            key_cooldowns.clone(),
        );
        let keys_disabled = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_keys_disabled",
            "Upstream keys disabled after a 401 or 403 until the config changes, by region",
            keys_disabled.clone(),
        );
        let route_durations = ROUTES
            .iter()
            .map(|route| {
                request_duration
                    .get_or_create(&RouteLabels { route })
                    .clone()
            })
            .collect();
        // Counters an alert watches start at 0, so that their first increment
        // shows in `increase()` (a series born at 1 shows no increase).
        for result in ["ok", "failed", "watch_error"] {
            let _ = config_reloads.get_or_create(&ResultLabels { result });
        }
        for result in ["unavailable", "error"] {
            let _ = store_errors.get_or_create(&ResultLabels { result });
        }
        Self {
            registry,
            route_durations,
            request_counters: std::sync::Mutex::default(),
            requests,
            request_duration,
            upstream_ttfb,
            upstream_errors,
            in_flight,
            client_connections,
            pool_open,
            pool_idle,
            pool_in_use,
            pool_waiting,
            config_reloads,
            auth_failures,
            client_requests,
            tls_cert_expiry_days,
            breaker_state,
            breaker_transitions,
            failovers,
            key_retries,
            key_cooldowns,
            keys_disabled,
            store_errors,
            replay_unprotected,
            rate_limited,
            tokens,
            cost,
            unpriced_answers,
            usage_decodes,
            quota_rejected,
            quota_unchecked,
            cache_requests,
            cache_memory_bytes,
            cache_memory_entries,
            trace_spans,
        }
    }

    /// Counts an answered request.
    pub fn count_request(&self, route: &'static str, status: u16, upstream: &Name) {
        let labels = RequestLabels {
            route,
            status,
            upstream: upstream.clone(),
        };
        let mut counters = self
            .request_counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(counter) = counters.get(&labels) {
            counter.inc();
            return;
        }
        let counter = self.requests.get_or_create(&labels).clone();
        counter.inc();
        counters.insert(labels, counter);
    }

    pub fn route_duration(&self, route: &'static str) -> &Histogram {
        let i = ROUTES
            .iter()
            .position(|r| *r == route)
            .unwrap_or(ROUTES.len() - 1);
        &self.route_durations[i]
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}
