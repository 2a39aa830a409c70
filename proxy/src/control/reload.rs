//! Loading the config and following its changes.
//!
//! The config text comes from a [`ConfigSource`]: a file, re-read every
//! `reload_interval`, or text held in memory and replaced by a [`Feed`] (the
//! ConfigMap watch of `--config-map`). Every `reload_interval`, and at once
//! when the feed brings a new text, the text and every file it references
//! (secrets, certificates, CA bundles) are hashed; when the hash changes the
//! new config is parsed, validated and built, then swapped in. A config that
//! fails keeps the old one in force, with a log line and a metric.
//! Polling, not inotify: mounted ConfigMaps and Secrets change by symlink
//! swaps that file watchers miss, and the files are small.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use claude_relay_crds::ProxyConfig;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::base::metrics::ResultLabels;
use crate::control::runtime::{App, Snapshot};
use crate::store::AnyStore;

/// Reads and validates a config file, naming the file in the error.
pub fn read_config(path: &Path) -> Result<ProxyConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    config_from_text(&path.display().to_string(), &text)
}

/// Parses and validates config text; `origin` (a path, a ConfigMap) starts the error.
pub fn config_from_text(origin: &str, text: &str) -> Result<ProxyConfig, String> {
    ProxyConfig::from_yaml(text).map_err(|e| format!("{origin}: {e}"))
}

/// What a feed says about the config text it follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// A version of the text (maybe the same as before).
    Text(String),
    /// The source is gone (named here); the config in force stays.
    Deleted(String),
    /// A version with no usable text (say, the key is missing); the config in force stays.
    Invalid(String),
    /// Following the source failed; the feed retries by itself.
    Error(String),
}

/// The later versions of a config text.
pub type Feed = Pin<Box<dyn Stream<Item = SourceEvent> + Send>>;

/// Where the config text comes from.
pub enum ConfigSource {
    File(PathBuf),
    /// The latest text of `origin`, replaced by what `feed` brings.
    Feed {
        origin: String,
        text: String,
        feed: Feed,
    },
}

/// The text of the source as it is now.
enum Text {
    File(PathBuf),
    Memory { origin: String, text: String },
}

impl Text {
    /// The raw bytes; an unreadable file reads as empty (the build then says why).
    fn bytes(&self) -> Vec<u8> {
        match self {
            Text::File(path) => std::fs::read(path).unwrap_or_default(),
            Text::Memory { text, .. } => text.as_bytes().to_vec(),
        }
    }

    fn config(&self) -> Result<ProxyConfig, String> {
        match self {
            Text::File(path) => read_config(path),
            Text::Memory { origin, text } => config_from_text(origin, text),
        }
    }

    fn origin(&self) -> String {
        match self {
            Text::File(path) => path.display().to_string(),
            Text::Memory { origin, .. } => origin.clone(),
        }
    }
}

/// A digest of the config text and of every file it references; an
/// unreadable file counts as a change (the build then says what is wrong).
fn inputs_digest(text: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(text);
    if let Ok(config) = std::str::from_utf8(text)
        .map_err(|_| ())
        .and_then(|t| ProxyConfig::parse_yaml(t).map_err(|_| ()))
    {
        for file in config.referenced_files() {
            hasher.update(file.as_os_str().as_encoded_bytes());
            hasher.update(std::fs::read(&file).unwrap_or_default());
        }
    }
    hasher.finalize().into()
}

pub struct Reloader {
    text: Text,
    feed: Option<Feed>,
    app: Arc<App>,
    last_digest: [u8; 32],
}

impl Reloader {
    /// `source` must hold the config that `app` runs with now.
    pub fn new(source: ConfigSource, app: Arc<App>) -> Self {
        let (text, feed) = match source {
            ConfigSource::File(path) => (Text::File(path), None),
            ConfigSource::Feed { origin, text, feed } => {
                (Text::Memory { origin, text }, Some(feed))
            }
        };
        let last_digest = inputs_digest(&text.bytes());
        Self {
            text,
            feed,
            app,
            last_digest,
        }
    }

    /// Checks once; returns whether a new config went into force.
    pub fn check(&mut self) -> bool {
        let digest = inputs_digest(&self.text.bytes());
        if digest == self.last_digest {
            return false;
        }
        self.last_digest = digest;
        let current = self.app.snapshot.load_full();
        let built = self.text.config().and_then(|config| {
            let store = match current.reusable_store(&config) {
                Some(store) => store,
                // A new store section: connect (Redis keeps trying in the
                // background; only a config that cannot work fails here).
                None => tokio::runtime::Handle::current()
                    .block_on(AnyStore::from_config(
                        config.store.as_ref(),
                        &config.relay_name,
                    ))
                    .map(Arc::new)
                    .map_err(|e| format!("store: {e}"))?,
            };
            Snapshot::build(
                config,
                Some(&current),
                self.app.workers,
                store,
                &self.app.services,
            )
        });
        match built {
            Ok(snapshot) => {
                if snapshot.config.server.listen != current.config.server.listen
                    || snapshot.config.server.admin_listen != current.config.server.admin_listen
                {
                    tracing::warn!(
                        "listen addresses changed: they take effect at the next restart"
                    );
                }
                self.app.swap(snapshot);
                self.count("ok");
                tracing::info!(source = %self.text.origin(), "configuration reloaded");
                true
            }
            Err(error) => {
                self.count("failed");
                tracing::error!(
                    source = %self.text.origin(),
                    %error,
                    "configuration rejected; the previous one stays in force"
                );
                false
            }
        }
    }

    /// `config_reloads{result}`: ok, failed, or watch_error (the feed could
    /// not follow its source and retries).
    fn count(&self, result: &'static str) {
        self.app
            .metrics
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Takes in what the feed says; returns whether the text changed hands
    /// (then a check follows at once).
    fn take(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Text(new) => match &mut self.text {
                Text::Memory { text, .. } => {
                    *text = new;
                    true
                }
                Text::File(_) => false,
            },
            SourceEvent::Deleted(what) => {
                tracing::warn!(source = %what, "config source deleted; the configuration in force stays");
                false
            }
            SourceEvent::Invalid(error) => {
                self.count("failed");
                tracing::error!(%error, "configuration rejected; the previous one stays in force");
                false
            }
            SourceEvent::Error(error) => {
                self.count("watch_error");
                tracing::warn!(%error, "cannot follow the config source; retrying");
                false
            }
        }
    }

    /// Checks forever at the interval of the config in force, and at once
    /// when the feed brings a new text.
    pub async fn run(mut self) {
        let interval = |app: &App| *app.snapshot.load().config.server.reload_interval;
        let mut next_poll = Instant::now() + interval(&self.app);
        loop {
            let event = match self.feed.as_mut() {
                Some(feed) => tokio::select! {
                    () = tokio::time::sleep_until(next_poll) => None,
                    event = feed.next() => Some(event),
                },
                None => {
                    tokio::time::sleep_until(next_poll).await;
                    None
                }
            };
            match event {
                None => next_poll = Instant::now() + interval(&self.app),
                Some(Some(event)) => {
                    if !self.take(event) {
                        continue;
                    }
                }
                Some(None) => {
                    tracing::error!(
                        source = %self.text.origin(),
                        "the config source is no longer followed; referenced files still are"
                    );
                    self.feed = None;
                    continue;
                }
            }
            // File reads are small but blocking: keep them off the I/O workers.
            self = match tokio::task::spawn_blocking(move || {
                self.check();
                self
            })
            .await
            {
                Ok(this) => this,
                Err(_) => return,
            };
        }
    }
}
