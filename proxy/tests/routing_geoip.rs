//! Geo routing against a small MaxMind DB written by the test (never a
//! downloaded one): the address's country or continent picks the route, the
//! forwarding header counts only from a trusted peer, and a missing or
//! corrupt database is a clear error.

use std::net::IpAddr;
use std::sync::Arc;

use claude_relay_crds::ProxyConfig;
use claude_relay_proxy::upstream::routing::{GeoIp, Location, RouteSource, Router};
use http::HeaderMap;
use ipnet::IpNet;
use serde_json::json;

fn write_db(path: &std::path::Path, entries: &[(&str, &str, &str)]) {
    let mut writer = mmdb_writer::Writer::new("GeoLite2-Country");
    for (net, country, continent) in entries {
        let record = json!({
            "continent": {"code": continent, "names": {"en": "x"}},
            "country": {"iso_code": country, "names": {"en": "x"}},
        });
        writer
            .insert(net.parse::<IpNet>().unwrap(), &record)
            .unwrap();
    }
    std::fs::write(path, writer.to_bytes().unwrap()).unwrap();
}

fn config(db: &std::path::Path) -> ProxyConfig {
    ProxyConfig::from_yaml(&format!(
        r#"
clients: [{{id: a, relay_keys: [{{env: K}}]}}]
regions:
  - {{name: us, base_url: 'https://us.example', api_keys: [{{env: A}}]}}
  - {{name: eu, base_url: 'https://eu.example', api_keys: [{{env: B}}], priority: 1}}
  - {{name: ap, base_url: 'https://ap.example', api_keys: [{{env: C}}], priority: 2}}
routing:
  geoip_db: {}
  trusted_proxies: ['10.0.0.0/8']
  rules:
    - {{countries: [DE], regions: [eu, us]}}
    - {{continents: [AS, OC], regions: [ap, us]}}
  default: [us]
"#,
        db.display()
    ))
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn country_and_continent_choose_the_route() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    write_db(
        &db,
        &[
            ("198.51.100.0/24", "DE", "EU"),
            ("203.0.113.0/24", "JP", "AS"),
            ("2001:db8:1::/48", "AU", "OC"),
            ("192.0.2.0/24", "US", "NA"),
        ],
    );
    let geo = Arc::new(GeoIp::open(&db).unwrap());
    assert_eq!(
        geo.lookup(ip("198.51.100.20")),
        Location {
            country: Some("DE".into()),
            continent: Some("EU".into())
        }
    );
    assert_eq!(
        geo.lookup(ip("::ffff:198.51.100.20")).country.as_deref(),
        Some("DE")
    );
    let router = Router::new(&config(&db), &["us", "eu", "ap"], Some(geo)).unwrap();

    let de = router.route(ip("198.51.100.20"));
    assert_eq!((de.regions, de.source), (&[1, 0][..], RouteSource::Rule(0)));
    assert_eq!(router.route(ip("203.0.113.9")).regions, &[2, 0]);
    assert_eq!(router.route(ip("2001:db8:1::5")).regions, &[2, 0]);
    // A country no rule names, and an address the database lacks: the default.
    assert_eq!(router.route(ip("192.0.2.1")).source, RouteSource::Default);
    assert_eq!(router.route(ip("100.64.0.1")).regions, &[0]);

    // The German client behind a trusted proxy is routed as German...
    let mut xff = HeaderMap::new();
    xff.insert("x-forwarded-for", "198.51.100.20".parse().unwrap());
    let client = router.client_ip(ip("10.2.3.4"), &xff);
    assert_eq!(router.route(client).regions, &[1, 0]);
    // ...but the same header from an untrusted peer is ignored.
    let client = router.client_ip(ip("192.0.2.50"), &xff);
    assert_eq!(client, ip("192.0.2.50"));
    assert_eq!(router.route(client).source, RouteSource::Default);
}

#[test]
fn database_is_reread_only_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    write_db(&db, &[("198.51.100.0/24", "DE", "EU")]);
    let first = GeoIp::reopen(None, &db).unwrap();
    let same = GeoIp::reopen(Some(&first), &db).unwrap();
    assert!(Arc::ptr_eq(&first, &same));
    write_db(
        &db,
        &[
            ("198.51.100.0/24", "FR", "EU"),
            ("203.0.113.0/24", "JP", "AS"),
        ],
    );
    let changed = GeoIp::reopen(Some(&first), &db).unwrap();
    assert!(!Arc::ptr_eq(&first, &changed));
    assert_eq!(
        changed.lookup(ip("198.51.100.1")).country.as_deref(),
        Some("FR")
    );
}

#[test]
fn missing_or_corrupt_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.mmdb");
    let err = GeoIp::open(&missing).unwrap_err().to_string();
    assert!(err.contains("nope.mmdb"), "{err}");
    let corrupt = dir.path().join("corrupt.mmdb");
    std::fs::write(&corrupt, b"this is not a maxmind database").unwrap();
    let err = GeoIp::open(&corrupt).unwrap_err().to_string();
    assert!(
        err.contains("corrupt.mmdb") && err.contains("not a MaxMind DB"),
        "{err}"
    );
    // Without a database the router still routes, by the default.
    let router = Router::new(&config(&missing), &["us", "eu", "ap"], None).unwrap();
    assert_eq!(router.route(ip("198.51.100.20")).regions, &[0]);
}
