//! Secrets in memory: a type whose `Debug` never shows the value, and the
//! resolution of a config's secret references (files or environment).

use std::fmt;
use std::sync::Arc;

use claude_relay_crds::config::SecretSource;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Reads a secret. The error names where it looked, never what it found.
pub fn resolve(source: &SecretSource) -> Result<Secret, String> {
    match source {
        SecretSource::File(path) => read_file(path),
        SecretSource::Env(name) => read_env(name),
    }
}

pub fn read_file(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    non_empty(text.trim(), || {
        format!("secret file {} is empty", path.display())
    })
}

pub fn read_env(name: &str) -> Result<Secret, String> {
    let value = std::env::var(name)
        .map_err(|_| format!("environment variable {name} is not set or not UTF-8"))?;
    non_empty(value.trim(), || {
        format!("environment variable {name} is empty")
    })
}

fn non_empty(value: &str, why: impl FnOnce() -> String) -> Result<Secret, String> {
    if value.is_empty() {
        Err(why())
    } else {
        Ok(Secret::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let s = Secret::new("sk-ant-very-secret");
        assert!(!format!("{s:?}").contains("sk-ant"));
    }

    #[test]
    fn file_secret_is_trimmed_and_errors_do_not_echo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "  sk-ant-123\n").unwrap();
        let s = resolve(&SecretSource::File(path.clone())).unwrap();
        assert_eq!(s.expose(), "sk-ant-123");
        std::fs::write(&path, "\n").unwrap();
        let err = resolve(&SecretSource::File(path)).unwrap_err();
        assert!(err.contains("is empty"), "{err}");
        let err = resolve(&SecretSource::Env("CLAUDE_RELAY_TEST_UNSET_VAR".into())).unwrap_err();
        assert!(err.contains("CLAUDE_RELAY_TEST_UNSET_VAR"));
    }
}
