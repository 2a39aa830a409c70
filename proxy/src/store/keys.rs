//! Every Redis key claude-relay uses, in one place; `docs/redis-keys.md`
//! documents them for operators and the operator reads some of them.
//!
//! All keys start with `claude-relay:{relay_name}:`. The braces in that
//! notation are placeholders, not Redis Cluster hash tags: each command
//! touches one key, so keys are free to spread over the cluster's slots.

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

    /// `claude-relay:{relay}:nonce:{client}:{nonce}`: a string, set once with
    /// an expiry; its existence means the nonce was used. Client ids and
    /// nonces contain no `:`, so the key splits back unambiguously.
    pub fn nonce(&self, client: &str, nonce: &str) -> String {
        format!("{}nonce:{client}:{nonce}", self.prefix)
    }

    /// `claude-relay:{relay}:rate:{client}`: an integer counting the client's
    /// requests in the current window; it expires when the window ends.
    pub fn rate(&self, client: &str) -> String {
        format!("{}rate:{client}", self.prefix)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_by_relay() {
        let keys = Keys::new("team-a/relay");
        assert_eq!(
            keys.nonce("app", "abc_DEF-0123456789"),
            "claude-relay:team-a/relay:nonce:app:abc_DEF-0123456789"
        );
        assert_eq!(keys.rate("app"), "claude-relay:team-a/relay:rate:app");
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
}
