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
