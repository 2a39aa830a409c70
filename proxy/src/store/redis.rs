//! The Redis store, through fred: standalone, Sentinel or Cluster, optional
//! TLS, a pool of connections that reconnect with exponential backoff.
//!
//! Each operation is one round trip and one atomic step in Redis:
//! - a nonce is `SET key 1 NX PX ttl`; never a read then a write, which two
//!   replicas could interleave;
//! - a rate-limit hit is one Lua script (INCR, and PEXPIRE on a new window).
//!
//! Commands of concurrent requests share a connection, several in flight
//! at once (pipelined); `store.redis.pipeline: false` keeps one at a time
//! on each connection, to measure what that gains or to rule it out.
//!
//! While Redis is unreachable, calls fail at once with transient errors
//! (`fail_fast`), and every call is bounded by `command_timeout`, so a
//! request never hangs on the store. Commands are never retried: a retried
//! `SET NX` whose first reply was lost would call a fresh nonce a replay.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use claude_relay_crds::config::{RedisMode, RedisStoreConfig};
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as FredError, ErrorKind, Expiration, KeysInterface,
    LuaInterface, Options, Pool, ReconnectPolicy, Server, ServerConfig, SetOptions, Value,
};
use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping, UnresponsiveConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use bytes::Bytes;
use fred::prelude::{HashesInterface, SortedSetsInterface};
use fred::types::FromValue;
use futures_util::StreamExt;

use super::keys::Keys;
use super::{
    BudgetPeriod, Charges, QuotaAsk, QuotaDecision, RateDecision, Store, StoreError, civil_date,
    day_of, minute_of, month_name, month_of,
};
use crate::base::secrets;

/// Counts one hit in the client's window. KEYS[1]: the counter; ARGV[1]: the
/// window in milliseconds. Returns {count, milliseconds left in the window}.
/// A counter without expiry (new, or left over) gets the window's.
pub(crate) const RATE_LIMIT_LUA: &str = "\
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
";

/// A request's admission in one round trip; each part is optional.
/// KEYS, in this order, for the parts asked: the nonce (ARGV[1] ms, '0':
/// none), the rate window (ARGV[2] ms, '0': none; ARGV[3] its limit), and
/// for a quota (ARGV[12] = '1') the minute's and the day's token counters,
/// the in-flight set, and the day's and the month's dollar counters. Quota
/// ARGV: [4] tokens per minute, [5] per day, [6] max concurrent (0: no
/// limit), [7] now ms, [8] lease end ms, [9] the slot, [10] ms left in the
/// minute, [11] in the day, [13] nano-dollars per day, [14] per month, [15]
/// ms left in the month.
/// Returns {fresh (1, 0, -1 not asked), count (-1: no limit), ms left in the
/// rate window, quota (-1 not asked, 0 allowed, 1 minute, 2 day, 3
/// concurrency, 4 dollars of the day, 5 of the month), ms until it frees
/// up}. A replayed nonce or a request over its rate limit stops the script
/// before anything else is counted. Every budget is read before a slot is
/// taken, so a refused request holds none.
pub(crate) const ADMIT_LUA: &str = "\
local k = 1
local fresh = -1
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[k], 1, 'NX', 'PX', ARGV[1]) then
    return {0, -1, -1, -1, -1}
  end
  fresh = 1
  k = k + 1
end
local count, ttl = -1, -1
if ARGV[2] ~= '0' then
  count = redis.call('INCR', KEYS[k])
  ttl = redis.call('PTTL', KEYS[k])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  k = k + 1
  if count > tonumber(ARGV[3]) then
    return {fresh, count, ttl, -1, -1}
  end
end
if ARGV[12] ~= '1' then
  return {fresh, count, ttl, -1, -1}
end
local tpm, tpd, maxc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if tpm > 0 and tonumber(redis.call('GET', KEYS[k]) or '0') >= tpm then
  return {fresh, count, ttl, 1, tonumber(ARGV[10])}
end
if tpd > 0 and tonumber(redis.call('GET', KEYS[k + 1]) or '0') >= tpd then
  return {fresh, count, ttl, 2, tonumber(ARGV[11])}
end
local usdd, usdm = tonumber(ARGV[13]), tonumber(ARGV[14])
if usdd > 0 and tonumber(redis.call('GET', KEYS[k + 3]) or '0') >= usdd then
  return {fresh, count, ttl, 4, tonumber(ARGV[11])}
end
if usdm > 0 and tonumber(redis.call('GET', KEYS[k + 4]) or '0') >= usdm then
  return {fresh, count, ttl, 5, tonumber(ARGV[15])}
end
if maxc > 0 then
  local set = KEYS[k + 2]
  redis.call('ZREMRANGEBYSCORE', set, '-inf', ARGV[7])
  if redis.call('ZCARD', set) >= maxc then
    return {fresh, count, ttl, 3, 1000}
  end
  redis.call('ZADD', set, ARGV[8], ARGV[9])
  local lease = tonumber(ARGV[8]) - tonumber(ARGV[7])
  if redis.call('PTTL', set) < lease then
    redis.call('PEXPIRE', set, lease)
  end
end
return {fresh, count, ttl, 0, 0}
";

/// Settles the finished requests of one client. KEYS[1]: its in-flight
/// set; then ARGV[1] minute counters, ARGV[2] day counters, ARGV[5] dollar
/// day counters, ARGV[6] dollar month counters and ARGV[3] usage hashes, in
/// that order; ARGV[4] the usage hashes' TTL (ms). Then ARGV holds the
/// amount of each minute, day, dollar day and dollar month counter, then
/// for each usage hash the number of its fields followed by field and
/// increment pairs, then the slots to release.
pub(crate) const SETTLE_LUA: &str = "\
local m, d, u = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ud, um = tonumber(ARGV[5]), tonumber(ARGV[6])
local a, k = 7, 2
for i = 1, m do
  redis.call('INCRBY', KEYS[k], ARGV[a])
  redis.call('PEXPIRE', KEYS[k], 120000)
  k, a = k + 1, a + 1
end
for i = 1, d + ud do
  redis.call('INCRBY', KEYS[k], ARGV[a])
  redis.call('PEXPIRE', KEYS[k], 172800000)
  k, a = k + 1, a + 1
end
for i = 1, um do
  redis.call('INCRBY', KEYS[k], ARGV[a])
  redis.call('PEXPIRE', KEYS[k], 3024000000)
  k, a = k + 1, a + 1
end
for i = 1, u do
  local n = tonumber(ARGV[a])
  a = a + 1
  for j = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[4])
  k = k + 1
end
while a <= #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[a])
  a = a + 1
end
return 1
";

/// Renews slots still in use. KEYS[1]: the in-flight set; ARGV[1]: the new
/// lease end (ms), then the slots. Only slots still present are renewed.
pub(crate) const RENEW_LUA: &str = "\
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
end
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
";

/// SHA-1 of [`RATE_LIMIT_LUA`], as `SCRIPT LOAD` answers it (checked by a
/// test against a real Redis), so EVALSHA needs no hashing here.
pub(crate) const RATE_LIMIT_SHA1: &str = "1e41cfc412e6f2421d73aaf3e2078ab84078a3e2";

/// Connections to Redis, and how commands take them.
struct Lane {
    pool: Pool,
    /// With pipelining off: one lock per connection of `pool`, held by a
    /// command from its write to its reply.
    turns: Option<Box<[tokio::sync::Mutex<()>]>>,
    /// Where the next command starts looking for a free connection.
    next: AtomicUsize,
}

/// A connection taken for one command (or a command and its retry).
struct Turn<'a> {
    client: &'a Client,
    _held: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl Lane {
    fn new(pool: Pool, pipeline: bool) -> Self {
        let turns = (!pipeline).then(|| {
            (0..pool.size())
                .map(|_| tokio::sync::Mutex::new(()))
                .collect()
        });
        Self {
            pool,
            turns,
            next: AtomicUsize::new(0),
        }
    }

    /// A connection at once: pipelined, a connected one whatever it
    /// carries (as the pool picks one); otherwise a connected one with no
    /// command in flight, if there is one.
    fn try_take(&self) -> Option<Turn<'_>> {
        let Some(turns) = &self.turns else {
            return Some(Turn {
                client: self.pool.next_connected(),
                _held: None,
            });
        };
        let clients = self.pool.clients();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..clients.len())
            .map(|i| (start + i) % clients.len())
            .find_map(|at| {
                let held = turns[at].try_lock().ok()?;
                clients[at].is_connected().then_some(Turn {
                    client: &clients[at],
                    _held: Some(held),
                })
            })
    }

    /// The next connection to come free (pipelining off, all busy); the
    /// wait is in line, first come first served.
    async fn take(&self) -> Turn<'_> {
        if let Some(turn) = self.try_take() {
            return turn;
        }
        let clients = self.pool.clients();
        let at = self.next.fetch_add(1, Ordering::Relaxed) % clients.len();
        let held = match &self.turns {
            Some(turns) => Some(turns[at].lock().await),
            None => None,
        };
        Turn {
            client: &clients[at],
            _held: held,
        }
    }
}

pub struct RedisStore {
    shared: Lane,
    /// One connection per worker thread, made on its first request and
    /// driven by that worker's runtime: a request's command and its answer
    /// stay on the request's thread, and (pipelined) the commands a
    /// worker's requests send in one turn of its loop go out in one write.
    worker_lanes: Box<[OnceLock<Option<Lane>>]>,
    /// What the shared pool was built from, for the workers' own; boxed,
    /// as it is read once per worker and would otherwise swell the store.
    recipe: Box<(RedisStoreConfig, Config)>,
    keys: Keys,
    options: Options,
    command_timeout: Duration,
}

impl RedisStore {
    /// Builds the pool and starts connecting. Waits up to `connect_timeout`
    /// for a first connection; if Redis is not there yet the store is still
    /// returned and keeps trying in the background. Errors are for a config
    /// that cannot work (bad URL, unreadable secret or CA file).
    ///
    /// Must be called inside a Tokio runtime.
    pub async fn connect(config: &RedisStoreConfig, relay_name: &str) -> Result<Self, StoreError> {
        let connect_timeout = *config.connect_timeout;
        let command_timeout = *config.command_timeout;
        let fred = fred_config(config)?;
        let pool = build_pool(config, fred.clone(), config.pool_size)?;
        // The connection tasks run until `quit`; the handle is not needed.
        drop(pool.connect());
        match tokio::time::timeout(connect_timeout, pool.wait_for_connect()).await {
            Ok(Ok(())) => tracing::info!(mode = ?config.mode, "connected to redis"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis not reachable yet; retrying in the background")
            }
            Err(_) => tracing::warn!(
                timeout = ?connect_timeout,
                "redis not reachable yet; retrying in the background"
            ),
        }
        Ok(Self {
            shared: Lane::new(pool, config.pipeline),
            worker_lanes: (0..crate::base::worker::MAX_WORKERS)
                .map(|_| OnceLock::new())
                .collect(),
            recipe: Box::new((config.clone(), fred)),
            keys: Keys::new(relay_name),
            options: Options {
                timeout: Some(command_timeout),
                fail_fast: true,
                max_attempts: Some(1),
                ..Options::default()
            },
            command_timeout,
        })
    }

    /// The connections for a request's commands: the calling worker's own
    /// when it is up; otherwise (off the workers, while it connects or
    /// reconnects) the shared pool.
    fn hot_lane(&self) -> &Lane {
        let Some(slot) = crate::base::worker::index().and_then(|i| self.worker_lanes.get(i)) else {
            return &self.shared;
        };
        // Made and connected without an await: the connection's tasks are
        // spawned on this worker's runtime.
        let (settings, fred) = &*self.recipe;
        let own = slot.get_or_init(|| match build_pool(settings, fred.clone(), 1) {
            Ok(pool) => {
                drop(pool.connect());
                Some(Lane::new(pool, settings.pipeline))
            }
            // fred took the same config for the shared pool; should it not
            // now, the shared pool serves.
            Err(_) => None,
        });
        match own {
            Some(lane) if lane.pool.is_connected() => lane,
            _ => &self.shared,
        }
    }

    /// A connection of `lane` for one command; with pipelining off, the
    /// wait for one to come free is bounded like a command.
    async fn turn<'a>(&self, lane: &'a Lane) -> Result<Turn<'a>, StoreError> {
        if let Some(turn) = lane.try_take() {
            return Ok(turn);
        }
        tokio::time::timeout(self.command_timeout, lane.take())
            .await
            .map_err(|_| {
                StoreError::transient(format!(
                    "redis: no connection free within {:?}",
                    self.command_timeout
                ))
            })
    }

    /// The connection pool, for the breakers and key cooldowns that share it.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// Whether at least one pooled connection is up.
    pub fn is_connected(&self) -> bool {
        self.shared.pool.is_connected()
    }

    /// Runs one command with the store's options and a hard bound on time.
    fn bounded<'a, T>(
        &self,
        call: impl Future<Output = Result<T, FredError>> + Send + 'a,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'a
    where
        T: 'a,
    {
        // Boxed at once: fred's futures are large, and every future that
        // holds one would otherwise be copied whole each time it moves.
        let call = Box::pin(call);
        let timeout = self.command_timeout;
        async move {
            // fred applies the same timeout; this outer bound covers time
            // spent before fred starts its clock.
            match tokio::time::timeout(timeout + Duration::from_millis(50), call).await {
                Ok(result) => result.map_err(store_error),
                Err(_) => Err(StoreError::transient(format!(
                    "redis: no answer within {timeout:?}"
                ))),
            }
        }
    }

    async fn run_rate_script(&self, key: &str, window_ms: i64) -> Result<Vec<i64>, StoreError> {
        self.run_script(
            RATE_LIMIT_LUA,
            RATE_LIMIT_SHA1,
            vec![key.to_string()],
            vec![window_ms.to_string()],
        )
        .await
    }

    /// EVALSHA, or EVAL when the script cache is empty (after a Redis
    /// restart), which runs the script and caches it again: one round trip.
    async fn run_script<R: FromValue + Send>(
        &self,
        script: &'static str,
        sha1: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, StoreError> {
        let turn = self.turn(self.hot_lane()).await?;
        let client = turn.client.with_options(&self.options);
        let result = self
            .bounded(client.evalsha::<R, _, _, _>(sha1, keys.clone(), args.clone()))
            .await;
        match result {
            Err(e) if e.to_string().contains("NOSCRIPT") => {
                self.bounded(client.eval::<R, _, _, _>(script, keys, args))
                    .await
            }
            other => other,
        }
    }

    /// See [`super::AnyStore::admit`]: nonce, rate window and quota in one script.
    pub async fn admit(
        &self,
        client: &str,
        nonce: Option<(&str, Duration)>,
        rate: Option<(u32, Duration)>,
        quota: Option<&QuotaAsk<'_>>,
    ) -> Result<super::Admission, StoreError> {
        let mut keys = Vec::with_capacity(7);
        let mut args = Vec::with_capacity(15);
        match nonce {
            Some((nonce, ttl)) => {
                keys.push(self.keys.nonce(client, nonce));
                args.push(millis_i64(ttl).to_string());
            }
            None => args.push("0".into()),
        }
        match rate {
            Some((limit, window)) => {
                keys.push(self.keys.rate(client));
                args.push(millis_i64(window).to_string());
                args.push(limit.to_string());
            }
            None => args.extend(["0".into(), "0".into()]),
        }
        match quota {
            Some(ask) => {
                let (minute, minute_left) = minute_of(ask.now_ms);
                let (day, day_left) = day_of(ask.now_ms);
                let (month, month_left) = month_of(ask.now_ms);
                keys.push(self.keys.tokens_minute(client, minute));
                keys.push(self.keys.tokens_day(client, &day));
                keys.push(self.keys.in_flight(client));
                keys.push(self.keys.usd_day(client, &day));
                keys.push(self.keys.usd_month(client, &month_name(month)));
                args.extend([
                    ask.tokens_per_minute.to_string(),
                    ask.tokens_per_day.to_string(),
                    ask.max_concurrent.to_string(),
                    ask.now_ms.to_string(),
                    ask.lease_until_ms.to_string(),
                    ask.slot.to_string(),
                    minute_left.as_millis().to_string(),
                    day_left.as_millis().to_string(),
                    "1".into(),
                    ask.usd_nanos_per_day.to_string(),
                    ask.usd_nanos_per_month.to_string(),
                    month_left.as_millis().to_string(),
                ]);
            }
            None => args.extend(std::iter::repeat_n(String::from("0"), 12)),
        }
        let reply: Vec<i64> = self.run_script(ADMIT_LUA, ADMIT_SHA1, keys, args).await?;
        let [fresh, count, left_ms, quota_code, quota_ms] = reply[..] else {
            return Err(StoreError::permanent(format!(
                "redis: the admission script answered {} values, not 5",
                reply.len()
            )));
        };
        let ms = |n: i64| Duration::from_millis(u64::try_from(n.max(1)).unwrap_or(1));
        Ok(super::Admission {
            nonce_fresh: nonce.map(|_| fresh == 1),
            rate: match rate {
                Some((limit, _)) if fresh != 0 => Some(decision(limit, count, left_ms)),
                _ => None,
            },
            quota: match quota_code {
                0 => Some(QuotaDecision::Allowed),
                1 => Some(QuotaDecision::OverBudget {
                    per: BudgetPeriod::Minute,
                    retry_after: ms(quota_ms),
                }),
                2 => Some(QuotaDecision::OverBudget {
                    per: BudgetPeriod::Day,
                    retry_after: ms(quota_ms),
                }),
                3 => Some(QuotaDecision::OverConcurrency),
                4 => Some(QuotaDecision::OverBudget {
                    per: BudgetPeriod::UsdDay,
                    retry_after: ms(quota_ms),
                }),
                5 => Some(QuotaDecision::OverBudget {
                    per: BudgetPeriod::UsdMonth,
                    retry_after: ms(quota_ms),
                }),
                _ => None,
            },
        })
    }

    /// Level 2 of the response cache: the entry under `key`, if any.
    pub async fn cache_get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let turn = self.turn(self.hot_lane()).await?;
        self.bounded(turn.client.with_options(&self.options).get(key))
            .await
    }

    /// Stores a cache entry for `ttl`; written in the background, so errors
    /// only matter to metrics.
    pub async fn cache_put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let turn = self.turn(&self.shared).await?;
        self.bounded(turn.client.with_options(&self.options).set::<(), _, _>(
            key,
            value,
            Some(Expiration::PX(millis_i64(ttl))),
            None,
            false,
        ))
        .await
    }

    /// Deletes the cache entries of one scope, or all of them; how many.
    /// SCAN walks the keyspace (every primary in a cluster), so this is an
    /// admin operation, never one on the request path.
    pub async fn cache_purge(&self, scope: Option<&str>) -> Result<u64, StoreError> {
        let pattern = self.keys.cache_pattern(scope);
        // NB: the SCAN stream is not held to one command per connection
        // when pipelining is off; the UNLINKs are.
        let client = self.shared.pool.next();
        let mut keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(500), None)
                .boxed()
        } else {
            client.scan_buffered(pattern, Some(500), None).boxed()
        };
        let mut deleted = 0u64;
        let mut batch = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), keys.next())
                .await
                .map_err(|_| StoreError::transient("redis: SCAN took too long"))?;
            let done = next.is_none();
            if let Some(key) = next {
                batch.push(key.map_err(store_error)?);
            }
            if batch.len() >= 100 || (done && !batch.is_empty()) {
                // One key per UNLINK: keys of a batch may live on different cluster slots.
                let unlinks = batch.drain(..).map(|key| async move {
                    let turn = self.turn(&self.shared).await?;
                    self.bounded(
                        turn.client
                            .with_options(&self.options)
                            .unlink::<u64, _>(key),
                    )
                    .await
                });
                for result in futures_util::future::join_all(unlinks).await {
                    deleted += result?;
                }
            }
            if done {
                return Ok(deleted);
            }
        }
    }
}

impl Store for RedisStore {
    async fn claim_nonce(
        &self,
        client: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.keys.nonce(client, nonce);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let turn = self.turn(self.hot_lane()).await?;
        let reply: Value = self
            .bounded(turn.client.with_options(&self.options).set(
                key,
                1,
                Some(Expiration::PX(ttl_ms)),
                Some(SetOptions::NX),
                false,
            ))
            .await?;
        // NX answers OK when it set the key, nil when the key existed.
        Ok(!reply.is_null())
    }

    async fn hit_rate_limit(
        &self,
        client: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        let key = self.keys.rate(client);
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        let reply = self.run_rate_script(&key, window_ms).await?;
        let [count, left_ms] = reply[..] else {
            return Err(StoreError::permanent(format!(
                "redis: the rate-limit script answered {} values, not 2",
                reply.len()
            )));
        };
        Ok(decision(limit, count, left_ms))
    }

    async fn check_quota(
        &self,
        client: &str,
        ask: &QuotaAsk<'_>,
    ) -> Result<QuotaDecision, StoreError> {
        let admission = self.admit(client, None, None, Some(ask)).await?;
        admission.quota.ok_or_else(|| {
            StoreError::permanent("redis: the admission script gave no quota decision")
        })
    }

    async fn settle(&self, client: &str, charges: &Charges) -> Result<(), StoreError> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut keys = vec![self.keys.in_flight(client)];
        let mut args = vec![
            charges.minutes.len().to_string(),
            charges.days.len().to_string(),
            charges.usage.len().to_string(),
            millis_i64(charges.retention).to_string(),
            charges.usd_days.len().to_string(),
            charges.usd_months.len().to_string(),
        ];
        for (minute, tokens) in &charges.minutes {
            keys.push(self.keys.tokens_minute(client, *minute));
            args.push(tokens.to_string());
        }
        for (day, tokens) in &charges.days {
            keys.push(self.keys.tokens_day(client, &civil_date(*day)));
            args.push(tokens.to_string());
        }
        for (day, nanos) in &charges.usd_days {
            keys.push(self.keys.usd_day(client, &civil_date(*day)));
            args.push(nanos.to_string());
        }
        for (month, nanos) in &charges.usd_months {
            keys.push(self.keys.usd_month(client, &month_name(*month)));
            args.push(nanos.to_string());
        }
        for (day, models) in &charges.usage {
            keys.push(self.keys.usage(client, &civil_date(*day)));
            let fields = Charges::usage_fields(models);
            args.push(fields.len().to_string());
            for (field, n) in fields {
                args.push(field);
                args.push(n.to_string());
            }
        }
        args.extend(charges.release.iter().cloned());
        self.run_script::<i64>(SETTLE_LUA, SETTLE_SHA1, keys, args)
            .await
            .map(drop)
    }

    async fn release_slot(&self, client: &str, slot: &str) -> Result<(), StoreError> {
        // On the worker's own connection, like the admission that took it.
        let turn = self.turn(self.hot_lane()).await?;
        self.bounded(
            turn.client
                .with_options(&self.options)
                .zrem::<i64, _, _>(self.keys.in_flight(client), slot),
        )
        .await
        .map(drop)
    }

    async fn renew_slots(
        &self,
        client: &str,
        slots: &[String],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(slots.len() + 1);
        args.push(until_ms.to_string());
        args.extend(slots.iter().cloned());
        self.run_script::<i64>(
            RENEW_LUA,
            RENEW_SHA1,
            vec![self.keys.in_flight(client)],
            args,
        )
        .await
        .map(drop)
    }

    async fn usage(&self, client: &str, day: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let turn = self.turn(&self.shared).await?;
        let all: std::collections::HashMap<String, u64> = self
            .bounded(
                turn.client
                    .with_options(&self.options)
                    .hgetall(self.keys.usage(client, day)),
            )
            .await?;
        Ok(all.into_iter().collect())
    }
}

/// A script's {count, ms left} as a decision against `limit`.
fn decision(limit: u32, count: i64, left_ms: i64) -> RateDecision {
    let count = u32::try_from(count.max(0)).unwrap_or(u32::MAX);
    let allowed = count <= limit;
    RateDecision {
        allowed,
        remaining: limit.saturating_sub(count),
        retry_after: (!allowed)
            .then(|| Duration::from_millis(u64::try_from(left_ms.max(1)).unwrap_or(1))),
    }
}

fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// SHA-1 of [`ADMIT_LUA`], [`SETTLE_LUA`] and [`RENEW_LUA`] (checked by a
/// test against a real Redis).
pub(crate) const ADMIT_SHA1: &str = "280cd5c1edeba604ad53be66b20651332077d37f";
pub(crate) const SETTLE_SHA1: &str = "56228ccc2303415598f953d3212afac64efc1f02";
pub(crate) const RENEW_SHA1: &str = "0eb98f3fbcf9783295329878d8799622b9bd2af6";

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Stop the reconnect loops of a store replaced on reload.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pools: Vec<Pool> = std::iter::once(self.shared.pool.clone())
                .chain(
                    self.worker_lanes
                        .iter()
                        .filter_map(|lane| Some(lane.get()?.as_ref()?.pool.clone())),
                )
                .collect();
            runtime.spawn(async move {
                for pool in pools {
                    let _ = pool.quit().await;
                }
            });
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .field("pool_size", &self.shared.pool.size())
            .field("pipeline", &self.shared.turns.is_none())
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

/// Connectivity trouble may pass; a malformed command or config will not.
fn store_error(e: FredError) -> StoreError {
    let message = format!("redis: {e}");
    match e.kind() {
        ErrorKind::Config
        | ErrorKind::Url
        | ErrorKind::Auth
        | ErrorKind::InvalidCommand
        | ErrorKind::InvalidArgument
        | ErrorKind::Parse => StoreError::permanent(message),
        _ => StoreError::transient(message),
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A pool of `size` connections, not connected yet.
fn build_pool(config: &RedisStoreConfig, fred: Config, size: usize) -> Result<Pool, StoreError> {
    let connect_timeout = *config.connect_timeout;
    let command_timeout = *config.command_timeout;
    let policy = ReconnectPolicy::new_exponential(
        0, // never give up
        millis_u32(*config.reconnect.min_delay),
        millis_u32(*config.reconnect.max_delay),
        2,
    );
    Builder::from_config(fred)
        .set_policy(policy)
        .with_connection_config(|c| {
            c.connection_timeout = connect_timeout;
            c.internal_command_timeout = connect_timeout;
            c.max_command_attempts = 1;
            // A Redis that accepts but stops answering (paused, partitioned)
            // is dropped and reconnected rather than left to time out forever.
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some((command_timeout * 4).max(Duration::from_secs(1))),
                interval: Duration::from_millis(250),
            };
            c.tcp.nodelay = Some(true);
        })
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        .build_pool(size)
        .map_err(|e| StoreError::permanent(format!("redis: cannot build the client: {e}")))
}

/// The fred config for the configured mode, credentials and TLS. Errors
/// never repeat the URL, which may hold a password.
fn fred_config(config: &RedisStoreConfig) -> Result<Config, StoreError> {
    let bad = |what: String| StoreError::permanent(format!("redis: {what}"));
    let mut url_tls = false;
    let mut fred = match config.mode {
        RedisMode::Standalone => {
            let url = match (&config.url, &config.url_from) {
                (Some(url), _) => url.clone(),
                (None, Some(source)) => secrets::resolve(source).map_err(bad)?.expose().to_owned(),
                (None, None) => return Err(bad("standalone mode needs url or url_from".into())),
            };
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(bad(
                    "the Redis URL must start with redis:// or rediss://".into()
                ));
            }
            url_tls = url.starts_with("rediss://");
            Config::from_url_centralized(&url).map_err(|_| {
                bad("store.redis.url is not a valid redis:// or rediss:// URL".into())
            })?
        }
        RedisMode::Sentinel => {
            let sentinel = config
                .sentinel
                .as_ref()
                .ok_or_else(|| bad("sentinel mode needs a sentinel section".into()))?;
            Config {
                server: ServerConfig::Sentinel {
                    hosts: servers(&sentinel.addresses).map_err(bad)?,
                    service_name: sentinel.service_name.clone(),
                },
                ..Config::default()
            }
        }
        RedisMode::Cluster => {
            let cluster = config
                .cluster
                .as_ref()
                .ok_or_else(|| bad("cluster mode needs a cluster section".into()))?;
            let hosts = servers(&cluster.nodes).map_err(bad)?;
            Config {
                server: ServerConfig::new_clustered(
                    hosts
                        .into_iter()
                        .map(|s| (s.host.to_string(), s.port))
                        .collect(),
                ),
                ..Config::default()
            }
        }
    };
    // Reconnect from the first attempt on: Redis may come up after the proxy.
    fred.fail_fast = false;
    if let Some(username) = &config.username {
        fred.username = Some(username.clone());
    }
    if let Some(source) = &config.password_from {
        fred.password = Some(secrets::resolve(source).map_err(bad)?.expose().to_owned());
    }
    fred.tls = if config.tls.enabled || url_tls {
        Some(tls_config(
            config.tls.ca_file.as_deref(),
            config.mode == RedisMode::Cluster,
        )?)
    } else {
        None
    };
    Ok(fred)
}

/// `host:port` strings (IPv6 in brackets) as fred servers.
fn servers(addresses: &[String]) -> Result<Vec<Server>, String> {
    addresses
        .iter()
        .map(|address| {
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| format!("{address:?} is not host:port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok(Server::new(host, port))
        })
        .collect()
}

/// rustls with the webpki roots plus an optional CA file, like the upstream client.
fn tls_config(ca_file: Option<&Path>, cluster: bool) -> Result<TlsConfig, StoreError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                StoreError::permanent(format!("redis: CA file {}: {e}", path.display()))
            })?;
        if certs.is_empty() {
            return Err(StoreError::permanent(format!(
                "redis: CA file {} holds no certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                StoreError::permanent(format!("redis: CA file {}: {e}", path.display()))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::permanent(format!("redis: TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfig {
        connector: TlsConnector::Rustls(tokio_rustls::TlsConnector::from(Arc::new(client))),
        // Cluster nodes announce IPs; check their certificates against the
        // configured host name instead.
        hostnames: if cluster {
            TlsHostMapping::DefaultHost
        } else {
            TlsHostMapping::None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_relay_crds::config::{RedisClusterConfig, RedisSentinelConfig};

    fn base() -> RedisStoreConfig {
        serde_json::from_str(r#"{"url": "redis://127.0.0.1:6379/2"}"#).unwrap()
    }

    #[test]
    fn standalone_url_sets_server_and_database() {
        let config = fred_config(&base()).unwrap();
        assert_eq!(
            config.server,
            ServerConfig::new_centralized("127.0.0.1", 6379)
        );
        assert_eq!(config.database, Some(2));
        assert!(config.tls.is_none());
        assert!(!config.fail_fast);
    }

    #[test]
    fn rediss_url_and_tls_flag_turn_tls_on() {
        let mut c = base();
        c.url = Some("rediss://redis.example:6380".into());
        assert!(fred_config(&c).unwrap().tls.is_some());
        let mut c = base();
        c.tls.enabled = true;
        assert!(fred_config(&c).unwrap().tls.is_some());
        c.tls.ca_file = Some("/nonexistent/ca.pem".into());
        let err = fred_config(&c).unwrap_err();
        assert!(!err.transient);
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn url_from_and_password_from_are_read_but_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "redis://:s3cr3t-pw@10.0.0.1:6390\n").unwrap();
        let mut c = base();
        c.url = None;
        c.url_from = Some(claude_relay_crds::config::SecretSource::File(
            url_file.clone(),
        ));
        let config = fred_config(&c).unwrap();
        assert_eq!(config.password.as_deref(), Some("s3cr3t-pw"));
        assert_eq!(
            config.server,
            ServerConfig::new_centralized("10.0.0.1", 6390)
        );

        std::fs::write(&url_file, "http://:s3cr3t-pw@nowhere").unwrap();
        let err = fred_config(&c).unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn sentinel_and_cluster_take_their_addresses() {
        let mut c = base();
        c.url = None;
        c.mode = RedisMode::Sentinel;
        c.sentinel = Some(RedisSentinelConfig {
            service_name: "mymaster".into(),
            addresses: vec!["s1:26379".into(), "[::1]:26380".into()],
        });
        match fred_config(&c).unwrap().server {
            ServerConfig::Sentinel {
                hosts,
                service_name,
            } => {
                assert_eq!(service_name, "mymaster");
                assert_eq!(
                    hosts,
                    vec![Server::new("s1", 26379), Server::new("::1", 26380)]
                );
            }
            other => panic!("{other:?}"),
        }

        let mut c = base();
        c.url = None;
        c.mode = RedisMode::Cluster;
        c.cluster = Some(RedisClusterConfig {
            nodes: vec!["n1:7000".into(), "n2:7001".into()],
        });
        let server = fred_config(&c).unwrap().server;
        assert!(server.is_clustered());
        assert_eq!(server.hosts().len(), 2);

        c.cluster = Some(RedisClusterConfig {
            nodes: vec!["n1".into()],
        });
        assert!(fred_config(&c).is_err());
    }

    #[tokio::test]
    async fn rate_limit_sha1_matches_what_redis_computes() {
        let server = claude_relay_testkit::redis::RedisServer::start().unwrap();
        let store = RedisStore::connect(
            &serde_json::from_value(serde_json::json!({"url": server.url()})).unwrap(),
            "t",
        )
        .await
        .unwrap();
        let sha: String = store.pool().script_load(RATE_LIMIT_LUA).await.unwrap();
        assert_eq!(sha, RATE_LIMIT_SHA1);
        let sha: String = store.pool().script_load(ADMIT_LUA).await.unwrap();
        assert_eq!(sha, ADMIT_SHA1);
        let sha: String = store.pool().script_load(SETTLE_LUA).await.unwrap();
        assert_eq!(sha, SETTLE_SHA1);
        let sha: String = store.pool().script_load(RENEW_LUA).await.unwrap();
        assert_eq!(sha, RENEW_SHA1);
    }
}
