//! The CEL rules of the CRDs, evaluated as the API server would (kube's
//! client-side CEL evaluator), so a bad spec is known to be rejected at apply.
#![cfg(feature = "kube")]

use claude_relay_crds::resources::{
    ClaudeRelay, GeoIp, GeoIpSource, GeoIpUpdater, RedisMode, RouteRule, Routing, SecretKeyRef,
    UpstreamRegion,
};
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, ImageVolumeSource};
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde::Serialize;
use serde_json::Value;

fn errors<K: CustomResourceExt + Serialize>(obj: &K) -> Vec<String> {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    let schema = serde_json::to_value(schema).unwrap();
    let object: Value = serde_json::to_value(obj).unwrap();
    match Validator::new().validate(&schema, &object, None) {
        Ok(()) => vec![],
        Err(e) => vec![e.to_string()],
    }
}

fn rejected_with<K: CustomResourceExt + Serialize>(obj: &K, message: &str) {
    let errs = errors(obj);
    assert!(
        errs.iter().any(|e| e.contains(message)),
        "expected {message:?}, got {errs:?}"
    );
}

#[test]
fn test_builders_are_valid() {
    assert_eq!(errors(&ClaudeRelay::test()), Vec::<String>::new());
    assert_eq!(
        errors(
            &ClaudeRelay::test()
                .with_autoscaling(2, 5)
                .with_redis_url("redis://r:6379")
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        errors(&UpstreamRegion::test("us", "https://api.anthropic.com")),
        Vec::<String>::new()
    );
}

#[test]
fn replicas_and_autoscaling_exclude_each_other() {
    let relay = ClaudeRelay::test().with_replicas(3).with_autoscaling(2, 5);
    rejected_with(&relay, "set replicas or autoscaling, not both");
}

#[test]
fn autoscaling_max_below_min_is_rejected() {
    rejected_with(
        &ClaudeRelay::test().with_autoscaling(4, 3),
        "maxReplicas must be at least minReplicas",
    );
}

#[test]
fn client_without_credentials_is_rejected() {
    let mut relay = ClaudeRelay::test();
    relay.spec.clients[0].relay_key_secret_ref = None;
    rejected_with(&relay, "needs relayKeySecretRef or signingSecretRefs");
    relay.spec.clients[0].signing_secret_refs = Some(vec![SecretKeyRef::new("app-hmac", "k1")]);
    assert_eq!(errors(&relay), Vec::<String>::new());
}

#[test]
fn redis_needs_exactly_one_url_and_sentinel_a_master() {
    let mut relay = ClaudeRelay::test().with_redis_url("redis://r:6379");
    let redis = relay.spec.redis.as_mut().unwrap();
    redis.url_secret_ref = Some(SecretKeyRef::new("redis", "url"));
    rejected_with(&relay, "set exactly one of url and urlSecretRef");

    let mut relay = ClaudeRelay::test().with_redis_url("redis://s1:26379,s2:26379");
    relay.spec.redis.as_mut().unwrap().mode = RedisMode::Sentinel;
    rejected_with(&relay, "mode Sentinel needs sentinelMasterName");
    relay.spec.redis.as_mut().unwrap().sentinel_master_name = Some("mymaster".into());
    assert_eq!(errors(&relay), Vec::<String>::new());
}

fn geoip(source: GeoIpSource, updater: bool) -> GeoIp {
    GeoIp {
        source,
        file: "GeoLite2-Country.mmdb".into(),
        updater: updater.then(|| GeoIpUpdater {
            image: "ghcr.io/maxmind/geoipupdate:v7.1.1".into(),
            account_secret_name: "maxmind".into(),
            edition_ids: "GeoLite2-Country".into(),
            frequency_hours: 24,
        }),
    }
}

#[test]
fn geoip_source_and_updater_depend_on_each_other() {
    let image = GeoIpSource {
        image: Some(ImageVolumeSource {
            reference: Some("registry.example/geoip:2025-01".into()),
            pull_policy: None,
        }),
        ..Default::default()
    };
    let empty_dir = GeoIpSource {
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };

    let mut relay = ClaudeRelay::test();
    relay.spec.geoip = Some(geoip(image.clone(), false));
    assert_eq!(errors(&relay), Vec::<String>::new());

    relay.spec.geoip = Some(geoip(image.clone(), true));
    rejected_with(&relay, "the updater writes the database");

    relay.spec.geoip = Some(geoip(empty_dir.clone(), false));
    rejected_with(&relay, "an emptyDir starts empty");

    relay.spec.geoip = Some(geoip(empty_dir, true));
    assert_eq!(errors(&relay), Vec::<String>::new());

    let both = GeoIpSource {
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..image
    };
    relay.spec.geoip = Some(geoip(both, true));
    rejected_with(&relay, "set exactly one of persistentVolumeClaim");
}

#[test]
fn route_rule_needs_a_country_or_continent() {
    let mut relay = ClaudeRelay::test();
    relay.spec.routing = Some(Routing {
        rules: Some(vec![RouteRule {
            countries: Some(vec![]),
            continents: None,
            regions: vec!["eu".into()],
        }]),
        ..Default::default()
    });
    rejected_with(&relay, "a rule needs at least one country or continent");
}

#[test]
fn relay_name_must_fit_a_service_name() {
    let mut relay = ClaudeRelay::test();
    relay.metadata.name = Some("9lives".into());
    rejected_with(&relay, "must be a DNS-1035 label");
}

#[test]
fn ca_bundle_only_with_https() {
    let mut region = UpstreamRegion::test("local", "http://10.0.0.1:8080");
    region.spec.ca_secret_ref = Some(SecretKeyRef::new("ca", "ca.crt"));
    rejected_with(&region, "caSecretRef only applies to an https baseUrl");
}

#[test]
fn kubectl_get_relays_resolves() {
    // kubectl expands short names from discovery before matching plural or
    // singular names, so `relays` and `relay` both find ClaudeRelays.
    let crd = ClaudeRelay::crd();
    let names = &crd.spec.names;
    assert_eq!(names.plural, "clauderelays");
    let short = names.short_names.clone().unwrap();
    assert!(short.contains(&"relays".to_string()) && short.contains(&"relay".to_string()));
    assert_eq!(UpstreamRegion::crd().spec.names.plural, "upstreamregions");
}

#[test]
fn a_quota_must_limit_something() {
    use claude_relay_crds::resources::ClientQuota;
    let mut relay = ClaudeRelay::test();
    relay.spec.clients[0].quota = Some(ClientQuota::default());
    rejected_with(
        &relay,
        "a quota needs tokensPerMinute, tokensPerDay, usdPerDay, usdPerMonth or maxConcurrent",
    );
    relay.spec.clients[0].quota = Some(ClientQuota {
        max_concurrent: Some(3),
        ..ClientQuota::default()
    });
    assert_eq!(errors(&relay), Vec::<String>::new());
}

#[test]
fn token_budgets_need_usage_enabled() {
    use claude_relay_crds::resources::{ClientQuota, UsageSettings};
    let mut relay = ClaudeRelay::test();
    relay.spec.usage = Some(UsageSettings {
        enabled: false,
        retention: None,
    });
    relay.spec.clients[0].quota = Some(ClientQuota {
        max_concurrent: Some(3),
        ..ClientQuota::default()
    });
    assert_eq!(errors(&relay), Vec::<String>::new(), "a cap is no budget");
    for quota in [
        ClientQuota {
            tokens_per_minute: Some(1000),
            ..ClientQuota::default()
        },
        ClientQuota {
            tokens_per_day: Some(100_000),
            ..ClientQuota::default()
        },
        ClientQuota {
            usd_per_month: Some(100.0),
            ..ClientQuota::default()
        },
    ] {
        relay.spec.clients[0].quota = Some(quota);
        rejected_with(
            &relay,
            "token and dollar budgets (clients[].quota.tokensPerMinute, tokensPerDay, usdPerDay, usdPerMonth) need usage.enabled",
        );
    }
    relay.spec.usage = Some(UsageSettings::default());
    assert_eq!(errors(&relay), Vec::<String>::new());
    relay.spec.usage = None;
    assert_eq!(errors(&relay), Vec::<String>::new());
}

#[test]
fn dollar_budgets_are_positive_and_need_prices() {
    use claude_relay_crds::resources::{ClientQuota, ModelPricing, PricingSettings};
    let mut relay = ClaudeRelay::test();
    relay.spec.clients[0].quota = Some(ClientQuota {
        usd_per_day: Some(25.0),
        usd_per_month: Some(500.0),
        ..ClientQuota::default()
    });
    // Unset pricing: the operator's default table prices them.
    assert_eq!(errors(&relay), Vec::<String>::new());
    relay.spec.clients[0].quota = Some(ClientQuota {
        usd_per_day: Some(0.0),
        ..ClientQuota::default()
    });
    rejected_with(&relay, "usdPerDay and usdPerMonth must be greater than 0");
    relay.spec.clients[0].quota = Some(ClientQuota {
        usd_per_month: Some(10.0),
        ..ClientQuota::default()
    });
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: false,
        models: None,
    });
    rejected_with(
        &relay,
        "dollar budgets (clients[].quota.usdPerDay, usdPerMonth) need prices",
    );
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: false,
        models: Some(vec![ModelPricing {
            pattern: "claude-sonnet-4-*".into(),
            input_usd_per_mtok: 3.0,
            output_usd_per_mtok: 15.0,
            cache_read_usd_per_mtok: 0.3,
            cache_write_5m_usd_per_mtok: 3.75,
            cache_write_1h_usd_per_mtok: 6.0,
        }]),
    });
    assert_eq!(errors(&relay), Vec::<String>::new());
}

/// Prices and budgets are never negative: the schema's own bounds, which
/// the API server checks before any CEL rule.
#[test]
fn prices_and_budgets_have_schema_bounds() {
    let crd = serde_json::to_value(ClaudeRelay::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let price = &spec["pricing"]["properties"]["models"]["items"];
    for field in [
        "inputUsdPerMtok",
        "outputUsdPerMtok",
        "cacheReadUsdPerMtok",
        "cacheWrite5mUsdPerMtok",
        "cacheWrite1hUsdPerMtok",
    ] {
        assert_eq!(price["properties"][field]["minimum"], 0.0, "{field}");
        assert!(
            price["required"]
                .as_array()
                .unwrap()
                .contains(&field.into()),
            "{field}"
        );
    }
    assert_eq!(
        price["properties"]["match"]["pattern"],
        claude_relay_crds::resources::MODEL_PATTERN
    );
    let quota = &spec["clients"]["items"]["properties"]["quota"]["properties"];
    for field in ["usdPerDay", "usdPerMonth"] {
        assert_eq!(quota[field]["minimum"], 0.0, "{field}");
        assert_eq!(quota[field]["type"], "number", "{field}");
    }
}
