//! The circuit breaker of each upstream region, shared by the replicas
//! through Redis without a Redis round trip per request.
//!
//! Every replica decides locally ([`RegionBreaker::admit`] reads a mutex, not
//! Redis). Outcomes are counted locally and, every [`SYNC_INTERVAL`], one
//! pipelined batch (one Lua script per region) adds them to a shared sliding
//! window in the region's hash `claude-relay:{relay}:breaker:{region}`, applies
//! this replica's transitions, trips the breaker when the shared window says
//! so, and answers the shared state, which the replica adopts. So a breaker
//! opened by one replica stops the others at their next sync (≤ 250 ms), the
//! state outlives restarts, and the same hash is what the operator shows.
//!
//! Half open, probes are counted across replicas in a sorted set (one Lua
//! call per probe: the only Redis round trip, and only while half open).
//!
//! Without Redis, or while it is unreachable, the local window and state
//! machine decide alone: the breaker keeps protecting and requests keep flowing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use claude_relay_crds::config::BreakerConfig;
use fred::clients::Pool;
use fred::interfaces::{ClientLike, LuaInterface, SortedSetsInterface};
use fred::types::Value;
use futures_util::future::join_all;
use http::StatusCode;
use tokio::time::Instant;

use crate::base::metrics::{Metrics, Name, TransitionLabels, UpstreamLabels};
use crate::store::keys::Keys;

/// How often outcomes are flushed to Redis and the shared state read back.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// Buckets of the sliding window (local and shared).
const BUCKETS: u32 = 10;
/// Cap on an upstream's `retry-after`, so a silly value cannot park a region for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// How long a refused half-open request is told to wait.
const HALF_OPEN_RETRY: Duration = Duration::from_secs(1);
/// The shared hash expires this long after its last write (docs/redis-keys.md).
const HASH_TTL_MS: i64 = 600_000;
/// A sync older than this means Redis is away: probes are then counted locally.
const SHARED_STALE: Duration = Duration::from_secs(2);

/// One sync of one region. KEYS[1]: the breaker hash. ARGV: now_ms,
/// bucket_ms, buckets, requests, failures, min_requests, threshold,
/// open_for_ms, hint_until_ms, last_error, event (`open`, `close` or ``),
/// event_until_ms, ttl_ms. Returns {state, open_until_ms}.
const SYNC_LUA: &str = r#"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local bucket_ms = tonumber(ARGV[2])
local buckets = tonumber(ARGV[3])
local dn, df = tonumber(ARGV[4]), tonumber(ARGV[5])
local cur = math.floor(now / bucket_ms)
if dn > 0 then
  redis.call('HINCRBY', key, 'n:' .. cur, dn)
  if df > 0 then redis.call('HINCRBY', key, 'f:' .. cur, df) end
end
local state = redis.call('HGET', key, 'state') or 'closed'
local open_until = tonumber(redis.call('HGET', key, 'open_until') or '0') or 0
local since = redis.call('HGET', key, 'since') or string.format('%d', math.floor(now / 1000))
local total, failed, fields = 0, 0, {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local kind, idx = string.match(all[i], '^([nf]):(%d+)$')
  if kind then
    if tonumber(idx) <= cur - buckets then
      redis.call('HDEL', key, all[i])
    else
      table.insert(fields, all[i])
      if kind == 'n' then total = total + tonumber(all[i + 1]) else failed = failed + tonumber(all[i + 1]) end
    end
  end
end
local rate = 0
if total > 0 then rate = failed / total end
local function move(to)
  if state ~= to then
    state = to
    since = string.format('%d', math.floor(now / 1000))
    for _, f in ipairs(fields) do redis.call('HDEL', key, f) end
    fields = {}
    total, failed = 0, 0
  end
end
if ARGV[11] == 'open' then
  move('open')
  open_until = math.max(open_until, tonumber(ARGV[12]))
elseif ARGV[11] == 'close' then
  move('closed')
end
if state == 'closed' and total >= tonumber(ARGV[6]) and rate > tonumber(ARGV[7]) then
  move('open')
  open_until = math.max(now + tonumber(ARGV[8]), tonumber(ARGV[9]))
end
if state == 'open' and now >= open_until then move('half_open') end
redis.call('HSET', key, 'state', state, 'failure_rate', string.format('%.2f', rate),
  'since', since, 'open_until', string.format('%d', open_until), 'updated_at', string.format('%d', now))
if ARGV[10] ~= '' then
  redis.call('HSET', key, 'last_error', ARGV[10])
elseif redis.call('HEXISTS', key, 'last_error') == 0 then
  redis.call('HSET', key, 'last_error', 'none')
end
redis.call('PEXPIRE', key, ARGV[13])
return {state, string.format('%d', open_until)}
"#;

/// Takes a half-open probe slot. KEYS[1]: the probes sorted set. ARGV:
/// now_ms, max probes, slot expiry ms, token, ttl_ms. Returns 1 or 0.
const PROBE_LUA: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// What went wrong with an attempt, as far as the region is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    Status5xx,
    Status529,
}

impl FailureKind {
    /// The `last_error` value of the shared hash.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Status5xx => "status_5xx",
            FailureKind::Status529 => "status_529",
        }
    }
}

/// The outcome of one attempt against a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The region answered (2xx, 3xx, and the client's own 4xx).
    Success,
    /// `retry_after`: the upstream's, which may keep the breaker open longer.
    Failure {
        kind: FailureKind,
        retry_after: Option<Duration>,
    },
    /// Says nothing about the region (a 429 is the key's; a cancelled request).
    Ignored,
}

impl Outcome {
    /// The breaker's reading of an upstream status. 5xx and 529 are the
    /// region's failures; 429 belongs to the key; other 4xx are the client's.
    pub fn of_status(status: StatusCode, retry_after: Option<Duration>) -> Self {
        match status.as_u16() {
            529 => Outcome::Failure {
                kind: FailureKind::Status529,
                retry_after,
            },
            500..=599 => Outcome::Failure {
                kind: FailureKind::Status5xx,
                retry_after,
            },
            429 => Outcome::Ignored,
            _ => Outcome::Success,
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure { .. })
    }
}

/// The longest wait a `retry-after` can ask for, in either form; callers cap it further.
const RETRY_AFTER_CEILING: Duration = Duration::from_secs(86_400);

/// `retry-after` as seconds (what the Claude API sends) or as an HTTP-date
/// (RFC 9110, what gateways in front of it may send), relative to `now`.
/// A date in the past means no wait.
pub fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::from_secs_f64(secs.min(RETRY_AFTER_CEILING.as_secs_f64()))
        }
        Ok(_) => return None,
        Err(_) => {
            let at = httpdate::parse_http_date(text).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(RETRY_AFTER_CEILING))
}

/// Runs `round` every `period` until aborted, the first round at once; a
/// slow round delays the next instead of bunching them up.
pub(crate) fn spawn_periodic<F, Fut>(period: Duration, mut round: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            round().await;
        }
    })
}

/// The region refuses requests for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    pub state: State,
    /// When it is worth trying this region again.
    pub retry_after: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    window: Duration,
    min_requests: u64,
    failure_rate: f64,
    open_for: Duration,
    probes: u32,
}

impl From<&BreakerConfig> for Settings {
    fn from(c: &BreakerConfig) -> Self {
        Self {
            window: *c.window,
            min_requests: u64::from(c.min_requests),
            failure_rate: c.failure_rate,
            open_for: *c.open_for,
            probes: c.half_open_probes,
        }
    }
}

impl Settings {
    fn bucket(&self) -> Duration {
        (self.window / BUCKETS).max(Duration::from_millis(1))
    }
}

/// A transition this replica made that Redis has not heard of yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Open { until_ms: u64 },
    Close,
}

struct Inner {
    settings: Settings,
    state: State,
    open_until: Instant,
    /// Sliding window: (bucket index, requests, failures), ring-indexed.
    window: [(u64, u64, u64); BUCKETS as usize],
    local_probes: u32,
    /// Counted since the last sync, for the shared window.
    pending_requests: u64,
    pending_failures: u64,
    last_error: Option<FailureKind>,
    /// Latest instant an upstream's retry-after asked for, in unix ms.
    hint_until_ms: u64,
    event: Option<Event>,
}

/// What the breakers of all regions share.
struct Common {
    metrics: Arc<Metrics>,
    redis: Option<Pool>,
    keys: Keys,
    /// Time origin of the local window's bucket indices.
    epoch: Instant,
    /// Instant of the last good sync, as ms since `epoch`; 0: none yet.
    synced_at_ms: AtomicU64,
    probe_ids: AtomicU64,
    instance: u64,
}

impl Common {
    fn shared_fresh(&self) -> bool {
        let at = self.synced_at_ms.load(Ordering::Relaxed);
        at != 0 && self.epoch.elapsed().as_millis() as u64 <= at + SHARED_STALE.as_millis() as u64
    }
}

/// The breaker of one region.
pub struct RegionBreaker {
    name: Name,
    hash_key: String,
    probes_key: String,
    common: Arc<Common>,
    inner: Mutex<Inner>,
    /// `inner.state == Closed`, readable without the lock: the common case
    /// of `admit` takes no lock shared with the other worker threads.
    closed: AtomicBool,
    removed: AtomicBool,
}

/// Permission to send one attempt; report its outcome with [`Ticket::record`].
/// Dropped unreported (the client went away), it counts nothing and frees
/// its probe slot.
#[must_use = "record the outcome of the attempt"]
pub struct Ticket {
    breaker: Arc<RegionBreaker>,
    probe: Option<Probe>,
}

enum Probe {
    Local,
    Shared(String),
}

impl Ticket {
    /// Whether this attempt is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    pub fn record(mut self, outcome: Outcome) {
        let probe = self.probe.take();
        self.breaker.record(probe, outcome);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.breaker.release(probe);
        }
    }
}

impl RegionBreaker {
    pub fn name(&self) -> &Name {
        &self.name
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May an attempt go to this region now? No Redis round trip unless the
    /// breaker is half open (then one, to take a probe slot across replicas).
    pub async fn admit(self: &Arc<Self>) -> Result<Ticket, Denied> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(Ticket {
                breaker: self.clone(),
                probe: None,
            });
        }
        let probes = {
            let mut inner = self.lock();
            let now = Instant::now();
            match inner.state {
                State::Closed => {
                    return Ok(Ticket {
                        breaker: self.clone(),
                        probe: None,
                    });
                }
                State::Open if now < inner.open_until => {
                    return Err(Denied {
                        state: State::Open,
                        retry_after: inner.open_until - now,
                    });
                }
                State::Open => self.transition(&mut inner, State::HalfOpen),
                State::HalfOpen => {}
            }
            if !(self.common.redis.is_some() && self.common.shared_fresh()) {
                return self.local_probe(&mut inner);
            }
            inner.settings.probes
        };
        // Boxed: the store call is several KB of future state, which every
        // request's future would otherwise carry (and copy) for this rare path.
        match Box::pin(self.take_shared_probe(probes)).await {
            Ok(Some(token)) => Ok(Ticket {
                breaker: self.clone(),
                probe: Some(Probe::Shared(token)),
            }),
            Ok(None) => Err(self.half_open_denied()),
            Err(error) => {
                tracing::warn!(region = &*self.name.0, %error, "breaker: cannot take a shared probe slot; counting probes locally");
                self.local_probe(&mut self.lock())
            }
        }
    }

    /// A half-open probe counted by this replica alone.
    fn local_probe(self: &Arc<Self>, inner: &mut Inner) -> Result<Ticket, Denied> {
        if inner.local_probes < inner.settings.probes {
            inner.local_probes += 1;
            Ok(Ticket {
                breaker: self.clone(),
                probe: Some(Probe::Local),
            })
        } else {
            Err(self.half_open_denied())
        }
    }

    fn half_open_denied(&self) -> Denied {
        Denied {
            state: State::HalfOpen,
            retry_after: HALF_OPEN_RETRY,
        }
    }

    async fn take_shared_probe(&self, probes: u32) -> Result<Option<String>, fred::error::Error> {
        let Some(redis) = &self.common.redis else {
            return Ok(None);
        };
        let token = format!(
            "{:016x}-{}",
            self.common.instance,
            self.common.probe_ids.fetch_add(1, Ordering::Relaxed)
        );
        let now = unix_ms();
        let lease = self.lock().settings.open_for.max(Duration::from_secs(10));
        let expiry = now + lease.as_millis() as u64;
        let call = redis.next().eval::<i64, _, _, _>(
            PROBE_LUA,
            self.probes_key.as_str(),
            vec![
                now.to_string(),
                probes.to_string(),
                expiry.to_string(),
                token.clone(),
                (lease.as_millis() as u64 * 2).to_string(),
            ],
        );
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(1)) => Ok(Some(token)),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                "no answer within 1s",
            )),
        }
    }

    fn release(&self, probe: Probe) {
        match probe {
            Probe::Local => {
                let mut inner = self.lock();
                inner.local_probes = inner.local_probes.saturating_sub(1);
            }
            Probe::Shared(token) => {
                if let (Some(redis), Ok(runtime)) = (
                    self.common.redis.clone(),
                    tokio::runtime::Handle::try_current(),
                ) {
                    let key = self.probes_key.clone();
                    // NB: off the request's task; a lost release lapses with the slot.
                    runtime.spawn(async move {
                        let _ = redis.next().zrem::<i64, _, _>(key, token).await;
                    });
                }
            }
        }
    }

    fn record(&self, probe: Option<Probe>, outcome: Outcome) {
        let was_probe = probe.is_some();
        if let Some(probe) = probe {
            self.release(probe);
        }
        let mut inner = self.lock();
        let now = Instant::now();
        if let Outcome::Failure { kind, retry_after } = outcome {
            inner.last_error = Some(kind);
            if let Some(wait) = retry_after {
                let until = unix_ms() + wait.min(MAX_RETRY_AFTER).as_millis() as u64;
                inner.hint_until_ms = inner.hint_until_ms.max(until);
            }
        }
        if was_probe {
            match outcome {
                Outcome::Success if inner.state == State::HalfOpen => {
                    self.transition(&mut inner, State::Closed);
                    inner.event = Some(Event::Close);
                }
                Outcome::Failure { .. } if inner.state != State::Open => self.open(&mut inner),
                _ => {}
            }
            return;
        }
        // Late answers of attempts admitted before the breaker opened say nothing new.
        if inner.state != State::Closed || outcome == Outcome::Ignored {
            return;
        }
        let failed = u64::from(outcome.is_failure());
        if self.common.redis.is_some() {
            inner.pending_requests += 1;
            inner.pending_failures += failed;
        }
        let bucket = inner.settings.bucket();
        let index = (now - self.common.epoch).as_millis() as u64 / bucket.as_millis() as u64;
        let slot = &mut inner.window[(index % u64::from(BUCKETS)) as usize];
        if slot.0 != index {
            *slot = (index, 0, 0);
        }
        slot.1 += 1;
        slot.2 += failed;
        let (requests, failures) = inner
            .window
            .iter()
            .filter(|(i, _, _)| *i + u64::from(BUCKETS) > index)
            .fold((0, 0), |(n, f), (_, bn, bf)| (n + bn, f + bf));
        if requests >= inner.settings.min_requests
            && failures as f64 > inner.settings.failure_rate * requests as f64
        {
            self.open(&mut inner);
        }
    }

    /// Opens for `open_for`, or until the upstream's retry-after if later.
    fn open(&self, inner: &mut Inner) {
        let now_ms = unix_ms();
        let until_ms =
            (now_ms + inner.settings.open_for.as_millis() as u64).max(inner.hint_until_ms);
        inner.open_until = Instant::now() + Duration::from_millis(until_ms - now_ms);
        self.transition(inner, State::Open);
        inner.event = Some(Event::Open { until_ms });
        tracing::warn!(
            region = &*self.name.0,
            last_error = inner.last_error.map_or("none", FailureKind::as_str),
            open_for = ?Duration::from_millis(until_ms - now_ms),
            "breaker opened"
        );
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        if from == to {
            return;
        }
        inner.state = to;
        self.closed.store(to == State::Closed, Ordering::Release);
        inner.window = Default::default();
        inner.local_probes = 0;
        if to == State::Closed {
            inner.hint_until_ms = 0;
        }
        let metrics = &self.common.metrics;
        metrics
            .breaker_transitions
            .get_or_create(&TransitionLabels {
                upstream: self.name.clone(),
                from: from.as_str(),
                to: to.as_str(),
            })
            .inc();
        metrics
            .breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: self.name.clone(),
            })
            .set(to.gauge());
        if to == State::Closed {
            tracing::info!(region = &*self.name.0, "breaker closed");
        }
    }

    /// What to send to Redis this round; `restore` puts it back if the send fails.
    fn take_pending(&self) -> Pending {
        let mut inner = self.lock();
        let pending = Pending {
            requests: inner.pending_requests,
            failures: inner.pending_failures,
            last_error: inner.last_error.take(),
            hint_until_ms: inner.hint_until_ms,
            event: inner.event.take(),
            settings: inner.settings,
        };
        inner.pending_requests = 0;
        inner.pending_failures = 0;
        pending
    }

    fn restore(&self, pending: &Pending) {
        let mut inner = self.lock();
        // Counts are dropped: replayed after an outage they would land in the
        // wrong bucket. A transition is kept until Redis hears of it.
        if inner.event.is_none() {
            inner.event = pending.event;
        }
        if inner.last_error.is_none() {
            inner.last_error = pending.last_error;
        }
    }

    /// Takes the shared state Redis answered, unless this replica made a
    /// newer transition meanwhile.
    fn adopt(&self, state: &str, open_until_ms: u64) {
        let mut inner = self.lock();
        if inner.event.is_some() {
            return;
        }
        match state {
            "open" => {
                let wait = Duration::from_millis(open_until_ms.saturating_sub(unix_ms()));
                inner.open_until = Instant::now() + wait;
                self.transition(&mut inner, State::Open);
            }
            "half_open" if inner.state != State::HalfOpen => {
                self.transition(&mut inner, State::HalfOpen)
            }
            "closed" => self.transition(&mut inner, State::Closed),
            _ => {}
        }
    }
}

struct Pending {
    requests: u64,
    failures: u64,
    last_error: Option<FailureKind>,
    hint_until_ms: u64,
    event: Option<Event>,
    settings: Settings,
}

/// The breakers of every region of this replica. Outlives config reloads:
/// a region keeps its breaker while its name stays.
pub struct Breakers {
    common: Arc<Common>,
    settings: Mutex<Settings>,
    regions: Mutex<HashMap<Arc<str>, Arc<RegionBreaker>>>,
}

impl Breakers {
    /// `redis`: the shared store's pool, or `None` for local breakers only
    /// (standalone, in-memory store).
    pub fn new(
        config: &BreakerConfig,
        relay_name: &str,
        redis: Option<Pool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        use std::hash::{BuildHasher, Hasher};
        let instance = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Arc::new(Self {
            common: Arc::new(Common {
                metrics,
                redis,
                keys: Keys::new(relay_name),
                epoch: Instant::now(),
                synced_at_ms: AtomicU64::new(0),
                probe_ids: AtomicU64::new(0),
                instance,
            }),
            settings: Mutex::new(Settings::from(config)),
            regions: Mutex::new(HashMap::new()),
        })
    }

    /// The breaker of region `name`, made on first use.
    pub fn region(&self, name: &str) -> Arc<RegionBreaker> {
        let settings = *self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = regions.get(name) {
            return existing.clone();
        }
        let common = &self.common;
        common
            .metrics
            .breaker_state
            .get_or_create(&UpstreamLabels {
                upstream: Name::from(name),
            })
            .set(State::Closed.gauge());
        let breaker = Arc::new(RegionBreaker {
            name: Name::from(name),
            hash_key: common.keys.breaker(name),
            probes_key: common.keys.breaker_probes(name),
            common: common.clone(),
            closed: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                settings,
                state: State::Closed,
                open_until: Instant::now(),
                window: Default::default(),
                local_probes: 0,
                pending_requests: 0,
                pending_failures: 0,
                last_error: None,
                hint_until_ms: 0,
                event: None,
            }),
            removed: AtomicBool::new(false),
        });
        regions.insert(Arc::from(name), breaker.clone());
        breaker
    }

    /// On reload: new settings for every breaker; regions no longer in
    /// `names` are dropped (and stop being synced).
    pub fn configure<'a>(&self, config: &BreakerConfig, names: impl IntoIterator<Item = &'a str>) {
        let settings = Settings::from(config);
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
        let keep: Vec<&str> = names.into_iter().collect();
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions.retain(|name, breaker| {
            let kept = keep.contains(&&**name);
            if kept {
                breaker.lock().settings = settings;
            } else {
                breaker.removed.store(true, Ordering::Relaxed);
                self.common.metrics.breaker_state.remove(&UpstreamLabels {
                    upstream: breaker.name.clone(),
                });
            }
            kept
        });
    }

    /// Whether the last sync with Redis succeeded recently.
    pub fn shared(&self) -> bool {
        self.common.shared_fresh()
    }

    /// Starts the sync loop (nothing to do without Redis). Runs until the
    /// handle is aborted; the first sync is at once, so a restarted replica
    /// takes up the shared state before it has served much.
    pub fn spawn_sync(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        self.common.redis.as_ref()?;
        let this = self.clone();
        Some(spawn_periodic(SYNC_INTERVAL, move || {
            let this = this.clone();
            async move { this.sync_once().await }
        }))
    }

    /// One round: flush every region's outcomes, read back the shared state.
    pub async fn sync_once(&self) {
        let Some(redis) = &self.common.redis else {
            return;
        };
        let breakers: Vec<Arc<RegionBreaker>> = self
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if breakers.is_empty() {
            return;
        }
        let pending: Vec<Pending> = breakers.iter().map(|b| b.take_pending()).collect();
        let fail_all = |why: &dyn std::fmt::Display| {
            tracing::debug!(error = %why, "breaker sync with redis failed; local breakers decide");
            for (breaker, p) in breakers.iter().zip(&pending) {
                breaker.restore(p);
            }
        };
        if !redis.is_connected() {
            fail_all(&"not connected");
            return;
        }
        // Sent together on one connection: fred pipelines concurrent commands
        // (its `Pipeline` type cannot carry EVAL).
        let client = redis.next();
        let now = unix_ms();
        let mut calls = Vec::with_capacity(breakers.len());
        for (breaker, p) in breakers.iter().zip(&pending) {
            let (event, event_until) = match p.event {
                Some(Event::Open { until_ms }) => ("open", until_ms),
                Some(Event::Close) => ("close", 0),
                None => ("", 0),
            };
            let args: Vec<String> = vec![
                now.to_string(),
                p.settings.bucket().as_millis().to_string(),
                BUCKETS.to_string(),
                p.requests.to_string(),
                p.failures.to_string(),
                p.settings.min_requests.to_string(),
                p.settings.failure_rate.to_string(),
                p.settings.open_for.as_millis().to_string(),
                p.hint_until_ms.to_string(),
                p.last_error.map_or("", FailureKind::as_str).to_string(),
                event.to_string(),
                event_until.to_string(),
                HASH_TTL_MS.to_string(),
            ];
            calls.push(client.eval::<Value, _, _, _>(SYNC_LUA, breaker.hash_key.as_str(), args));
        }
        let replies = match tokio::time::timeout(Duration::from_secs(1), join_all(calls)).await {
            Ok(replies) => replies,
            Err(_) => {
                fail_all(&"no answer within 1s");
                return;
            }
        };
        let mut all_ok = true;
        for ((breaker, p), reply) in breakers.iter().zip(&pending).zip(replies) {
            let parsed = reply.ok().and_then(|v| v.convert::<Vec<String>>().ok());
            match parsed.as_deref() {
                Some([state, until]) if !breaker.removed.load(Ordering::Relaxed) => {
                    breaker.adopt(state, until.parse().unwrap_or(0));
                }
                Some(_) => {}
                None => {
                    all_ok = false;
                    breaker.restore(p);
                }
            }
        }
        if all_ok {
            let at = (self.common.epoch.elapsed().as_millis() as u64).max(1);
            self.common.synced_at_ms.store(at, Ordering::Relaxed);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min: u32, rate: f64, open_for: u64, probes: u32) -> BreakerConfig {
        BreakerConfig {
            window: claude_relay_crds::duration::HumanDuration::from_secs(60),
            min_requests: min,
            failure_rate: rate,
            open_for: claude_relay_crds::duration::HumanDuration::from_secs(open_for),
            half_open_probes: probes,
        }
    }

    fn local(min: u32, rate: f64, open_for: u64, probes: u32) -> (Arc<Breakers>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let breakers = Breakers::new(
            &config(min, rate, open_for, probes),
            "t",
            None,
            metrics.clone(),
        );
        (breakers, metrics)
    }

    const FAIL: Outcome = Outcome::Failure {
        kind: FailureKind::Status5xx,
        retry_after: None,
    };

    #[tokio::test(start_paused = true)]
    async fn opens_over_threshold_with_enough_volume_only() {
        let (breakers, _) = local(10, 0.5, 60, 1);
        let b = breakers.region("us");
        // Nine failures: under the minimum volume, stays closed.
        for _ in 0..9 {
            b.admit().await.unwrap().record(FAIL);
        }
        assert_eq!(b.state(), State::Closed);
        // 10 requests, 9 failed: over 50%.
        b.admit().await.unwrap().record(Outcome::Success);
        assert_eq!(b.state(), State::Open);
        let denied = b.admit().await.err().unwrap();
        assert_eq!(denied.state, State::Open);
        assert!(denied.retry_after <= Duration::from_secs(60));
        assert!(denied.retry_after > Duration::from_secs(59));
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_and_429_are_not_failures() {
        let (breakers, _) = local(4, 0.5, 60, 1);
        let b = breakers.region("us");
        for status in [400, 401, 403, 404, 413, 429, 429, 429, 429, 200] {
            let outcome = Outcome::of_status(StatusCode::from_u16(status).unwrap(), None);
            assert!(!outcome.is_failure(), "{status}");
            b.admit().await.unwrap().record(outcome);
        }
        for _ in 0..5 {
            b.admit().await.unwrap().record(FAIL);
        }
        // 6 counted successes (429s ignored), 5 failures: 45%, closed.
        assert_eq!(b.state(), State::Closed);
        assert!(Outcome::of_status(StatusCode::from_u16(529).unwrap(), None).is_failure());
        assert!(Outcome::of_status(StatusCode::BAD_GATEWAY, None).is_failure());
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_slide_out_of_the_window() {
        let (breakers, _) = local(4, 0.5, 60, 1);
        let b = breakers.region("us");
        for _ in 0..3 {
            b.admit().await.unwrap().record(FAIL);
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        b.admit().await.unwrap().record(FAIL);
        // Only one failure is left in the window: under the minimum volume.
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_n_probes_then_success_closes() {
        let (breakers, metrics) = local(2, 0.5, 30, 2);
        let b = breakers.region("us");
        b.admit().await.unwrap().record(FAIL);
        b.admit().await.unwrap().record(FAIL);
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_secs(31)).await;
        let p1 = b.admit().await.unwrap();
        let p2 = b.admit().await.unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert_eq!(b.admit().await.err().unwrap().state, State::HalfOpen);
        // A dropped probe frees its slot without deciding anything.
        drop(p2);
        let p3 = b.admit().await.unwrap();
        p1.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        p3.record(Outcome::Success);
        assert!(!b.admit().await.unwrap().is_probe());
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"breaker_transitions_total{upstream="us",from="half_open",to="closed"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"breaker_state{upstream="us"} 0"#), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_and_retry_after_extends() {
        let (breakers, metrics) = local(2, 0.5, 10, 1);
        let b = breakers.region("us");
        b.admit().await.unwrap().record(FAIL);
        b.admit().await.unwrap().record(FAIL);
        tokio::time::advance(Duration::from_secs(11)).await;
        let probe = b.admit().await.unwrap();
        probe.record(Outcome::Failure {
            kind: FailureKind::Status529,
            retry_after: Some(Duration::from_secs(120)),
        });
        assert_eq!(b.state(), State::Open);
        let denied = b.admit().await.err().unwrap();
        assert!(denied.retry_after > Duration::from_secs(100), "{denied:?}");
        assert!(
            metrics
                .encode()
                .contains(r#"breaker_state{upstream="us"} 2"#)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reload_keeps_state_and_drops_removed_regions() {
        let (breakers, _) = local(1, 0.5, 60, 1);
        let us = breakers.region("us");
        us.admit().await.unwrap().record(FAIL);
        breakers.configure(&config(5, 0.5, 60, 1), ["us"]);
        assert!(Arc::ptr_eq(&us, &breakers.region("us")));
        assert_eq!(breakers.region("us").state(), State::Open);
        let eu = breakers.region("eu");
        breakers.configure(&config(5, 0.5, 60, 1), ["us"]);
        assert!(!Arc::ptr_eq(&eu, &breakers.region("eu")));
    }

    #[test]
    fn retry_after_reads_seconds() {
        let now = SystemTime::now();
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(http::header::RETRY_AFTER, "-3".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(http::header::RETRY_AFTER, "999999999".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(RETRY_AFTER_CEILING));
    }

    #[test]
    fn retry_after_reads_http_dates() {
        // Wed, 21 Oct 2026 07:28:00 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_792_567_680);
        let at = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(
            at("Wed, 21 Oct 2026 07:28:45 GMT"),
            Some(Duration::from_secs(45))
        );
        // The two obsolete forms RFC 9110 still asks recipients to read.
        assert_eq!(
            at("Wednesday, 21-Oct-26 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            at("Wed Oct 21 07:28:10 2026"),
            Some(Duration::from_secs(10))
        );
        // Already past (or exactly now): no wait.
        assert_eq!(at("Wed, 21 Oct 2026 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(at("Wed, 21 Oct 2026 07:28:00 GMT"), Some(Duration::ZERO));
        // Years away: capped like the seconds form.
        assert_eq!(
            at("Fri, 21 Oct 2050 07:28:00 GMT"),
            Some(RETRY_AFTER_CEILING)
        );
        // Not a date.
        assert_eq!(at("Wed, 32 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(at("tomorrow"), None);
    }
}
