//! The upstream API keys of each region: which key the next attempt uses.
//!
//! A pool takes keys in turn (round robin) or the one with the fewest
//! requests in flight, skipping keys that rest after a 429 (for the
//! upstream's `retry-after`, else its `anthropic-ratelimit-*-reset` time),
//! keys disabled by a 401 or 403 (until the config changes and the pool is
//! rebuilt), and keys at their concurrency cap.
//!
//! Cooldowns are shared: every [`SYNC_INTERVAL`] one pipelined batch (a Lua
//! script per region on `claude-relay:{relay}:key-cooldowns:{region}`) writes
//! this replica's new cooldowns and reads everyone's, so replicas do not all
//! run into a limited key; no Redis round trip per request.
//!
//! A key never appears in logs or metrics: it is named by its index in the
//! region's `api_keys` and an id, the first 12 hex digits of its SHA-256.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claude_relay_crds::config::{KeyPoolConfig, KeyStrategy};
use fred::clients::Pool;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::types::Value;
use futures_util::future::join_all;
use http::{HeaderMap, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use crate::base::metrics::{Metrics, Name, UpstreamLabels};
use crate::store::keys::Keys;

/// How often cooldowns are exchanged with Redis.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// Rest after a 429 that says nothing of when to come back.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);
/// Cap on a cooldown, so a bad header cannot retire a key for good.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// Writes cooldowns and reads them all. KEYS[1]: the region's hash. ARGV:
/// now_ms, then pairs of key id and until_ms. Returns the pairs in force.
const SYNC_LUA: &str = r#"
local key, now = KEYS[1], tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', key, ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
end
local out, latest = {}, 0
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local t = tonumber(all[i + 1]) or 0
  if t <= now then
    redis.call('HDEL', key, all[i])
  else
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
    if t > latest then latest = t end
  end
end
if latest > now then redis.call('PEXPIRE', key, latest - now) end
return out
"#;

/// Why no key is available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoKeyReason {
    /// Every usable key rests after a 429.
    CoolingDown,
    /// Every key was refused with 401 or 403.
    AllDisabled,
    /// Every usable key is at `max_in_flight_per_key`.
    AtCapacity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoKey {
    pub reason: NoKeyReason,
    /// When cooling down: until the first key is back.
    pub retry_after: Option<Duration>,
}

struct Key {
    value: HeaderValue,
    id: String,
    in_flight: AtomicU32,
    cooldown_until_ms: AtomicU64,
    disabled: AtomicBool,
}

struct Common {
    metrics: Arc<Metrics>,
    redis: Option<Pool>,
    keys: Keys,
    /// Cooldowns not yet written to Redis: (region, key id, until_ms).
    outbox: Mutex<Vec<(Arc<str>, String, u64)>>,
}

/// The keys of one region.
pub struct KeyPool {
    region: Name,
    keys: Vec<Key>,
    strategy: KeyStrategy,
    cap: Option<u32>,
    next: AtomicUsize,
    common: Arc<Common>,
}

/// One attempt's key; counts as in flight until dropped, so keep it until
/// the response body ends.
pub struct KeyLease {
    pool: Arc<KeyPool>,
    index: usize,
}

impl KeyLease {
    /// The `x-api-key` value (marked sensitive).
    pub fn header(&self) -> &HeaderValue {
        &self.pool.keys[self.index].value
    }

    /// Position of the key in the region's `api_keys`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The key's id for logs: a short hash prefix, never the key.
    pub fn id(&self) -> &str {
        &self.pool.keys[self.index].id
    }

    /// Reads the upstream's answer: a 429 rests the key, a 401 or 403
    /// disables it until the config changes. Other statuses change nothing.
    pub fn record(&self, status: StatusCode, headers: &HeaderMap) {
        let pool = &self.pool;
        let key = &pool.keys[self.index];
        let labels = UpstreamLabels {
            upstream: pool.region.clone(),
        };
        match status.as_u16() {
            429 => {
                let now = unix_ms();
                let rest = cooldown(headers, SystemTime::now());
                let until = now + rest.as_millis() as u64;
                key.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
                pool.common
                    .metrics
                    .key_cooldowns
                    .get_or_create(&labels)
                    .inc();
                tracing::info!(
                    region = &*pool.region.0,
                    key_index = self.index,
                    key_id = %key.id,
                    cooldown = ?rest,
                    "upstream key rate limited; resting it"
                );
                if pool.common.redis.is_some() {
                    pool.common
                        .outbox
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((pool.region.0.clone(), key.id.clone(), until));
                }
            }
            // Only the first refusal logs and counts; later ones find it disabled.
            401 | 403 if !key.disabled.swap(true, Ordering::Relaxed) => {
                pool.common
                    .metrics
                    .keys_disabled
                    .get_or_create(&labels)
                    .inc();
                tracing::error!(
                    region = &*pool.region.0,
                    key_index = self.index,
                    key_id = %key.id,
                    status = status.as_u16(),
                    "UPSTREAM KEY REFUSED: disabled until the config changes; replace or remove it"
                );
            }
            _ => {}
        }
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.pool.keys[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl KeyPool {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for the next attempt. Lock-free: a few atomics per key.
    pub fn pick(self: &Arc<Self>) -> Result<KeyLease, NoKey> {
        self.pick_except(&[])
    }

    /// The key for the next attempt of a request whose keys `tried` (by
    /// index) answered 429: those are not asked again, even when their
    /// rest is already over (a `retry-after` in the past).
    pub fn pick_except(self: &Arc<Self>, tried: &[usize]) -> Result<KeyLease, NoKey> {
        let n = self.keys.len();
        let now = unix_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let usable = |i: usize| {
            let k = &self.keys[i];
            !k.disabled.load(Ordering::Relaxed)
                && k.cooldown_until_ms.load(Ordering::Relaxed) <= now
                && !tried.contains(&i)
        };
        let order = (0..n).map(|j| (start + j) % n);
        match self.strategy {
            KeyStrategy::RoundRobin => {
                for i in order {
                    if usable(i) && self.try_take(i) {
                        return Ok(self.lease(i));
                    }
                }
            }
            KeyStrategy::LeastInFlight => {
                let mut candidates: Vec<usize> = order.filter(|&i| usable(i)).collect();
                // Stable: equal loads keep the rotated order, so ties take turns.
                candidates.sort_by_key(|&i| self.keys[i].in_flight.load(Ordering::Relaxed));
                for i in candidates {
                    if self.try_take(i) {
                        return Ok(self.lease(i));
                    }
                }
            }
        }
        Err(self.why_none(now, tried))
    }

    /// How long until a key of the region can be used again: zero when one
    /// is free now (or only busy), `None` when every key is disabled.
    pub fn rest_left(&self) -> Option<Duration> {
        let now = unix_ms();
        self.keys
            .iter()
            .filter(|k| !k.disabled.load(Ordering::Relaxed))
            .map(|k| {
                k.cooldown_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(now)
            })
            .min()
            .map(Duration::from_millis)
    }

    /// Counts one more in flight on key `i`, unless that passes the cap.
    fn try_take(&self, i: usize) -> bool {
        let in_flight = &self.keys[i].in_flight;
        match self.cap {
            None => {
                in_flight.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(cap) => in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    fn lease(self: &Arc<Self>, index: usize) -> KeyLease {
        KeyLease {
            pool: self.clone(),
            index,
        }
    }

    /// Why no key was found; keys `tried` by this request count as resting
    /// (they answered 429), for however long their rest still runs.
    fn why_none(&self, now: u64, tried: &[usize]) -> NoKey {
        let back_in = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.disabled.load(Ordering::Relaxed))
            .map(|(i, k)| {
                let left = k
                    .cooldown_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(now);
                (tried.contains(&i), left)
            })
            .collect::<Vec<_>>();
        if back_in.is_empty() {
            NoKey {
                reason: NoKeyReason::AllDisabled,
                retry_after: None,
            }
        } else if back_in.iter().any(|&(tried, left)| !tried && left == 0) {
            NoKey {
                reason: NoKeyReason::AtCapacity,
                retry_after: None,
            }
        } else {
            NoKey {
                reason: NoKeyReason::CoolingDown,
                retry_after: back_in
                    .iter()
                    .map(|&(_, left)| left)
                    .min()
                    .map(Duration::from_millis),
            }
        }
    }

    fn apply_shared(&self, id: &str, until: u64) {
        for key in self.keys.iter().filter(|k| k.id == id) {
            key.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }
}

/// The key pools of every region of this replica.
pub struct KeyPools {
    common: Arc<Common>,
    pools: Mutex<HashMap<Arc<str>, Arc<KeyPool>>>,
}

impl KeyPools {
    /// `redis`: the shared store's pool, or `None` for cooldowns kept locally.
    pub fn new(relay_name: &str, redis: Option<Pool>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            common: Arc::new(Common {
                metrics,
                redis,
                keys: Keys::new(relay_name),
                outbox: Mutex::new(Vec::new()),
            }),
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// A fresh pool for `region` (call it for every region when a config
    /// takes effect): disabled keys are enabled again, cooldowns of keys that
    /// stay are carried over. `keys` in `api_keys` order.
    pub fn build(
        &self,
        region: &str,
        keys: Vec<HeaderValue>,
        config: &KeyPoolConfig,
    ) -> Arc<KeyPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let previous = pools.get(region).cloned();
        let keys = keys
            .into_iter()
            .map(|mut value| {
                value.set_sensitive(true);
                let id = key_id(value.as_bytes());
                let carried = previous.as_ref().map_or(0, |p| {
                    p.keys
                        .iter()
                        .filter(|k| k.id == id)
                        .map(|k| k.cooldown_until_ms.load(Ordering::Relaxed))
                        .max()
                        .unwrap_or(0)
                });
                Key {
                    value,
                    id,
                    in_flight: AtomicU32::new(0),
                    cooldown_until_ms: AtomicU64::new(carried),
                    disabled: AtomicBool::new(false),
                }
            })
            .collect();
        let pool = Arc::new(KeyPool {
            region: Name::from(region),
            keys,
            strategy: config.strategy,
            cap: config.max_in_flight_per_key,
            next: AtomicUsize::new(0),
            common: self.common.clone(),
        });
        pools.insert(Arc::from(region), pool.clone());
        pool
    }

    /// Forgets the pools of regions not in `names` (after a reload).
    pub fn retain<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let keep: Vec<&str> = names.into_iter().collect();
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep.contains(&&**name));
    }

    /// Starts exchanging cooldowns with Redis (nothing to do without it).
    pub fn spawn_sync(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        self.common.redis.as_ref()?;
        let this = self.clone();
        Some(crate::upstream::breaker::spawn_periodic(
            SYNC_INTERVAL,
            move || {
                let this = this.clone();
                async move { this.sync_once().await }
            },
        ))
    }

    /// One round: write new cooldowns, read everyone's.
    pub async fn sync_once(&self) {
        let Some(redis) = &self.common.redis else {
            return;
        };
        let pools: Vec<Arc<KeyPool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let outbox =
            std::mem::take(&mut *self.common.outbox.lock().unwrap_or_else(|e| e.into_inner()));
        let put_back = |outbox: Vec<(Arc<str>, String, u64)>| {
            let now = unix_ms();
            let mut pending = self.common.outbox.lock().unwrap_or_else(|e| e.into_inner());
            pending.extend(outbox.into_iter().filter(|(_, _, until)| *until > now));
        };
        if pools.is_empty() || !redis.is_connected() {
            put_back(outbox);
            return;
        }
        let now = unix_ms();
        // Sent together: fred pipelines concurrent commands on one connection.
        let client = redis.next();
        let mut calls = Vec::with_capacity(pools.len());
        for pool in &pools {
            let mut args = vec![now.to_string()];
            for (_, id, until) in outbox.iter().filter(|(r, _, _)| *r == pool.region.0) {
                args.push(id.clone());
                args.push(until.to_string());
            }
            let key = self.common.keys.key_cooldowns(&pool.region.0);
            calls.push(client.eval::<Value, _, _, _>(SYNC_LUA, key, args));
        }
        let Ok(replies) = tokio::time::timeout(Duration::from_secs(1), join_all(calls)).await
        else {
            put_back(outbox);
            return;
        };
        let mut failed = false;
        for (pool, reply) in pools.iter().zip(replies) {
            match reply.and_then(|v| v.convert::<Vec<String>>()) {
                Ok(pairs) => {
                    for pair in pairs.chunks_exact(2) {
                        if let Ok(until) = pair[1].parse() {
                            pool.apply_shared(&pair[0], until);
                        }
                    }
                }
                Err(e) => {
                    failed = true;
                    tracing::debug!(region = &*pool.region.0, error = %e, "key cooldown sync failed");
                }
            }
        }
        if failed {
            // Rewriting a cooldown already stored is harmless (the script keeps the later one).
            put_back(outbox);
        }
    }
}

/// A key's id: the first 12 hex digits of its SHA-256.
pub fn key_id(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    hex::encode(&digest[..6])
}

/// How long a key answered with 429 rests: `retry-after` (seconds or an
/// HTTP-date; a past date: not at all); else the `anthropic-ratelimit-*-reset`
/// times (RFC 3339): the latest among the limits whose `-remaining` is 0, or
/// the earliest future one; else [`DEFAULT_COOLDOWN`]. Capped at an hour.
pub fn cooldown(headers: &HeaderMap, now: SystemTime) -> Duration {
    if let Some(wait) = crate::upstream::breaker::retry_after(headers, now) {
        return wait.min(MAX_COOLDOWN);
    }
    let mut exhausted: Option<Duration> = None;
    let mut earliest: Option<Duration> = None;
    for (name, value) in headers {
        let Some(limit) = name
            .as_str()
            .strip_prefix("anthropic-ratelimit-")
            .and_then(|rest| rest.strip_suffix("-reset"))
        else {
            continue;
        };
        let Some(wait) = value
            .to_str()
            .ok()
            .and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok())
            .and_then(|at| at.duration_since(now).ok())
            .filter(|wait| !wait.is_zero())
        else {
            continue;
        };
        let remaining = headers
            .get(format!("anthropic-ratelimit-{limit}-remaining"))
            .and_then(|v| v.to_str().ok());
        if remaining.is_some_and(|r| r.trim() == "0") {
            exhausted = Some(exhausted.map_or(wait, |w| w.max(wait)));
        }
        earliest = Some(earliest.map_or(wait, |w| w.min(wait)));
    }
    exhausted
        .or(earliest)
        .unwrap_or(DEFAULT_COOLDOWN)
        .min(MAX_COOLDOWN)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, config: KeyPoolConfig) -> (Arc<KeyPools>, Arc<KeyPool>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let pools = KeyPools::new("t", None, metrics.clone());
        let keys = (0..n)
            .map(|i| HeaderValue::from_str(&format!("sk-ant-test-{i}")).unwrap())
            .collect();
        let pool = pools.build("us", keys, &config);
        (pools, pool, metrics)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn round_robin_takes_turns() {
        let (_, pool, _) = pool(3, KeyPoolConfig::default());
        let order: Vec<usize> = (0..6).map(|_| pool.pick().unwrap().index()).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_in_flight_prefers_idle_keys_and_cap_holds() {
        let config = KeyPoolConfig {
            strategy: KeyStrategy::LeastInFlight,
            max_in_flight_per_key: Some(2),
        };
        let (_, pool, _) = pool(2, config);
        let a = pool.pick().unwrap();
        let b = pool.pick().unwrap();
        assert_ne!(a.index(), b.index());
        let c = pool.pick().unwrap();
        let d = pool.pick().unwrap();
        assert_ne!(c.index(), d.index());
        let none = pool.pick().err().unwrap();
        assert_eq!(none.reason, NoKeyReason::AtCapacity);
        let freed = a.index();
        drop(a);
        assert_eq!(pool.pick().unwrap().index(), freed);
    }

    #[test]
    fn a_429_rests_the_key_and_it_comes_back() {
        let (_, pool, metrics) = pool(2, KeyPoolConfig::default());
        let lease = pool.pick().unwrap();
        let limited = lease.index();
        lease.record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "1")]),
        );
        drop(lease);
        for _ in 0..4 {
            assert_ne!(pool.pick().unwrap().index(), limited);
        }
        assert!(
            metrics
                .encode()
                .contains(r#"upstream_key_cooldowns_total{upstream="us"} 1"#)
        );
        std::thread::sleep(Duration::from_millis(1100));
        let used: Vec<usize> = (0..4).map(|_| pool.pick().unwrap().index()).collect();
        assert!(used.contains(&limited), "{used:?}");
    }

    #[test]
    fn all_keys_resting_says_when_to_come_back() {
        let (_, pool, _) = pool(1, KeyPoolConfig::default());
        pool.pick().unwrap().record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30")]),
        );
        let none = pool.pick().err().unwrap();
        assert_eq!(none.reason, NoKeyReason::CoolingDown);
        let wait = none.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(28) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn keys_a_request_tried_are_skipped_even_when_their_rest_is_over() {
        let (_, pool, _) = pool(2, KeyPoolConfig::default());
        let first = pool.pick().unwrap();
        let limited = first.index();
        // A retry-after already past: the key does not rest.
        first.record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "0")]),
        );
        drop(first);
        for _ in 0..3 {
            assert_ne!(pool.pick_except(&[limited]).unwrap().index(), limited);
        }
        let none = pool.pick_except(&[0, 1]).err().unwrap();
        assert_eq!(none.reason, NoKeyReason::CoolingDown);
        assert_eq!(none.retry_after, Some(Duration::ZERO));
        assert_eq!(pool.rest_left(), Some(Duration::ZERO));
        pool.pick().unwrap().record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30")]),
        );
        pool.pick().unwrap().record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "20")]),
        );
        let left = pool.rest_left().unwrap();
        assert!(
            left > Duration::from_secs(18) && left <= Duration::from_secs(20),
            "{left:?}"
        );
    }

    #[test]
    fn cooldown_from_ratelimit_reset_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |secs: u64| humantime::format_rfc3339(now + Duration::from_secs(secs)).to_string();
        // The exhausted limit wins even when another resets sooner.
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "12"),
            ("anthropic-ratelimit-requests-reset", &at(3)),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            ("anthropic-ratelimit-output-tokens-reset", &at(40)),
        ]);
        assert_eq!(cooldown(&h, now), Duration::from_secs(40));
        // Nothing says which: the earliest reset.
        let h = headers(&[
            ("anthropic-ratelimit-tokens-reset", &at(20)),
            ("anthropic-ratelimit-requests-reset", &at(7)),
        ]);
        assert_eq!(cooldown(&h, now), Duration::from_secs(7));
        // retry-after beats them; nothing at all gives the default.
        let h = headers(&[
            ("retry-after", "2"),
            ("anthropic-ratelimit-tokens-reset", &at(20)),
        ]);
        assert_eq!(cooldown(&h, now), Duration::from_secs(2));
        // So does its HTTP-date form; a date already past means no rest.
        let date = |secs: i64| {
            let at = if secs >= 0 {
                now + Duration::from_secs(secs as u64)
            } else {
                now - Duration::from_secs(secs.unsigned_abs())
            };
            httpdate::fmt_http_date(at)
        };
        let h = headers(&[
            ("retry-after", &date(90)),
            ("anthropic-ratelimit-tokens-reset", &at(20)),
        ]);
        assert_eq!(cooldown(&h, now), Duration::from_secs(90));
        let h = headers(&[("retry-after", &date(-30))]);
        assert_eq!(cooldown(&h, now), Duration::ZERO);
        let h = headers(&[("retry-after", &date(7 * 86_400))]);
        assert_eq!(cooldown(&h, now), MAX_COOLDOWN);
        assert_eq!(cooldown(&HeaderMap::new(), now), DEFAULT_COOLDOWN);
        let h = headers(&[("anthropic-ratelimit-tokens-reset", "garbage")]);
        assert_eq!(cooldown(&h, now), DEFAULT_COOLDOWN);
    }

    #[test]
    fn a_401_disables_until_rebuilt_and_never_logs_the_key() {
        let (pools, pool, metrics) = pool(2, KeyPoolConfig::default());
        let lease = pool.pick().unwrap();
        let bad = lease.index();
        assert_eq!(lease.id(), key_id(format!("sk-ant-test-{bad}").as_bytes()));
        assert_eq!(lease.id().len(), 12);
        lease.record(StatusCode::UNAUTHORIZED, &HeaderMap::new());
        drop(lease);
        for _ in 0..4 {
            assert_ne!(pool.pick().unwrap().index(), bad);
        }
        pool.pick()
            .unwrap()
            .record(StatusCode::FORBIDDEN, &HeaderMap::new());
        assert_eq!(pool.pick().err().unwrap().reason, NoKeyReason::AllDisabled);
        let text = metrics.encode();
        assert!(
            text.contains(r#"upstream_keys_disabled_total{upstream="us"} 2"#),
            "{text}"
        );
        assert!(!text.contains("sk-ant"), "{text}");
        // A config change rebuilds the pool: the keys are tried again.
        let rebuilt = pools.build(
            "us",
            vec![
                HeaderValue::from_static("sk-ant-test-0"),
                HeaderValue::from_static("sk-ant-test-1"),
            ],
            &KeyPoolConfig::default(),
        );
        assert!(rebuilt.pick().is_ok());
    }

    #[test]
    fn rebuild_carries_cooldowns_of_kept_keys() {
        let (pools, pool, _) = pool(2, KeyPoolConfig::default());
        let lease = pool.pick().unwrap();
        assert_eq!(lease.index(), 0);
        lease.record(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "60")]),
        );
        let rebuilt = pools.build(
            "us",
            vec![
                HeaderValue::from_static("sk-ant-new"),
                HeaderValue::from_static("sk-ant-test-0"),
            ],
            &KeyPoolConfig::default(),
        );
        for _ in 0..3 {
            assert_eq!(rebuilt.pick().unwrap().index(), 0);
        }
    }
}
