//! The default price table ships twice, as examples/pricing.yaml and as the
//! chart's `pricing` value: both must be the same, valid table, dated, and
//! price the current models.

use std::path::Path;

use claude_relay_crds::config::{ModelPrice, PricingConfig};

fn repo_file(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn example() -> PricingConfig {
    serde_yaml_ng::from_str(&repo_file("examples/pricing.yaml")).unwrap()
}

/// The entry the proxy would use: exact name, else the longest prefix.
fn price_of<'a>(table: &'a PricingConfig, model: &str) -> Option<&'a ModelPrice> {
    table
        .models
        .iter()
        .find(|m| m.pattern == model)
        .or_else(|| {
            table
                .models
                .iter()
                .filter(|m| m.pattern.ends_with('*') && m.matches(model))
                .max_by_key(|m| m.pattern.len())
        })
}

#[test]
fn the_default_table_is_valid_and_dated() {
    let table = example();
    assert_eq!(table.problems(), vec![], "examples/pricing.yaml");
    assert_eq!(table.as_of.as_deref(), Some("2026-12-06"));
    assert!(table.models.len() >= 10);
}

#[test]
fn the_chart_ships_the_same_table() {
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&repo_file("charts/claude-relay/values.yaml")).unwrap();
    let chart: PricingConfig = serde_yaml_ng::from_value(values["pricing"].clone()).unwrap();
    assert_eq!(chart, example(), "charts/claude-relay/values.yaml pricing");
}

#[test]
fn current_models_get_their_own_prices() {
    let table = example();
    let input = |model: &str| price_of(&table, model).map(|p| p.input_usd_per_mtok);
    // Longer patterns win over the family's: Opus 4.5 and later cost less
    // than Opus 4 and 4.1.
    assert_eq!(input("claude-opus-4-1-20250805"), Some(15.0));
    assert_eq!(input("claude-opus-4-20250514"), Some(15.0));
    assert_eq!(input("claude-opus-4-5-20251101"), Some(5.0));
    assert_eq!(input("claude-sonnet-4-5-20250929"), Some(3.0));
    assert_eq!(input("claude-sonnet-5"), Some(2.0));
    assert_eq!(input("claude-haiku-4-5-20251001"), Some(1.0));
    assert_eq!(input("claude-3-5-haiku-20241022"), Some(0.8));
    let fable = price_of(&table, "claude-fable-5-1").unwrap();
    assert_eq!(fable.cache_read_usd_per_mtok, 0.25);
    assert_eq!(
        price_of(&table, "claude-fable-5")
            .unwrap()
            .cache_read_usd_per_mtok,
        1.0
    );
    // Cache writes of an hour cost more than those of 5 minutes, which cost
    // more than plain input, which costs more than cache reads.
    for m in &table.models {
        assert!(
            m.cache_write_1h_usd_per_mtok > m.cache_write_5m_usd_per_mtok
                && m.cache_write_5m_usd_per_mtok > m.input_usd_per_mtok
                && m.input_usd_per_mtok > m.cache_read_usd_per_mtok
                && m.output_usd_per_mtok > m.input_usd_per_mtok,
            "{}",
            m.pattern
        );
    }
    assert!(price_of(&table, "gpt-4o").is_none());
}
