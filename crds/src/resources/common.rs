//! Types shared by both custom resources.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// The API group of every claude-relay resource.
pub const GROUP: &str = "relay.claude-relay.dev";
/// The version of the resources in this crate.
pub const VERSION: &str = "v1alpha1";

/// What a base URL looks like: `http(s)://host[:port][/path]`, no credentials,
/// query or fragment. Kept in step with [`crate::config::check_base_url`].
pub const BASE_URL_PATTERN: &str = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$";
/// What an egress proxy URL looks like: `http://host[:port]`, no TLS to the
/// proxy, credentials, path, query or fragment. Kept in step with
/// [`crate::config::check_egress_proxy_url`].
pub const EGRESS_PROXY_URL_PATTERN: &str = r"^http://[^\s/?#@]+/?$";
/// An ISO 3166-1 alpha-2 country code, upper case.
pub const COUNTRY_PATTERN: &str = "^[A-Z]{2}$";
/// A client id or region name as the proxy config accepts it.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,63}$";

/// One key of a Secret in the resource's namespace.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

impl SecretKeyRef {
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
        }
    }
}

/// Continent codes as MaxMind databases report them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum Continent {
    AF,
    AN,
    AS,
    EU,
    NA,
    OC,
    SA,
}

/// Timeouts towards an upstream region. Unset fields fall back to the
/// relay's timeouts, then to the proxy's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// TCP and TLS connect (proxy default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<HumanDuration>,
    /// Until the response headers (proxy default 10m: a non-streaming call answers when the generation is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HumanDuration>,
    /// Longest silence between two chunks of a response body (proxy default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<HumanDuration>,
    /// Cap on the whole exchange (proxy default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<HumanDuration>,
}

/// State of a circuit breaker, as the proxy publishes it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
    /// No fresh report from any proxy replica.
    Unknown,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
            Self::Unknown => "unknown",
        }
    }

    /// Parses the `state` field of the Redis breaker hash.
    pub fn from_redis(value: &str) -> Self {
        match value {
            "closed" => Self::Closed,
            "half_open" => Self::HalfOpen,
            "open" => Self::Open,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
