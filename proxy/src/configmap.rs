//! The config document read from a ConfigMap through the Kubernetes API
//! (`--config-map NAMESPACE/NAME`), the way the proxy runs in a cluster.
//!
//! A watch on the one ConfigMap (a list and watch with the field selector
//! `metadata.name=NAME`, which is what a Role restricted by `resourceNames`
//! allows) delivers every new version within a second or so, where a mounted
//! file waits for kubelet's sync period. Each version becomes a
//! [`SourceEvent`] for the [`Reloader`](crate::control::reload::Reloader), which builds
//! and swaps the config as it does for a file. Secrets stay mounted files,
//! referenced by path, and the reloader keeps polling them.

use std::fmt;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client};

use claude_relay_proxy::control::reload::{Feed, SourceEvent};

/// The key of the config document when `--config-map-key` is not given
/// (the operator renders it under this key).
pub const DEFAULT_KEY: &str = "config.yaml";

/// Which ConfigMap, and which key in it, holds the config document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigMap {}/{}", self.namespace, self.name)
    }
}

impl ConfigMapRef {
    /// Parses `NAMESPACE/NAME` or `NAME`; a bare name lives in
    /// `default_namespace` (POD_NAMESPACE, or the client's namespace).
    pub fn parse(spec: &str, key: &str, default_namespace: Option<&str>) -> Result<Self, String> {
        let (namespace, name) = match spec.split_once('/') {
            Some((namespace, name)) => (namespace.to_string(), name),
            None => match default_namespace.filter(|ns| !ns.is_empty()) {
                Some(namespace) => (namespace.to_string(), spec),
                None => {
                    return Err(format!(
                        "--config-map {spec}: no namespace; write NAMESPACE/NAME or set POD_NAMESPACE"
                    ));
                }
            },
        };
        if !is_dns_label(&namespace) {
            return Err(format!(
                "--config-map {spec}: `{namespace}` is not a namespace name (lowercase letters, digits and '-', at most 63)"
            ));
        }
        if !is_dns_subdomain(name) {
            return Err(format!(
                "--config-map {spec}: `{name}` is not a ConfigMap name (lowercase letters, digits, '-' and '.', at most 253)"
            ));
        }
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "--config-map-key {key}: not a ConfigMap key (letters, digits, '-', '_' and '.')"
            ));
        }
        Ok(Self {
            namespace,
            name: name.to_string(),
            key: key.to_string(),
        })
    }

    /// The field selector that names this ConfigMap.
    pub fn field_selector(&self) -> String {
        format!("metadata.name={}", self.name)
    }

    /// The config document in one version of the ConfigMap.
    fn text_of(&self, config_map: &ConfigMap) -> Result<String, String> {
        if let Some(text) = config_map.data.as_ref().and_then(|d| d.get(&self.key)) {
            return Ok(text.clone());
        }
        if config_map
            .binary_data
            .as_ref()
            .is_some_and(|d| d.contains_key(&self.key))
        {
            return Err(format!(
                "{self}: key `{}` is in binaryData; the config must be text under data",
                self.key
            ));
        }
        let keys: Vec<&str> = config_map
            .data
            .iter()
            .flat_map(|d| d.keys())
            .map(String::as_str)
            .collect();
        Err(format!(
            "{self} has no key `{}` (it has: {}); see --config-map-key",
            self.key,
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        ))
    }

    fn rbac_hint(&self) -> String {
        format!(
            "the proxy's ServiceAccount needs the verbs get, list and watch on configmaps \
             (resourceNames: [{}]) in namespace {}",
            self.name, self.namespace
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The namespace of a bare `--config-map NAME`: `POD_NAMESPACE`, which the
/// operator sets from the downward API.
pub fn pod_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Why following the ConfigMap could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot set up a Kubernetes API client (in-cluster service account or kubeconfig): {0}"
    )]
    Client(String),
    #[error("{0}")]
    Ref(String),
    #[error("{target} does not exist (waited {waited}); the proxy starts once it exists")]
    Missing { target: String, waited: String },
    #[error("{target}: the Kubernetes API refused to list it ({status}): {hint}")]
    Forbidden {
        target: String,
        status: String,
        hint: String,
    },
    #[error("{0}")]
    Unusable(String),
    #[error("{target}: no answer from the Kubernetes API within {waited}; last error: {error}")]
    Unreachable {
        target: String,
        waited: String,
        error: String,
    },
}

type RawStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Send>>;

/// Connects to the API (in-cluster config or `KUBECONFIG`), waits at most
/// `wait` for the ConfigMap, and returns its config text, where it came
/// from, and the feed of its later versions.
///
/// `spec` and `key` are the flags; a bare name takes `POD_NAMESPACE` or,
/// without it, the client's namespace (kubeconfig context, or the service
/// account's namespace in a pod).
pub async fn connect(
    spec: &str,
    key: &str,
    wait: Duration,
) -> Result<(ConfigMapRef, String, Feed), StartError> {
    let client = Client::try_default()
        .await
        .map_err(|e| StartError::Client(e.to_string()))?;
    let default_namespace = pod_namespace().unwrap_or_else(|| client.default_namespace().into());
    let target =
        ConfigMapRef::parse(spec, key, Some(&default_namespace)).map_err(StartError::Ref)?;
    let (text, feed) = follow(client, target.clone(), wait).await?;
    Ok((target, text, feed))
}

/// Starts the watch and waits for the first version of the ConfigMap.
pub async fn follow(
    client: Client,
    target: ConfigMapRef,
    wait: Duration,
) -> Result<(String, Feed), StartError> {
    let api: Api<ConfigMap> = Api::namespaced(client, &target.namespace);
    let config = watcher::Config::default().fields(&target.field_selector());
    let mut stream: RawStream = Box::pin(watcher(api, config).default_backoff());
    let waited = humantime::format_duration(wait).to_string();
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_error: Option<String> = None;
    let mut said_waiting = false;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(next)) => next,
            Ok(None) => {
                return Err(StartError::Unusable(format!(
                    "{target}: the watch ended before the first version arrived"
                )));
            }
            Err(_) => {
                return Err(match last_error {
                    Some(error) => StartError::Unreachable {
                        target: target.to_string(),
                        waited,
                        error,
                    },
                    None => StartError::Missing {
                        target: target.to_string(),
                        waited,
                    },
                });
            }
        };
        match next {
            Ok(Event::Apply(config_map) | Event::InitApply(config_map))
                if config_map.metadata.name.as_deref() == Some(&target.name) =>
            {
                let text = target.text_of(&config_map).map_err(StartError::Unusable)?;
                return Ok((text, feed(stream, target)));
            }
            Ok(Event::InitDone) => {
                last_error = None;
                if !said_waiting {
                    said_waiting = true;
                    // Logging is not set up before the config is known.
                    eprintln!(
                        "{target} not found yet; waiting up to {waited} for it to be created"
                    );
                }
            }
            Ok(_) => {}
            Err(error) => {
                if let Some(status) = refused(&error) {
                    return Err(StartError::Forbidden {
                        target: target.to_string(),
                        status,
                        hint: target.rbac_hint(),
                    });
                }
                last_error = Some(error.to_string());
            }
        }
    }
}

/// An answer that waiting will not change: unauthenticated or forbidden.
fn refused(error: &watcher::Error) -> Option<String> {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status,
        watcher::Error::WatchError(status) => status,
        _ => return None,
    };
    matches!(status.code, 401 | 403).then(|| {
        if status.message.is_empty() {
            format!("HTTP {}", status.code)
        } else {
            format!("HTTP {}: {}", status.code, status.message)
        }
    })
}

/// What the watch tells about the ConfigMap, one meaningful event at a time.
struct Follower {
    stream: RawStream,
    target: ConfigMapRef,
    /// Whether the listing in progress (after a restart of the watch) has
    /// shown the ConfigMap; a listing without it means it was deleted.
    seen_in_listing: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<SourceEvent> {
        loop {
            let event = match self.stream.next().await? {
                Ok(event) => event,
                // The watcher retries by itself, after a backoff.
                Err(error) => return Some(SourceEvent::Error(format!("{}: {error}", self.target))),
            };
            match event {
                Event::Init => self.seen_in_listing = false,
                Event::InitApply(config_map) | Event::Apply(config_map) => {
                    if config_map.metadata.name.as_deref() != Some(&self.target.name) {
                        continue;
                    }
                    self.seen_in_listing = true;
                    return Some(match self.target.text_of(&config_map) {
                        Ok(text) => SourceEvent::Text(text),
                        Err(message) => SourceEvent::Invalid(message),
                    });
                }
                Event::InitDone if !self.seen_in_listing => {
                    return Some(SourceEvent::Deleted(self.target.to_string()));
                }
                Event::InitDone => {}
                Event::Delete(config_map) => {
                    if config_map.metadata.name.as_deref() == Some(&self.target.name) {
                        return Some(SourceEvent::Deleted(self.target.to_string()));
                    }
                }
            }
        }
    }
}

fn feed(stream: RawStream, target: ConfigMapRef) -> Feed {
    let follower = Follower {
        stream,
        target,
        seen_in_listing: true,
    };
    Box::pin(futures_util::stream::unfold(
        follower,
        |mut follower| async move {
            let event = follower.next().await?;
            Some((event, follower))
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn namespace_and_name_are_parsed_and_checked() {
        let r = ConfigMapRef::parse("team-a/main-config", "config.yaml", Some("other")).unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str(), r.key.as_str()),
            ("team-a", "main-config", "config.yaml")
        );
        assert_eq!(r.field_selector(), "metadata.name=main-config");
        assert_eq!(r.to_string(), "ConfigMap team-a/main-config");

        let bare = ConfigMapRef::parse("relay.config", "c.yaml", Some("pods-ns")).unwrap();
        assert_eq!(
            (bare.namespace.as_str(), bare.name.as_str()),
            ("pods-ns", "relay.config")
        );

        let no_ns = ConfigMapRef::parse("main-config", "config.yaml", None).unwrap_err();
        assert!(no_ns.contains("POD_NAMESPACE"), "{no_ns}");
        assert!(ConfigMapRef::parse("main-config", "config.yaml", Some("")).is_err());
        // An unset POD_NAMESPACE leaves `$(POD_NAMESPACE)` in the args as is.
        let unexpanded =
            ConfigMapRef::parse("$(POD_NAMESPACE)/main-config", "config.yaml", None).unwrap_err();
        assert!(unexpanded.contains("not a namespace name"), "{unexpanded}");
        assert!(ConfigMapRef::parse("team-a/Main", "config.yaml", None).is_err());
        assert!(ConfigMapRef::parse("team-a/", "config.yaml", None).is_err());
        assert!(ConfigMapRef::parse("a/b/c", "config.yaml", None).is_err());
        assert!(ConfigMapRef::parse("team-a/main", "a/b", None).is_err());
    }

    #[test]
    fn text_comes_from_the_key_and_a_missing_key_is_named() {
        let target = ConfigMapRef::parse("ns/cm", "config.yaml", None).unwrap();
        let mut config_map = ConfigMap {
            data: Some(BTreeMap::from([(
                "config.yaml".into(),
                "clients: []".into(),
            )])),
            ..ConfigMap::default()
        };
        assert_eq!(target.text_of(&config_map).unwrap(), "clients: []");
        config_map.data = Some(BTreeMap::from([("other.yaml".into(), String::new())]));
        let error = target.text_of(&config_map).unwrap_err();
        assert!(
            error.contains("ConfigMap ns/cm has no key `config.yaml` (it has: other.yaml)"),
            "{error}"
        );
    }
}
