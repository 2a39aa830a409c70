//! The configuration in force: a snapshot built from a validated config
//! document, with secrets resolved and upstream transports ready. The
//! snapshot is swapped atomically on reload; a request keeps the snapshot it
//! started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use claude_relay_crds::ProxyConfig;
use claude_relay_crds::config::UpstreamTimeouts;
use http::HeaderValue;
use rustls::sign::CertifiedKey;

use crate::accounting::cache::{CachePolicy, ResponseCache};
use crate::accounting::usage::Accounting;
use crate::admission::auth::Clients;
use crate::base::metrics::{Metrics, Name};
use crate::base::secrets;
use crate::control::tls;
use crate::store::AnyStore;
use crate::upstream::breaker::{Breakers, RegionBreaker};
use crate::upstream::keypool::{KeyPool, KeyPools};
use crate::upstream::pool::{EgressProxy, Transport, TransportKey};
use crate::upstream::routing::Router;
use crate::upstream::routing::geoip::GeoIp;

pub struct Region {
    pub name: Name,
    pub priority: i32,
    pub transport: Arc<Transport>,
    pub timeouts: UpstreamTimeouts,
    /// This region's time-to-first-byte histogram, looked up once.
    pub ttfb: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// Shared by the snapshots (and, through Redis, by the replicas).
    pub breaker: Arc<RegionBreaker>,
    pub keys: Arc<KeyPool>,
}

/// What outlives a reload: metrics, breakers, key cooldowns, accounting
/// state and the level-1 response cache.
pub struct Services {
    pub metrics: Arc<Metrics>,
    pub breakers: Arc<Breakers>,
    pub keypools: Arc<KeyPools>,
    pub accounting: Arc<Accounting>,
    pub cache: Arc<ResponseCache>,
    /// The span queue and its exporter (`traces`).
    pub tracer: Arc<crate::accounting::trace::Tracer>,
}

impl Services {
    /// With a Redis store, breakers and key cooldowns are shared through it.
    pub fn new(config: &ProxyConfig, store: &AnyStore) -> Self {
        let metrics = Arc::new(Metrics::new());
        let redis = store.redis_pool();
        Self {
            breakers: Breakers::new(
                &config.breaker,
                &config.relay_name,
                redis.clone(),
                metrics.clone(),
            ),
            keypools: KeyPools::new(&config.relay_name, redis.clone(), metrics.clone()),
            accounting: Accounting::new(metrics.clone()),
            cache: ResponseCache::new(&config.cache, &config.relay_name, redis, metrics.clone()),
            tracer: crate::accounting::trace::Tracer::new(metrics.clone()),
            metrics,
        }
    }

    /// Starts the background sync with Redis and the renewal of concurrency
    /// slot leases; call inside the control runtime.
    pub fn spawn_sync(&self) {
        self.breakers.spawn_sync();
        self.keypools.spawn_sync();
        self.cache.spawn_sync();
        self.accounting.spawn_renewal();
        self.accounting.spawn_flush();
        self.tracer.spawn_export();
    }
}

pub struct Snapshot {
    pub config: ProxyConfig,
    pub clients: Clients,
    /// Sorted by priority (lowest first), ties in listed order.
    pub regions: Vec<Region>,
    pub downstream_cert: Option<Arc<CertifiedKey>>,
    pub cert_expiry_days: Option<f64>,
    /// Nonces and rate windows: in memory, or Redis shared by the replicas.
    pub store: Arc<AnyStore>,
    /// Which regions serve a request, in order.
    pub router: Router,
    /// 0..regions.len(), so one region can be a route of its own.
    pub region_indices: Vec<usize>,
    /// Which requests the response cache takes, and under which key.
    pub cache: CachePolicy,
    /// The prices answers are costed at.
    pub pricing: Arc<crate::accounting::pricing::Pricing>,
    /// `traces`, its header secrets resolved; `None`: no spans.
    pub trace: Option<Arc<crate::accounting::trace::TraceSettings>>,
}

impl Snapshot {
    /// Builds a snapshot, reusing the transports (and so the warm
    /// connection pools) of `previous` whose settings did not change.
    /// `workers` is the number of worker threads (one upstream client each);
    /// `store` the store for `config.store` (see [`Snapshot::reusable_store`]).
    pub fn build(
        config: ProxyConfig,
        previous: Option<&Snapshot>,
        workers: usize,
        store: Arc<AnyStore>,
        services: &Services,
    ) -> Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        let clients = Clients::build(&config.clients)?;
        let mut regions = Vec::with_capacity(config.regions.len());
        for (i, rc) in config.regions.iter().enumerate() {
            let ca_pem = match &rc.tls.ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    format!(
                        "regions[{i}].tls.ca_file: cannot read {}: {e}",
                        path.display()
                    )
                })?),
                None => None,
            };
            let egress = match &rc.egress_proxy {
                Some(proxy) => {
                    let credentials = match &proxy.credentials_from {
                        Some(source) => Some(secrets::resolve(source).map_err(|e| {
                            format!("regions[{i}].egress_proxy.credentials_from: {e}")
                        })?),
                        None => None,
                    };
                    Some(
                        EgressProxy::new(proxy, credentials)
                            .map_err(|e| format!("regions[{i}].{e}"))?,
                    )
                }
                None => None,
            };
            let key = TransportKey::new(rc, ca_pem, egress);
            let reused = previous.and_then(|p| {
                p.regions
                    .iter()
                    .find(|r| r.transport.key == key)
                    .map(|r| r.transport.clone())
            });
            let transport = match reused {
                Some(t) => t,
                None => Arc::new(
                    Transport::new(key, workers).map_err(|e| format!("regions[{i}]: {e}"))?,
                ),
            };
            let mut keys = Vec::with_capacity(rc.api_keys.len());
            for (k, source) in rc.api_keys.iter().enumerate() {
                let secret = secrets::resolve(source)
                    .map_err(|e| format!("regions[{i}].api_keys[{k}]: {e}"))?;
                let mut value = HeaderValue::from_str(secret.expose())
                    .map_err(|_| format!("regions[{i}].api_keys[{k}]: not a valid header value"))?;
                value.set_sensitive(true);
                keys.push(value);
            }
            regions.push(Region {
                name: Name::from(rc.name.as_str()),
                ttfb: std::sync::OnceLock::new(),
                priority: rc.priority,
                transport,
                timeouts: rc.timeouts.clone(),
                breaker: services.breakers.region(&rc.name),
                keys: services.keypools.build(&rc.name, keys, &config.key_pool),
            });
        }
        regions.sort_by_key(|r| r.priority);
        let names: Vec<&str> = regions.iter().map(|r| &*r.name.0).collect();
        let geoip = config.routing.geoip_db.as_ref().and_then(|path| {
            let before = previous.and_then(|p| p.router.geoip());
            GeoIp::reopen(before, path)
                .inspect_err(|error| {
                    tracing::warn!(%error, "GeoIP database unusable: every request takes the default route");
                })
                .ok()
        });
        let router = Router::new(&config, &names, geoip)?;
        services
            .breakers
            .configure(&config.breaker, names.iter().copied());
        services.keypools.retain(names.iter().copied());
        let (downstream_cert, cert_expiry_days) = match &config.server.tls {
            Some(t) => {
                let loaded = tls::load_certified_key(&t.cert_file, &t.key_file)?;
                (Some(loaded.key), Some(loaded.expiry_days))
            }
            None => (None, None),
        };
        if let Some(p) = previous
            && p.downstream_cert.is_some() != downstream_cert.is_some()
        {
            return Err("server.tls cannot be turned on or off without a restart".into());
        }
        let region_indices = (0..regions.len()).collect();
        let cache = CachePolicy::new(&config.cache);
        let pricing = Arc::new(crate::accounting::pricing::Pricing::from_config(
            &config.pricing,
        ));
        let trace = match &config.traces {
            Some(traces) => Some(Arc::new(crate::accounting::trace::TraceSettings::build(
                traces,
            )?)),
            None => None,
        };
        Ok(Self {
            trace,
            cache,
            pricing,
            config,
            clients,
            regions,
            downstream_cert,
            cert_expiry_days,
            store,
            router,
            region_indices,
        })
    }

    /// This snapshot's store, when `config` asks for the same one (so
    /// in-memory nonces and Redis connections survive a reload).
    pub fn reusable_store(&self, config: &ProxyConfig) -> Option<Arc<AnyStore>> {
        (self.config.store == config.store && self.config.relay_name == config.relay_name)
            .then(|| self.store.clone())
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| &*r.name.0 == name)
    }
}

/// Request ids: a random per-process prefix and a counter, unique without
/// a random draw per request.
pub struct RequestIds {
    /// `relay_` and the process prefix in hex, written once.
    head: [u8; 22],
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self::with_prefix(prefix, 0)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl RequestIds {
    fn with_prefix(prefix: u64, counter: u64) -> Self {
        let mut head = *b"relay_0000000000000000";
        for (i, byte) in head[6..].iter_mut().rev().enumerate() {
            *byte = HEX[((prefix >> (4 * i)) & 0xf) as usize];
        }
        Self {
            head,
            counter: AtomicU64::new(counter),
        }
    }

    /// `relay_` then 16 hex digits of the process prefix and 12 of the
    /// counter. Written by hand: `format!` cost about 2,000 instructions a
    /// request, a noticeable share of the relay's own work.
    pub fn next(&self) -> Arc<str> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 34];
        id[..22].copy_from_slice(&self.head);
        for (i, byte) in id[22..].iter_mut().rev().enumerate() {
            *byte = HEX[((n >> (4 * i)) & 0xf) as usize];
        }
        Arc::from(std::str::from_utf8(&id).expect("ASCII"))
    }
}

/// What every request and the admin server see.
pub struct App {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub ids: RequestIds,
    /// False before start-up completes and while shutting down.
    pub ready: AtomicBool,
    /// Worker threads, fixed at start.
    pub workers: usize,
    pub services: Services,
}

impl App {
    pub fn new(snapshot: Snapshot, workers: usize, services: Services) -> Arc<Self> {
        let metrics = services.metrics.clone();
        if let Some(days) = snapshot.cert_expiry_days {
            metrics.tls_cert_expiry_days.set(days);
        }
        services.tracer.configure(snapshot.trace.clone());
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            ids: RequestIds::default(),
            ready: AtomicBool::new(false),
            workers,
            services,
        })
    }

    /// Puts a new snapshot in force; requests in flight keep the old one.
    pub fn swap(&self, snapshot: Snapshot) {
        if let Some(days) = snapshot.cert_expiry_days {
            self.metrics.tls_cert_expiry_days.set(days);
        }
        // Entries of cache routes that changed are dropped here (and out of
        // reach in Redis, whose keys carry the route's generation).
        self.services
            .cache
            .reconfigure(&snapshot.config.cache, &snapshot.cache.generations());
        self.services.tracer.configure(snapshot.trace.clone());
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn shutdown_grace(&self) -> Duration {
        *self.snapshot.load().config.server.shutdown_grace
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_then_the_counter_in_hex() {
        let ids = RequestIds::with_prefix(0x0123_4567_89ab_cdef, 0xfe);
        assert_eq!(&*ids.next(), "relay_0123456789abcdef0000000000fe");
        assert_eq!(&*ids.next(), "relay_0123456789abcdef0000000000ff");
        let random = RequestIds::default();
        let (a, b) = (random.next(), random.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), "relay_".len() + 28);
        assert!(a[6..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
