use claude_relay_crds::config::{
    BreakerConfig, KeyPoolConfig, ProxyConfig, RelayKeySource, ReplayConfig, RouteRule,
    RoutingConfig, SecretSource,
};
use claude_relay_crds::resources::{
    BreakerSettings, Continent, KeyPoolSettings, KeyStrategy, RedisMode, ReplaySettings, Routing,
    SecretKeyRef, Timeouts,
};
use claude_relay_crds::{ClaudeRelay, HumanDuration, UpstreamRegion};
use serde_json::{Value, json};

use super::*;

fn defaults() -> Defaults {
    Defaults {
        image: "ghcr.io/claude-relay/claude-relay-proxy:0.1.0".into(),
        pricing: Default::default(),
    }
}

/// The operator's defaults with the price table the chart ships.
fn priced_defaults() -> Defaults {
    let table = include_str!("../../../examples/pricing.yaml");
    Defaults {
        pricing: serde_yaml_ng::from_str(table).unwrap(),
        ..defaults()
    }
}

fn regions() -> Vec<UpstreamRegion> {
    vec![
        UpstreamRegion::test("us", "https://api.anthropic.com"),
        UpstreamRegion::test("eu", "https://eu.gateway.example/anthropic").with_priority(10),
    ]
}

fn json_of<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

/// Where the proxy container mounts its volumes.
fn mount_paths(rendered: &Rendered) -> Vec<String> {
    json_of(&rendered.deployment)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str().map(str::to_owned))
        .collect()
}

fn meta(name: &str) -> Value {
    json!({
        "name": name,
        "namespace": "team-a",
        "labels": {
            "app.kubernetes.io/component": "proxy",
            "app.kubernetes.io/instance": "main",
            "app.kubernetes.io/managed-by": "claude-relay-operator",
            "app.kubernetes.io/name": "claude-relay",
        },
        "ownerReferences": [{
            "apiVersion": "relay.claude-relay.dev/v1alpha1",
            "kind": "ClaudeRelay",
            "name": "main",
            "uid": "00000000-0000-0000-0000-00000000c1a0",
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    })
}

fn selector() -> Value {
    json!({
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/instance": "main",
        "app.kubernetes.io/name": "claude-relay",
    })
}

/// Parses the ConfigMap text the way the proxy reads a document.
fn parse_config_map(rendered: &Rendered) -> ProxyConfig {
    let text = &rendered.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let value: Value = serde_yaml_ng::from_str(text).unwrap();
    let config: ProxyConfig = serde_json::from_value(value).unwrap();
    config.validate().unwrap();
    config
}

#[test]
fn config_refers_to_mounted_secrets_and_orders_regions() {
    let rendered = render(&ClaudeRelay::test(), &regions(), &defaults()).unwrap();
    let config = parse_config_map(&rendered);

    assert_eq!(config.relay_name, "team-a/main");
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(config.clients.len(), 1);
    assert_eq!(config.clients[0].id, "app");
    assert_eq!(
        config.clients[0].relay_keys,
        vec![RelayKeySource::File(
            "/etc/claude-relay/secrets/app-key/key".into()
        )]
    );
    let names: Vec<_> = config.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["us", "eu"], "lowest priority value first");
    assert_eq!(config.regions[1].priority, 10);
    assert_eq!(
        config.regions[1].base_url,
        "https://eu.gateway.example/anthropic"
    );
    assert_eq!(
        config.regions[0].api_keys,
        vec![SecretSource::File(
            "/etc/claude-relay/secrets/us-keys/api-key".into()
        )]
    );
    assert_eq!(config.server.tls, None);

    // Secrets only referenced: the document names files, never values.
    let text = &rendered.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(
        text.contains("file: /etc/claude-relay/secrets/us-keys/api-key"),
        "{text}"
    );
}

#[test]
fn region_timeouts_override_the_relays() {
    let mut relay = ClaudeRelay::test();
    relay.spec.timeouts = Some(Timeouts {
        connect: Some(HumanDuration::from_secs(2)),
        idle: Some(HumanDuration::from_secs(30)),
        ..Timeouts::default()
    });
    let mut us = UpstreamRegion::test("us", "https://api.anthropic.com");
    us.spec.timeouts = Some(Timeouts {
        connect: Some(HumanDuration::from_millis(500)),
        ..Timeouts::default()
    });
    let config = render_config(&relay, &[us], &defaults().pricing).unwrap();
    let t = &config.regions[0].timeouts;
    assert_eq!(t.connect, HumanDuration::from_millis(500));
    assert_eq!(t.idle, HumanDuration::from_secs(30));
    // Unset everywhere: the proxy's default.
    assert_eq!(t.total, HumanDuration::from_secs(3600));
}

/// Three regions: `us` (priority 0, serves US and CA, continent NA), `eu`
/// (priority 10, serves DE and the continent EU), `ap` (priority 20, serves
/// DE too and the continent AS).
fn geo_regions() -> Vec<UpstreamRegion> {
    let mut us = UpstreamRegion::test("us", "https://api.anthropic.com");
    us.spec.countries = Some(vec!["US".into(), "CA".into()]);
    us.spec.continents = Some(vec![Continent::NA]);
    let mut eu = UpstreamRegion::test("eu", "https://eu.example").with_priority(10);
    eu.spec.countries = Some(vec!["DE".into()]);
    eu.spec.continents = Some(vec![Continent::EU]);
    let mut ap = UpstreamRegion::test("ap", "https://ap.example").with_priority(20);
    ap.spec.countries = Some(vec!["DE".into()]);
    ap.spec.continents = Some(vec![Continent::AS]);
    vec![ap, eu, us]
}

fn rule(countries: &[&str], continents: &[&str], regions: &[&str]) -> RouteRule {
    let strings = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    RouteRule {
        countries: strings(countries),
        continents: strings(continents),
        regions: strings(regions),
    }
}

#[test]
fn routing_rules_come_first_then_the_regions_countries_then_continents() {
    let mut relay = ClaudeRelay::test();
    relay.spec.routing = Some(Routing {
        rules: Some(vec![claude_relay_crds::resources::RouteRule {
            countries: Some(vec!["JP".into()]),
            continents: None,
            regions: vec!["ap".into(), "us".into()],
        }]),
        default_regions: None,
        trusted_proxies: Some(vec!["10.0.0.0/8".into()]),
        max_attempts: Some(2),
    });
    let config = render_config(&relay, &geo_regions(), &defaults().pricing).unwrap();
    let routing = &config.routing;
    assert_eq!(
        routing.rules,
        vec![
            rule(&["JP"], &[], &["ap", "us"]),
            // Serving regions first, by priority, then every other region.
            rule(&["CA"], &[], &["us", "eu", "ap"]),
            rule(&["DE"], &[], &["eu", "ap", "us"]),
            rule(&["US"], &[], &["us", "eu", "ap"]),
            rule(&[], &["AS"], &["ap", "us", "eu"]),
            rule(&[], &["EU"], &["eu", "us", "ap"]),
            rule(&[], &["NA"], &["us", "eu", "ap"]),
        ]
    );
    assert_eq!(routing.trusted_proxies, ["10.0.0.0/8"]);
    assert_eq!(routing.max_attempts, 2);
    assert!(routing.default.is_empty(), "every region by priority");
    assert_eq!(routing.geoip_db, None);
}

#[test]
fn derived_routes_fall_back_along_the_default_route() {
    let mut relay = ClaudeRelay::test();
    relay.spec.routing = Some(Routing {
        default_regions: Some(vec!["us".into()]),
        ..Routing::default()
    });
    let config = render_config(&relay, &geo_regions(), &defaults().pricing).unwrap();
    assert_eq!(config.routing.default, ["us"]);
    let de = config
        .routing
        .rules
        .iter()
        .find(|r| r.countries == ["DE"])
        .unwrap();
    assert_eq!(de.regions, ["eu", "ap", "us"]);
    let asia = config
        .routing
        .rules
        .iter()
        .find(|r| r.continents == ["AS"])
        .unwrap();
    assert_eq!(
        asia.regions,
        ["ap", "us"],
        "not every region: the default route"
    );
}

#[test]
fn a_rule_naming_a_region_not_selected_is_an_invalid_spec() {
    let mut relay = ClaudeRelay::test();
    relay.spec.routing = Some(Routing {
        rules: Some(vec![claude_relay_crds::resources::RouteRule {
            countries: Some(vec!["FR".into()]),
            continents: None,
            regions: vec!["mars".into()],
        }]),
        ..Routing::default()
    });
    let err = render_config(&relay, &regions(), &defaults().pricing).unwrap_err();
    assert!(err.0.contains("mars"), "{err}");

    relay.spec.routing = Some(Routing {
        default_regions: Some(vec!["venus".into()]),
        ..Routing::default()
    });
    let err = render_config(&relay, &regions(), &defaults().pricing).unwrap_err();
    assert!(err.0.contains("venus"), "{err}");
}

#[test]
fn geoip_breaker_key_pool_and_replay_settings_reach_the_proxy() {
    let mut relay = ClaudeRelay::test();
    relay.spec.geoip = Some(
        serde_json::from_value(json!({
            "source": {"persistentVolumeClaim": {"claimName": "geoip"}},
            "file": "db/GeoLite2-City.mmdb",
        }))
        .unwrap(),
    );
    relay.spec.breaker = Some(BreakerSettings {
        window: HumanDuration::from_secs(30),
        min_requests: 4,
        failure_rate_percent: 25,
        open_for: HumanDuration::from_secs(90),
        half_open_probes: 2,
    });
    relay.spec.key_pool = Some(KeyPoolSettings {
        strategy: KeyStrategy::LeastInFlight,
        max_in_flight_per_key: Some(16),
    });
    relay.spec.replay = Some(ReplaySettings {
        window: Some(HumanDuration::from_secs(120)),
        fail_open: Some(true),
    });
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    let config = parse_config_map(&rendered);
    assert_eq!(
        config.routing.geoip_db.as_deref(),
        Some(std::path::Path::new(
            "/etc/claude-relay/geoip/db/GeoLite2-City.mmdb"
        ))
    );
    assert_eq!(
        config.breaker,
        BreakerConfig {
            window: HumanDuration::from_secs(30),
            min_requests: 4,
            failure_rate: 0.25,
            open_for: HumanDuration::from_secs(90),
            half_open_probes: 2,
        }
    );
    assert_eq!(
        config.key_pool,
        KeyPoolConfig {
            strategy: claude_relay_crds::config::KeyStrategy::LeastInFlight,
            max_in_flight_per_key: Some(16),
        }
    );
    assert_eq!(config.replay.window, HumanDuration::from_secs(120));
    assert!(config.replay.fail_open);

    // Unset: the proxy's defaults, not the operator's guesses.
    let plain = render_config(&ClaudeRelay::test(), &regions(), &defaults().pricing).unwrap();
    assert_eq!(plain.breaker, BreakerConfig::default());
    assert_eq!(plain.key_pool, KeyPoolConfig::default());
    assert_eq!(plain.replay, ReplayConfig::default());
    assert_eq!(plain.routing, RoutingConfig::default());
}

#[test]
fn no_regions_is_an_invalid_config() {
    let err = render(&ClaudeRelay::test(), &[], &defaults()).unwrap_err();
    assert!(err.0.contains("regions"), "{err}");
}

#[test]
fn tls_redis_and_ca_are_rendered_as_files() {
    let mut relay = ClaudeRelay::test().with_tls("relay-cert");
    relay.spec.redis = Some(claude_relay_crds::resources::RedisConnection {
        url: Some("rediss://s1:26379,s2:26379".into()),
        url_secret_ref: None,
        mode: RedisMode::Sentinel,
        sentinel_master_name: Some("mymaster".into()),
        password_secret_ref: Some(SecretKeyRef::new("redis", "password")),
    });
    let mut us = UpstreamRegion::test("us", "https://api.anthropic.com");
    us.spec.ca_secret_ref = Some(SecretKeyRef::new("corp-ca", "ca.crt"));

    let rendered = render(&relay, &[us], &defaults()).unwrap();
    let config = parse_config_map(&rendered);
    let value = json_of(&config);
    assert_eq!(
        value["server"]["tls"],
        json!({
            "cert_file": "/etc/claude-relay/secrets/relay-cert/tls.crt",
            "key_file": "/etc/claude-relay/secrets/relay-cert/tls.key",
        })
    );
    assert_eq!(
        value["regions"][0]["tls"]["ca_file"],
        "/etc/claude-relay/secrets/corp-ca/ca.crt"
    );
    let redis = &value["store"]["redis"];
    assert_eq!(redis["mode"], "sentinel");
    assert_eq!(
        redis["sentinel"],
        json!({"service_name": "mymaster", "addresses": ["s1:26379", "s2:26379"]})
    );
    assert_eq!(
        redis["password_from"],
        json!({"file": "/etc/claude-relay/secrets/redis/password"})
    );
    assert_eq!(redis["tls"]["enabled"], true);

    // Every referenced Secret is mounted, and the Service defaults to 443.
    let pod = json_of(&rendered.deployment)["spec"]["template"]["spec"].clone();
    let mounted: Vec<_> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(
        mounted,
        ["app-key", "corp-ca", "redis", "relay-cert", "us-keys"]
    );
    assert_eq!(json_of(&rendered.service)["spec"]["ports"][0]["port"], 443);
}

#[test]
fn deployment_is_exactly_as_expected() {
    let rendered = render(&ClaudeRelay::test(), &regions(), &defaults()).unwrap();
    let secret_volume = |name: &str| json!({"name": format!("secret-{name}"), "secret": {"secretName": name, "defaultMode": 0o440}});
    let secret_mount = |name: &str| json!({"name": format!("secret-{name}"), "mountPath": format!("/etc/claude-relay/secrets/{name}"), "readOnly": true});
    let probe = |path: &str, period: i32| {
        json!({
            "httpGet": {"path": path, "port": "admin"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    let spread = |key: &str| {
        json!({
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector()},
            "matchLabelKeys": ["pod-template-hash"],
        })
    };
    let expected = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta("main"),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector()},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": selector()},
                "spec": {
                    "serviceAccountName": "main-proxy",
                    "automountServiceAccountToken": true,
                    "terminationGracePeriodSeconds": 40,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        spread("kubernetes.io/hostname"),
                        spread("topology.kubernetes.io/zone"),
                    ],
                    "containers": [{
                        "name": "proxy",
                        "image": "ghcr.io/claude-relay/claude-relay-proxy:0.1.0",
                        "args": ["--config-map", "$(POD_NAMESPACE)/main-config", "--config-map-key", "config.yaml"],
                        "env": [
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": [
                            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                            {"name": "admin", "containerPort": 9090, "protocol": "TCP"},
                        ],
                        "livenessProbe": probe("/healthz", 10),
                        "readinessProbe": probe("/readyz", 5),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "tmp", "mountPath": "/tmp", "readOnly": false},
                            secret_mount("app-key"),
                            secret_mount("eu-keys"),
                            secret_mount("us-keys"),
                        ],
                    }],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        secret_volume("app-key"),
                        secret_volume("eu-keys"),
                        secret_volume("us-keys"),
                    ],
                },
            },
        },
    });
    assert_eq!(json_of(&rendered.deployment), expected);
}

#[test]
fn access_objects_are_exactly_as_expected() {
    let rendered = render(&ClaudeRelay::test(), &regions(), &defaults()).unwrap();
    assert_eq!(
        json_of(&rendered.service_account),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("main-proxy")})
    );
    assert_eq!(
        json_of(&rendered.role),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta("main-proxy"),
            "rules": [{
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": ["main-config"],
                "verbs": ["get", "list", "watch"],
            }],
        })
    );
    assert_eq!(
        json_of(&rendered.role_binding),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta("main-proxy"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "main-proxy"},
            "subjects": [{"kind": "ServiceAccount", "name": "main-proxy", "namespace": "team-a"}],
        })
    );
    let config_map = json_of(&rendered.config_map);
    assert_eq!(config_map["metadata"], meta("main-config"));
    assert_eq!(
        config_map["data"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["config.yaml"]
    );
}

#[test]
fn service_and_pdb_are_exactly_as_expected() {
    let rendered = render(&ClaudeRelay::test(), &regions(), &defaults()).unwrap();
    assert_eq!(
        json_of(&rendered.service),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("main"),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(),
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        })
    );
    assert_eq!(
        json_of(&rendered.pdb),
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta("main"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector()}},
        })
    );
    assert_eq!(rendered.hpa, None);
}

#[test]
fn autoscaling_renders_an_hpa_and_leaves_replicas_to_it() {
    let mut relay = ClaudeRelay::test().with_autoscaling(3, 10);
    relay
        .spec
        .autoscaling
        .as_mut()
        .unwrap()
        .target_in_flight_per_pod = Some(200);
    let rendered = render(&relay, &regions(), &defaults()).unwrap();

    let deployment = json_of(&rendered.deployment);
    assert!(deployment["spec"].get("replicas").is_none(), "{deployment}");
    assert_eq!(
        json_of(rendered.hpa.as_ref().unwrap()),
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta("main"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "main"},
                "minReplicas": 3,
                "maxReplicas": 10,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
                    {"type": "Pods", "pods": {
                        "metric": {"name": "claude_relay_in_flight_requests"},
                        "target": {"type": "AverageValue", "averageValue": "200"},
                    }},
                ],
            },
        })
    );
}

#[test]
fn fixed_replicas_are_rendered() {
    let rendered = render(
        &ClaudeRelay::test().with_replicas(5),
        &regions(),
        &defaults(),
    )
    .unwrap();
    assert_eq!(json_of(&rendered.deployment)["spec"]["replicas"], 5);
}

#[test]
fn secret_volume_names_are_valid_labels() {
    assert_eq!(deployment::secret_volume_name("app-key"), "secret-app-key");
    let dotted = deployment::secret_volume_name("tls.example.com");
    assert!(
        dotted.starts_with("secret-") && dotted.len() == 23,
        "{dotted}"
    );
    assert!(!dotted.contains('.'));
    let long = deployment::secret_volume_name(&"k".repeat(100));
    assert!(long.len() <= 63);
}

#[test]
fn egress_proxies_are_rendered_with_mounted_credentials() {
    use claude_relay_crds::resources::EgressProxy;
    let mut us = UpstreamRegion::test("us", "https://api.anthropic.com");
    us.spec.egress_proxy = Some(EgressProxy {
        url: "http://egress-us.internal:3128".into(),
        credentials_secret_ref: Some(SecretKeyRef::new("egress-us", "credentials")),
    });
    let mut eu = UpstreamRegion::test("eu", "https://eu.gateway.example").with_priority(10);
    eu.spec.egress_proxy = Some(EgressProxy {
        url: "http://egress-eu.internal:3128".into(),
        credentials_secret_ref: None,
    });
    let direct = UpstreamRegion::test("ap", "https://ap.gateway.example").with_priority(20);

    let rendered = render(&ClaudeRelay::test(), &[us, eu, direct], &defaults()).unwrap();
    let value = json_of(&parse_config_map(&rendered));
    assert_eq!(
        value["regions"][0]["egress_proxy"],
        json!({
            "url": "http://egress-us.internal:3128",
            "credentials_from": {"file": "/etc/claude-relay/secrets/egress-us/credentials"},
        })
    );
    assert_eq!(
        value["regions"][1]["egress_proxy"],
        json!({"url": "http://egress-eu.internal:3128"})
    );
    assert!(value["regions"][2].get("egress_proxy").is_none());
    // The credentials Secret is mounted like the API key Secrets.
    let mounts = mount_paths(&rendered);
    assert!(
        mounts
            .iter()
            .any(|m| m == "/etc/claude-relay/secrets/egress-us"),
        "{mounts:?}"
    );

    // A proxy URL the proxy cannot use is an invalid spec naming the field.
    let mut tls_proxy = UpstreamRegion::test("us", "https://api.anthropic.com");
    tls_proxy.spec.egress_proxy = Some(EgressProxy {
        url: "https://egress.internal:3128".into(),
        credentials_secret_ref: None,
    });
    let err = render(&ClaudeRelay::test(), &[tls_proxy], &defaults()).unwrap_err();
    assert!(err.0.contains("regions[0].egress_proxy.url"), "{err}");
}

#[test]
fn quotas_and_cache_are_rendered() {
    use claude_relay_crds::resources::{
        CacheRoute, CacheSettings, ClientCache, ClientQuota, QuotaSettings,
    };
    let mut relay = ClaudeRelay::test().with_client("batch", "batch-key", "key");
    relay.spec.clients[0].quota = Some(ClientQuota {
        tokens_per_minute: Some(100_000),
        tokens_per_day: Some(5_000_000),
        max_concurrent: Some(20),
        count_cache_reads: true,
        ..ClientQuota::default()
    });
    relay.spec.clients[0].cache = Some(ClientCache { enabled: true });
    relay.spec.clients[1].quota = Some(ClientQuota {
        max_concurrent: Some(4),
        ..ClientQuota::default()
    });
    relay.spec.quota = Some(QuotaSettings {
        fail_open_grace: Some(HumanDuration::from_secs(60)),
    });
    relay.spec.cache = Some(CacheSettings {
        max_entry_bytes: Some(2 * 1024 * 1024),
        ttl: Some(HumanDuration::from_secs(600)),
        routes: Some(vec![CacheRoute {
            name: "haiku".into(),
            models: Some(vec!["claude-haiku-*".into()]),
            enabled: true,
            ttl: Some(HumanDuration::from_secs(3600)),
            shared: true,
        }]),
        ..CacheSettings::default()
    });
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    let config = parse_config_map(&rendered);

    let quota = config.clients[0].quota.unwrap();
    assert_eq!(quota.tokens_per_minute, Some(100_000));
    assert_eq!(quota.tokens_per_day, Some(5_000_000));
    assert_eq!(quota.max_concurrent, Some(20));
    assert!(quota.count_cache_reads);
    assert!(config.clients[0].cache.unwrap().enabled);
    let quota = config.clients[1].quota.unwrap();
    assert_eq!(
        (quota.tokens_per_minute, quota.max_concurrent),
        (None, Some(4))
    );
    assert_eq!(config.clients[1].cache, None);
    assert_eq!(config.quota.fail_open_grace, HumanDuration::from_secs(60));
    assert_eq!(config.cache.max_entry_bytes, 2 * 1024 * 1024);
    assert_eq!(config.cache.ttl, HumanDuration::from_secs(600));
    // Unset: the proxy's defaults.
    assert_eq!(config.cache.memory_bytes, 64 * 1024 * 1024);
    assert!(config.cache.redis);
    let route = &config.cache.routes[0];
    assert_eq!(route.name, "haiku");
    assert_eq!(route.models, ["claude-haiku-*"]);
    assert!(route.enabled && route.shared);
    assert_eq!(route.ttl, Some(HumanDuration::from_secs(3600)));

    // Without them, nothing is rendered and the defaults hold.
    let plain = parse_config_map(&render(&ClaudeRelay::test(), &regions(), &defaults()).unwrap());
    assert_eq!(plain.clients[0].quota, None);
    assert_eq!(
        plain.cache,
        claude_relay_crds::config::CacheConfig::default()
    );
}

#[test]
fn usage_settings_are_rendered() {
    use claude_relay_crds::config::UsageConfig;
    use claude_relay_crds::resources::UsageSettings;
    let ninety_days = HumanDuration::from_secs(90 * 86_400);

    // Absent: no `usage` section, so the proxy's defaults hold.
    let plain = render_config(&ClaudeRelay::test(), &regions(), &defaults().pricing).unwrap();
    assert_eq!(plain.usage, UsageConfig::default());
    assert_eq!(
        plain.usage,
        UsageConfig {
            enabled: true,
            retention: ninety_days,
        }
    );

    let mut relay = ClaudeRelay::test();
    relay.spec.usage = Some(UsageSettings {
        enabled: false,
        retention: None,
    });
    let config = parse_config_map(&render(&relay, &regions(), &defaults()).unwrap());
    assert_eq!(
        config.usage,
        UsageConfig {
            enabled: false,
            retention: ninety_days,
        }
    );

    relay.spec.usage = Some(UsageSettings {
        enabled: true,
        retention: Some("35d".parse().unwrap()),
    });
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    let text = &rendered.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert!(
        text.contains("usage:\n  enabled: true\n  retention: 840h\n"),
        "{text}"
    );
    assert_eq!(
        parse_config_map(&rendered).usage,
        UsageConfig {
            enabled: true,
            retention: HumanDuration::from_secs(35 * 86_400),
        }
    );
}

#[test]
fn token_budgets_without_usage_or_a_short_retention_are_invalid_specs() {
    use claude_relay_crds::resources::{ClientQuota, UsageSettings};
    let mut relay = ClaudeRelay::test().with_client("batch", "batch-key", "key");
    relay.spec.usage = Some(UsageSettings {
        enabled: false,
        retention: None,
    });
    // A concurrency cap alone needs no usage.
    relay.spec.clients[0].quota = Some(ClientQuota {
        max_concurrent: Some(4),
        ..ClientQuota::default()
    });
    render(&relay, &regions(), &defaults()).unwrap();

    relay.spec.clients[1].quota = Some(ClientQuota {
        tokens_per_day: Some(1_000_000),
        ..ClientQuota::default()
    });
    let err = render(&relay, &regions(), &defaults()).unwrap_err();
    assert_eq!(
        err.0,
        "invalid proxy config: clients[1].quota: token budgets need usage.enabled"
    );

    relay.spec.usage = Some(UsageSettings {
        enabled: true,
        retention: Some(HumanDuration::from_secs(3600)),
    });
    let err = render(&relay, &regions(), &defaults()).unwrap_err();
    assert_eq!(
        err.0,
        "invalid proxy config: usage.retention: must be at least 1d"
    );
}

#[test]
fn prices_are_the_defaults_with_the_relays_own_on_top() {
    use claude_relay_crds::resources::{ClientQuota, ModelPricing, PricingSettings};
    let defaults = priced_defaults();
    let table = |relay: &ClaudeRelay| {
        let config = parse_config_map(&render(relay, &regions(), &defaults).unwrap());
        config.pricing
    };
    // No pricing in the spec: the default table, dated.
    let mut relay = ClaudeRelay::test();
    assert_eq!(table(&relay), defaults.pricing);
    assert_eq!(table(&relay).as_of.as_deref(), Some("2026-12-06"));

    let own = |pattern: &str, input| ModelPricing {
        pattern: pattern.into(),
        input_usd_per_mtok: input,
        output_usd_per_mtok: 10.0,
        cache_read_usd_per_mtok: 0.1,
        cache_write_5m_usd_per_mtok: 1.25,
        cache_write_1h_usd_per_mtok: 2.0,
    };
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: true,
        models: Some(vec![
            own("claude-sonnet-4-*", 2.5),
            own("internal-model", 1.0),
        ]),
    });
    relay.spec.clients[0].quota = Some(ClientQuota {
        usd_per_day: Some(12.5),
        usd_per_month: Some(200.0),
        ..ClientQuota::default()
    });
    let config = parse_config_map(&render(&relay, &regions(), &defaults).unwrap());
    let priced = |pattern: &str| {
        config
            .pricing
            .models
            .iter()
            .filter(|m| m.pattern == pattern)
            .map(|m| m.input_usd_per_mtok)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        priced("claude-sonnet-4-*"),
        [2.5],
        "the relay's own replaces the default"
    );
    assert_eq!(priced("internal-model"), [1.0]);
    assert_eq!(priced("claude-haiku-4-5*"), [1.0], "other defaults stay");
    assert_eq!(
        config.pricing.models.len(),
        defaults.pricing.models.len() + 1
    );
    let quota = config.clients[0].quota.unwrap();
    assert_eq!(
        (quota.usd_per_day, quota.usd_per_month),
        (Some(12.5), Some(200.0))
    );

    // Without the defaults, only the relay's own.
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: false,
        models: Some(vec![own("internal-model", 1.0)]),
    });
    let own_only = table(&relay);
    assert_eq!(own_only.models.len(), 1);
    assert_eq!(own_only.as_of, None);

    // Dollar budgets with no price at all: the proxy would refuse the config.
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: false,
        models: None,
    });
    let err = render(&relay, &regions(), &defaults).unwrap_err();
    assert!(err.0.contains("dollar budgets need prices"), "{}", err.0);
    // A price the proxy cannot keep exactly is named with its path.
    relay.spec.pricing = Some(PricingSettings {
        include_defaults: false,
        models: Some(vec![own("internal-model", 1.0001)]),
    });
    let err = render(&relay, &regions(), &defaults).unwrap_err();
    assert!(
        err.0.contains("pricing.models[0].input_usd_per_mtok"),
        "{}",
        err.0
    );
}

#[test]
fn traces_are_rendered_with_header_secrets_mounted() {
    use claude_relay_crds::resources::{TraceHeader, TracesSettings};
    assert_eq!(
        render_config(&ClaudeRelay::test(), &regions(), &defaults().pricing)
            .unwrap()
            .traces,
        None
    );
    let mut relay = ClaudeRelay::test();
    relay.spec.traces = Some(TracesSettings {
        endpoint: "http://otel-collector.observability:4318".into(),
        sampling_ratio: Some(0.1),
        headers: Some(vec![TraceHeader {
            name: "Authorization".into(),
            value_secret_ref: SecretKeyRef::new("otel-token", "header"),
        }]),
        service_name: None,
        export_interval: Some("2s".parse().unwrap()),
        max_queue_spans: None,
    });
    let rendered = render(&relay, &regions(), &defaults()).unwrap();
    let value = json_of(&parse_config_map(&rendered));
    assert_eq!(
        value["traces"],
        json!({
            "endpoint": "http://otel-collector.observability:4318",
            "sampling_ratio": 0.1,
            "headers": {"authorization": {"file": "/etc/claude-relay/secrets/otel-token/header"}},
            "service_name": "claude-relay",
            "export_interval": "2s",
            "max_queue_spans": 4096,
        })
    );
    // The token's Secret is mounted like the API keys'; only its path is in
    // the ConfigMap.
    let mounts = mount_paths(&rendered);
    assert!(
        mounts
            .iter()
            .any(|m| m == "/etc/claude-relay/secrets/otel-token"),
        "{mounts:?}"
    );

    // What the proxy refuses is an invalid spec naming the field.
    relay.spec.traces.as_mut().unwrap().endpoint = "otel-collector:4318".into();
    let err = render(&relay, &regions(), &defaults()).unwrap_err();
    assert!(err.0.contains("traces.endpoint"), "{err}");
}
