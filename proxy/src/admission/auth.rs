//! Clients and how they authenticate: by relay key, or by a signed request
//! (see [`crate::admission::signing`] and docs/signing.md).
//!
//! Relay keys are kept as SHA-256 digests and every presented key is
//! compared with every digest in constant time, so neither a key's content
//! nor its position in the table shows in the timing.

use std::collections::HashMap;
use std::time::Duration;

use claude_relay_crds::config::{AuthMethod, ClientConfig, RelayKeySource};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::admission::signing::SigningSecret;
use crate::base::metrics::Name;
use crate::base::secrets;
use crate::http::error::RelayError;
use crate::http::error::SignatureError;

pub struct Clients {
    /// (client index, key digest); a client may hold several keys (rotation).
    keys: Vec<(u32, [u8; 32])>,
    clients: Vec<Client>,
    by_id: HashMap<String, usize>,
}

/// A client of the relay.
pub struct Client {
    pub id: Name,
    /// This client's request counter, looked up once.
    pub requests: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
    pub relay_key_allowed: bool,
    pub signature_allowed: bool,
    /// Every secret valid now (several during a rotation).
    pub signing_secrets: Vec<SigningSecret>,
    /// Requests per window, shared by all replicas through the store.
    pub rate_limit: Option<(u32, Duration)>,
    /// Token budgets and concurrency cap, shared through the store.
    pub quota: Option<crate::accounting::usage::Quota>,
    /// Whether the response cache is on for this client's requests.
    pub cache_enabled: bool,
}

impl Clients {
    pub fn build(configs: &[ClientConfig]) -> Result<Self, String> {
        let mut keys = Vec::new();
        let mut clients = Vec::with_capacity(configs.len());
        for (index, client) in configs.iter().enumerate() {
            let mut signing_secrets = Vec::with_capacity(client.signing_secrets.len());
            for (k, source) in client.signing_secrets.iter().enumerate() {
                let where_ = format!("clients[{index}].signing_secrets[{k}]");
                let secret = secrets::resolve(source).map_err(|e| format!("{where_}: {e}"))?;
                signing_secrets.push(
                    SigningSecret::new(secret.expose().as_bytes())
                        .map_err(|e| format!("{where_}: {e}"))?,
                );
            }
            clients.push(Client {
                id: Name::from(client.id.as_str()),
                requests: std::sync::OnceLock::new(),
                relay_key_allowed: client.allows(AuthMethod::RelayKey),
                signature_allowed: client.allows(AuthMethod::Signature),
                signing_secrets,
                rate_limit: client.rate_limit.map(|r| (r.requests, r.per.duration())),
                quota: client
                    .quota
                    .filter(|q| q.is_active())
                    .map(|q| crate::accounting::usage::Quota::from_config(&q)),
                cache_enabled: client.cache.is_some_and(|c| c.enabled),
            });
            for (k, source) in client.relay_keys.iter().enumerate() {
                let where_ = || format!("clients[{index}].relay_keys[{k}]");
                let digest = match source {
                    RelayKeySource::Sha256(hex) => {
                        let mut digest = [0u8; 32];
                        hex::decode_to_slice(hex, &mut digest)
                            .map_err(|e| format!("{}: {e}", where_()))?;
                        digest
                    }
                    RelayKeySource::File(path) => digest_of(
                        secrets::read_file(path)
                            .map_err(|e| format!("{}: {e}", where_()))?
                            .expose(),
                    ),
                    RelayKeySource::Env(name) => digest_of(
                        secrets::read_env(name)
                            .map_err(|e| format!("{}: {e}", where_()))?
                            .expose(),
                    ),
                };
                keys.push((index as u32, digest));
            }
        }
        let by_id = configs
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        Ok(Self {
            keys,
            clients,
            by_id,
        })
    }

    /// The client a signed request names, if it may sign.
    pub fn for_signature(&self, key_id: &str) -> Result<&Client, SignatureError> {
        let client = self
            .by_id
            .get(key_id)
            .map(|&i| &self.clients[i])
            .ok_or(SignatureError::UnknownKeyId)?;
        if client.signature_allowed {
            Ok(client)
        } else {
            Err(SignatureError::NotAllowed)
        }
    }

    /// The client that holds the key this request presents.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&Client, RelayError> {
        let presented = presented_key(headers).ok_or(RelayError::Unauthenticated(
            "no relay key: send it as the x-api-key header or as Authorization: Bearer",
        ))?;
        let digest = digest_of(presented);
        // 0 = no match, else client index + 1; no early exit.
        let mut found = 0u32;
        for (index, key) in &self.keys {
            let hit = key.ct_eq(&digest);
            found = u32::conditional_select(&found, &(index + 1), hit);
        }
        match found {
            0 => Err(RelayError::Unauthenticated("invalid relay key")),
            n => {
                let client = &self.clients[(n - 1) as usize];
                if client.relay_key_allowed {
                    Ok(client)
                } else {
                    Err(RelayError::Unauthenticated(
                        "this client must sign its requests; relay keys are not enabled for it",
                    ))
                }
            }
        }
    }
}

pub fn digest_of(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers
        .get(crate::http::headers::X_API_KEY)
        .and_then(|v| v.to_str().ok())
    {
        return Some(key.trim()).filter(|k| !k.is_empty());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn clients() -> Clients {
        let configs: Vec<ClientConfig> = serde_json::from_value(serde_json::json!([
            {"id": "a", "relay_keys": [{"sha256": hex::encode(digest_of("key-a"))}]},
            {"id": "b", "relay_keys": [
                {"sha256": hex::encode(digest_of("key-b-old"))},
                {"sha256": hex::encode(digest_of("key-b-new"))}
            ]}
        ]))
        .unwrap();
        Clients::build(&configs).unwrap()
    }

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn finds_the_client_by_either_header() {
        let c = clients();
        assert_eq!(
            &*c.authenticate(&with("x-api-key", "key-a")).unwrap().id.0,
            "a"
        );
        assert_eq!(
            &*c.authenticate(&with("authorization", "Bearer key-b-new"))
                .unwrap()
                .id
                .0,
            "b"
        );
        assert_eq!(
            &*c.authenticate(&with("authorization", "bearer key-b-old"))
                .unwrap()
                .id
                .0,
            "b"
        );
    }

    #[test]
    fn refuses_unknown_and_missing_keys() {
        let c = clients();
        assert!(matches!(
            c.authenticate(&with("x-api-key", "key-c")),
            Err(RelayError::Unauthenticated("invalid relay key"))
        ));
        assert!(c.authenticate(&HeaderMap::new()).is_err());
        assert!(
            c.authenticate(&with("authorization", "Basic a2V5"))
                .is_err()
        );
    }
}
