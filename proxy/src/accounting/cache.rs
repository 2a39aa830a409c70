//! The response cache: exact-match, for non-streaming `POST /v1/messages`.
//!
//! Off unless enabled for the client (`clients[].cache.enabled`), for the
//! route of the request's model (`cache.routes[].enabled`), or for the
//! request by `x-relay-cache: on` (`off` skips it whatever the config).
//!
//! The key is the SHA-256 of the scope (the client, or `shared` for a shared
//! route), the route's config generation (a change of the route moves its
//! entries out of reach), `anthropic-version`, `anthropic-beta` and the
//! request body with its JSON objects' keys sorted, so that formatting and
//! key order do not matter. The body holds the model.
//!
//! Entries hold uncompressed bytes: a compressed answer (the SDKs ask for
//! gzip) is stored as the usage tap decoded it ([`crate::accounting::usage::UsageTap`],
//! whole and within its cap, else not at all), and a hit is served without
//! `Content-Encoding`, with its length, to any client. Every client takes
//! that unless its `Accept-Encoding` refuses identity (`identity;q=0`, or
//! `*;q=0` without identity): such a request skips the cache. So the key
//! leaves `Accept-Encoding` out, and no client gets a coding it did not ask
//! for or bytes labelled wrong. Re-encoding hits would save bandwidth on a
//! link where the relay is not local, at the cost of CPU on every hit.
//!
//! Level 1 is this process's memory, bounded in bytes, oldest out first;
//! level 2 is Redis (each entry with its TTL, at most `max_entry_bytes`). A
//! level-2 hit fills level 1. Only complete 200 answers are stored. A purge
//! deletes level 2 and records the time per scope in Redis; every replica
//! reads those times each second and treats older level-1 entries as gone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use claude_relay_crds::config::{CacheConfig, CacheRoute};
use fred::prelude::{HashesInterface, Pool};
use http::{HeaderMap, HeaderValue, Method, Response, header};
use sha2::{Digest, Sha256};

use crate::base::metrics::{Metrics, ResultLabels};
use crate::http::body::RelayBody;
use crate::http::error::RelayError;
use crate::http::headers::RELAY_REQUEST_ID;
use crate::store::keys::Keys;
use crate::store::{AnyStore, StoreError, unix_ms};

/// The request header that turns the cache on or off for one request; the
/// response header that says whether it was a hit.
pub const RELAY_CACHE: &str = "x-relay-cache";
/// How often the purge times of the other replicas are read.
const PURGE_SYNC: Duration = Duration::from_secs(1);
/// L2 entry header: stored at (ms), expires at (ms), both big-endian u64.
const HEADER_LEN: usize = 16;

/// The cache settings of one snapshot, worked out once at build time.
pub struct CachePolicy {
    config: CacheConfig,
    /// Per route: its config generation.
    generations: Vec<u64>,
    /// For requests matching no route.
    default_generation: u64,
}

impl CachePolicy {
    pub fn new(config: &CacheConfig) -> Self {
        let generation = |what: &str| {
            let digest = Sha256::digest(what.as_bytes());
            u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
        };
        Self {
            generations: config
                .routes
                .iter()
                .map(|r| generation(&serde_json::to_string(r).unwrap_or_default()))
                .collect(),
            default_generation: generation(&format!("default {}", config.ttl)),
            config: config.clone(),
        }
    }

    /// Every generation in force, to drop level-1 entries of the others.
    pub fn generations(&self) -> Vec<u64> {
        let mut all = self.generations.clone();
        all.push(self.default_generation);
        all
    }

    /// Whether a request of a client (with its own `cache.enabled`) may be
    /// cached without the request asking: then its body is looked at.
    pub fn may_apply(&self, client_enabled: bool) -> bool {
        client_enabled || self.config.routes.iter().any(|r| r.enabled)
    }

    /// Whether a request may be cached, from its method, path and headers
    /// alone: `Some(asked)` (`asked`: it sent `x-relay-cache: on`) when its
    /// body is to be looked at. A bad `x-relay-cache` value is a 400.
    pub fn wanted(
        &self,
        client_enabled: bool,
        method: &Method,
        path: &str,
        // The request's `x-relay-cache`, if it has one.
        cache_header: Option<&HeaderValue>,
    ) -> Result<Option<bool>, RelayError> {
        let asked = match cache_header.map(|v| v.to_str().unwrap_or("")) {
            None => None,
            Some("on") => Some(true),
            Some("off") => Some(false),
            Some(_) => {
                return Err(RelayError::InvalidRequest(format!(
                    "{RELAY_CACHE} must be \"on\" or \"off\""
                )));
            }
        };
        if asked == Some(false)
            || method != Method::POST
            || path != "/v1/messages"
            || (asked.is_none() && !self.may_apply(client_enabled))
        {
            return Ok(None);
        }
        Ok(Some(asked == Some(true)))
    }

    /// The cache key and settings of a request that [`Self::wanted`] let
    /// through, from its parsed body (the request path parses it once, for
    /// both the JSON check and the key); `None` when it is not cached.
    pub fn plan_parsed(
        &self,
        client: &str,
        client_enabled: bool,
        asked: bool,
        headers: &HeaderMap,
        request: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<Plan> {
        if request.get("stream").and_then(serde_json::Value::as_bool) == Some(true) {
            return None;
        }
        // Hits are served uncoded; a client that refuses that goes upstream.
        if !crate::http::encoding::accepts_identity(headers) {
            return None;
        }
        let model = request
            .get("model")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let route = self.config.routes.iter().position(|r| r.matches(model));
        let (enabled, shared, ttl, generation, route_name) = match route {
            Some(i) => {
                let r: &CacheRoute = &self.config.routes[i];
                (
                    r.enabled || client_enabled,
                    r.shared,
                    r.ttl.map_or(*self.config.ttl, |t| *t),
                    self.generations[i],
                    r.name.as_str(),
                )
            }
            None => (
                client_enabled,
                false,
                *self.config.ttl,
                self.default_generation,
                "default",
            ),
        };
        if !(asked || enabled) {
            return None;
        }
        let scope = if shared {
            "shared".to_owned()
        } else {
            format!("client:{client}")
        };
        // The key's input is written to one buffer and hashed in one call:
        // feeding the hasher field by field cost more than the hashing.
        let hash = CANONICAL.with_borrow_mut(|input| {
            input.clear();
            input.extend_from_slice(b"claude-relay cache v1\0");
            input.extend_from_slice(&generation.to_be_bytes());
            input.extend_from_slice(scope.as_bytes());
            for name in ["anthropic-version", "anthropic-beta"] {
                input.push(0);
                for value in headers.get_all(name) {
                    input.extend_from_slice(value.as_bytes());
                    input.push(b',');
                }
            }
            input.push(0);
            write_object(input, request);
            let hash: [u8; 32] = Sha256::digest(&input[..]).into();
            if input.capacity() > CANONICAL_KEEP {
                *input = Vec::new();
            }
            hash
        });
        Some(Plan {
            hash,
            scope: Arc::from(scope),
            ttl,
            generation,
            route: Arc::from(route_name),
            max_entry_bytes: self.config.max_entry_bytes,
            redis: self.config.redis,
        })
    }
}

thread_local! {
    /// The canonical form of the request being keyed, reused per thread.
    static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
/// A buffer grown past this by a large request is not kept.
const CANONICAL_KEEP: usize = 256 * 1024;

/// Writes a JSON value in canonical form: object keys in sorted order and
/// every value tagged and length-prefixed, so that no two different values
/// write alike.
fn write_canonical(out: &mut Vec<u8>, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => out.push(b'n'),
        Value::Bool(b) => out.push(if *b { b't' } else { b'f' }),
        Value::Number(n) => {
            use std::io::Write;
            out.push(b'#');
            let _ = write!(out, "{n}");
            out.push(b';');
        }
        Value::String(s) => {
            out.push(b's');
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            out.push(b'[');
            for item in items {
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object(out: &mut Vec<u8>, map: &serde_json::Map<String, serde_json::Value>) {
    let write_member = |out: &mut Vec<u8>, key: &String, value| {
        out.extend_from_slice(&(key.len() as u64).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        write_canonical(out, value);
    };
    out.push(b'{');
    // serde_json's map is sorted already unless a crate in the build turns
    // on its `preserve_order` feature; then sort here.
    if map.keys().is_sorted() {
        for (key, value) in map {
            write_member(out, key, value);
        }
    } else {
        let mut members: Vec<_> = map.iter().collect();
        members.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, value) in members {
            write_member(out, key, value);
        }
    }
    out.push(b'}');
}

/// A cacheable request: where its answer lives.
#[derive(Clone, Debug)]
pub struct Plan {
    pub hash: [u8; 32],
    pub scope: Arc<str>,
    pub ttl: Duration,
    pub generation: u64,
    pub route: Arc<str>,
    pub max_entry_bytes: u64,
    pub redis: bool,
}

impl Plan {
    fn l2_key(&self, keys: &Keys) -> String {
        keys.cache_entry(&self.scope, &hex::encode(self.hash))
    }
}

/// A response found in the cache.
pub struct Hit {
    pub body: Bytes,
    pub level: &'static str,
}

impl Hit {
    /// The answer: 200 JSON, uncompressed, with its length (from the body),
    /// marked as a hit; costs no upstream call.
    pub fn into_response(self, request_id: &str) -> Response<RelayBody> {
        let mut response = Response::new(RelayBody::full(self.body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(RELAY_CACHE, HeaderValue::from_static("hit"));
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert("request-id", id.clone());
            headers.insert(RELAY_REQUEST_ID, id);
        }
        response
    }
}

/// Stores a completed answer (given to the request's meter on a miss).
pub struct Fill {
    pub cache: Arc<ResponseCache>,
    pub plan: Plan,
}

impl Fill {
    pub async fn store(self, body: Bytes, store: &AnyStore) {
        let Fill { cache, plan } = self;
        if body.len() as u64 > plan.max_entry_bytes {
            cache.count("too_large");
            return;
        }
        let now = unix_ms();
        let expires = now + plan.ttl.as_millis() as u64;
        cache.put_local(&plan, body.clone(), now, expires);
        cache.count("stored");
        if let (true, Some(redis)) = (plan.redis, store.cache()) {
            let mut value = BytesMut::with_capacity(HEADER_LEN + body.len());
            value.put_u64(now);
            value.put_u64(expires);
            value.put_slice(&body);
            let key = plan.l2_key(&cache.keys);
            if let Err(error) = redis.cache_put(&key, value.freeze(), plan.ttl).await {
                cache.count("l2_store_failed");
                tracing::debug!(%error, "cache entry not written to redis");
            }
        }
    }
}

struct Entry {
    body: Bytes,
    scope: Arc<str>,
    generation: u64,
    stored_ms: u64,
    expires_ms: u64,
    /// Matches the entry's place in the eviction queue.
    seq: u64,
}

#[derive(Default)]
struct Memory {
    entries: HashMap<[u8; 32], Entry>,
    /// Oldest first; stale positions (replaced entries) are skipped.
    order: VecDeque<([u8; 32], u64)>,
    bytes: u64,
    max_bytes: u64,
    seq: u64,
    /// Purge times (ms) by scope; `*` for all.
    purged: HashMap<Arc<str>, u64>,
}

impl Memory {
    fn remove(&mut self, hash: &[u8; 32]) -> Option<Entry> {
        let entry = self.entries.remove(hash)?;
        self.bytes -= entry.body.len() as u64;
        Some(entry)
    }

    fn make_room(&mut self, needed: u64) {
        while self.bytes + needed > self.max_bytes {
            let Some((hash, seq)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&hash).is_some_and(|e| e.seq == seq) {
                self.remove(&hash);
            }
        }
    }

    fn purged_after(&self, entry: &Entry) -> bool {
        let at = |scope: &str| self.purged.get(scope).copied().unwrap_or(0);
        entry.stored_ms <= at(&entry.scope).max(at("*"))
    }
}

/// The cache of this process (level 1) and its way to level 2.
pub struct ResponseCache {
    memory: Mutex<Memory>,
    keys: Keys,
    metrics: Arc<Metrics>,
    redis: Option<Pool>,
}

impl ResponseCache {
    pub fn new(
        config: &CacheConfig,
        relay_name: &str,
        redis: Option<Pool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            memory: Mutex::new(Memory {
                max_bytes: config.memory_bytes,
                ..Memory::default()
            }),
            keys: Keys::new(relay_name),
            metrics,
            redis,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .cache_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn publish_size(&self, memory: &Memory) {
        self.metrics.cache_memory_bytes.set(memory.bytes as i64);
        self.metrics
            .cache_memory_entries
            .set(memory.entries.len() as i64);
    }

    /// Applies a new config: the memory bound, and the generations in force
    /// (entries of routes that changed are dropped).
    pub fn reconfigure(&self, config: &CacheConfig, generations: &[u64]) {
        let mut memory = self.lock();
        memory.max_bytes = config.memory_bytes;
        let stale: Vec<[u8; 32]> = memory
            .entries
            .iter()
            .filter(|(_, e)| !generations.contains(&e.generation))
            .map(|(h, _)| *h)
            .collect();
        for hash in stale {
            memory.remove(&hash);
        }
        memory.make_room(0);
        self.publish_size(&memory);
    }

    fn put_local(&self, plan: &Plan, body: Bytes, stored_ms: u64, expires_ms: u64) {
        let mut memory = self.lock();
        let size = body.len() as u64;
        if size > memory.max_bytes {
            return;
        }
        memory.remove(&plan.hash);
        memory.make_room(size);
        memory.seq += 1;
        let seq = memory.seq;
        memory.order.push_back((plan.hash, seq));
        memory.bytes += size;
        memory.entries.insert(
            plan.hash,
            Entry {
                body,
                scope: plan.scope.clone(),
                generation: plan.generation,
                stored_ms,
                expires_ms,
                seq,
            },
        );
        self.publish_size(&memory);
    }

    fn get_local(&self, plan: &Plan) -> Option<Bytes> {
        let now = unix_ms();
        let mut memory = self.lock();
        let entry = memory.entries.get(&plan.hash)?;
        if entry.expires_ms <= now || memory.purged_after(entry) {
            memory.remove(&plan.hash);
            self.publish_size(&memory);
            return None;
        }
        Some(entry.body.clone())
    }

    /// Level 1: this process's memory. No round trip.
    pub fn lookup_local(&self, plan: &Plan) -> Option<Hit> {
        let body = self.get_local(plan)?;
        Some(Hit { body, level: "l1" })
    }

    /// Counts a hit once the request is admitted and served from it.
    pub fn served(&self, hit: &Hit) {
        self.count(if hit.level == "l1" {
            "hit_l1"
        } else {
            "hit_l2"
        });
    }

    /// The level-2 key of a request, when level 2 is in use (a Redis
    /// store, and `cache.redis` on).
    pub fn level2_key(&self, plan: &Plan, store: &AnyStore) -> Option<String> {
        (plan.redis && store.cache().is_some()).then(|| plan.l2_key(&self.keys))
    }

    /// What level 2 answered for a request that level 1 did not (read with
    /// the request's admission, [`AnyStore::admit_and_get`]); a hit fills
    /// level 1. `None` (level 2 not asked) or no entry: a miss.
    pub fn level2_answer(
        &self,
        plan: &Plan,
        answer: Option<Result<Option<Bytes>, StoreError>>,
    ) -> Option<Hit> {
        match answer {
            Some(Ok(Some(value))) if value.len() >= HEADER_LEN => {
                let stored = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
                let expires = u64::from_be_bytes(value[8..16].try_into().expect("8 bytes"));
                let body = value.slice(HEADER_LEN..);
                if expires > unix_ms() {
                    self.put_local(plan, body.clone(), stored, expires);
                    return Some(Hit { body, level: "l2" });
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(error)) => {
                self.count("l2_unavailable");
                tracing::debug!(%error, "cache level 2 not reachable; treated as a miss");
            }
        }
        self.count("miss");
        None
    }

    /// Deletes the entries of `client` (its own, not shared ones), or all;
    /// (level 1 entries here, level 2 entries). Other replicas drop their
    /// level-1 entries within a second, from the purge time left in Redis.
    pub async fn purge(
        &self,
        client: Option<&str>,
        store: &AnyStore,
    ) -> Result<(usize, u64), crate::store::StoreError> {
        let scope: Arc<str> = match client {
            Some(client) => Arc::from(format!("client:{client}")),
            None => Arc::from("*"),
        };
        let now = unix_ms();
        let local = {
            let mut memory = self.lock();
            let doomed: Vec<[u8; 32]> = memory
                .entries
                .iter()
                .filter(|(_, e)| &*scope == "*" || e.scope == scope)
                .map(|(h, _)| *h)
                .collect();
            for hash in &doomed {
                memory.remove(hash);
            }
            memory.purged.insert(scope.clone(), now);
            self.publish_size(&memory);
            doomed.len()
        };
        let mut remote = 0;
        if let Some(redis) = store.cache() {
            remote = redis.cache_purge(client.map(|_| &*scope)).await?;
            if let Some(pool) = &self.redis {
                let _: Result<(), _> = pool
                    .hset(self.keys.cache_purges(), (scope.to_string(), now))
                    .await;
            }
        }
        Ok((local, remote))
    }

    /// Reads the purge times the replicas left in Redis, each second.
    pub fn spawn_sync(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        self.redis.as_ref()?;
        let this = self.clone();
        Some(crate::upstream::breaker::spawn_periodic(
            PURGE_SYNC,
            move || {
                let this = this.clone();
                async move { this.sync_once().await }
            },
        ))
    }

    pub async fn sync_once(&self) {
        let Some(pool) = &self.redis else {
            return;
        };
        let read = pool.hgetall::<HashMap<String, u64>, _>(self.keys.cache_purges());
        let Ok(Ok(times)) = tokio::time::timeout(Duration::from_secs(1), read).await else {
            return;
        };
        let mut memory = self.lock();
        for (scope, at) in times {
            let known = memory.purged.entry(Arc::from(scope)).or_insert(0);
            *known = (*known).max(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl CachePolicy {
        /// `wanted`, then `plan_parsed` on the body, as the request path does.
        fn plan(
            &self,
            client: &str,
            client_enabled: bool,
            method: &Method,
            path: &str,
            headers: &HeaderMap,
            body: &[u8],
        ) -> Result<Option<Plan>, RelayError> {
            let cache_header = headers.get(RELAY_CACHE);
            let Some(asked) = self.wanted(client_enabled, method, path, cache_header)? else {
                return Ok(None);
            };
            let Ok(serde_json::Value::Object(request)) = serde_json::from_slice(body) else {
                return Ok(None);
            };
            Ok(self.plan_parsed(client, client_enabled, asked, headers, &request))
        }
    }

    fn policy(json: &str) -> CachePolicy {
        CachePolicy::new(&serde_json::from_str(json).unwrap())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn plan(
        policy: &CachePolicy,
        client: &str,
        client_enabled: bool,
        h: &HeaderMap,
        body: &str,
    ) -> Option<Plan> {
        policy
            .plan(
                client,
                client_enabled,
                &Method::POST,
                "/v1/messages",
                h,
                body.as_bytes(),
            )
            .unwrap()
    }

    const BODY: &str =
        r#"{"model":"claude-x","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

    #[test]
    fn key_ignores_formatting_but_not_meaning() {
        let p = policy("{}");
        let h = headers(&[("anthropic-version", "2023-06-01")]);
        let a = plan(&p, "app", true, &h, BODY).unwrap();
        let reordered = r#"{ "messages": [{"content":"Hi","role":"user"}], "max_tokens": 8, "model": "claude-x" }"#;
        assert_eq!(plan(&p, "app", true, &h, reordered).unwrap().hash, a.hash);
        let other_body = BODY.replace("Hi", "Hi!");
        assert_ne!(plan(&p, "app", true, &h, &other_body).unwrap().hash, a.hash);
        let beta = headers(&[("anthropic-version", "2023-06-01"), ("anthropic-beta", "x")]);
        assert_ne!(plan(&p, "app", true, &beta, BODY).unwrap().hash, a.hash);
        assert_ne!(plan(&p, "other", true, &h, BODY).unwrap().hash, a.hash);
        // "8" and 8 are different requests.
        let string_tokens = BODY.replace("8", "\"8\"");
        assert_ne!(
            plan(&p, "app", true, &h, &string_tokens).unwrap().hash,
            a.hash
        );
    }

    #[test]
    fn off_unless_enabled_and_never_for_streams() {
        let p = policy("{}");
        assert!(plan(&p, "app", false, &HeaderMap::new(), BODY).is_none());
        let on = headers(&[("x-relay-cache", "on")]);
        assert!(plan(&p, "app", false, &on, BODY).is_some());
        let off = headers(&[("x-relay-cache", "off")]);
        assert!(plan(&p, "app", true, &off, BODY).is_none());
        let stream = BODY.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
        assert!(plan(&p, "app", true, &HeaderMap::new(), &stream).is_none());
        let bad = headers(&[("x-relay-cache", "yes")]);
        assert!(
            p.plan(
                "app",
                true,
                &Method::POST,
                "/v1/messages",
                &bad,
                BODY.as_bytes()
            )
            .is_err()
        );
        assert!(
            p.plan(
                "app",
                true,
                &Method::POST,
                "/v1/messages/count_tokens",
                &HeaderMap::new(),
                BODY.as_bytes()
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn routes_pick_ttl_scope_and_generation() {
        let p = policy(
            r#"{"ttl": "1m", "routes": [{"name": "haiku", "models": ["claude-haiku-*"], "enabled": true, "ttl": "1h", "shared": true}]}"#,
        );
        let haiku = BODY.replace("claude-x", "claude-haiku-4-5");
        let a = plan(&p, "app", false, &HeaderMap::new(), &haiku).unwrap();
        assert_eq!(a.ttl, Duration::from_secs(3600));
        assert_eq!(&*a.scope, "shared");
        let b = plan(&p, "other", false, &HeaderMap::new(), &haiku).unwrap();
        assert_eq!(a.hash, b.hash, "a shared route serves every client");
        assert!(plan(&p, "app", false, &HeaderMap::new(), BODY).is_none());
        let changed = policy(
            r#"{"ttl": "1m", "routes": [{"name": "haiku", "models": ["claude-haiku-*"], "enabled": true, "ttl": "2h", "shared": true}]}"#,
        );
        let c = plan(&changed, "app", false, &HeaderMap::new(), &haiku).unwrap();
        assert_ne!(a.hash, c.hash, "a changed route starts afresh");
    }

    #[test]
    fn memory_is_bounded_and_oldest_go_first() {
        let cache = ResponseCache::new(
            &serde_json::from_str(r#"{"memory_bytes": 100}"#).unwrap(),
            "t",
            None,
            Arc::new(Metrics::new()),
        );
        let p = policy("{}");
        let now = unix_ms();
        let mut plans = Vec::new();
        for i in 0..5 {
            let plan = plan(
                &p,
                "app",
                true,
                &HeaderMap::new(),
                &BODY.replace("Hi", &format!("Hi {i}")),
            )
            .unwrap();
            cache.put_local(&plan, Bytes::from(vec![b'x'; 40]), now, now + 60_000);
            plans.push(plan);
        }
        assert!(cache.lock().bytes <= 100);
        assert!(cache.get_local(&plans[0]).is_none());
        assert!(cache.get_local(&plans[4]).is_some());
        assert!(cache.get_local(&plans[3]).is_some());
        // Expired entries are misses.
        cache.put_local(&plans[0], Bytes::from_static(b"old"), now - 2, now - 1);
        assert!(cache.get_local(&plans[0]).is_none());
    }
}
