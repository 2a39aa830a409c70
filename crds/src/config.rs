//! The proxy configuration document.
//!
//! One YAML or JSON document that the proxy reads from a file (standalone) and
//! that the operator renders into a ConfigMap (in-cluster). Secrets are never
//! inline: every secret is a [`SecretSource`] that names a file or an
//! environment variable.
//!
//! Parsing (`parse_yaml`) rejects unknown fields and names the path of the bad
//! field; [`ProxyConfig::validate`] then checks what types cannot express.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// Default body limit: the Claude API's own request size limit.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Name of this relay, scoping its state in a shared store (the operator
    /// writes `namespace/name`).
    #[serde(default = "default_relay_name")]
    pub relay_name: String,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Who may use the relay. At least one.
    pub clients: Vec<ClientConfig>,
    /// Upstream regions. The relay sends to the one with the lowest `priority`
    /// value (ties: listed order).
    pub regions: Vec<RegionConfig>,
    /// Replay protection of signed requests.
    #[serde(default)]
    pub replay: ReplayConfig,
    /// Where nonces and rate-limit windows live. Absent: in memory, which is
    /// only correct for a single replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreConfig>,
    /// Which regions serve a request, by the client's country or continent.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// The circuit breaker of every region.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// How the upstream API keys of a region are used.
    #[serde(default)]
    pub key_pool: KeyPoolConfig,
    /// What happens to token quotas (`clients[].quota`) while the store is unreachable.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// Usage accounting: per client per day counters in the store.
    #[serde(default)]
    pub usage: UsageConfig,
    /// The response cache (off unless a client, a route or a request enables it).
    #[serde(default)]
    pub cache: CacheConfig,
    /// Prices per model: the cost of each answer, and budgets in dollars.
    #[serde(default, skip_serializing_if = "PricingConfig::is_empty")]
    pub pricing: PricingConfig,
    /// OpenTelemetry trace export over OTLP/HTTP. Absent: no spans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<TracesConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the API listener. A change needs a restart.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`). A change needs a restart.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long requests and streams in flight may run after SIGTERM.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Worker threads, each serving its share of connections start to end;
    /// 0 means one per core. A change needs a restart.
    #[serde(default)]
    pub workers: usize,
    /// How often the config file and the files it references are checked for changes.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: HumanDuration,
    /// Serve HTTPS instead of plain HTTP. Files are re-read when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DownstreamTls>,
    /// Longest wait for the next bytes of a request body; past it the
    /// client gets 408 and the connection closes.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: HumanDuration,
    /// Slowest average rate, in bytes per second, at which a request body
    /// may arrive once `body_read_timeout` has passed since its start (each
    /// `min_body_rate` bytes received earn one more second); slower gets
    /// 408 and the connection closes. 0: no minimum.
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: u64,
    /// Client connections served at once (API listener); more wait in the
    /// listen backlog until one closes. Absent: half the process's
    /// open-files limit, less a reserve, since every stream also holds an
    /// upstream connection. A change needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            max_body_bytes: default_max_body_bytes(),
            shutdown_grace: default_shutdown_grace(),
            workers: 0,
            reload_interval: default_reload_interval(),
            tls: None,
            body_read_timeout: default_body_read_timeout(),
            min_body_rate: default_min_body_rate(),
            max_connections: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownstreamTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter, such as `info` or `claude_relay_proxy=debug,info`.
    /// `RUST_LOG` wins when set. Read at start only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where a secret comes from. Written as `{file: /path}` or `{env: NAME}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    /// A file holding the secret (surrounding white space is trimmed), such as a mounted Secret.
    File(PathBuf),
    /// An environment variable holding the secret.
    Env(String),
}

/// A client's relay key: a secret source, or the hex SHA-256 of the key
/// (`{sha256: ...}`), which is not a secret and may stand in the config.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum RelayKeySource {
    File(PathBuf),
    Env(String),
    Sha256(String),
}

/// Reads `{kind: value}` with `kind` among `kinds`. Hand-written because
/// serde's own errors quote the offending value, and a value written where
/// a reference belongs is most likely the secret itself.
fn secret_reference<'de, D: serde::Deserializer<'de>>(
    d: D,
    kinds: &[&'static str],
) -> Result<(&'static str, String), D::Error> {
    let expected = || {
        let forms: Vec<String> = kinds.iter().map(|k| format!("{{{k}: ...}}")).collect();
        serde::de::Error::custom(format!(
            "expected one of {}; a secret is never written inline",
            forms.join(", ")
        ))
    };
    let value = serde_json::Value::deserialize(d).map_err(|_| expected())?;
    let serde_json::Value::Object(map) = value else {
        return Err(expected());
    };
    let mut entries = map.into_iter();
    match (entries.next(), entries.next()) {
        (Some((key, serde_json::Value::String(text))), None) => kinds
            .iter()
            .find(|k| **k == key)
            .map(|k| (*k, text))
            .ok_or_else(expected),
        _ => Err(expected()),
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match secret_reference(d, &["file", "env"])? {
            ("file", path) => SecretSource::File(path.into()),
            (_, name) => SecretSource::Env(name),
        })
    }
}

impl<'de> Deserialize<'de> for RelayKeySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match secret_reference(d, &["file", "env", "sha256"])? {
            ("file", path) => RelayKeySource::File(path.into()),
            ("env", name) => RelayKeySource::Env(name),
            (_, hex) => RelayKeySource::Sha256(hex),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Name used in logs and metrics; never the key.
    pub id: String,
    /// Relay keys this client may present as `x-api-key` or `Authorization: Bearer`.
    /// Several keys allow rotation with overlap.
    #[serde(default)]
    pub relay_keys: Vec<RelayKeySource>,
    /// Methods this client may use. Empty (the default): `relay_key` when it
    /// has relay keys, `signature` when it has signing secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth: Vec<AuthMethod>,
    /// HMAC secrets for signed requests (docs/signing.md); the key id on the
    /// wire is `id`. Several are all valid at once, for rotation with overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_secrets: Vec<SecretSource>,
    /// Requests per period for this client, shared by all replicas through the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Token budgets and a concurrency cap, shared by all replicas through the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<ClientQuota>,
    /// The response cache for this client's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ClientCache>,
}

/// A client's token budgets (input plus output tokens, cache writes
/// included; cache reads when `count_cache_reads`), budgets in US dollars
/// (the cost of its answers, from `pricing`) and concurrency cap.
/// Absent or 0: no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientQuota {
    /// Tokens per calendar minute (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per calendar day (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// US dollars per calendar day (UTC), priced by `pricing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_day: Option<f64>,
    /// US dollars per calendar month (UTC), priced by `pricing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_month: Option<f64>,
    /// Requests in flight at once, streams included, across replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Whether `cache_read_input_tokens` count against the budgets.
    #[serde(default)]
    pub count_cache_reads: bool,
}

impl ClientQuota {
    /// Whether anything is limited at all.
    pub fn is_active(&self) -> bool {
        self.has_token_budget()
            || self.has_usd_budget()
            || self.max_concurrent.is_some_and(|n| n > 0)
    }

    /// Whether tokens are limited, which needs the usage of responses.
    pub fn has_token_budget(&self) -> bool {
        self.tokens_per_minute.is_some_and(|n| n > 0) || self.tokens_per_day.is_some_and(|n| n > 0)
    }

    /// Whether spending is limited, which needs usage and prices.
    pub fn has_usd_budget(&self) -> bool {
        self.usd_per_day.is_some_and(|n| n > 0.0) || self.usd_per_month.is_some_and(|n| n > 0.0)
    }
}

/// Prices of the models in US dollars per million tokens, from which the
/// relay computes the cost of every answer. A model that no entry matches
/// is counted as unpriced, never guessed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// When the prices were taken (`YYYY-MM-DD`), for the reader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
    /// An exact model name wins over patterns; among patterns, the longest
    /// prefix wins, so the order of the list does not matter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelPrice>,
}

impl PricingConfig {
    /// No prices: every answer is unpriced.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// What is wrong with the table, by path (`pricing.models[0].match`):
    /// patterns well formed and unique, prices ones the relay keeps exactly.
    pub fn problems(&self) -> Vec<(String, &'static str)> {
        let mut problems = Vec::new();
        let mut patterns = HashSet::new();
        for (m, price) in self.models.iter().enumerate() {
            if !is_model_pattern(&price.pattern) {
                problems.push((
                    format!("pricing.models[{m}].match"),
                    "a model name, or a prefix ending in '*' (letters, digits, '-', '.', '_', ':', '@'; '*' only at the end)",
                ));
            }
            if !patterns.insert(price.pattern.as_str()) {
                problems.push((
                    format!("pricing.models[{m}].match"),
                    "duplicate pattern: each model pattern is priced once",
                ));
            }
            for (field, usd) in price.prices() {
                if nano_usd_per_token(usd).is_none() {
                    problems.push((
                        format!("pricing.models[{m}].{field}"),
                        "must be a price from 0 to 100000 US dollars per million tokens, in steps of 0.001",
                    ));
                }
            }
        }
        if let Some(as_of) = &self.as_of
            && !is_date(as_of)
        {
            problems.push(("pricing.as_of".into(), "must be a date, YYYY-MM-DD"));
        }
        problems
    }

    /// `overrides` on top of this table: an entry of `overrides` replaces
    /// the one with the same `match`, others are added.
    pub fn overridden_by(&self, overrides: &[ModelPrice]) -> Self {
        let mut models: Vec<ModelPrice> = self
            .models
            .iter()
            .filter(|m| !overrides.iter().any(|o| o.pattern == m.pattern))
            .cloned()
            .collect();
        models.extend(overrides.iter().cloned());
        Self {
            as_of: self.as_of.clone(),
            models,
        }
    }
}

/// The prices of one model, or of the models a pattern matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// A model name (`claude-opus-4-1-20250805`) or a prefix ending in `*`
    /// (`claude-sonnet-4-*`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Input tokens, not cached.
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    /// Input tokens read from the prompt cache (`cache_read_input_tokens`).
    pub cache_read_usd_per_mtok: f64,
    /// Input tokens written to the cache for 5 minutes
    /// (`cache_creation.ephemeral_5m_input_tokens`; all of
    /// `cache_creation_input_tokens` when the answer does not split them).
    pub cache_write_5m_usd_per_mtok: f64,
    /// Input tokens written to the cache for 1 hour
    /// (`cache_creation.ephemeral_1h_input_tokens`).
    pub cache_write_1h_usd_per_mtok: f64,
}

impl ModelPrice {
    /// The five prices with their field names, in the order of the fields.
    pub fn prices(&self) -> [(&'static str, f64); 5] {
        [
            ("input_usd_per_mtok", self.input_usd_per_mtok),
            ("output_usd_per_mtok", self.output_usd_per_mtok),
            ("cache_read_usd_per_mtok", self.cache_read_usd_per_mtok),
            (
                "cache_write_5m_usd_per_mtok",
                self.cache_write_5m_usd_per_mtok,
            ),
            (
                "cache_write_1h_usd_per_mtok",
                self.cache_write_1h_usd_per_mtok,
            ),
        ]
    }

    /// Whether `model` is this entry's name, or starts with its prefix.
    pub fn matches(&self, model: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => model == self.pattern,
        }
    }
}

/// The largest price accepted, US dollars per million tokens: far above any
/// model's, low enough that a cost in nano-dollars cannot overflow.
pub const MAX_USD_PER_MTOK: f64 = 100_000.0;
/// The largest dollar budget accepted (per day or month).
pub const MAX_USD_BUDGET: f64 = 1_000_000_000.0;

/// A price in nano-dollars per token, when it is one the relay keeps
/// exactly: finite, 0 to [`MAX_USD_PER_MTOK`], in steps of $0.001 per
/// million tokens (one nano-dollar per token).
pub fn nano_usd_per_token(usd_per_mtok: f64) -> Option<u64> {
    if !usd_per_mtok.is_finite() || !(0.0..=MAX_USD_PER_MTOK).contains(&usd_per_mtok) {
        return None;
    }
    let nanos = usd_per_mtok * 1000.0;
    let rounded = nanos.round();
    ((nanos - rounded).abs() < 1e-6).then_some(rounded as u64)
}

/// A dollar amount in nano-dollars (budgets): `None` when negative, not
/// finite or above [`MAX_USD_BUDGET`].
pub fn nano_usd(usd: f64) -> Option<u64> {
    (usd.is_finite() && (0.0..=MAX_USD_BUDGET).contains(&usd)).then(|| (usd * 1e9).round() as u64)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientCache {
    /// Cache this client's cacheable requests (non-streaming `POST /v1/messages`).
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// While the store is unreachable, quotas are not checked for this long
    /// (logged and counted); after that each replica enforces them on its
    /// own, from what it saw itself. Traffic is never blocked by the outage.
    #[serde(default = "default_quota_fail_open_grace")]
    pub fail_open_grace: HumanDuration,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            fail_open_grace: default_quota_fail_open_grace(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Read the usage of responses (metrics, counters, token quotas). Off
    /// only to measure what it costs; token budgets need it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long the per client per day counters are kept in the store.
    #[serde(default = "default_usage_retention")]
    pub retention: HumanDuration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: default_usage_retention(),
        }
    }
}

/// Exact-match cache of non-streaming `POST /v1/messages` answers: level 1
/// in process memory, level 2 in the Redis store (when there is one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of responses the process keeps (level 1); the oldest go first.
    #[serde(default = "default_cache_memory_bytes")]
    pub memory_bytes: u64,
    /// Largest response stored; larger ones are relayed but not cached.
    #[serde(default = "default_cache_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// How long an entry lives, unless its route says otherwise.
    #[serde(default = "default_cache_ttl")]
    pub ttl: HumanDuration,
    /// Whether level 2 (Redis) is used when the store is Redis.
    #[serde(default = "default_true")]
    pub redis: bool,
    /// Per-model settings; the first route whose `models` match the
    /// request's model applies. A change of a route empties its entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<CacheRoute>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            memory_bytes: default_cache_memory_bytes(),
            max_entry_bytes: default_cache_max_entry_bytes(),
            ttl: default_cache_ttl(),
            redis: true,
            routes: Vec::new(),
        }
    }
}

/// OpenTelemetry traces: a span per request and per upstream attempt,
/// sent in batches to an OTLP/HTTP collector (JSON encoding).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP URL: a base (`http://collector:4318`, to
    /// which `/v1/traces` is added) or the full traces URL.
    pub endpoint: String,
    /// Share of requests without a sampled parent that are traced, 0 to 1.
    /// A client's `traceparent` decides for its own requests.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// Headers sent with every export (such as the collector's token),
    /// each value from a secret: `{file: /path}` or `{env: NAME}`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, SecretSource>,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How often the spans queued are sent.
    #[serde(default = "default_export_interval")]
    pub export_interval: HumanDuration,
    /// Spans held for the next export; past it, new spans are dropped
    /// (and counted), never waited for.
    #[serde(default = "default_max_queue_spans")]
    pub max_queue_spans: usize,
}

fn default_sampling_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "claude-relay".into()
}
fn default_export_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_max_queue_spans() -> usize {
    4096
}

impl TracesConfig {
    /// What is wrong, as (path below `traces`, message) pairs.
    fn problems(&self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        if let Err(why) = check_collector_url(&self.endpoint) {
            out.push(("endpoint".into(), why));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            out.push(("sampling_ratio".into(), "must be between 0 and 1"));
        }
        for name in self.headers.keys() {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                out.push((format!("headers.{name}"), "not a valid HTTP header name"));
            }
        }
        if self.service_name.is_empty() {
            out.push(("service_name".into(), "must not be empty"));
        }
        if self.export_interval.is_zero() {
            out.push(("export_interval".into(), "must be greater than 0"));
        }
        if self.max_queue_spans == 0 {
            out.push(("max_queue_spans".into(), "must be greater than 0"));
        }
        out
    }
}

/// An OTLP/HTTP collector URL: http or https, a host, no credentials in it
/// (those go in `headers`, from a secret).
pub fn check_collector_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err("must name a host");
    }
    if authority.contains('@') {
        return Err("must not carry credentials; give them in traces.headers from a secret");
    }
    if url.contains(['?', '#']) {
        return Err("must not have a query or fragment");
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheRoute {
    /// Name in metrics and logs.
    pub name: String,
    /// Model names or prefixes ending in `*` (`claude-haiku-*`); empty: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Cache these requests for every client (a client's own `cache.enabled` also turns it on).
    #[serde(default)]
    pub enabled: bool,
    /// Entry lifetime for this route; absent: `cache.ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<HumanDuration>,
    /// One entry serves every client (otherwise entries are per client).
    #[serde(default)]
    pub shared: bool,
}

impl CacheRoute {
    pub fn matches(&self, model: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|m| match m.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => model == m,
            })
    }
}

impl ClientConfig {
    /// Whether the client may authenticate with `method` (explicit `auth`, or
    /// the default derived from which credentials it has).
    pub fn allows(&self, method: AuthMethod) -> bool {
        if !self.auth.is_empty() {
            return self.auth.contains(&method);
        }
        match method {
            AuthMethod::RelayKey => !self.relay_keys.is_empty(),
            AuthMethod::Signature => !self.signing_secrets.is_empty(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `x-api-key` or `Authorization: Bearer` with one of `relay_keys`.
    RelayKey,
    /// HMAC-SHA256 signed request with one of `signing_secrets`.
    Signature,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per period; more get 429 with `retry-after`.
    pub requests: u32,
    pub per: RatePeriod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RatePeriod {
    Second,
    Minute,
}

impl RatePeriod {
    pub fn duration(self) -> std::time::Duration {
        match self {
            RatePeriod::Second => std::time::Duration::from_secs(1),
            RatePeriod::Minute => std::time::Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Short name, used in metrics and logs (`us`, `eu-gateway`).
    pub name: String,
    /// `https://api.anthropic.com`, or a gateway, optionally with a path prefix.
    pub base_url: String,
    /// Lower is preferred.
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The upstream API keys of this region, used in turn.
    pub api_keys: Vec<SecretSource>,
    #[serde(default)]
    pub tls: UpstreamTls,
    #[serde(default)]
    pub timeouts: UpstreamTimeouts,
    #[serde(default)]
    pub pool: PoolConfig,
    /// Leave through this HTTP proxy (a CONNECT tunnel per upstream
    /// connection), so that regions can leave from different addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<EgressProxyConfig>,
}

/// An HTTP proxy that opens tunnels with `CONNECT host:port`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressProxyConfig {
    /// `http://host:port` (port 80 when left out). TLS to the upstream runs
    /// inside the tunnel; the hop to the proxy itself is plain TCP.
    pub url: String,
    /// `user:password`, sent as `Proxy-Authorization: Basic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_from: Option<SecretSource>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Extra PEM CA certificates trusted besides the webpki roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// TCP (and TLS) connect.
    #[serde(default = "default_connect_timeout")]
    pub connect: HumanDuration,
    /// From sending the request until the response headers. A non-streaming
    /// Messages call only answers when the whole generation is done, so this is long.
    #[serde(default = "default_response_headers_timeout")]
    pub response_headers: HumanDuration,
    /// Longest silence between two chunks of a response body.
    #[serde(default = "default_idle_timeout")]
    pub idle: HumanDuration,
    /// Cap on the whole exchange, body included.
    #[serde(default = "default_total_timeout")]
    pub total: HumanDuration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            response_headers: default_response_headers_timeout(),
            idle: default_idle_timeout(),
            total: default_total_timeout(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Idle keep-alive connections kept open per upstream host.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_host: usize,
    /// Idle connections are closed after this long.
    #[serde(default = "default_pool_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Requests in flight to this region at once; more wait (and show as
    /// `waiting` in the pool metrics).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle_per_host: default_max_idle(),
            idle_timeout: default_pool_idle_timeout(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// A signed request's timestamp may differ from the relay's clock by at
    /// most this much, either way. Nonces are remembered for twice as long.
    #[serde(default = "default_replay_window")]
    pub window: HumanDuration,
    /// When the store is unreachable, accept signed requests without the nonce
    /// check (logged loudly) instead of answering 503.
    #[serde(default)]
    pub fail_open: bool,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            window: default_replay_window(),
            fail_open: false,
        }
    }
}

/// The shared store, written `{memory: {...}}` or `{redis: {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// In this process only: correct for one replica.
    Memory(MemoryStoreConfig),
    /// Shared by every replica. Boxed: it is much larger than the memory variant.
    Redis(Box<RedisStoreConfig>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryStoreConfig {
    /// Nonces remembered at once; when full, signed requests get 503 rather
    /// than a nonce being forgotten early (which would allow a replay).
    #[serde(default = "default_memory_max_entries")]
    pub max_entries: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        Self {
            max_entries: default_memory_max_entries(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisStoreConfig {
    #[serde(default)]
    pub mode: RedisMode,
    /// `redis://host:port/db` or `rediss://...` (TLS), without credentials.
    /// Standalone mode only; exactly one of `url` and `url_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The URL from a secret, when it carries credentials. Standalone mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// Required in sentinel mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<RedisSentinelConfig>,
    /// Required in cluster mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RedisClusterConfig>,
    /// ACL user name; overrides one in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password; overrides one in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_from: Option<SecretSource>,
    #[serde(default)]
    pub tls: RedisTlsConfig,
    /// Connections kept open and shared; commands are spread over them.
    /// Each proxy worker thread also keeps one connection of its own for
    /// the commands of its requests.
    #[serde(default = "default_redis_pool_size")]
    pub pool_size: usize,
    /// Several commands in flight on one connection: the commands of a
    /// worker's concurrent requests go out together and Redis reads them
    /// at once. `false` keeps one command at a time on each connection
    /// (concurrent requests wait for each other's round trip), only to
    /// measure what pipelining gains or to rule it out when diagnosing.
    #[serde(default = "default_true")]
    pub pipeline: bool,
    /// TCP (and TLS) connect.
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Bound on every command, so a Redis outage fails requests fast instead of hanging them.
    #[serde(default = "default_redis_command_timeout")]
    pub command_timeout: HumanDuration,
    #[serde(default)]
    pub reconnect: RedisReconnectConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    #[default]
    Standalone,
    Sentinel,
    Cluster,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSentinelConfig {
    /// Name of the monitored primary (`mymaster`).
    pub service_name: String,
    /// Sentinels as `host:port`.
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisClusterConfig {
    /// Some cluster nodes as `host:port`; the rest are discovered.
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsConfig {
    /// Connect with TLS (also implied by a `rediss://` URL).
    #[serde(default)]
    pub enabled: bool,
    /// Extra PEM CA certificates trusted besides the webpki roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisReconnectConfig {
    /// First delay after a lost connection; doubled on each failed attempt.
    #[serde(default = "default_reconnect_min_delay")]
    pub min_delay: HumanDuration,
    /// Cap on the delay between attempts. Attempts never stop.
    #[serde(default = "default_reconnect_max_delay")]
    pub max_delay: HumanDuration,
}

impl Default for RedisReconnectConfig {
    fn default() -> Self {
        Self {
            min_delay: default_reconnect_min_delay(),
            max_delay: default_reconnect_max_delay(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// A MaxMind DB (GeoIP2/GeoLite2 Country or City) file; re-read when it
    /// changes. Absent, or unreadable: every request takes `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geoip_db: Option<PathBuf>,
    /// Peers (CIDRs such as `10.0.0.0/8`) whose `X-Forwarded-For` or
    /// `Forwarded` header names the client; from any other peer it is ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// The first rule matching the client's country or continent gives the
    /// regions to try, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RouteRule>,
    /// Regions to try when no rule matches. Empty: every region by priority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default: Vec<String>,
    /// Regions tried for one request at most (the first and the failovers).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            geoip_db: None,
            trusted_proxies: Vec::new(),
            rules: Vec::new(),
            default: Vec::new(),
            max_attempts: default_max_attempts(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// ISO 3166-1 alpha-2 codes (`DE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub countries: Vec<String>,
    /// MaxMind continent codes (`EU`, `NA`, `AS`, `SA`, `AF`, `OC`, `AN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub continents: Vec<String>,
    /// Region names, tried in this order.
    pub regions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// The sliding window over which the failure rate is measured.
    #[serde(default = "default_breaker_window")]
    pub window: HumanDuration,
    /// Requests the window must hold before the breaker may open.
    #[serde(default = "default_breaker_min_requests")]
    pub min_requests: u32,
    /// The breaker opens when failures / requests exceeds this (0 to 1).
    #[serde(default = "default_breaker_failure_rate")]
    pub failure_rate: f64,
    /// How long an open breaker refuses requests before probing (longer when
    /// the upstream's `retry-after` asks for it).
    #[serde(default = "default_breaker_open_for")]
    pub open_for: HumanDuration,
    /// Probe requests let through at once when half open, across all replicas.
    #[serde(default = "default_breaker_half_open_probes")]
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: default_breaker_window(),
            min_requests: default_breaker_min_requests(),
            failure_rate: default_breaker_failure_rate(),
            open_for: default_breaker_open_for(),
            half_open_probes: default_breaker_half_open_probes(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPoolConfig {
    #[serde(default)]
    pub strategy: KeyStrategy,
    /// Requests in flight at once on one upstream key; absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_key: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    /// Each key in turn.
    #[default]
    RoundRobin,
    /// The key with the fewest requests in flight on this replica.
    LeastInFlight,
}

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a
/// block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: std::net::IpAddr = addr.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
            None => max,
        };
        (prefix <= max).then_some(Self { network, prefix })
    }

    /// Whether `addr` is inside; an IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        let bits = |a: std::net::IpAddr| -> (u128, u8) {
            match a.to_canonical() {
                std::net::IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
                std::net::IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let (net, net_width) = bits(self.network);
        let (addr, addr_width) = bits(addr);
        if net_width != addr_width {
            return false;
        }
        // Both sit in the top bits; a /0 would shift by 128, which checked_shl turns into 0.
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        net & mask == addr & mask
    }
}

const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

fn default_max_attempts() -> u32 {
    3
}
fn default_breaker_window() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_breaker_min_requests() -> u32 {
    10
}
fn default_breaker_failure_rate() -> f64 {
    0.5
}
fn default_breaker_open_for() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_breaker_half_open_probes() -> u32 {
    1
}

fn default_quota_fail_open_grace() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_usage_retention() -> HumanDuration {
    HumanDuration::from_secs(90 * 86_400)
}
fn default_cache_memory_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_cache_max_entry_bytes() -> u64 {
    1024 * 1024
}
fn default_cache_ttl() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_true() -> bool {
    true
}

fn default_replay_window() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_memory_max_entries() -> usize {
    1_000_000
}
fn default_redis_pool_size() -> usize {
    4
}
fn default_redis_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_redis_command_timeout() -> HumanDuration {
    HumanDuration::from_millis(250)
}
fn default_reconnect_min_delay() -> HumanDuration {
    HumanDuration::from_millis(100)
}
fn default_reconnect_max_delay() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_relay_name() -> String {
    "standalone".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_body_read_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_min_body_rate() -> u64 {
    1024
}
fn default_reload_interval() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_weight() -> u32 {
    1
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_response_headers_timeout() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_total_timeout() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_max_idle() -> usize {
    64
}
fn default_pool_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(90)
}
fn default_max_in_flight() -> usize {
    4096
}

/// A config document that cannot be used, with the path of the bad field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl ProxyConfig {
    /// Parses YAML (and so JSON) with unknown fields rejected; the error names
    /// the path of the offending field.
    pub fn parse_yaml(text: &str) -> Result<Self, ConfigError> {
        // Through a JSON value: YAML's own enum encoding wants `!tags`, while
        // people (and the operator's JSON) write `{file: /path}`.
        let value: serde_json::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                path: "(document)".into(),
                message: e.to_string(),
            })?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            ConfigError::Parse {
                path: if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                message,
            }
        })
    }

    /// Parses and validates.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: names unique and well formed, URLs,
    /// non-empty lists, positive durations. Collects every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |path: String, message: &str| problems.push(format!("{path}: {message}"));

        if self.server.max_body_bytes == 0 {
            bad("server.max_body_bytes".into(), "must be greater than 0");
        }
        if self.server.reload_interval.is_zero() {
            bad("server.reload_interval".into(), "must be greater than 0");
        }
        if self.server.body_read_timeout.is_zero() {
            bad("server.body_read_timeout".into(), "must be greater than 0");
        }
        if self.server.max_connections == Some(0) {
            bad("server.max_connections".into(), "must be greater than 0");
        }
        if self.clients.is_empty() {
            bad("clients".into(), "at least one client is required");
        }
        let mut ids = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            if !is_name(&client.id) {
                bad(
                    format!("clients[{i}].id"),
                    "must be 1-63 characters of a-z, A-Z, 0-9, '-', '_' or '.'",
                );
            }
            if !ids.insert(client.id.as_str()) {
                bad(format!("clients[{i}].id"), "duplicate client id");
            }
            if client.relay_keys.is_empty() && client.signing_secrets.is_empty() {
                bad(
                    format!("clients[{i}].relay_keys"),
                    "the client has no way to authenticate: give at least one relay key or signing secret",
                );
            }
            for (k, key) in client.relay_keys.iter().enumerate() {
                if let RelayKeySource::Sha256(hex) = key
                    && (hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    bad(
                        format!("clients[{i}].relay_keys[{k}].sha256"),
                        "must be 64 hex digits",
                    );
                }
            }
        }

        if self.regions.is_empty() {
            bad("regions".into(), "at least one region is required");
        }
        let mut names = HashSet::new();
        for (i, region) in self.regions.iter().enumerate() {
            if !is_name(&region.name) {
                bad(
                    format!("regions[{i}].name"),
                    "must be 1-63 characters of a-z, A-Z, 0-9, '-', '_' or '.'",
                );
            }
            if !names.insert(region.name.as_str()) {
                bad(format!("regions[{i}].name"), "duplicate region name");
            }
            if let Err(why) = check_base_url(&region.base_url) {
                bad(format!("regions[{i}].base_url"), why);
            }
            if region.api_keys.is_empty() {
                bad(
                    format!("regions[{i}].api_keys"),
                    "at least one upstream API key is required",
                );
            }
            let t = &region.timeouts;
            for (field, value) in [
                ("connect", t.connect),
                ("response_headers", t.response_headers),
                ("idle", t.idle),
                ("total", t.total),
            ] {
                if value.is_zero() {
                    bad(
                        format!("regions[{i}].timeouts.{field}"),
                        "must be greater than 0",
                    );
                }
            }
            if region.pool.max_in_flight == 0 {
                bad(
                    format!("regions[{i}].pool.max_in_flight"),
                    "must be greater than 0",
                );
            }
            if let Some(proxy) = &region.egress_proxy
                && let Err(why) = check_egress_proxy_url(&proxy.url)
            {
                bad(format!("regions[{i}].egress_proxy.url"), why);
            }
        }

        self.validate_signing_and_store(&mut problems);
        self.validate_routing(&mut problems);
        if let Some(traces) = &self.traces {
            for (path, message) in traces.problems() {
                problems.push(format!("traces.{path}: {message}"));
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The checks of client auth methods, rate limits, replay and store.
    fn validate_signing_and_store(&self, problems: &mut Vec<String>) {
        let mut bad = |path: String, message: &str| problems.push(format!("{path}: {message}"));
        for (i, client) in self.clients.iter().enumerate() {
            let mut seen = HashSet::new();
            for (m, method) in client.auth.iter().enumerate() {
                if !seen.insert(method) {
                    bad(format!("clients[{i}].auth[{m}]"), "duplicate method");
                }
            }
            if client.auth.contains(&AuthMethod::RelayKey) && client.relay_keys.is_empty() {
                bad(
                    format!("clients[{i}].auth"),
                    "allows relay_key but the client has no relay_keys",
                );
            }
            if client.auth.contains(&AuthMethod::Signature) && client.signing_secrets.is_empty() {
                bad(
                    format!("clients[{i}].auth"),
                    "allows signature but the client has no signing_secrets",
                );
            }
            if client.rate_limit.is_some_and(|r| r.requests == 0) {
                bad(
                    format!("clients[{i}].rate_limit.requests"),
                    "must be greater than 0",
                );
            }
            if !self.usage.enabled && client.quota.is_some_and(|q| q.has_token_budget()) {
                bad(
                    format!("clients[{i}].quota"),
                    "token budgets need usage.enabled",
                );
            }
            if !self.usage.enabled && client.quota.is_some_and(|q| q.has_usd_budget()) {
                bad(
                    format!("clients[{i}].quota"),
                    "dollar budgets need usage.enabled",
                );
            }
            if self.pricing.models.is_empty() && client.quota.is_some_and(|q| q.has_usd_budget()) {
                bad(
                    format!("clients[{i}].quota"),
                    "dollar budgets need prices: give pricing.models",
                );
            }
            if let Some(quota) = &client.quota {
                for (field, usd) in [
                    ("usd_per_day", quota.usd_per_day),
                    ("usd_per_month", quota.usd_per_month),
                ] {
                    if usd.is_some_and(|usd| nano_usd(usd).is_none()) {
                        bad(
                            format!("clients[{i}].quota.{field}"),
                            "must be a number of US dollars from 0 to 1000000000",
                        );
                    }
                }
            }
            if client.quota.is_some_and(|q| !q.is_active()) {
                bad(
                    format!("clients[{i}].quota"),
                    "sets no limit: give tokens_per_minute, tokens_per_day, usd_per_day, usd_per_month or max_concurrent",
                );
            }
        }
        if *self.usage.retention < std::time::Duration::from_secs(86_400) {
            bad("usage.retention".into(), "must be at least 1d");
        }
        let cache = &self.cache;
        if cache.max_entry_bytes == 0 || cache.max_entry_bytes > 64 * 1024 * 1024 {
            bad(
                "cache.max_entry_bytes".into(),
                "must be between 1 and 64 MiB",
            );
        }
        if cache.ttl.is_zero() {
            bad("cache.ttl".into(), "must be greater than 0");
        }
        let mut routes = HashSet::new();
        for (r, route) in cache.routes.iter().enumerate() {
            if !is_name(&route.name) {
                bad(
                    format!("cache.routes[{r}].name"),
                    "must be 1-63 characters of a-z, A-Z, 0-9, '-', '_' or '.'",
                );
            }
            if !routes.insert(route.name.as_str()) {
                bad(format!("cache.routes[{r}].name"), "duplicate route name");
            }
            if route.ttl.is_some_and(|t| t.is_zero()) {
                bad(format!("cache.routes[{r}].ttl"), "must be greater than 0");
            }
            for (m, model) in route.models.iter().enumerate() {
                if model.is_empty() || model[..model.len() - 1].contains('*') {
                    bad(
                        format!("cache.routes[{r}].models[{m}]"),
                        "a model name, or a prefix ending in '*'",
                    );
                }
            }
        }

        for (path, problem) in self.pricing.problems() {
            bad(path, problem);
        }

        let window = *self.replay.window;
        if window < std::time::Duration::from_secs(1)
            || window > std::time::Duration::from_secs(3600)
        {
            bad("replay.window".into(), "must be between 1s and 1h");
        }

        match &self.store {
            None => {}
            Some(StoreConfig::Memory(memory)) if memory.max_entries == 0 => {
                bad("store.memory.max_entries".into(), "must be greater than 0");
            }
            Some(StoreConfig::Memory(_)) => {}
            Some(StoreConfig::Redis(redis)) => {
                for (path, problem) in redis.problems() {
                    bad(format!("store.redis.{path}"), problem);
                }
            }
        }
    }

    /// The checks of routing rules, breaker and key pool settings.
    fn validate_routing(&self, problems: &mut Vec<String>) {
        let mut bad = |path: String, message: &str| problems.push(format!("{path}: {message}"));
        let known: HashSet<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
        let check_names = |path: String, names: &[String], bad: &mut dyn FnMut(String, &str)| {
            let mut seen = HashSet::new();
            for (n, name) in names.iter().enumerate() {
                if !known.contains(name.as_str()) {
                    bad(
                        format!("{path}[{n}]"),
                        &format!("no region is named {name:?}"),
                    );
                } else if !seen.insert(name.as_str()) {
                    bad(format!("{path}[{n}]"), "region listed twice");
                }
            }
        };
        let routing = &self.routing;
        for (i, cidr) in routing.trusted_proxies.iter().enumerate() {
            if Cidr::parse(cidr).is_none() {
                bad(
                    format!("routing.trusted_proxies[{i}]"),
                    "must be an address or a CIDR such as 10.0.0.0/8",
                );
            }
        }
        for (i, rule) in routing.rules.iter().enumerate() {
            if rule.countries.is_empty() && rule.continents.is_empty() {
                bad(
                    format!("routing.rules[{i}]"),
                    "give countries or continents to match",
                );
            }
            for (c, code) in rule.countries.iter().enumerate() {
                if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
                    bad(
                        format!("routing.rules[{i}].countries[{c}]"),
                        "must be an ISO 3166-1 alpha-2 code in capitals, such as DE",
                    );
                }
            }
            for (c, code) in rule.continents.iter().enumerate() {
                if !CONTINENTS.contains(&code.as_str()) {
                    bad(
                        format!("routing.rules[{i}].continents[{c}]"),
                        "must be one of AF, AN, AS, EU, NA, OC, SA",
                    );
                }
            }
            if rule.regions.is_empty() {
                bad(
                    format!("routing.rules[{i}].regions"),
                    "at least one region is required",
                );
            }
            check_names(
                format!("routing.rules[{i}].regions"),
                &rule.regions,
                &mut bad,
            );
        }
        check_names("routing.default".into(), &routing.default, &mut bad);
        if !(1..=10).contains(&routing.max_attempts) {
            bad("routing.max_attempts".into(), "must be between 1 and 10");
        }

        let breaker = &self.breaker;
        if breaker.window.is_zero() {
            bad("breaker.window".into(), "must be greater than 0");
        }
        if breaker.open_for.is_zero() {
            bad("breaker.open_for".into(), "must be greater than 0");
        }
        if breaker.min_requests == 0 {
            bad("breaker.min_requests".into(), "must be greater than 0");
        }
        if !(breaker.failure_rate > 0.0 && breaker.failure_rate < 1.0) {
            bad(
                "breaker.failure_rate".into(),
                "must be between 0 and 1, both excluded",
            );
        }
        if breaker.half_open_probes == 0 {
            bad("breaker.half_open_probes".into(), "must be greater than 0");
        }
        if self.key_pool.max_in_flight_per_key == Some(0) {
            bad(
                "key_pool.max_in_flight_per_key".into(),
                "must be greater than 0 (leave it out for no cap)",
            );
        }
    }

    /// Every file the config refers to, so a watcher can notice a change in any of them.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(tls) = &self.server.tls {
            files.push(tls.cert_file.clone());
            files.push(tls.key_file.clone());
        }
        for client in &self.clients {
            for key in &client.relay_keys {
                if let RelayKeySource::File(path) = key {
                    files.push(path.clone());
                }
            }
            for secret in &client.signing_secrets {
                if let SecretSource::File(path) = secret {
                    files.push(path.clone());
                }
            }
        }
        if let Some(StoreConfig::Redis(redis)) = &self.store {
            for secret in [&redis.url_from, &redis.password_from]
                .into_iter()
                .flatten()
            {
                if let SecretSource::File(path) = secret {
                    files.push(path.clone());
                }
            }
            if let Some(ca) = &redis.tls.ca_file {
                files.push(ca.clone());
            }
        }
        for region in &self.regions {
            for key in &region.api_keys {
                if let SecretSource::File(path) = key {
                    files.push(path.clone());
                }
            }
            if let Some(ca) = &region.tls.ca_file {
                files.push(ca.clone());
            }
            if let Some(SecretSource::File(path)) = region
                .egress_proxy
                .as_ref()
                .and_then(|p| p.credentials_from.as_ref())
            {
                files.push(path.clone());
            }
        }
        if let Some(db) = &self.routing.geoip_db {
            files.push(db.clone());
        }
        for source in self.traces.iter().flat_map(|t| t.headers.values()) {
            if let SecretSource::File(path) = source {
                files.push(path.clone());
            }
        }
        files
    }
}

impl RedisStoreConfig {
    /// What is wrong, as (path below `store.redis`, message) pairs.
    fn problems(&self) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        let mut bad = |path: &str, message: &'static str| out.push((path.to_owned(), message));
        let standalone = self.mode == RedisMode::Standalone;
        match (&self.url, &self.url_from) {
            (Some(_), Some(_)) => bad("url", "give url or url_from, not both"),
            (None, None) if standalone => bad("url", "standalone mode needs url or url_from"),
            (Some(_), None) | (None, Some(_)) if !standalone => bad(
                "url",
                "only for standalone mode; sentinel and cluster take addresses",
            ),
            _ => {}
        }
        if let Some(url) = &self.url
            && let Err(why) = check_redis_url(url)
        {
            bad("url", why);
        }
        match (self.mode, &self.sentinel) {
            (RedisMode::Sentinel, None) => {
                bad("sentinel", "sentinel mode needs service_name and addresses")
            }
            (RedisMode::Sentinel, Some(sentinel)) => {
                if sentinel.service_name.is_empty() {
                    bad("sentinel.service_name", "must not be empty");
                }
                if sentinel.addresses.is_empty() {
                    bad("sentinel.addresses", "at least one sentinel is required");
                }
                for (i, address) in sentinel.addresses.iter().enumerate() {
                    if !is_host_port(address) {
                        bad(&format!("sentinel.addresses[{i}]"), "must be host:port");
                    }
                }
            }
            (_, Some(_)) => bad("sentinel", "only for sentinel mode"),
            (_, None) => {}
        }
        match (self.mode, &self.cluster) {
            (RedisMode::Cluster, None) => bad("cluster", "cluster mode needs nodes"),
            (RedisMode::Cluster, Some(cluster)) => {
                if cluster.nodes.is_empty() {
                    bad("cluster.nodes", "at least one node is required");
                }
                for (i, node) in cluster.nodes.iter().enumerate() {
                    if !is_host_port(node) {
                        bad(&format!("cluster.nodes[{i}]"), "must be host:port");
                    }
                }
            }
            (_, Some(_)) => bad("cluster", "only for cluster mode"),
            (_, None) => {}
        }
        if self.tls.ca_file.is_some()
            && !self.tls.enabled
            && !self
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            bad("tls.ca_file", "set tls.enabled (or use a rediss:// URL)");
        }
        if !(1..=64).contains(&self.pool_size) {
            bad("pool_size", "must be between 1 and 64");
        }
        for (path, value) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("reconnect.min_delay", self.reconnect.min_delay),
            ("reconnect.max_delay", self.reconnect.max_delay),
        ] {
            if value.is_zero() {
                bad(path, "must be greater than 0");
            }
        }
        if self.reconnect.min_delay > self.reconnect.max_delay {
            bad("reconnect.min_delay", "must not exceed reconnect.max_delay");
        }
        out
    }
}

/// A Redis URL as the config may hold it: no credentials, since the config is
/// not a secret (they belong in `url_from` or `password_from`).
fn check_redis_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or("must start with redis:// or rediss://")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry credentials; use url_from or password_from");
    }
    if authority.is_empty() {
        return Err("has no host");
    }
    Ok(())
}

/// A model name or a prefix ending in `*` (an empty prefix, `*`, matches
/// every model).
fn is_model_pattern(s: &str) -> bool {
    let name = s.strip_suffix('*').unwrap_or(s);
    (s == "*" || !name.is_empty())
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:@".contains(&b))
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A base URL: `http` or `https`, a host, an optional port and path prefix,
/// no query or fragment.
pub fn check_base_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err("has no host");
    }
    if authority.contains('@') {
        return Err("must not carry credentials");
    }
    if rest.contains('?') || rest.contains('#') {
        return Err("must not have a query or fragment");
    }
    if rest
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain white space");
    }
    Ok(())
}

/// An egress proxy's URL: `http://host[:port][/]`. The messages never
/// quote the URL, which may be where someone wrote a password.
pub fn check_egress_proxy_url(url: &str) -> Result<(), &'static str> {
    if url.starts_with("https://") {
        return Err(
            "TLS to the proxy itself is not supported: give an http:// URL (the upstream's TLS still runs end to end inside the tunnel)",
        );
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or("must start with http://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(
            "must not carry credentials: put user:password in a file named by credentials_from",
        );
    }
    if authority.contains(['/', '?', '#']) {
        return Err("must be http://host:port, without a path, query or fragment");
    }
    if authority
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain white space");
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal without a port: `[::1]`.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() || host == "[]" {
        return Err("has no host");
    }
    if port.is_some_and(|p| p.parse::<u16>().ok().is_none_or(|p| p == 0)) {
        return Err("port must be a number from 1 to 65535");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
clients:
  - id: app
    relay_keys: [{env: RELAY_KEY}]
regions:
  - name: us
    base_url: https://api.anthropic.com
    api_keys: [{file: /secrets/key}]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = ProxyConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(config.regions[0].timeouts.connect.as_secs(), 1);
        assert_eq!(config.regions[0].timeouts.idle.as_secs(), 60);
        assert_eq!(config.server.body_read_timeout.as_secs(), 30);
        assert_eq!(config.server.min_body_rate, 1024);
        assert_eq!(config.server.max_connections, None);
        assert_eq!(
            config.regions[0].api_keys[0],
            SecretSource::File("/secrets/key".into())
        );
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let text = MINIMAL.replace(
            "base_url: https://api.anthropic.com",
            "base_url: https://api.anthropic.com\n    prioritty: 3",
        );
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0]"), "{err}");
        assert!(err.contains("prioritty"), "{err}");
    }

    #[test]
    fn inline_secret_is_rejected() {
        let text = MINIMAL.replace("{file: /secrets/key}", "sk-ant-inline");
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].api_keys[0]"), "{err}");
        assert!(!err.contains("sk-ant-inline"), "secret echoed: {err}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = format!("{MINIMAL}    timeouts: {{connect: soon}}\n");
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].timeouts.connect"), "{err}");
    }

    #[test]
    fn server_limits_must_be_positive() {
        let text = format!(
            "server: {{body_read_timeout: 0s, max_connections: 0, min_body_rate: 0}}\n{MINIMAL}"
        );
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("server.body_read_timeout"), "{err}");
        assert!(err.contains("server.max_connections"), "{err}");
        // No minimum rate is a choice, not a mistake.
        assert!(!err.contains("server.min_body_rate"), "{err}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let text = r#"
clients:
  - id: app
    relay_keys: []
  - id: app
    relay_keys: [{sha256: nothex}]
regions:
  - name: us
    base_url: ftp://example.com
    api_keys: []
"#;
        let err = ProxyConfig::from_yaml(text).unwrap_err().to_string();
        for expected in [
            "clients[0].relay_keys",
            "clients[1].id: duplicate",
            "clients[1].relay_keys[0].sha256",
            "regions[0].base_url",
            "regions[0].api_keys",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
    }

    #[test]
    fn base_urls() {
        assert!(check_base_url("https://api.anthropic.com").is_ok());
        assert!(check_base_url("http://127.0.0.1:8080/prefix").is_ok());
        assert!(check_base_url("https://").is_err());
        assert!(check_base_url("https://user:pw@host").is_err());
        assert!(check_base_url("https://host/?q").is_err());
        assert!(check_base_url("api.anthropic.com").is_err());
    }

    #[test]
    fn egress_proxy_urls() {
        for good in [
            "http://proxy.internal:3128",
            "http://10.0.0.7:8080/",
            "http://[fd00::7]:3128",
            "http://[fd00::7]",
            "http://squid",
        ] {
            assert_eq!(check_egress_proxy_url(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("https://proxy:3128", "not supported"),
            ("socks5://proxy:1080", "http://"),
            ("http://user:hunter2@proxy:3128", "credentials_from"),
            ("http://proxy:3128/path", "without a path"),
            ("http://proxy:3128?x", "without a path"),
            ("http://", "no host"),
            ("http://:3128", "no host"),
            ("http://proxy:0", "port"),
            ("http://proxy:99999", "port"),
            ("http://proxy:http", "port"),
        ] {
            let err = check_egress_proxy_url(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn egress_proxy_is_validated_and_its_credentials_watched() {
        let text = format!(
            "{MINIMAL}    egress_proxy: {{url: 'http://proxy:3128', credentials_from: {{file: /secrets/proxy/creds}}}}\n"
        );
        let config = ProxyConfig::from_yaml(&text).unwrap();
        let proxy = config.regions[0].egress_proxy.as_ref().unwrap();
        assert_eq!(proxy.url, "http://proxy:3128");
        assert!(
            config
                .referenced_files()
                .contains(&PathBuf::from("/secrets/proxy/creds"))
        );

        // The URL is never quoted back: it may hold a password.
        let text = format!("{MINIMAL}    egress_proxy: {{url: 'http://u:hunter2@proxy:3128'}}\n");
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].egress_proxy.url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let text = format!("{MINIMAL}    egress_proxy: {{url: 'https://proxy:3128'}}\n");
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].egress_proxy.url: TLS"), "{err}");
        // Inline credentials are not a secret reference.
        let text = format!(
            "{MINIMAL}    egress_proxy: {{url: 'http://proxy:3128', credentials_from: 'u:hunter2'}}\n"
        );
        let err = ProxyConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(
            err.contains("regions[0].egress_proxy.credentials_from"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn round_trips_through_json() {
        let config = ProxyConfig::from_yaml(MINIMAL).unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(ProxyConfig::from_yaml(&json).unwrap(), config);
    }
}

#[cfg(test)]
mod signing_store_tests {
    use super::*;

    const BASE: &str = r#"
regions:
  - name: us
    base_url: https://api.anthropic.com
    api_keys: [{file: /secrets/key}]
"#;

    fn config(extra: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::from_yaml(&format!("{BASE}{extra}"))
    }

    fn problems(extra: &str) -> String {
        config(extra).unwrap_err().to_string()
    }

    #[test]
    fn auth_defaults_follow_the_credentials_given() {
        let c = config(
            r#"
clients:
  - id: keys-only
    relay_keys: [{env: K}]
  - id: signed-only
    signing_secrets: [{file: /s/a}]
  - id: both
    relay_keys: [{env: K}]
    signing_secrets: [{file: /s/b}]
  - id: restricted
    auth: [signature]
    relay_keys: [{env: K}]
    signing_secrets: [{file: /s/c}]
"#,
        )
        .unwrap();
        let allows = |i: usize| {
            (
                c.clients[i].allows(AuthMethod::RelayKey),
                c.clients[i].allows(AuthMethod::Signature),
            )
        };
        assert_eq!(allows(0), (true, false));
        assert_eq!(allows(1), (false, true));
        assert_eq!(allows(2), (true, true));
        assert_eq!(allows(3), (false, true));
        assert_eq!(c.replay.window.as_secs(), 300);
        assert!(!c.replay.fail_open);
        assert_eq!(c.store, None);
    }

    #[test]
    fn prices_and_dollar_budgets_are_validated_with_their_paths() {
        let good = config(
            r#"
clients:
  - id: a
    relay_keys: [{env: K}]
    quota: {usd_per_day: 2.5, usd_per_month: 40}
pricing:
  as_of: "2026-12-06"
  models:
    - {match: "claude-sonnet-4-*", input_usd_per_mtok: 3, output_usd_per_mtok: 15, cache_read_usd_per_mtok: 0.3, cache_write_5m_usd_per_mtok: 3.75, cache_write_1h_usd_per_mtok: 6}
"#,
        )
        .unwrap();
        let quota = good.clients[0].quota.unwrap();
        assert!(quota.is_active() && quota.has_usd_budget() && !quota.has_token_budget());
        assert_eq!(nano_usd(quota.usd_per_day.unwrap()), Some(2_500_000_000));
        assert!(good.pricing.models[0].matches("claude-sonnet-4-5"));
        assert!(!good.pricing.models[0].matches("claude-sonnet-3"));

        let err = problems(
            r#"
clients:
  - id: a
    relay_keys: [{env: K}]
    quota: {usd_per_day: -1}
pricing:
  as_of: yesterday
  models:
    - {match: "claude-*-4", input_usd_per_mtok: -3, output_usd_per_mtok: 15, cache_read_usd_per_mtok: 0.0001, cache_write_5m_usd_per_mtok: 1.2345, cache_write_1h_usd_per_mtok: 1e9}
    - {match: "claude-x", input_usd_per_mtok: 1, output_usd_per_mtok: 1, cache_read_usd_per_mtok: 1, cache_write_5m_usd_per_mtok: 1, cache_write_1h_usd_per_mtok: 1}
    - {match: "claude-x", input_usd_per_mtok: 1, output_usd_per_mtok: 1, cache_read_usd_per_mtok: 1, cache_write_5m_usd_per_mtok: 1, cache_write_1h_usd_per_mtok: 1}
    - {match: "", input_usd_per_mtok: 1, output_usd_per_mtok: 1, cache_read_usd_per_mtok: 1, cache_write_5m_usd_per_mtok: 1, cache_write_1h_usd_per_mtok: 1}
"#,
        );
        for expected in [
            "clients[0].quota.usd_per_day: must be a number of US dollars",
            "pricing.models[0].match: a model name, or a prefix ending in '*'",
            "pricing.models[0].input_usd_per_mtok: must be a price from 0",
            "pricing.models[0].cache_read_usd_per_mtok: must be a price",
            "pricing.models[0].cache_write_5m_usd_per_mtok: must be a price",
            "pricing.models[0].cache_write_1h_usd_per_mtok: must be a price",
            "pricing.models[2].match: duplicate pattern",
            "pricing.models[3].match: a model name",
            "pricing.as_of: must be a date",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
        assert!(!err.contains("output_usd_per_mtok"), "{err}");
        // Dollar budgets need prices and the usage of answers.
        let err = problems(
            "clients: [{id: a, relay_keys: [{env: K}], quota: {usd_per_month: 5}}]\nusage: {enabled: false}\n",
        );
        assert!(err.contains("dollar budgets need usage.enabled"), "{err}");
        assert!(err.contains("dollar budgets need prices"), "{err}");
    }

    #[test]
    fn overrides_replace_defaults_by_pattern() {
        let price = |pattern: &str, input| ModelPrice {
            pattern: pattern.into(),
            input_usd_per_mtok: input,
            output_usd_per_mtok: 1.0,
            cache_read_usd_per_mtok: 1.0,
            cache_write_5m_usd_per_mtok: 1.0,
            cache_write_1h_usd_per_mtok: 1.0,
        };
        let defaults = PricingConfig {
            as_of: Some("2026-12-06".into()),
            models: vec![price("a-*", 1.0), price("b-*", 2.0)],
        };
        let merged = defaults.overridden_by(&[price("b-*", 5.0), price("c", 3.0)]);
        assert_eq!(
            merged.models,
            vec![price("a-*", 1.0), price("b-*", 5.0), price("c", 3.0)]
        );
        assert_eq!(merged.as_of.as_deref(), Some("2026-12-06"));
    }

    #[test]
    fn auth_method_without_its_credentials_is_named() {
        let err = problems(
            r#"
clients:
  - id: a
    auth: [relay_key, signature, signature]
    relay_keys: [{env: K}]
  - id: b
    auth: [relay_key]
    signing_secrets: [{env: S}]
    rate_limit: {requests: 0, per: second}
"#,
        );
        for expected in [
            "clients[0].auth[2]: duplicate",
            "clients[0].auth: allows signature but the client has no signing_secrets",
            "clients[1].auth: allows relay_key but the client has no relay_keys",
            "clients[1].rate_limit.requests",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
    }

    #[test]
    fn quotas_usage_and_cache_parse_with_defaults() {
        let c = config(
            r#"
clients:
  - id: a
    relay_keys: [{env: K}]
    quota: {tokens_per_minute: 1000, max_concurrent: 4}
    cache: {enabled: true}
quota: {fail_open_grace: 30s}
cache:
  ttl: 10m
  routes: [{name: haiku, models: ['claude-haiku-*', claude-x], enabled: true, ttl: 1h, shared: true}]
"#,
        )
        .unwrap();
        let quota = c.clients[0].quota.unwrap();
        assert_eq!(quota.tokens_per_minute, Some(1000));
        assert_eq!(quota.tokens_per_day, None);
        assert!(!quota.count_cache_reads);
        assert!(c.clients[0].cache.unwrap().enabled);
        assert_eq!(c.quota.fail_open_grace.as_secs(), 30);
        assert_eq!(c.usage.retention.as_secs(), 90 * 86_400);
        assert_eq!(c.cache.memory_bytes, 64 * 1024 * 1024);
        assert_eq!(c.cache.ttl.as_secs(), 600);
        let route = &c.cache.routes[0];
        assert!(route.matches("claude-haiku-4-5") && route.matches("claude-x"));
        assert!(!route.matches("claude-x-2") && !route.matches("claude-sonnet"));
        let plain = config("clients: [{id: a, relay_keys: [{env: K}]}]\n").unwrap();
        assert_eq!(plain.quota.fail_open_grace.as_secs(), 300);
        assert!(plain.cache.routes.is_empty());
    }

    #[test]
    fn bad_quotas_and_cache_settings_are_named() {
        let err = problems(
            r#"
clients:
  - id: a
    relay_keys: [{env: K}]
    quota: {count_cache_reads: true}
usage: {retention: 1h}
cache:
  max_entry_bytes: 0
  ttl: 0s
  routes:
    - {name: r, models: ['a*b', ''], ttl: 0s}
    - {name: r}
"#,
        );
        for expected in [
            "clients[0].quota: sets no limit",
            "usage.retention",
            "cache.max_entry_bytes",
            "cache.ttl",
            "cache.routes[0].models[0]",
            "cache.routes[0].models[1]",
            "cache.routes[0].ttl",
            "cache.routes[1].name: duplicate",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
        let err = problems(
            "clients: [{id: a, relay_keys: [{env: K}], quota: {tokens_per_day: 5}}]\nusage: {enabled: false}\n",
        );
        assert!(err.contains("token budgets need usage.enabled"), "{err}");
        // 0 is no budget: a concurrency cap alone works without usage.
        config(
            "clients: [{id: a, relay_keys: [{env: K}], quota: {tokens_per_day: 0, max_concurrent: 2}}]\nusage: {enabled: false}\n",
        )
        .unwrap();
        let err = problems("clients: [{id: a, relay_keys: [{env: K}], quota: {tokens: 5}}]\n");
        assert!(err.contains("clients[0].quota"), "{err}");
    }

    #[test]
    fn rate_limit_and_replay_parse() {
        let c = config(
            r#"
clients:
  - id: a
    signing_secrets: [{file: /s/a}, {file: /s/b}]
    rate_limit: {requests: 10, per: minute}
replay: {window: 2m, fail_open: true}
"#,
        )
        .unwrap();
        let limit = c.clients[0].rate_limit.unwrap();
        assert_eq!(limit.requests, 10);
        assert_eq!(limit.per.duration().as_secs(), 60);
        assert_eq!(c.replay.window.as_secs(), 120);
        assert!(c.replay.fail_open);
        let err = problems("clients: [{id: a, relay_keys: [{env: K}]}]\nreplay: {window: 0s}\n");
        assert!(err.contains("replay.window"), "{err}");
        let err = problems(
            "clients: [{id: a, relay_keys: [{env: K}], rate_limit: {requests: 1, per: hour}}]\n",
        );
        assert!(err.contains("clients[0].rate_limit.per"), "{err}");
    }

    #[test]
    fn redis_store_modes_are_checked() {
        let clients = "clients: [{id: a, relay_keys: [{env: K}]}]\n";
        let ok = config(&format!(
            "{clients}store: {{redis: {{url: 'redis://redis:6379/0', pool_size: 8}}}}\n"
        ))
        .unwrap();
        let Some(StoreConfig::Redis(redis)) = &ok.store else {
            panic!("not redis: {:?}", ok.store)
        };
        assert_eq!(redis.mode, RedisMode::Standalone);
        assert_eq!(redis.pool_size, 8);
        assert!(redis.pipeline, "pipelining is on unless turned off");
        let unpipelined = config(&format!(
            "{clients}store: {{redis: {{url: 'redis://redis:6379/0', pipeline: false}}}}\n"
        ))
        .unwrap();
        let Some(StoreConfig::Redis(redis)) = &unpipelined.store else {
            panic!("not redis: {:?}", unpipelined.store)
        };
        assert!(!redis.pipeline);
        assert_eq!(redis.command_timeout.as_millis(), 250);
        assert_eq!(redis.reconnect.max_delay.as_secs(), 5);

        let sentinel = config(&format!(
            "{clients}store: {{redis: {{mode: sentinel, sentinel: {{service_name: mymaster, addresses: ['s1:26379', 's2:26379']}}}}}}\n"
        ));
        assert!(sentinel.is_ok(), "{sentinel:?}");
        let cluster = config(&format!(
            "{clients}store: {{redis: {{mode: cluster, cluster: {{nodes: ['n1:6379']}}, tls: {{enabled: true}}}}}}\n"
        ));
        assert!(cluster.is_ok(), "{cluster:?}");

        for (store, expected) in [
            ("{redis: {}}", "store.redis.url: standalone mode needs url"),
            (
                "{redis: {url: 'redis://x:6379', url_from: {env: U}}}",
                "store.redis.url: give url or url_from",
            ),
            (
                "{redis: {url: 'redis://:hunter2@x:6379'}}",
                "store.redis.url: must not carry credentials",
            ),
            (
                "{redis: {url: 'http://x'}}",
                "store.redis.url: must start with",
            ),
            (
                "{redis: {mode: sentinel}}",
                "store.redis.sentinel: sentinel mode needs",
            ),
            (
                "{redis: {mode: sentinel, sentinel: {service_name: m, addresses: [nope]}}}",
                "store.redis.sentinel.addresses[0]: must be host:port",
            ),
            (
                "{redis: {mode: cluster, url: 'redis://x:1', cluster: {nodes: []}}}",
                "store.redis.url: only for standalone",
            ),
            (
                "{redis: {mode: cluster, cluster: {nodes: []}}}",
                "store.redis.cluster.nodes",
            ),
            (
                "{redis: {url: 'redis://x:1', cluster: {nodes: ['a:1']}}}",
                "store.redis.cluster: only for cluster mode",
            ),
            (
                "{redis: {url: 'redis://x:1', tls: {ca_file: /ca.pem}}}",
                "store.redis.tls.ca_file",
            ),
            (
                "{redis: {url: 'redis://x:1', pool_size: 0}}",
                "store.redis.pool_size",
            ),
            (
                "{redis: {url: 'redis://x:1', command_timeout: 0s}}",
                "store.redis.command_timeout",
            ),
            (
                "{redis: {url: 'redis://x:1', reconnect: {min_delay: 10s, max_delay: 1s}}}",
                "store.redis.reconnect.min_delay",
            ),
            (
                "{redis: {url: 'redis://x:1', pipeline: sometimes}}",
                "store.redis.pipeline",
            ),
            ("{memory: {max_entries: 0}}", "store.memory.max_entries"),
        ] {
            let err = problems(&format!("{clients}store: {store}\n"));
            assert!(
                err.contains(expected),
                "{store}: missing {expected:?} in {err}"
            );
            assert!(!err.contains("hunter2"), "secret echoed: {err}");
        }
    }

    #[test]
    fn secret_files_of_signing_and_store_are_watched() {
        let c = config(
            r#"
clients:
  - id: a
    signing_secrets: [{file: /s/old}, {file: /s/new}, {env: NOT_A_FILE}]
store:
  redis:
    url_from: {file: /s/redis-url}
    password_from: {file: /s/redis-password}
    tls: {enabled: true, ca_file: /s/ca.pem}
"#,
        )
        .unwrap();
        let files = c.referenced_files();
        for expected in [
            "/s/old",
            "/s/new",
            "/s/redis-url",
            "/s/redis-password",
            "/s/ca.pem",
        ] {
            assert!(
                files.contains(&PathBuf::from(expected)),
                "{expected} not in {files:?}"
            );
        }
    }

    #[test]
    fn new_fields_round_trip_through_json() {
        let c = config(
            r#"
clients:
  - id: a
    auth: [signature]
    signing_secrets: [{file: /s/a}]
    rate_limit: {requests: 5, per: second}
store: {redis: {mode: sentinel, sentinel: {service_name: m, addresses: ['s:26379']}}}
"#,
        )
        .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_yaml(&json).unwrap(), c);
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;

    const BASE: &str = r#"
clients: [{id: a, relay_keys: [{env: K}]}]
regions:
  - {name: us, base_url: 'https://us.example', api_keys: [{env: A}]}
  - {name: eu, base_url: 'https://eu.example', api_keys: [{env: B}], priority: 1}
"#;

    fn config(extra: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::from_yaml(&format!("{BASE}{extra}"))
    }

    #[test]
    fn defaults_apply_without_sections() {
        let c = config("").unwrap();
        assert_eq!(c.routing.max_attempts, 3);
        assert!(c.routing.default.is_empty());
        assert_eq!(c.breaker.window.as_secs(), 60);
        assert_eq!(c.breaker.min_requests, 10);
        assert_eq!(c.breaker.failure_rate, 0.5);
        assert_eq!(c.breaker.open_for.as_secs(), 60);
        assert_eq!(c.breaker.half_open_probes, 1);
        assert_eq!(c.key_pool.strategy, KeyStrategy::RoundRobin);
        assert_eq!(c.key_pool.max_in_flight_per_key, None);
    }

    #[test]
    fn routing_breaker_and_pool_parse_and_round_trip() {
        let c = config(
            r#"
routing:
  geoip_db: /geo/country.mmdb
  trusted_proxies: ['10.0.0.0/8', 'fd00::/8', '192.0.2.7']
  rules:
    - {countries: [DE, FR], regions: [eu, us]}
    - {continents: [NA], regions: [us]}
  default: [us]
  max_attempts: 2
breaker: {window: 30s, min_requests: 5, failure_rate: 0.25, open_for: 10s, half_open_probes: 2}
key_pool: {strategy: least_in_flight, max_in_flight_per_key: 8}
"#,
        )
        .unwrap();
        assert_eq!(c.routing.rules[0].regions, ["eu", "us"]);
        assert_eq!(c.breaker.half_open_probes, 2);
        assert_eq!(c.key_pool.strategy, KeyStrategy::LeastInFlight);
        assert!(
            c.referenced_files()
                .contains(&PathBuf::from("/geo/country.mmdb"))
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::from_yaml(&json).unwrap(), c);
    }

    #[test]
    fn bad_routing_is_named_by_path() {
        let err = config(
            r#"
routing:
  trusted_proxies: ['10.0.0.0/33', 'nonsense', '10.0.0.0/']
  rules:
    - {countries: [de], continents: [XX], regions: [asia, us, us]}
    - {regions: [us]}
    - {countries: [DE], regions: []}
  default: [mars]
  max_attempts: 0
breaker: {window: 0s, min_requests: 0, failure_rate: 1.5, open_for: 0s, half_open_probes: 0}
key_pool: {max_in_flight_per_key: 0}
"#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "routing.trusted_proxies[0]",
            "routing.trusted_proxies[1]",
            "routing.trusted_proxies[2]",
            "routing.rules[0].countries[0]",
            "routing.rules[0].continents[0]",
            "routing.rules[0].regions[0]: no region is named",
            "routing.rules[0].regions[2]: region listed twice",
            "routing.rules[1]: give countries or continents",
            "routing.rules[2].regions: at least one",
            "routing.default[0]: no region is named",
            "routing.max_attempts",
            "breaker.window",
            "breaker.min_requests",
            "breaker.failure_rate",
            "breaker.open_for",
            "breaker.half_open_probes",
            "key_pool.max_in_flight_per_key",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
        let err = config("key_pool: {strategy: random}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_pool.strategy"), "{err}");
    }

    #[test]
    fn cidrs_match_their_addresses() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        // A peer seen through a dual-stack socket.
        assert!(net.contains(ip("::ffff:10.1.0.9")));
        assert!(!net.contains(ip("fd00::1")));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.1")) && !all.contains(ip("2001:db8::1")));
        assert!(Cidr::parse("::/129").is_none());
        assert!(Cidr::parse("10.0.0.0/-1").is_none());
    }
}
