//! Which regions may serve a request, in the order to try them.
//!
//! 1. The client address: the socket peer; only when the peer is a trusted
//!    proxy (`routing.trusted_proxies`), the `Forwarded` (preferred) or
//!    `X-Forwarded-For` header, walked from the right past trusted hops.
//! 2. Its country and continent from the GeoIP database, if one is loaded.
//! 3. The first rule naming that country or continent gives the regions;
//!    otherwise `routing.default`; that empty, every region by priority.
//!
//! The route is a list of indices into `Snapshot::regions`. Breaker state is
//! not looked at here: the caller skips a region whose breaker denies
//! (`breaker::RegionBreaker::admit`) and moves on, up to
//! [`Router::max_attempts`] attempts sent.

pub mod geoip;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use claude_relay_crds::ProxyConfig;
use claude_relay_crds::config::Cidr;
use http::HeaderMap;

pub use geoip::{GeoIp, GeoIpError, Location};

struct Rule {
    countries: Vec<String>,
    continents: Vec<String>,
    regions: Vec<usize>,
}

/// The routing part of a snapshot; built with it, swapped with it.
pub struct Router {
    trusted: Vec<Cidr>,
    rules: Vec<Rule>,
    default: Vec<usize>,
    max_attempts: usize,
    geoip: Option<Arc<GeoIp>>,
}

/// Why this route was chosen, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSource {
    /// Rule number `n` of `routing.rules` matched.
    Rule(usize),
    Default,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route<'r> {
    /// Indices into the snapshot's regions, in the order to try.
    pub regions: &'r [usize],
    pub source: RouteSource,
}

impl Router {
    /// `region_names`: the snapshot's regions in its order (by priority).
    /// `geoip`: the database loaded for `routing.geoip_db`, or `None` (not
    /// configured, or unreadable: then every request takes the default).
    pub fn new(
        config: &ProxyConfig,
        region_names: &[&str],
        geoip: Option<Arc<GeoIp>>,
    ) -> Result<Self, String> {
        let index = |path: &str, name: &str| {
            region_names
                .iter()
                .position(|n| *n == name)
                .ok_or_else(|| format!("{path}: no region named {name:?}"))
        };
        let routing = &config.routing;
        let trusted = routing
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, text)| {
                Cidr::parse(text).ok_or_else(|| format!("routing.trusted_proxies[{i}]: not a CIDR"))
            })
            .collect::<Result<_, _>>()?;
        let mut rules = Vec::with_capacity(routing.rules.len());
        for (i, rule) in routing.rules.iter().enumerate() {
            rules.push(Rule {
                countries: rule.countries.clone(),
                continents: rule.continents.clone(),
                regions: rule
                    .regions
                    .iter()
                    .map(|name| index(&format!("routing.rules[{i}].regions"), name))
                    .collect::<Result<_, _>>()?,
            });
        }
        let default = if routing.default.is_empty() {
            (0..region_names.len()).collect()
        } else {
            routing
                .default
                .iter()
                .map(|name| index("routing.default", name))
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            trusted,
            rules,
            default,
            max_attempts: routing.max_attempts.max(1) as usize,
            geoip,
        })
    }

    /// Attempts (the first and the failovers) one request may send.
    pub fn max_attempts(&self) -> usize {
        self.max_attempts
    }

    pub fn geoip(&self) -> Option<&Arc<GeoIp>> {
        self.geoip.as_ref()
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(ip))
    }

    /// The client's address: `peer`, unless `peer` is a trusted proxy and a
    /// forwarding header names hops; then the rightmost hop that is not a
    /// trusted proxy (a client can write anything on the left). A hop that
    /// is not an address (`unknown`, an obfuscated id) ends the walk at the
    /// last address seen.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.trusted.is_empty() || !self.trusted(peer) {
            return peer;
        }
        let hops = forwarded_hops(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = hop else { break };
            client = ip.to_canonical();
            if !self.trusted(client) {
                break;
            }
        }
        client
    }

    /// The regions to try for a client at `ip`, in order.
    pub fn route(&self, ip: IpAddr) -> Route<'_> {
        let location = self
            .geoip
            .as_ref()
            .map(|db| db.lookup(ip))
            .unwrap_or_default();
        self.route_for(&location)
    }

    /// The regions to try for a client at `location`.
    pub fn route_for(&self, location: &Location) -> Route<'_> {
        let matches = |rule: &Rule| {
            location
                .country
                .as_ref()
                .is_some_and(|c| rule.countries.contains(c))
                || location
                    .continent
                    .as_ref()
                    .is_some_and(|c| rule.continents.contains(c))
        };
        match self.rules.iter().position(matches) {
            Some(n) => Route {
                regions: &self.rules[n].regions,
                source: RouteSource::Rule(n),
            },
            None => Route {
                regions: &self.default,
                source: RouteSource::Default,
            },
        }
    }
}

/// The hops of `Forwarded` (its `for=` parameters) if present, else of
/// `X-Forwarded-For`, left to right; `None` for a hop that is not an address.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all(http::header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| parse_node(value.trim().trim_matches('"')))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|hop| parse_node(hop.trim()))
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]`, `[2001:db8::1]:80` or `2001:db8::1`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(extra: &str) -> Router {
        let config = ProxyConfig::from_yaml(&format!(
            r#"
clients: [{{id: a, relay_keys: [{{env: K}}]}}]
regions:
  - {{name: us, base_url: 'https://us.example', api_keys: [{{env: A}}]}}
  - {{name: eu, base_url: 'https://eu.example', api_keys: [{{env: B}}], priority: 1}}
  - {{name: ap, base_url: 'https://ap.example', api_keys: [{{env: C}}], priority: 2}}
{extra}"#
        ))
        .unwrap();
        Router::new(&config, &["us", "eu", "ap"], None).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_peers() {
        let r = router("routing: {trusted_proxies: ['10.0.0.0/8', 'fd00::/8']}");
        let xff = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.9, 10.0.0.7")]);
        // Untrusted peer: the header is ignored, whatever it says.
        assert_eq!(r.client_ip(ip("203.0.113.5"), &xff), ip("203.0.113.5"));
        // Trusted peer: the rightmost untrusted hop; the spoofable left part is not used.
        assert_eq!(r.client_ip(ip("10.1.1.1"), &xff), ip("198.51.100.9"));
        assert_eq!(r.client_ip(ip("::ffff:10.1.1.1"), &xff), ip("198.51.100.9"));
        // Several header lines are one list.
        let split = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "198.51.100.10"),
        ]);
        assert_eq!(r.client_ip(ip("10.1.1.1"), &split), ip("198.51.100.10"));
        // Only trusted hops: the leftmost of them.
        let inner = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.7")]);
        assert_eq!(r.client_ip(ip("10.1.1.1"), &inner), ip("10.9.9.9"));
        // Not an address: stop at the last one seen.
        let junk = headers(&[("x-forwarded-for", "198.51.100.9, garbage, 10.0.0.7")]);
        assert_eq!(r.client_ip(ip("10.1.1.1"), &junk), ip("10.0.0.7"));
        // No header: the peer.
        assert_eq!(
            r.client_ip(ip("10.1.1.1"), &HeaderMap::new()),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn forwarded_header_is_preferred_and_parsed() {
        let r = router("routing: {trusted_proxies: ['10.0.0.0/8', 'fd00::/8']}");
        let h = headers(&[
            (
                "forwarded",
                r#"for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711""#,
            ),
            ("forwarded", "for=fd00::3"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(r.client_ip(ip("fd00::1"), &h), ip("2001:db8:cafe::17"));
        assert_eq!(r.client_ip(ip("192.0.2.200"), &h), ip("192.0.2.200"));
        let port = headers(&[("forwarded", r#"for="192.0.2.61:8080""#)]);
        assert_eq!(r.client_ip(ip("10.0.0.1"), &port), ip("192.0.2.61"));
        let hidden = headers(&[("forwarded", "for=_hidden, for=10.0.0.3")]);
        assert_eq!(r.client_ip(ip("10.0.0.1"), &hidden), ip("10.0.0.3"));
    }

    #[test]
    fn no_trusted_proxies_means_the_peer() {
        let r = router("");
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(r.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn rules_then_default() {
        let r = router(
            "routing: {rules: [{countries: [DE], regions: [eu, us]}, {continents: [EU, AS], regions: [ap]}], default: [us, eu]}",
        );
        let at = |country: Option<&str>, continent: Option<&str>| Location {
            country: country.map(str::to_owned),
            continent: continent.map(str::to_owned),
        };
        let de = r.route_for(&at(Some("DE"), Some("EU")));
        assert_eq!((de.regions, de.source), (&[1, 0][..], RouteSource::Rule(0)));
        let fr = r.route_for(&at(Some("FR"), Some("EU")));
        assert_eq!((fr.regions, fr.source), (&[2][..], RouteSource::Rule(1)));
        let unknown = r.route_for(&Location::default());
        assert_eq!(
            (unknown.regions, unknown.source),
            (&[0, 1][..], RouteSource::Default)
        );
        // No database: the default for everyone.
        assert_eq!(r.route(ip("192.0.2.1")).source, RouteSource::Default);
        // No default configured: every region in priority order.
        assert_eq!(
            router("").route_for(&Location::default()).regions,
            &[0, 1, 2]
        );
        assert_eq!(router("").max_attempts(), 3);
    }
}
