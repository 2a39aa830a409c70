//! Breaker state read from the Redis keys the proxies publish
//! (`docs/redis-keys.md`): `claude-relay:{relay}:breaker:{region}` hashes.

use std::collections::HashMap;
use std::time::Duration;

use claude_relay_crds::resources::{
    BreakerState, RedisConnection, RedisMode, RegionBreaker, SecretKeyRef,
};
use fred::prelude::{Builder, ClientLike, Config, HashesInterface};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::Mutex;

/// A reader treats a breaker hash not written for this long as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// Bound on connecting and on each command, so a dead Redis cannot stall a reconcile.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis key of one region's breaker.
pub fn breaker_key(relay_name: &str, region: &str) -> String {
    format!("claude-relay:{relay_name}:breaker:{region}")
}

/// Reads one breaker hash. A missing key, a stale one or an unknown state is
/// `unknown`: no proxy has reported lately.
pub fn parse_breaker(
    region: &str,
    fields: &HashMap<String, String>,
    now: Timestamp,
) -> RegionBreaker {
    let updated_ms = fields.get("updated_at").and_then(|v| v.parse::<i64>().ok());
    let fresh = updated_ms.is_some_and(|ms| {
        now.as_millisecond().saturating_sub(ms) <= STALE_AFTER.as_millis() as i64
    });
    let state = match fields.get("state") {
        Some(state) if fresh => BreakerState::from_redis(state),
        _ => BreakerState::Unknown,
    };
    let since = fields
        .get("since")
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(|secs| Timestamp::from_second(secs).ok())
        .map(Time);
    RegionBreaker {
        region: region.into(),
        state,
        failure_rate: fields.get("failure_rate").cloned(),
        since,
        last_error: fields.get("last_error").cloned(),
    }
}

/// `us:closed eu:open`, in the order given.
pub fn summary(breakers: &[RegionBreaker]) -> String {
    breakers
        .iter()
        .map(|b| format!("{}:{}", b.region, b.state))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a relay's Redis is, resolved from its spec and Secret values.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RedisTarget {
    url: String,
    password: Option<String>,
}

// The URL and password may hold credentials: never print them.
impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisTarget(..)")
    }
}

impl RedisTarget {
    /// `secret` looks up the value of a Secret key the relay references.
    pub fn resolve(
        redis: &RedisConnection,
        secret: impl Fn(&SecretKeyRef) -> Option<String>,
    ) -> Result<Self, String> {
        let url = match (&redis.url, &redis.url_secret_ref) {
            (Some(url), _) => url.clone(),
            (None, Some(reference)) => secret(reference)
                .ok_or_else(|| format!("Secret {} has no key {}", reference.name, reference.key))?
                .trim()
                .to_string(),
            (None, None) => return Err("redis needs url or urlSecretRef".into()),
        };
        let password = match &redis.password_secret_ref {
            Some(reference) => Some(
                secret(reference)
                    .ok_or_else(|| {
                        format!("Secret {} has no key {}", reference.name, reference.key)
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let url = match redis.mode {
            RedisMode::Standalone => url,
            RedisMode::Sentinel => fred_url(
                &url,
                "sentinel",
                26379,
                redis.sentinel_master_name.as_deref(),
            ),
            RedisMode::Cluster => fred_url(&url, "cluster", 6379, None),
        };
        Ok(Self { url, password })
    }
}

/// fred's URL form for several hosts: the first in the authority, the others
/// as `node=` parameters.
fn fred_url(url: &str, kind: &str, default_port: u16, service: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = |h: &str| {
        if h.contains(':') {
            h.to_string()
        } else {
            format!("{h}:{default_port}")
        }
    };
    let mut hosts = authority.split(',').map(with_port);
    let first = hosts.next().unwrap_or_default();
    let mut params: Vec<String> = hosts.map(|h| format!("node={h}")).collect();
    if let Some(service) = service {
        params.push(format!("sentinelServiceName={service}"));
    }
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    format!("{scheme}-{kind}://{first}{query}")
}

/// Connections to the Redis of each relay, reused across reconciles.
#[derive(Default)]
pub struct BreakerReader {
    clients: Mutex<HashMap<RedisTarget, fred::clients::Client>>,
}

impl BreakerReader {
    /// The breaker of each of `regions` of relay `relay_name` (`namespace/name`).
    pub async fn read(
        &self,
        target: &RedisTarget,
        relay_name: &str,
        regions: &[String],
    ) -> Result<Vec<RegionBreaker>, fred::error::Error> {
        let client = self.client(target).await?;
        let now = Timestamp::now();
        let mut out = Vec::with_capacity(regions.len());
        for region in regions {
            let read = tokio::time::timeout(
                REDIS_TIMEOUT,
                client.hgetall::<HashMap<String, String>, _>(breaker_key(relay_name, region)),
            )
            .await;
            let fields = match read {
                Ok(Ok(fields)) => fields,
                Ok(Err(e)) => return Err(self.forget(target, e).await),
                Err(_) => return Err(self.forget(target, timeout_error()).await),
            };
            out.push(parse_breaker(region, &fields, now));
        }
        Ok(out)
    }

    async fn client(
        &self,
        target: &RedisTarget,
    ) -> Result<fred::clients::Client, fred::error::Error> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(target)
            && client.is_connected()
        {
            return Ok(client.clone());
        }
        if let Some(old) = clients.remove(target) {
            let _ = old.quit().await;
        }
        let mut config = Config::from_url(&target.url)?;
        if let Some(password) = &target.password {
            config.password = Some(password.clone());
        }
        // No reconnect policy: a failed connect returns to the reconcile
        // (which reports RedisUnreachable) instead of retrying forever.
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = REDIS_TIMEOUT;
                c.internal_command_timeout = REDIS_TIMEOUT;
            })
            .with_performance_config(|p| p.default_command_timeout = REDIS_TIMEOUT)
            .build()?;
        match tokio::time::timeout(REDIS_TIMEOUT * 2, client.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let _ = client.quit().await;
                return Err(timeout_error());
            }
        }
        clients.insert(target.clone(), client.clone());
        Ok(client)
    }

    async fn forget(&self, target: &RedisTarget, error: fred::error::Error) -> fred::error::Error {
        if let Some(client) = self.clients.lock().await.remove(target) {
            let _ = client.quit().await;
        }
        error
    }
}

fn timeout_error() -> fred::error::Error {
    fred::error::Error::new(
        fred::error::ErrorKind::Timeout,
        "Redis did not answer in time",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fresh_hash_gives_its_state_and_stale_or_missing_is_unknown() {
        let now = Timestamp::from_second(1_764_136_900).unwrap();
        let open = fields(&[
            ("state", "open"),
            ("failure_rate", "0.62"),
            ("since", "1764136800"),
            ("last_error", "status_529"),
            ("updated_at", "1764136890000"),
        ]);
        let b = parse_breaker("eu", &open, now);
        assert_eq!(b.state, BreakerState::Open);
        assert_eq!(b.failure_rate.as_deref(), Some("0.62"));
        assert_eq!(b.last_error.as_deref(), Some("status_529"));
        assert_eq!(
            b.since,
            Some(Time(Timestamp::from_second(1_764_136_800).unwrap()))
        );

        let stale = fields(&[("state", "open"), ("updated_at", "1764136800000")]);
        assert_eq!(
            parse_breaker("eu", &stale, now).state,
            BreakerState::Unknown
        );
        assert_eq!(
            parse_breaker("eu", &HashMap::new(), now).state,
            BreakerState::Unknown
        );
    }

    #[test]
    fn summary_lists_region_and_state() {
        let now = Timestamp::from_second(100).unwrap();
        let b = |r: &str, s: &str| {
            parse_breaker(r, &fields(&[("state", s), ("updated_at", "100000")]), now)
        };
        assert_eq!(
            summary(&[b("us", "closed"), b("eu", "open")]),
            "us:closed eu:open"
        );
    }

    #[test]
    fn sentinel_and_cluster_urls_for_fred() {
        let redis = RedisConnection {
            url: Some("rediss://s1,s2:26380".into()),
            url_secret_ref: None,
            mode: RedisMode::Sentinel,
            sentinel_master_name: Some("mymaster".into()),
            password_secret_ref: None,
        };
        let t = RedisTarget::resolve(&redis, |_| None).unwrap();
        assert_eq!(
            t.url,
            "rediss-sentinel://s1:26379?node=s2:26380&sentinelServiceName=mymaster"
        );
        let cluster = RedisConnection {
            mode: RedisMode::Cluster,
            url: Some("redis://a:7000,b:7001".into()),
            ..redis
        };
        let t = RedisTarget::resolve(&cluster, |_| None).unwrap();
        assert_eq!(t.url, "redis-cluster://a:7000?node=b:7001");
        assert_eq!(format!("{t:?}"), "RedisTarget(..)");
    }
}
