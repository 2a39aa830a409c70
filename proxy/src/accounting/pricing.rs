//! The cost of an answer, from the `pricing` table of the config.
//!
//! Prices are kept as whole nano-dollars per token (the config's dollars
//! per million tokens, which it allows in steps of $0.001) and costs as
//! whole nano-dollars, so that sums over many answers never drift. An
//! exact model name wins over patterns; among patterns (`claude-sonnet-4-*`)
//! the longest prefix wins, so the order of the table does not matter.
//! A model nothing matches has no price: its answers are counted as
//! unpriced, never guessed.

use std::collections::HashMap;

use claude_relay_crds::config::{PricingConfig, nano_usd_per_token};

use crate::store::Usage;

/// Nano-dollars per token of each kind of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
}

impl Price {
    /// What `usage` costs at these prices, in nano-dollars. Cache writes
    /// that the answer did not split by lifetime are priced as 5-minute
    /// writes, the API's default lifetime.
    pub fn cost_nanos(&self, usage: &Usage) -> u64 {
        let one_hour = usage
            .cache_creation_1h_input_tokens
            .min(usage.cache_creation_input_tokens);
        let five_minutes = usage.cache_creation_input_tokens - one_hour;
        [
            (usage.input_tokens, self.input),
            (usage.output_tokens, self.output),
            (usage.cache_read_input_tokens, self.cache_read),
            (five_minutes, self.cache_write_5m),
            (one_hour, self.cache_write_1h),
        ]
        .iter()
        .fold(0u64, |sum, (tokens, price)| {
            sum.saturating_add(tokens.saturating_mul(*price))
        })
    }
}

/// The price table, ready for lookups on the response path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pricing {
    exact: HashMap<String, Price>,
    /// Patterns by prefix, longest first.
    prefixes: Vec<(String, Price)>,
}

impl Pricing {
    /// The table of a validated config (a price it would refuse is taken as 0).
    pub fn from_config(config: &PricingConfig) -> Self {
        let mut pricing = Self::default();
        for model in &config.models {
            let [input, output, cache_read, cache_write_5m, cache_write_1h] = model
                .prices()
                .map(|(_, usd)| nano_usd_per_token(usd).unwrap_or(0));
            let price = Price {
                input,
                output,
                cache_read,
                cache_write_5m,
                cache_write_1h,
            };
            match model.pattern.strip_suffix('*') {
                Some(prefix) => pricing.prefixes.push((prefix.to_owned(), price)),
                None => {
                    pricing.exact.insert(model.pattern.clone(), price);
                }
            }
        }
        pricing
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        pricing
    }

    /// The price of `model`: its exact entry, else the longest matching prefix.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.exact.get(model).or_else(|| {
            self.prefixes
                .iter()
                .find(|(prefix, _)| model.starts_with(prefix.as_str()))
                .map(|(_, price)| price)
        })
    }

    /// What an answer of `model` reporting `usage` cost, in nano-dollars;
    /// `None` when the model has no price.
    pub fn cost_nanos(&self, model: &str, usage: &Usage) -> Option<u64> {
        self.price(model).map(|price| price.cost_nanos(usage))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Nano-dollars as dollars, for JSON and logs.
pub fn usd(nanos: u64) -> f64 {
    // Split so that amounts above 2^53 nano-dollars keep their cents.
    (nanos / 1_000_000_000) as f64 + (nanos % 1_000_000_000) as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> Pricing {
        let config: PricingConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Pricing::from_config(&config)
    }

    const TABLE: &str = r#"
models:
  - {match: "claude-sonnet-4-*", input_usd_per_mtok: 3, output_usd_per_mtok: 15, cache_read_usd_per_mtok: 0.3, cache_write_5m_usd_per_mtok: 3.75, cache_write_1h_usd_per_mtok: 6}
  - {match: "claude-sonnet-4-5*", input_usd_per_mtok: 4, output_usd_per_mtok: 16, cache_read_usd_per_mtok: 0.4, cache_write_5m_usd_per_mtok: 5, cache_write_1h_usd_per_mtok: 8}
  - {match: "claude-sonnet-4-5-exact", input_usd_per_mtok: 1, output_usd_per_mtok: 1, cache_read_usd_per_mtok: 1, cache_write_5m_usd_per_mtok: 1, cache_write_1h_usd_per_mtok: 1}
  - {match: "claude-haiku-3", input_usd_per_mtok: 0.25, output_usd_per_mtok: 1.25, cache_read_usd_per_mtok: 0.03, cache_write_5m_usd_per_mtok: 0.3, cache_write_1h_usd_per_mtok: 0.5}
"#;

    #[test]
    fn exact_names_win_then_the_longest_prefix() {
        let pricing = table(TABLE);
        assert_eq!(
            pricing.price("claude-sonnet-4-20250514").unwrap().input,
            3_000
        );
        assert_eq!(
            pricing.price("claude-sonnet-4-5-20250929").unwrap().input,
            4_000
        );
        assert_eq!(
            pricing.price("claude-sonnet-4-5-exact").unwrap().input,
            1_000
        );
        assert_eq!(pricing.price("claude-haiku-3").unwrap().cache_read, 30);
        // An exact entry is no prefix.
        assert_eq!(pricing.price("claude-haiku-3-20240307"), None);
        assert_eq!(pricing.price("claude-opus-4-1"), None);
        assert_eq!(pricing.cost_nanos("gpt-4", &Usage::default()), None);
    }

    #[test]
    fn every_kind_of_token_has_its_price_and_sums_stay_exact() {
        let pricing = table(TABLE);
        let usage = Usage {
            input_tokens: 1_000,
            output_tokens: 2_000,
            cache_read_input_tokens: 10_000,
            cache_creation_input_tokens: 3_000,
            cache_creation_1h_input_tokens: 1_000,
        };
        // 1000×3 + 2000×15 + 10000×0.3 + 2000×3.75 + 1000×6 dollars per million.
        let cost = pricing.cost_nanos("claude-sonnet-4-0", &usage).unwrap();
        assert_eq!(
            cost,
            3_000_000 + 30_000_000 + 3_000_000 + 7_500_000 + 6_000_000
        );
        assert_eq!(usd(cost), 0.0495);
        // Without the split, every cache write is a 5-minute one.
        let unsplit = Usage {
            cache_creation_1h_input_tokens: 0,
            ..usage
        };
        assert_eq!(
            pricing.cost_nanos("claude-sonnet-4-0", &unsplit).unwrap(),
            cost - 6_000_000 + 3_750_000
        );
        // A million answers of 0.1 cents add up to exactly $1000.
        let small = Usage {
            input_tokens: 333,
            ..Usage::default()
        };
        let one = pricing.cost_nanos("claude-sonnet-4-0", &small).unwrap();
        assert_eq!(one, 999_000);
        let total: u64 = (0..1_000_000).map(|_| one).sum();
        assert_eq!(usd(total), 999.0);
    }
}
