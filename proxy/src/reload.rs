//! Loading the config file and following its changes.
//!
//! Every `reload_interval` the file and every file it references (secrets,
//! certificates, CA bundles) are read and hashed; when the hash changes the
//! new config is parsed, validated and built, then swapped in. A config that
//! fails keeps the old one in force, with a log line and a metric.
//! Polling, not inotify: mounted ConfigMaps and Secrets change by symlink
//! swaps that file watchers miss, and the files are small.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use claude_relay_crds::ProxyConfig;
use sha2::{Digest, Sha256};

use crate::metrics::ResultLabels;
use crate::runtime::{App, Snapshot};
use crate::store::AnyStore;

/// Reads and validates a config file, naming the file in the error.
pub fn read_config(path: &Path) -> Result<ProxyConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ProxyConfig::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A digest of the config file and of every file it references; an
/// unreadable file counts as a change (the build then says what is wrong).
fn inputs_digest(path: &Path) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let text = std::fs::read(path).unwrap_or_default();
    hasher.update(&text);
    if let Ok(config) = std::str::from_utf8(&text)
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
    path: PathBuf,
    app: Arc<App>,
    last_digest: [u8; 32],
}

impl Reloader {
    pub fn new(path: PathBuf, app: Arc<App>) -> Self {
        let last_digest = inputs_digest(&path);
        Self {
            path,
            app,
            last_digest,
        }
    }

    /// Checks once; returns whether a new config went into force.
    pub fn check(&mut self) -> bool {
        let digest = inputs_digest(&self.path);
        if digest == self.last_digest {
            return false;
        }
        self.last_digest = digest;
        let current = self.app.snapshot.load_full();
        let built = read_config(&self.path).and_then(|config| {
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
                self.app
                    .metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                tracing::info!(path = %self.path.display(), "configuration reloaded");
                true
            }
            Err(error) => {
                self.app
                    .metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "failed" })
                    .inc();
                tracing::error!(
                    path = %self.path.display(),
                    %error,
                    "configuration rejected; the previous one stays in force"
                );
                false
            }
        }
    }

    /// Checks forever at the interval of the config in force.
    pub async fn run(mut self) {
        loop {
            let interval = *self.app.snapshot.load().config.server.reload_interval;
            tokio::time::sleep(interval).await;
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
