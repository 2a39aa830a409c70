//! Which headers cross the relay.

use std::cell::RefCell;

use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderName};

use crate::base::metrics::FastMap;

/// The relay's own request id, beside the upstream's `request-id`.
pub const RELAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-relay-request-id");
/// Pins a request to one region by name.
pub const RELAY_REGION: HeaderName = HeaderName::from_static("x-relay-region");
/// The Claude API's key header.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
/// W3C trace context: honoured from clients, sent upstream naming the attempt.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Names a worker keeps, so that each distinct name the parsers meet is
/// validated (and, outside the standard table, allocated) once.
const KEPT_NAMES: usize = 1024;
/// A longer name is parsed every time rather than kept.
const KEPT_NAME_LEN: usize = 64;

thread_local! {
    static NAMES: RefCell<FastMap<Box<[u8]>, HeaderName>> = RefCell::new(FastMap::default());
}

/// A header name as a parser read it (any case). A name seen before on
/// this thread costs a hash lookup; `HeaderName::from_bytes` lowercases,
/// checks and, for names outside its table (`x-api-key`, every
/// `anthropic-*`), allocates each time.
pub fn name_from_wire(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    NAMES.with_borrow_mut(|names| {
        if let Some(name) = names.get(raw) {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        // Bounded: a client sending made-up names cannot grow it.
        if raw.len() <= KEPT_NAME_LEN && names.len() < KEPT_NAMES {
            names.insert(raw.into(), name.clone());
        }
        Ok(name)
    })
}

/// Whether a request carries any of the relay's own headers (`x-relay-*`).
pub fn has_relay_controls(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().starts_with("x-relay-"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those that only make sense on one leg.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str())
}

fn is_hop_by_hop_name(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers named in `Connection: a, b` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// What goes upstream of the client's headers: everything but hop-by-hop
/// headers, the client's credentials, `host` (the upstream URI carries it),
/// the `content-length` (recomputed from the buffered body), the relay's
/// own control headers, and any name that becomes one of those when its
/// `_` are read as `-` (`Content_Length`, `Transfer_Encoding`, `X_Api_Key`):
/// a CGI-style server behind the upstream (or a gateway that maps `_` to
/// `-`) would take them for the real thing, and see another body boundary
/// or another key. Other names with `_` pass (SDKs send custom headers).
pub fn for_upstream(from: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let listed = connection_listed(from);
    from.iter().filter(move |(name, _)| {
        !(stays_behind(name.as_str(), &listed)
            || (name.as_str().contains('_')
                && stays_behind(&name.as_str().replace('_', "-"), &listed)))
    })
}

/// Whether a (lowercase) header name is one the relay keeps from the upstream.
fn stays_behind(name: &str, listed: &[HeaderName]) -> bool {
    is_hop_by_hop_name(name)
        || matches!(
            name,
            "host" | "x-api-key" | "authorization" | "content-length"
        )
        || name.starts_with("x-relay-")
        || listed.iter().any(|l| l.as_str() == name)
}

/// [`for_upstream`] as a header map, with room for the key and `host`.
pub fn upstream_request_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len() + 2);
    for (name, value) in for_upstream(from) {
        out.append(name.clone(), value.clone());
    }
    out
}

/// Copies what comes back: everything but hop-by-hop headers. Most
/// responses have none, and then nothing is touched.
pub fn downstream_response_headers(from: &mut HeaderMap) {
    if !from.keys().any(is_hop_by_hop) {
        return;
    }
    for name in connection_listed(from) {
        from.remove(&name);
    }
    let hop: Vec<HeaderName> = from.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in hop {
        from.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("client-key"));
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("host", HeaderValue::from_static("relay.local"));
        h.insert("x-relay-region", HeaderValue::from_static("eu"));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        h.insert("anthropic-beta", HeaderValue::from_static("a,b"));
        h.append("x-custom", HeaderValue::from_static("1"));
        h.append("x-custom", HeaderValue::from_static("2"));
        let out = upstream_request_headers(&h);
        assert_eq!(out["anthropic-version"], "2023-06-01");
        assert_eq!(out["anthropic-beta"], "a,b");
        assert_eq!(out.get_all("x-custom").iter().count(), 2);
        for gone in [
            "x-api-key",
            "authorization",
            "connection",
            "x-trace",
            "host",
            "x-relay-region",
        ] {
            assert!(!out.contains_key(gone), "{gone} leaked upstream");
        }
    }

    #[test]
    fn underscore_look_alikes_of_what_stays_behind_stay_behind_too() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("x-trace"));
        for name in [
            "content_length",
            "transfer_encoding",
            "x_api_key",
            "proxy_authorization",
            "keep_alive",
            "x_relay_region",
            "x_trace",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("5"),
            );
        }
        h.insert("x_request_tag", HeaderValue::from_static("kept"));
        h.insert("anthropic_beta_", HeaderValue::from_static("kept"));
        let out = upstream_request_headers(&h);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x_request_tag", "anthropic_beta_"]);
    }

    #[test]
    fn names_from_the_wire_are_checked_and_lowercased_each_time_they_are_seen() {
        for _ in 0..2 {
            assert_eq!(name_from_wire(b"X-Api-Key").unwrap(), X_API_KEY);
            assert_eq!(name_from_wire(b"x-api-key").unwrap(), X_API_KEY);
            assert_eq!(
                name_from_wire(b"Content-Type").unwrap(),
                header::CONTENT_TYPE
            );
            assert!(name_from_wire(b"bad name").is_err());
            assert!(name_from_wire(b"").is_err());
        }
        let long = "x-".repeat(KEPT_NAME_LEN);
        assert_eq!(name_from_wire(long.as_bytes()).unwrap().as_str(), long);
        // Past the bound, names are still parsed, only no longer kept.
        for i in 0..KEPT_NAMES + 10 {
            let name = format!("x-made-up-{i}");
            assert_eq!(name_from_wire(name.as_bytes()).unwrap().as_str(), name);
        }
        assert!(NAMES.with_borrow(FastMap::len) <= KEPT_NAMES);
    }

    #[test]
    fn response_keeps_rate_limit_headers() {
        let mut h = HeaderMap::new();
        h.insert("request-id", HeaderValue::from_static("req_1"));
        h.insert("retry-after", HeaderValue::from_static("3"));
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("9"),
        );
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("connection", HeaderValue::from_static("close"));
        downstream_response_headers(&mut h);
        assert_eq!(h.len(), 3);
        assert!(!h.contains_key("transfer-encoding"));
    }
}
