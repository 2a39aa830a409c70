//! The proxy config document (`ProxyConfig`) of a relay.
//!
//! Built as JSON and then parsed into `ProxyConfig`, so fields the proxy adds
//! later with defaults need no change here, and a field renamed on either
//! side fails the render tests instead of silently vanishing.

use claude_relay_crds::config::{ModelPrice, PricingConfig, ProxyConfig};
use std::collections::BTreeSet;

use claude_relay_crds::resources::{
    Continent, KeyStrategy, PricingSettings, RatePeriod, RedisMode, Timeouts,
};
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use kube::ResourceExt;
use serde_json::{Map, Value, json};

use super::{ADMIN_PORT, GEOIP_DIR, HTTP_PORT, InvalidSpec, SECRETS_DIR, secret_path};

/// Renders and validates the proxy config of `relay` with `regions`;
/// `default_pricing` is the operator's default price table.
pub fn render_config(
    relay: &ClaudeRelay,
    regions: &[UpstreamRegion],
    default_pricing: &PricingConfig,
) -> Result<ProxyConfig, InvalidSpec> {
    let spec = &relay.spec;
    let mut server = json!({
        "listen": format!("0.0.0.0:{HTTP_PORT}"),
        "admin_listen": format!("0.0.0.0:{ADMIN_PORT}"),
    });
    if let Some(tls) = &spec.tls {
        server["tls"] = json!({
            "cert_file": format!("{SECRETS_DIR}/{}/tls.crt", tls.secret_name),
            "key_file": format!("{SECRETS_DIR}/{}/tls.key", tls.secret_name),
        });
    }

    let log = spec.log.clone().unwrap_or_default();
    let mut log_json =
        json!({ "format": log.format.unwrap_or(claude_relay_crds::config::LogFormat::Json) });
    if let Some(level) = log.level {
        log_json["level"] = level.into();
    }

    let clients: Vec<Value> = spec
        .clients
        .iter()
        .map(|client| {
            let mut c = json!({
                "id": client.id,
                "relay_keys": client.relay_key_secret_ref.iter().map(file).collect::<Vec<_>>(),
            });
            if let Some(secrets) = &client.signing_secret_refs {
                c["signing_secrets"] = secrets.iter().map(file).collect();
            }
            if let Some(limit) = &client.rate_limit {
                let per = match limit.per {
                    RatePeriod::Second => "second",
                    RatePeriod::Minute => "minute",
                };
                c["rate_limit"] = json!({ "requests": limit.requests, "per": per });
            }
            if let Some(quota) = &client.quota {
                c["quota"] = without_nulls(json!({
                    "tokens_per_minute": quota.tokens_per_minute,
                    "tokens_per_day": quota.tokens_per_day,
                    "usd_per_day": quota.usd_per_day,
                    "usd_per_month": quota.usd_per_month,
                    "max_concurrent": quota.max_concurrent,
                    "count_cache_reads": quota.count_cache_reads,
                }));
            }
            if let Some(cache) = &client.cache {
                c["cache"] = json!({ "enabled": cache.enabled });
            }
            c
        })
        .collect();

    // Lowest priority value first; equal priorities in name order, so the
    // rendering does not depend on the order the API server listed them in.
    let mut sorted: Vec<&UpstreamRegion> = regions.iter().collect();
    sorted.sort_by_key(|r| (r.spec.priority, r.name_any()));
    let regions: Vec<Value> = sorted
        .iter()
        .map(|region| {
            let mut r = json!({
                "name": region.name_any(),
                "base_url": region.spec.base_url,
                "priority": region.spec.priority,
                "weight": region.spec.weight,
                "api_keys": region.spec.api_key_secret_refs.iter().map(file).collect::<Vec<_>>(),
                "timeouts": timeouts(region.spec.timeouts.as_ref(), spec.timeouts.as_ref()),
            });
            if let Some(ca) = &region.spec.ca_secret_ref {
                r["tls"] = json!({ "ca_file": secret_path(ca) });
            }
            if let Some(proxy) = &region.spec.egress_proxy {
                r["egress_proxy"] = json!({ "url": proxy.url });
                if let Some(credentials) = &proxy.credentials_secret_ref {
                    r["egress_proxy"]["credentials_from"] = file(credentials);
                }
            }
            r
        })
        .collect();

    let mut doc = json!({
        "relay_name": format!("{}/{}", relay.namespace().unwrap_or_default(), relay.name_any()),
        "server": server,
        "log": log_json,
        "clients": clients,
        "regions": regions,
    });
    if let Some(redis) = &spec.redis {
        doc["store"] = json!({ "redis": redis_store(redis) });
    }
    doc["routing"] = routing(relay, &sorted);
    if let Some(breaker) = &spec.breaker {
        doc["breaker"] = json!({
            "window": breaker.window,
            "min_requests": breaker.min_requests,
            "failure_rate": f64::from(breaker.failure_rate_percent) / 100.0,
            "open_for": breaker.open_for,
            "half_open_probes": breaker.half_open_probes,
        });
    }
    if let Some(pool) = &spec.key_pool {
        let strategy = match pool.strategy {
            KeyStrategy::RoundRobin => "round_robin",
            KeyStrategy::LeastInFlight => "least_in_flight",
        };
        doc["key_pool"] = json!({ "strategy": strategy });
        if let Some(cap) = pool.max_in_flight_per_key {
            doc["key_pool"]["max_in_flight_per_key"] = cap.into();
        }
    }
    if let Some(replay) = &spec.replay {
        let mut r = Map::new();
        if let Some(window) = replay.window {
            r.insert("window".into(), json!(window));
        }
        if let Some(fail_open) = replay.fail_open {
            r.insert("fail_open".into(), fail_open.into());
        }
        doc["replay"] = Value::Object(r);
    }
    if let Some(grace) = spec.quota.as_ref().and_then(|q| q.fail_open_grace) {
        doc["quota"] = json!({ "fail_open_grace": grace });
    }
    if let Some(cache) = &spec.cache {
        doc["cache"] = cache_block(cache);
    }
    doc["pricing"] = pricing(spec.pricing.as_ref(), default_pricing);
    if let Some(usage) = &spec.usage {
        doc["usage"] = without_nulls(json!({
            "enabled": usage.enabled,
            "retention": usage.retention,
        }));
    }

    if let Some(traces) = &spec.traces {
        doc["traces"] = traces_block(traces);
    }

    let config: ProxyConfig = serde_json::from_value(doc).map_err(|e| {
        InvalidSpec(format!(
            "the proxy config cannot be built (operator and proxy versions differ?): {e}"
        ))
    })?;
    config
        .validate()
        .map_err(|e| InvalidSpec(format!("invalid proxy config: {e}")))?;
    Ok(config)
}

/// The routing section: the relay's own rules first, then rules derived from
/// the countries and continents each region says it serves.
///
/// A derived rule sends a client to the regions serving its country (or,
/// failing that, its continent) first and then along the default route, so a
/// region's `countries` states a preference, never a wall: failover still
/// reaches the others. Country rules come before continent rules because the
/// proxy takes the first rule that matches.
fn routing(relay: &ClaudeRelay, sorted_regions: &[&UpstreamRegion]) -> Value {
    let spec = relay.spec.routing.clone().unwrap_or_default();
    let mut out = json!({});
    if let Some(geoip) = &relay.spec.geoip {
        out["geoip_db"] = format!("{GEOIP_DIR}/{}", geoip.file).into();
    }
    if let Some(cidrs) = &spec.trusted_proxies {
        out["trusted_proxies"] = json!(cidrs);
    }
    if let Some(default) = &spec.default_regions {
        out["default"] = json!(default);
    }
    if let Some(attempts) = spec.max_attempts {
        out["max_attempts"] = attempts.into();
    }

    let mut rules: Vec<Value> = spec
        .rules
        .iter()
        .flatten()
        .map(|rule| {
            json!({
                "countries": rule.countries.clone().unwrap_or_default(),
                "continents": rule.continents.clone().unwrap_or_default(),
                "regions": rule.regions,
            })
        })
        .collect();

    let default_route: Vec<String> = match &spec.default_regions {
        Some(names) => names.clone(),
        None => sorted_regions.iter().map(|r| r.name_any()).collect(),
    };
    // Regions serving `place`, in priority order, then the default route.
    let route_for = |serves: &dyn Fn(&UpstreamRegion) -> bool| -> Vec<String> {
        let mut route: Vec<String> = sorted_regions
            .iter()
            .filter(|r| serves(r))
            .map(|r| r.name_any())
            .collect();
        for name in &default_route {
            if !route.contains(name) {
                route.push(name.clone());
            }
        }
        route
    };
    let countries: BTreeSet<&String> = sorted_regions
        .iter()
        .flat_map(|r| r.spec.countries.iter().flatten())
        .collect();
    for country in countries {
        let regions = route_for(&|r: &UpstreamRegion| {
            r.spec.countries.iter().flatten().any(|c| c == country)
        });
        rules.push(json!({ "countries": [country], "regions": regions }));
    }
    let continents: BTreeSet<Continent> = sorted_regions
        .iter()
        .flat_map(|r| r.spec.continents.iter().flatten().copied())
        .collect();
    for continent in continents {
        let regions = route_for(&|r: &UpstreamRegion| {
            r.spec.continents.iter().flatten().any(|c| *c == continent)
        });
        rules.push(json!({ "continents": [continent], "regions": regions }));
    }
    if !rules.is_empty() {
        out["rules"] = rules.into();
    }
    out
}

/// The price table: the relay's own entries over the operator's default
/// table (unless `includeDefaults` is off), an entry of the relay's
/// replacing the default with the same `match`.
fn pricing(own: Option<&PricingSettings>, defaults: &PricingConfig) -> Value {
    let own = own.cloned().unwrap_or_default();
    let models: Vec<ModelPrice> = own
        .models
        .iter()
        .flatten()
        .map(|m| ModelPrice {
            pattern: m.pattern.clone(),
            input_usd_per_mtok: m.input_usd_per_mtok,
            output_usd_per_mtok: m.output_usd_per_mtok,
            cache_read_usd_per_mtok: m.cache_read_usd_per_mtok,
            cache_write_5m_usd_per_mtok: m.cache_write_5m_usd_per_mtok,
            cache_write_1h_usd_per_mtok: m.cache_write_1h_usd_per_mtok,
        })
        .collect();
    let table = if own.include_defaults {
        defaults.overridden_by(&models)
    } else {
        PricingConfig {
            as_of: None,
            models,
        }
    };
    serde_json::to_value(table).expect("a price table serializes")
}

/// The config document as the ConfigMap holds it. Serialised through JSON
/// values so secret sources read `{file: ...}`, the form the docs show.
pub fn to_yaml(config: &ProxyConfig) -> String {
    let value = serde_json::to_value(config).expect("a ProxyConfig serializes");
    serde_yaml_ng::to_string(&value).expect("a JSON value serializes to YAML")
}

fn file(secret: &claude_relay_crds::resources::SecretKeyRef) -> Value {
    json!({ "file": secret_path(secret) })
}

/// The region's own timeouts, else the relay's; unset ones keep the proxy's defaults.
fn timeouts(region: Option<&Timeouts>, relay: Option<&Timeouts>) -> Value {
    let pick = |f: fn(&Timeouts) -> Option<claude_relay_crds::HumanDuration>| {
        region.and_then(f).or_else(|| relay.and_then(f))
    };
    let mut out = Map::new();
    for (key, value) in [
        ("connect", pick(|t| t.connect)),
        ("response_headers", pick(|t| t.response_headers)),
        ("idle", pick(|t| t.idle)),
        ("total", pick(|t| t.total)),
    ] {
        if let Some(v) = value {
            out.insert(
                key.into(),
                serde_json::to_value(v).expect("durations serialize"),
            );
        }
    }
    Value::Object(out)
}

/// The `traces` section: header values are files of the mounted Secrets;
/// unset fields keep the proxy's defaults.
fn traces_block(traces: &claude_relay_crds::resources::TracesSettings) -> Value {
    let headers: Map<String, Value> = traces
        .headers
        .iter()
        .flatten()
        .map(|h| (h.name.to_ascii_lowercase(), file(&h.value_secret_ref)))
        .collect();
    without_nulls(json!({
        "endpoint": traces.endpoint,
        "sampling_ratio": traces.sampling_ratio,
        "headers": headers,
        "service_name": traces.service_name,
        "export_interval": traces.export_interval,
        "max_queue_spans": traces.max_queue_spans,
    }))
}

/// The `cache` section; unset fields keep the proxy's defaults (the JSON
/// nulls of unset options are dropped).
fn cache_block(cache: &claude_relay_crds::resources::CacheSettings) -> Value {
    let routes: Vec<Value> = cache
        .routes
        .iter()
        .flatten()
        .map(|route| {
            without_nulls(json!({
                "name": route.name,
                "models": route.models,
                "enabled": route.enabled,
                "ttl": route.ttl,
                "shared": route.shared,
            }))
        })
        .collect();
    without_nulls(json!({
        "memory_bytes": cache.memory_bytes,
        "max_entry_bytes": cache.max_entry_bytes,
        "ttl": cache.ttl,
        "redis": cache.redis,
        "routes": routes,
    }))
}

fn without_nulls(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.retain(|_, v| !v.is_null());
    }
    value
}

fn redis_store(redis: &claude_relay_crds::resources::RedisConnection) -> Value {
    // Sentinel and Cluster list several `host:port` in the URL's authority.
    let hosts = || -> Vec<String> {
        let url = redis.url.as_deref().unwrap_or_default();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or_default();
        authority.split(',').map(str::to_owned).collect()
    };
    let tls = redis
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("rediss://"));
    let mut store = match redis.mode {
        RedisMode::Standalone => {
            let mut s = json!({ "mode": "standalone" });
            if let Some(url) = &redis.url {
                s["url"] = url.clone().into();
            }
            if let Some(secret) = &redis.url_secret_ref {
                s["url_from"] = file(secret);
            }
            s
        }
        RedisMode::Sentinel => json!({
            "mode": "sentinel",
            "sentinel": {
                "service_name": redis.sentinel_master_name.clone().unwrap_or_default(),
                "addresses": hosts(),
            },
        }),
        RedisMode::Cluster => json!({ "mode": "cluster", "cluster": { "nodes": hosts() } }),
    };
    if tls && redis.mode != RedisMode::Standalone {
        store["tls"] = json!({ "enabled": true });
    }
    if let Some(secret) = &redis.password_secret_ref {
        store["password_from"] = file(secret);
    }
    store
}
