//! Durations written the way people write them: `1s`, `250ms`, `1m30s`.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a duration string looks like; also the CRD schema pattern.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
}

impl std::ops::Deref for HumanDuration {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&compact(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 500ms, 30s, 5m"))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&compact(self.0))
    }
}

/// `1h30m`, `250ms`, `2h` rather than humantime's `1h 30m` or `2days`: the
/// form the CRD schema pattern accepts.
fn compact(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        let n = (secs / size) % if unit == "h" { u64::MAX } else { 60 };
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    for (unit, size, modulo) in [("ms", 1_000_000, 1000), ("us", 1000, 1000), ("ns", 1, 1000)] {
        let n = (nanos / size) % modulo;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 500ms, 30s, 5m or 1h30m."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_compactly() {
        let d: HumanDuration = "1m30s".parse().unwrap();
        assert_eq!(d.as_secs(), 90);
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
        let d: HumanDuration = "250ms".parse().unwrap();
        assert_eq!(d.as_millis(), 250);
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn printed_form_matches_the_schema_pattern() {
        // Keep the pattern and humantime's output in step: the operator renders
        // durations that the CRD schema must accept.
        for (text, printed_as) in [
            ("1s", "1s"),
            ("250ms", "250ms"),
            ("1h30m", "1h30m"),
            ("2d", "48h"),
            ("1m0.5s", "1m500ms"),
        ] {
            let d: HumanDuration = text.parse().unwrap();
            let printed = serde_json::to_value(d).unwrap();
            let printed = printed.as_str().unwrap();
            assert_eq!(printed, printed_as);
            assert!(matches_pattern(printed), "{printed}");
            assert_eq!(printed.parse::<HumanDuration>().unwrap(), d);
        }
    }

    fn matches_pattern(s: &str) -> bool {
        // A tiny matcher for DURATION_PATTERN, to avoid a regex dependency.
        let mut rest = s;
        if rest.is_empty() {
            return false;
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(rest.len());
            if digits == 0 {
                return false;
            }
            rest = &rest[digits..];
            let unit = ["ns", "us", "ms", "s", "m", "h", "d"]
                .into_iter()
                .find(|u| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")));
            match unit {
                Some(u) => rest = &rest[u.len()..],
                None => return false,
            }
        }
        true
    }
}
