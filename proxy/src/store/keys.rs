//! Every Redis key claude-relay uses, in one place; `docs/redis-keys.md`
//! documents them for operators and the operator reads some of them.
//!
//! All keys start with `claude-relay:{relay_name}:`; braces in that notation
//! are placeholders. The keys of one client also carry the client id in
//! literal braces, `{app}`: a Redis Cluster hash tag, so that its nonce and
//! rate keys share a slot and the admission script (which touches both) runs
//! in a cluster instead of failing with CROSSSLOT. Every other command
//! touches one key, so keys are otherwise free to spread over the slots.

/// The key formats of one relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(relay_name: &str) -> Self {
        Self {
            prefix: format!("claude-relay:{relay_name}:"),
        }
    }

    /// `claude-relay:{relay}:{{client}}:nonce:{nonce}` (the client id in
    /// literal braces): a string, set once with an expiry; its existence
    /// means the nonce was used. Client ids and nonces contain no `:`, `{`
    /// or `}`, so the key splits back unambiguously.
    pub fn nonce(&self, client: &str, nonce: &str) -> String {
        // Built by hand: one per signed request, and `format!` through the
        // client tag cost ten times as much.
        let mut key = String::with_capacity(self.prefix.len() + client.len() + nonce.len() + 9);
        for part in [&*self.prefix, "{", client, "}:nonce:", nonce] {
            key.push_str(part);
        }
        key
    }

    /// `claude-relay:{relay}:{{client}}:rate`: an integer counting the
    /// client's requests in the current window; it expires when the window
    /// ends. Same hash tag as the client's nonces.
    pub fn rate(&self, client: &str) -> String {
        format!("{}{}:rate", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:tokens:m:{minute}`: tokens the
    /// client spent in one calendar minute (minutes since the epoch, UTC);
    /// expires two minutes after it starts.
    pub fn tokens_minute(&self, client: &str, minute: u64) -> String {
        format!("{}{}:tokens:m:{minute}", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:tokens:d:{YYYY-MM-DD}`: tokens the
    /// client spent in one calendar day (UTC); expires two days after.
    pub fn tokens_day(&self, client: &str, day: &str) -> String {
        format!("{}{}:tokens:d:{day}", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:usd:d:{YYYY-MM-DD}`: nano-dollars
    /// the client spent in one calendar day (UTC); expires two days after.
    pub fn usd_day(&self, client: &str, day: &str) -> String {
        format!("{}{}:usd:d:{day}", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:usd:m:{YYYY-MM}`: nano-dollars the
    /// client spent in one calendar month (UTC); expires 35 days after
    /// the month's last charge.
    pub fn usd_month(&self, client: &str, month: &str) -> String {
        format!("{}{}:usd:m:{month}", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:inflight`: a sorted set of the
    /// client's requests in flight across replicas (member: a request's slot,
    /// score: unix milliseconds when its lease lapses unless renewed).
    pub fn in_flight(&self, client: &str) -> String {
        format!("{}{}:inflight", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:{{client}}:usage:{YYYY-MM-DD}`: a hash of the
    /// client's usage counters of one day (UTC): `requests`, `input_tokens`,
    /// `output_tokens`, `cache_creation_input_tokens`,
    /// `cache_read_input_tokens`, and the same per model as
    /// `{model}/{counter}`; expires after `usage.retention`.
    pub fn usage(&self, client: &str, day: &str) -> String {
        format!("{}{}:usage:{day}", self.prefix, client_tag(client))
    }

    /// `claude-relay:{relay}:cache:{scope}:{hash}`: a cached response (a
    /// string: 16 bytes of header, then the body), with its TTL. `scope` is
    /// `client:{id}` or `shared`; `hash` the hex SHA-256 of the request.
    pub fn cache_entry(&self, scope: &str, hash: &str) -> String {
        format!("{}cache:{scope}:{hash}", self.prefix)
    }

    /// The SCAN pattern of the cache entries of one scope, or of all.
    pub fn cache_pattern(&self, scope: Option<&str>) -> String {
        match scope {
            Some(scope) => format!("{}cache:{scope}:*", self.prefix),
            None => format!("{}cache:*", self.prefix),
        }
    }

    /// `claude-relay:{relay}:cache-purges`: a hash from a cache scope
    /// (`client:{id}`, or `*` for all) to the unix milliseconds of its last
    /// purge; replicas drop older level-1 entries of that scope.
    pub fn cache_purges(&self) -> String {
        format!("{}cache-purges", self.prefix)
    }

    /// `claude-relay:{relay}:breaker:{region}`: a hash with the breaker state
    /// of one region (fields in `docs/redis-keys.md`).
    pub fn breaker(&self, region: &str) -> String {
        format!("{}breaker:{region}", self.prefix)
    }

    /// `claude-relay:{relay}:breaker:{region}:probes`: a sorted set of the
    /// half-open probes in flight across replicas (member: a token, score:
    /// unix milliseconds when the probe's slot lapses).
    pub fn breaker_probes(&self, region: &str) -> String {
        format!("{}breaker:{region}:probes", self.prefix)
    }

    /// `claude-relay:{relay}:key-cooldowns:{region}`: a hash from an upstream
    /// key's id (a short hash prefix, never the key) to the unix milliseconds
    /// until which the key rests after a 429.
    pub fn key_cooldowns(&self, region: &str) -> String {
        format!("{}key-cooldowns:{region}", self.prefix)
    }
}

/// The client id as a Redis Cluster hash tag.
fn client_tag(client: &str) -> String {
    format!("{{{client}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_by_relay() {
        let keys = Keys::new("team-a/relay");
        assert_eq!(
            keys.nonce("app", "abc_DEF-0123456789"),
            "claude-relay:team-a/relay:{app}:nonce:abc_DEF-0123456789"
        );
        assert_eq!(keys.rate("app"), "claude-relay:team-a/relay:{app}:rate");
        assert_eq!(keys.breaker("us"), "claude-relay:team-a/relay:breaker:us");
        assert_ne!(Keys::new("b").rate("app"), keys.rate("app"));
        assert_eq!(
            keys.usage("app", "2026-11-26"),
            "claude-relay:team-a/relay:{app}:usage:2026-11-26"
        );
        assert_eq!(
            keys.cache_entry("client:app", "ab12"),
            "claude-relay:team-a/relay:cache:client:app:ab12"
        );
        assert_eq!(
            keys.cache_pattern(Some("client:app")),
            "claude-relay:team-a/relay:cache:client:app:*"
        );
        assert_eq!(
            keys.breaker_probes("us"),
            "claude-relay:team-a/relay:breaker:us:probes"
        );
        assert_eq!(
            keys.key_cooldowns("us"),
            "claude-relay:team-a/relay:key-cooldowns:us"
        );
    }

    /// What Redis Cluster hashes of a key: the text between the first `{`
    /// and the next `}` when that is not empty, else the whole key.
    fn hashed_part(key: &str) -> &str {
        key.find('{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.find('}')
                    .filter(|close| *close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key)
    }

    #[test]
    fn keys_of_a_client_share_a_cluster_slot() {
        let keys = Keys::new("team-a/relay");
        for client in ["app", "a.b-c_D", "x"] {
            let tag = hashed_part(&keys.rate(client)).to_owned();
            assert_eq!(tag, client);
            assert_eq!(hashed_part(&keys.nonce(client, "n0123456789abcdef")), tag);
            // The admission and settlement scripts touch these with the rate key.
            assert_eq!(hashed_part(&keys.tokens_minute(client, 7)), tag);
            assert_eq!(hashed_part(&keys.tokens_day(client, "2026-11-26")), tag);
            assert_eq!(hashed_part(&keys.in_flight(client)), tag);
            assert_eq!(hashed_part(&keys.usd_day(client, "2026-11-26")), tag);
            assert_eq!(hashed_part(&keys.usd_month(client, "2026-11")), tag);
            assert_eq!(hashed_part(&keys.usage(client, "2026-11-26")), tag);
        }
        // Other clients, other tags: they spread over the slots.
        assert_ne!(
            hashed_part(&keys.rate("app")),
            hashed_part(&keys.rate("app2"))
        );
        // The breaker keys are as the operator reads them, without a tag.
        assert_eq!(hashed_part(&keys.breaker("us")), keys.breaker("us"));
    }
}
