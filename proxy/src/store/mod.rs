//! State shared by the proxy replicas: once-only nonces (replay protection),
//! per-client rate-limit windows, token budgets and concurrency slots
//! (quotas), usage counters per client per day, and level 2 of the
//! response cache (Redis only).
//!
//! One trait, [`Store`], with two backends: [`MemoryStore`] (one process; the
//! standalone default) and [`RedisStore`] (every replica). [`AnyStore`] picks
//! one from the config without boxing futures on the hot path. Both backends
//! pass the same conformance suite (`proxy/tests/store_conformance.rs`).
//!
//! Errors carry a `transient` flag: an unreachable or overloaded store is
//! transient, and the caller decides whether to fail closed (503) or open.

use std::collections::BTreeMap;
use std::time::Duration;

use claude_relay_crds::config::{MemoryStoreConfig, StoreConfig};

pub mod keys;
pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// The outcome of counting one request against a client's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests still allowed in the current window after this one.
    pub remaining: u32,
    /// When refused: how long until the window ends and requests pass again.
    pub retry_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    /// The store is unreachable, slow or full: the same call may work later.
    /// Not transient: a bug or misconfiguration, such as a wrong reply type.
    pub transient: bool,
    message: String,
}

impl StoreError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            transient: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            transient: false,
            message: message.into(),
        }
    }

    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        if self.transient {
            "unavailable"
        } else {
            "error"
        }
    }
}

/// The operations of the shared store. Each is one atomic step in the
/// backend, so concurrent callers on any replica see a consistent result.
pub trait Store: Send + Sync {
    /// Records that `client` used `nonce`, for `ttl`. `Ok(true)` the first
    /// time; `Ok(false)` while an earlier claim is remembered, however many
    /// claims race.
    fn claim_nonce(
        &self,
        client: &str,
        nonce: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Counts one request of `client` in a fixed window of length `window`
    /// that starts with the first request after the previous one ended.
    /// Refused requests count too, so hammering does not help.
    fn hit_rate_limit(
        &self,
        client: &str,
        limit: u32,
        window: Duration,
    ) -> impl Future<Output = Result<RateDecision, StoreError>> + Send;

    /// Checks a client's token budgets and, when they allow the request and
    /// it caps concurrency, takes a slot named `ask.slot` (held until
    /// [`Store::settle`] releases it, or its lease lapses). Budgets are only
    /// read here; [`Store::settle`] charges them.
    fn check_quota(
        &self,
        client: &str,
        ask: &QuotaAsk<'_>,
    ) -> impl Future<Output = Result<QuotaDecision, StoreError>> + Send;

    /// After responses: charges their tokens to the client's budgets, adds
    /// their usage to the client's counters of the day and releases their
    /// slots, in one atomic step (the requests of a flush interval together).
    fn settle(
        &self,
        client: &str,
        charges: &Charges,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Releases one concurrency slot at once, as its answer ends (the next
    /// request of a client with `max_concurrent` may follow right away): one
    /// command, not the batch of [`Store::settle`]. A slot not held is no error.
    fn release_slot(
        &self,
        client: &str,
        slot: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends the leases of concurrency slots still in use (long streams).
    fn renew_slots(
        &self,
        client: &str,
        slots: &[String],
        until_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The usage counters of `client` on `day` (`YYYY-MM-DD`, UTC): field
    /// name to count, empty when nothing was recorded.
    fn usage(
        &self,
        client: &str,
        day: &str,
    ) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;
}

/// Token counts the upstream reported for one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// The part of `cache_creation_input_tokens` written for 1 hour
    /// (`cache_creation.ephemeral_1h_input_tokens`), priced apart; not one
    /// of [`Usage::KINDS`].
    pub cache_creation_1h_input_tokens: u64,
}

impl Usage {
    /// The counter names, in the order of [`Usage::counts`].
    pub const KINDS: [&'static str; 4] = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ];

    pub fn counts(&self) -> [u64; 4] {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ]
    }

    /// What a quota charges: input, output and cache writes; cache reads
    /// when the client's quota says so.
    pub fn quota_tokens(&self, count_cache_reads: bool) -> u64 {
        let reads = if count_cache_reads {
            self.cache_read_input_tokens
        } else {
            0
        };
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(reads)
    }

    pub fn is_empty(&self) -> bool {
        self.counts() == [0; 4]
    }

    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_1h_input_tokens += other.cache_creation_1h_input_tokens;
    }
}

/// A client's limits, asked before a request goes upstream; 0 means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaAsk<'a> {
    pub tokens_per_minute: u64,
    pub tokens_per_day: u64,
    pub max_concurrent: u32,
    /// Nano-dollars per UTC day and per UTC calendar month.
    pub usd_nanos_per_day: u64,
    pub usd_nanos_per_month: u64,
    /// Unique per request: the name of its concurrency slot.
    pub slot: &'a str,
    /// The replica's clock, unix milliseconds: picks the minute and the day.
    pub now_ms: u64,
    /// Until when a slot is held without renewal, unix milliseconds.
    pub lease_until_ms: u64,
}

/// The answer to a [`QuotaAsk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Within every limit; a slot was taken when concurrency is capped.
    Allowed,
    /// A budget is spent (the minute's or the day's tokens, the day's or the
    /// month's dollars); it frees up after `retry_after`.
    OverBudget {
        per: BudgetPeriod,
        retry_after: Duration,
    },
    /// `max_concurrent` requests are in flight already.
    OverConcurrency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPeriod {
    Minute,
    Day,
    /// Dollars per UTC day.
    UsdDay,
    /// Dollars per UTC calendar month.
    UsdMonth,
}

impl BudgetPeriod {
    pub fn label(self) -> &'static str {
        match self {
            Self::Minute => "tokens_per_minute",
            Self::Day => "tokens_per_day",
            Self::UsdDay => "usd_per_day",
            Self::UsdMonth => "usd_per_month",
        }
    }
}

/// What one finished request leaves in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement<'a> {
    /// Tokens charged to the budgets (0 when the client has none).
    pub quota_tokens: u64,
    /// Nano-dollars charged to the dollar budgets (0 when the client has none).
    pub quota_nanos: u64,
    /// The usage the upstream reported, by model, and what it cost in
    /// nano-dollars (0 when unpriced); absent: no usage (errors).
    pub usage: Option<(&'a str, Usage, u64)>,
    /// The concurrency slot to release.
    pub slot: Option<&'a str>,
    pub now_ms: u64,
    /// How long the day's usage counters are kept.
    pub retention: Duration,
}

/// What finished requests of one client leave in the store, gathered over
/// a flush interval so that the store sees one call per client, not one per
/// request. Kept compact (numbers, one entry per model) so that adding a
/// request allocates nothing in the usual case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Charges {
    /// Tokens per calendar minute (minutes since the epoch).
    pub minutes: BTreeMap<u64, u64>,
    /// Tokens per calendar day (days since the epoch).
    pub days: BTreeMap<u64, u64>,
    /// Nano-dollars per calendar day (days since the epoch).
    pub usd_days: BTreeMap<u64, u64>,
    /// Nano-dollars per calendar month ([`month_index`]).
    pub usd_months: BTreeMap<u64, u64>,
    /// Usage per day (days since the epoch) and model.
    pub usage: BTreeMap<u64, BTreeMap<String, ModelUsage>>,
    /// Concurrency slots to release.
    pub release: Vec<String>,
    /// How long a day's usage counters are kept.
    pub retention: Duration,
}

/// Requests that reported usage, the sum of what they reported and of what
/// it cost (nano-dollars; unpriced answers add nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelUsage {
    pub requests: u64,
    pub usage: Usage,
    pub cost_nanos: u64,
}

impl ModelUsage {
    fn add(&mut self, other: &ModelUsage) {
        self.requests += other.requests;
        self.usage.add(&other.usage);
        self.cost_nanos = self.cost_nanos.saturating_add(other.cost_nanos);
    }
}

/// The usage hash's field holding the cost in nano-dollars (`/usage`
/// shows it as `cost_usd`).
pub const COST_FIELD: &str = "cost_nanousd";

impl Charges {
    /// Adds one finished request.
    pub fn add(&mut self, settlement: &Settlement<'_>) {
        self.retention = settlement.retention;
        let day = settlement.now_ms / DAY_MS;
        if settlement.quota_tokens > 0 {
            *self
                .minutes
                .entry(settlement.now_ms / MINUTE_MS)
                .or_default() += settlement.quota_tokens;
            *self.days.entry(day).or_default() += settlement.quota_tokens;
        }
        if settlement.quota_nanos > 0 {
            *self.usd_days.entry(day).or_default() += settlement.quota_nanos;
            *self.usd_months.entry(month_index(day)).or_default() += settlement.quota_nanos;
        }
        if let Some((model, usage, cost_nanos)) = settlement.usage {
            let models = self.usage.entry(day).or_default();
            let one = ModelUsage {
                requests: 1,
                usage,
                cost_nanos,
            };
            match models.get_mut(model) {
                Some(counts) => counts.add(&one),
                None => {
                    models.insert(model.to_owned(), one);
                }
            }
        }
        if let Some(slot) = settlement.slot {
            self.release.push(slot.to_owned());
        }
    }

    /// Adds what an earlier flush could not write.
    pub fn merge(&mut self, other: Charges) {
        for (minute, n) in other.minutes {
            *self.minutes.entry(minute).or_default() += n;
        }
        for (day, n) in other.days {
            *self.days.entry(day).or_default() += n;
        }
        for (day, n) in other.usd_days {
            *self.usd_days.entry(day).or_default() += n;
        }
        for (month, n) in other.usd_months {
            *self.usd_months.entry(month).or_default() += n;
        }
        for (day, models) in other.usage {
            let mine = self.usage.entry(day).or_default();
            for (model, counts) in models {
                mine.entry(model).or_default().add(&counts);
            }
        }
        self.release.extend(other.release);
        self.retention = self.retention.max(other.retention);
    }

    /// The same without what no longer matters after `now_ms`: minutes past
    /// their window (days are kept, usage and day budgets still count).
    pub fn still_due(mut self, now_ms: u64) -> Self {
        let minute = now_ms / MINUTE_MS;
        self.minutes.retain(|m, _| *m + 1 >= minute);
        self
    }

    pub fn of(settlement: &Settlement<'_>) -> Self {
        let mut charges = Self::default();
        charges.add(settlement);
        charges
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
            && self.days.is_empty()
            && self.usd_days.is_empty()
            && self.usd_months.is_empty()
            && self.usage.is_empty()
            && self.release.is_empty()
    }

    /// One day's usage as the fields of its usage hash: `requests`, the
    /// token counts and the cost ([`COST_FIELD`]) in total, and the same per
    /// model as `{model}/{field}`.
    pub fn usage_fields(models: &BTreeMap<String, ModelUsage>) -> Vec<(String, u64)> {
        let mut total = ModelUsage::default();
        let mut fields = Vec::with_capacity((models.len() + 1) * 6);
        for (model, counts) in models {
            total.add(counts);
            fields.push((format!("{model}/requests"), counts.requests));
            for (kind, n) in Usage::KINDS.iter().zip(counts.usage.counts()) {
                fields.push((format!("{model}/{kind}"), n));
            }
            fields.push((format!("{model}/{COST_FIELD}"), counts.cost_nanos));
        }
        fields.push(("requests".into(), total.requests));
        for (kind, n) in Usage::KINDS.iter().zip(total.usage.counts()) {
            fields.push(((*kind).to_owned(), n));
        }
        fields.push((COST_FIELD.to_owned(), total.cost_nanos));
        fields
    }
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// The calendar minute (UTC) of `now_ms`, as minutes since the epoch, and
/// the time left in it.
pub fn minute_of(now_ms: u64) -> (u64, Duration) {
    (
        now_ms / MINUTE_MS,
        Duration::from_millis(MINUTE_MS - now_ms % MINUTE_MS),
    )
}

/// The calendar day (UTC) of `now_ms` as `YYYY-MM-DD`, and the time left in it.
pub fn day_of(now_ms: u64) -> (String, Duration) {
    (
        civil_date(now_ms / DAY_MS),
        Duration::from_millis(DAY_MS - now_ms % DAY_MS),
    )
}

/// The calendar month (UTC) of `now_ms` as [`month_index`], and the time
/// left in it.
pub fn month_of(now_ms: u64) -> (u64, Duration) {
    let (year, month, _) = civil(now_ms / DAY_MS);
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let next_ms = u64::try_from(days_from_civil(next_year, next_month, 1)).unwrap_or(0) * DAY_MS;
    (
        month_index(now_ms / DAY_MS),
        Duration::from_millis(next_ms.saturating_sub(now_ms).max(1)),
    )
}

/// The month of a day (days since the epoch) as months since 0000-01.
pub fn month_index(days: u64) -> u64 {
    let (year, month, _) = civil(days);
    u64::try_from(year * 12 + month - 1).unwrap_or(0)
}

/// `YYYY-MM` of a [`month_index`].
pub fn month_name(index: u64) -> String {
    format!("{:04}-{:02}", index / 12, index % 12 + 1)
}

/// `YYYY-MM-DD` of a count of days since 1970-01-01 (proleptic Gregorian).
pub fn civil_date(days: u64) -> String {
    let (year, month, day) = civil(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Year, month and day of a count of days since 1970-01-01.
fn civil(days: u64) -> (i64, i64, i64) {
    // Howard Hinnant's days-to-civil, on eras of 400 years.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date (negative before).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date; `None` when it is not one.
pub fn days_of(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: i64 = parts.next()?.parse().ok()?;
    let day: i64 = parts.next()?.parse().ok()?;
    if date.len() != 10 || !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    // 2026-02-31 is not a date: it does not come back the same.
    (civil_date(days) == date).then_some(days)
}

/// What the store says of a request before it goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// For a signed request: whether its nonce was seen for the first time.
    pub nonce_fresh: Option<bool>,
    /// For a rate-limited client: the decision (absent for a replayed nonce,
    /// which is refused anyway and not counted).
    pub rate: Option<RateDecision>,
    /// For a client with a quota: the decision (absent for a replayed nonce
    /// or a request refused by the rate limit).
    pub quota: Option<QuotaDecision>,
}

/// The store the config asks for.
#[derive(Debug)]
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl AnyStore {
    /// Builds the configured store; no `store` section means in memory. A
    /// Redis that is down is not an error here: the store reconnects in the
    /// background and calls fail with transient errors until it is back.
    pub async fn from_config(
        config: Option<&StoreConfig>,
        relay_name: &str,
    ) -> Result<Self, StoreError> {
        match config {
            None => Ok(Self::Memory(MemoryStore::new(
                MemoryStoreConfig::default().max_entries,
            ))),
            Some(StoreConfig::Memory(memory)) => {
                Ok(Self::Memory(MemoryStore::new(memory.max_entries)))
            }
            Some(StoreConfig::Redis(redis)) => RedisStore::connect(redis, relay_name)
                .await
                .map(Self::Redis),
        }
    }

    /// `memory` or `redis`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Everything the hot path asks of the store for one request, in at most
    /// one round trip: the nonce claim of a signed request, the client's
    /// rate-limit hit and its quota check. Nothing to ask: no call at all.
    pub async fn admit(
        &self,
        client: &str,
        nonce: Option<(&str, Duration)>,
        rate: Option<(u32, Duration)>,
        quota: Option<&QuotaAsk<'_>>,
    ) -> Result<Admission, StoreError> {
        let asks = usize::from(nonce.is_some()) + usize::from(rate.is_some());
        match self {
            // Several at once: one script. One alone is a single command
            // below (a nonce is a plain SET NX, which costs Redis less).
            Self::Redis(redis) if asks + usize::from(quota.is_some()) > 1 => {
                redis.admit(client, nonce, rate, quota).await
            }
            _ => {
                let nonce_fresh = match nonce {
                    Some((nonce, ttl)) => Some(self.claim_nonce(client, nonce, ttl).await?),
                    None => None,
                };
                let rate = match rate {
                    Some((limit, window)) if nonce_fresh != Some(false) => {
                        Some(self.hit_rate_limit(client, limit, window).await?)
                    }
                    _ => None,
                };
                let quota = match quota {
                    Some(ask) if nonce_fresh != Some(false) && rate.is_none_or(|r| r.allowed) => {
                        Some(self.check_quota(client, ask).await?)
                    }
                    _ => None,
                };
                Ok(Admission {
                    nonce_fresh,
                    rate,
                    quota,
                })
            }
        }
    }

    /// [`Self::admit`] and a read of the response cache's level 2 (`key`,
    /// Redis only) sent together: one round trip in time for a cacheable
    /// request that level 1 did not answer. The read is `None` with no
    /// Redis or no key.
    pub async fn admit_and_get(
        &self,
        client: &str,
        nonce: Option<(&str, Duration)>,
        rate: Option<(u32, Duration)>,
        quota: Option<&QuotaAsk<'_>>,
        cache_key: Option<&str>,
    ) -> (
        Result<Admission, StoreError>,
        Option<Result<Option<bytes::Bytes>, StoreError>>,
    ) {
        match (self, cache_key) {
            (Self::Redis(redis), Some(key)) => {
                let (admission, cached) =
                    tokio::join!(self.admit(client, nonce, rate, quota), redis.cache_get(key));
                (admission, Some(cached))
            }
            _ => (self.admit(client, nonce, rate, quota).await, None),
        }
    }

    /// Level 2 of the response cache: Redis only.
    pub fn cache(&self) -> Option<&RedisStore> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(redis) => Some(redis),
        }
    }

    /// The Redis pool, for state shared besides nonces (breakers, cooldowns).
    pub fn redis_pool(&self) -> Option<fred::clients::Pool> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(redis) => Some(redis.pool().clone()),
        }
    }

    /// Whether the store can take calls now (for readiness and metrics).
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(redis) => redis.is_connected(),
        }
    }
}

impl Store for AnyStore {
    async fn claim_nonce(
        &self,
        client: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Self::Memory(store) => store.claim_nonce(client, nonce, ttl).await,
            Self::Redis(store) => store.claim_nonce(client, nonce, ttl).await,
        }
    }

    async fn hit_rate_limit(
        &self,
        client: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        match self {
            Self::Memory(store) => store.hit_rate_limit(client, limit, window).await,
            Self::Redis(store) => store.hit_rate_limit(client, limit, window).await,
        }
    }

    async fn check_quota(
        &self,
        client: &str,
        ask: &QuotaAsk<'_>,
    ) -> Result<QuotaDecision, StoreError> {
        match self {
            Self::Memory(store) => store.check_quota(client, ask).await,
            Self::Redis(store) => store.check_quota(client, ask).await,
        }
    }

    async fn settle(&self, client: &str, charges: &Charges) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => store.settle(client, charges).await,
            Self::Redis(store) => store.settle(client, charges).await,
        }
    }

    async fn release_slot(&self, client: &str, slot: &str) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => store.release_slot(client, slot).await,
            Self::Redis(store) => store.release_slot(client, slot).await,
        }
    }

    async fn renew_slots(
        &self,
        client: &str,
        slots: &[String],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => store.renew_slots(client, slots, until_ms).await,
            Self::Redis(store) => store.renew_slots(client, slots, until_ms).await,
        }
    }

    async fn usage(&self, client: &str, day: &str) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            Self::Memory(store) => store.usage(client, day).await,
            Self::Redis(store) => store.usage(client, day).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates_round_trip() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_418), "2025-11-26");
        assert_eq!(civil_date(19_782), "2024-02-29");
        for days in [0, 59, 365, 10_000, 20_418, 30_000] {
            assert_eq!(days_of(&civil_date(days)), Some(days));
        }
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-01-01",
            "2026-1-1",
            "yesterday",
        ] {
            assert_eq!(days_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn months_end_on_the_first_of_the_next() {
        // 2024-02-29 12:00 UTC: a leap day, 12 hours before March.
        let now = 19_782 * DAY_MS + DAY_MS / 2;
        let (month, left) = month_of(now);
        assert_eq!(month_name(month), "2024-02");
        assert_eq!(left, Duration::from_millis(DAY_MS / 2));
        // 2025-12-31 23:59:59.999: the year turns over.
        let days = days_of("2025-12-31").unwrap();
        let (month, left) = month_of((days + 1) * DAY_MS - 1);
        assert_eq!(month_name(month), "2025-12");
        assert_eq!(left, Duration::from_millis(1));
        assert_eq!(month_name(month_index(days + 1)), "2026-01");
        assert_eq!(month_index(days + 1), month + 1);
        // The first instant of a month has the whole month ahead.
        let (month, left) = month_of(days_of("2026-11-01").unwrap() * DAY_MS);
        assert_eq!(month_name(month), "2026-11");
        assert_eq!(left, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn windows_end_on_calendar_boundaries() {
        let now = 20_418 * DAY_MS + 3_600_000 + 59_000; // 01:00:59 UTC
        let (minute, left) = minute_of(now);
        assert_eq!(minute, now / 60_000);
        assert_eq!(left, Duration::from_secs(1));
        let (day, left) = day_of(now);
        assert_eq!(day, "2025-11-26");
        assert_eq!(left, Duration::from_millis(DAY_MS - 3_659_000));
    }

    #[test]
    fn charges_gather_requests_and_drop_past_minutes() {
        let now = 20_418 * DAY_MS + 30_000;
        let one = |tokens, slot| Settlement {
            quota_tokens: tokens,
            quota_nanos: tokens * 1_000,
            usage: Some((
                "m",
                Usage {
                    input_tokens: tokens,
                    ..Usage::default()
                },
                tokens * 2_000,
            )),
            slot,
            now_ms: now,
            retention: Duration::from_secs(86_400),
        };
        let mut charges = Charges::of(&one(10, Some("a")));
        charges.add(&one(5, None));
        let mut later = Charges::default();
        later.add(&Settlement {
            now_ms: now + 120_000,
            ..one(1, Some("b"))
        });
        charges.merge(later);
        assert_eq!(charges.days[&20_418], 16);
        assert_eq!(charges.minutes.len(), 2);
        let fields = Charges::usage_fields(&charges.usage[&20_418]);
        let field = |name: &str| fields.iter().find(|(f, _)| f == name).unwrap().1;
        assert_eq!(field("input_tokens"), 16);
        assert_eq!(field("requests"), 3);
        assert_eq!(field("m/requests"), 3);
        assert_eq!(field("m/output_tokens"), 0);
        assert_eq!(field("m/cost_nanousd"), 32_000);
        assert_eq!(field(COST_FIELD), 32_000);
        assert_eq!(charges.usd_days[&20_418], 16_000);
        assert_eq!(charges.usd_months[&month_index(20_418)], 16_000);
        assert_eq!(charges.release, ["a", "b"]);
        // Three minutes on, the first minute's budget no longer matters.
        let due = charges.still_due(now + 180_000);
        assert_eq!(due.minutes.len(), 1);
        assert_eq!(due.days[&20_418], 16);
        assert!(!due.is_empty() && Charges::default().is_empty());
    }

    #[test]
    fn quota_tokens_count_cache_reads_only_when_asked() {
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 20,
            cache_creation_input_tokens: 5,
            cache_read_input_tokens: 100,
            cache_creation_1h_input_tokens: 2,
        };
        assert_eq!(usage.quota_tokens(false), 35);
        assert_eq!(usage.quota_tokens(true), 135);
    }
}
