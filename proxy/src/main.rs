use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use claude_relay_crds::ProxyConfig;
use claude_relay_crds::config::{LogConfig, LogFormat};
use claude_relay_proxy::admission::sign_cli::{self, SignArgs};
use claude_relay_proxy::control::reload::{ConfigSource, config_from_text, read_config};
use claude_relay_proxy::control::runtime::{App, Services, Snapshot};
use claude_relay_proxy::serve::server;
use claude_relay_proxy::store::{AnyStore, MemoryStore};

mod configmap;

// Small, short-lived allocations on every request: jemalloc spends less time
// in malloc/free than glibc's allocator and, unlike mimalloc's defaults,
// keeps the idle and many-streams footprint small (see bench/run.sh).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A relay for the Anthropic Claude API.
#[derive(Parser)]
#[command(
    name = "claude-relay-proxy",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The configuration file (YAML or JSON); reloaded when it changes.
    #[arg(
        long,
        short,
        env = "CLAUDE_RELAY_CONFIG",
        conflicts_with = "config_map"
    )]
    config: Option<PathBuf>,
    /// Follow the configuration in a ConfigMap through the Kubernetes API
    /// (in-cluster service account, or KUBECONFIG): NAMESPACE/NAME, or NAME
    /// in POD_NAMESPACE. Needs get, list and watch on that ConfigMap.
    #[arg(long, env = "CLAUDE_RELAY_CONFIG_MAP", value_name = "[NAMESPACE/]NAME")]
    config_map: Option<String>,
    /// The key of the ConfigMap that holds the document.
    #[arg(long, env = "CLAUDE_RELAY_CONFIG_MAP_KEY", default_value = configmap::DEFAULT_KEY)]
    config_map_key: String,
    /// How long to wait at start for the ConfigMap to exist and answer.
    #[arg(long, env = "CLAUDE_RELAY_CONFIG_MAP_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    config_map_wait: Duration,
    /// Listen here instead of the config's `server.listen` (several replicas
    /// on one host, host networking); fixed for the life of the process.
    #[arg(long, env = "CLAUDE_RELAY_LISTEN", value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Listen here instead of the config's `server.admin_listen`.
    #[arg(long, env = "CLAUDE_RELAY_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Once serving, write the addresses listened on to this file as JSON,
    /// `{"api": "127.0.0.1:41234", "admin": "127.0.0.1:41235"}`: what a
    /// harness that asks for port 0 (any free port) reads.
    #[arg(long, env = "CLAUDE_RELAY_READY_FILE", value_name = "PATH")]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file (secrets and certificates included) and exit.
    CheckConfig { file: PathBuf },
    /// Print the SHA-256 of a relay key read from standard input, for `{sha256: ...}` in the config.
    HashKey,
    /// Sign a request as a client must (docs/signing.md): prints the headers or a curl command.
    Sign(SignArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::HashKey) => hash_key(),
        Some(Command::Sign(args)) => match sign_cli::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        None => {
            let listen = server::ListenOverride {
                api: cli.listen,
                admin: cli.admin_listen,
                ready_file: cli.ready_file,
            };
            match (cli.config, cli.config_map) {
                (Some(path), _) => run(Origin::File(path), listen),
                (None, Some(spec)) => run(
                    Origin::ConfigMap {
                        spec,
                        key: cli.config_map_key,
                        wait: cli.config_map_wait,
                    },
                    listen,
                ),
                (None, None) => {
                    eprintln!(
                        "error: give a configuration file with --config FILE (or CLAUDE_RELAY_CONFIG), or a ConfigMap with --config-map [NAMESPACE/]NAME; see examples/standalone.yaml"
                    );
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    install_crypto_provider();
    // Secrets and certificates are read; the store is not connected to.
    let placeholder = Arc::new(AnyStore::Memory(MemoryStore::new(1)));
    let built = read_config(file).and_then(|config| {
        let services = Services::new(&config, &placeholder);
        Snapshot::build(config, None, 1, placeholder, &services)
    });
    match built {
        Ok(snapshot) => {
            println!(
                "{}: ok ({} clients, {} regions)",
                file.display(),
                snapshot.config.clients.len(),
                snapshot.regions.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if std::io::stdin().read_to_string(&mut key).is_err() || key.trim().is_empty() {
        eprintln!("error: write the relay key on standard input");
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        hex::encode(claude_relay_proxy::admission::auth::digest_of(key.trim()))
    );
    ExitCode::SUCCESS
}

fn install_crypto_provider() {
    // One provider for the whole process; ignore "already installed".
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the config comes from.
enum Origin {
    File(PathBuf),
    ConfigMap {
        spec: String,
        key: String,
        wait: Duration,
    },
}

/// The first config, and the source the reloader follows from there.
fn load(
    origin: Origin,
    control: &tokio::runtime::Runtime,
) -> Result<(ProxyConfig, ConfigSource), String> {
    match origin {
        Origin::File(path) => Ok((read_config(&path)?, ConfigSource::File(path))),
        // The watch lives on the control runtime, which the reloader runs on.
        Origin::ConfigMap { spec, key, wait } => {
            let (target, text, feed) = control
                .block_on(configmap::connect(&spec, &key, wait))
                .map_err(|e| e.to_string())?;
            let origin = format!("{target} key {key}");
            let config = config_from_text(&origin, &text)?;
            Ok((config, ConfigSource::Feed { origin, text, feed }))
        }
    }
}

fn run(origin: Origin, listen: server::ListenOverride) -> ExitCode {
    install_crypto_provider();
    let control = match server::control_runtime() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (config, source) = match load(origin, &control) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log);
    let workers = claude_relay_proxy::base::worker::count(config.server.workers);
    // The store connects on the control runtime, which drives its connections.
    let store = match control.block_on(AnyStore::from_config(
        config.store.as_ref(),
        &config.relay_name,
    )) {
        Ok(store) => {
            tracing::info!(kind = store.kind(), "shared store ready");
            Arc::new(store)
        }
        Err(error) => {
            tracing::error!(%error, "the store cannot be used");
            return ExitCode::FAILURE;
        }
    };
    let services = Services::new(&config, &store);
    let snapshot = match Snapshot::build(config, None, workers, store, &services) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            tracing::error!(%error, "configuration cannot be used");
            return ExitCode::FAILURE;
        }
    };
    {
        // The sync tasks run on the control runtime, beside the store's connections.
        let _in_control = control.enter();
        services.spawn_sync();
    }
    let app = App::new(snapshot, workers, services);
    match server::run(
        control,
        app,
        Some(source),
        listen,
        server::shutdown_signal(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "proxy stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
