//! State shared by the proxy replicas: once-only nonces (replay protection)
//! and per-client rate-limit windows.
//!
//! One trait, [`Store`], with two backends: [`MemoryStore`] (one process; the
//! standalone default) and [`RedisStore`] (every replica). [`AnyStore`] picks
//! one from the config without boxing futures on the hot path. Both backends
//! pass the same conformance suite (`proxy/tests/store_conformance.rs`).
//!
//! Errors carry a `transient` flag: an unreachable or overloaded store is
//! transient, and the caller decides whether to fail closed (503) or open.

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
}

/// What the store says of a request before it goes upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// For a signed request: whether its nonce was seen for the first time.
    pub nonce_fresh: Option<bool>,
    /// For a rate-limited client: the decision (absent for a replayed nonce,
    /// which is refused anyway and not counted).
    pub rate: Option<RateDecision>,
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
    /// one round trip: the nonce claim of a signed request and the client's
    /// rate-limit hit. Nothing to ask: no call at all.
    pub async fn admit(
        &self,
        client: &str,
        nonce: Option<(&str, Duration)>,
        rate: Option<(u32, Duration)>,
    ) -> Result<Admission, StoreError> {
        match (self, nonce) {
            // Both at once: one script. A nonce alone is a plain SET NX below,
            // which costs Redis less than a script.
            (Self::Redis(redis), Some(nonce)) if rate.is_some() => {
                redis.admit(client, nonce, rate).await
            }
            (_, nonce) => {
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
                Ok(Admission { nonce_fresh, rate })
            }
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
}
