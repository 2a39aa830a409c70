use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use claude_relay_crds::config::{LogConfig, LogFormat};
use claude_relay_proxy::reload::read_config;
use claude_relay_proxy::runtime::{App, Services, Snapshot};
use claude_relay_proxy::server;
use claude_relay_proxy::sign_cli::{self, SignArgs};
use claude_relay_proxy::store::{AnyStore, MemoryStore};

// Small, short-lived allocations on every request: mimalloc handles them
// with less time in malloc/free than glibc's allocator (see bench/run.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A relay for the Anthropic Claude API.
#[derive(Parser)]
#[command(
    name = "claude-relay-proxy",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The configuration file (YAML or JSON); reloaded when it changes.
    #[arg(long, short, env = "CLAUDE_RELAY_CONFIG")]
    config: Option<PathBuf>,
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
        None => match cli.config {
            Some(path) => run(path),
            None => {
                eprintln!(
                    "error: give a configuration file with --config FILE (or CLAUDE_RELAY_CONFIG); see examples/standalone.yaml"
                );
                ExitCode::from(2)
            }
        },
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
        hex::encode(claude_relay_proxy::auth::digest_of(key.trim()))
    );
    ExitCode::SUCCESS
}

fn install_crypto_provider() {
    // One provider for the whole process; ignore "already installed".
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn run(path: PathBuf) -> ExitCode {
    install_crypto_provider();
    let config = match read_config(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log);
    let workers = claude_relay_proxy::worker::count(config.server.workers);
    let control = match server::control_runtime() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
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
    match server::run(control, app, Some(path), server::shutdown_signal()) {
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
