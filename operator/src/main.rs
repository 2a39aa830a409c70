//! `claude-relay-operator`: runs the ClaudeRelay controller with leader
//! election, an admin listener and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use claude_relay_crds::config::PricingConfig;
use claude_relay_crds::{ClaudeRelay, UpstreamRegion};
use claude_relay_operator::admin::{self, State};
use claude_relay_operator::controller::{self, Context};
use claude_relay_operator::leader::{self, Elector, LeaseConfig};
use claude_relay_operator::metrics::Metrics;
use claude_relay_operator::render::Defaults;
use k8s_openapi::NamespaceResourceScope;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client, CustomResourceExt, Resource};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "claude-relay-operator", version, about)]
struct Args {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "ADMIN_LISTEN", default_value = "0.0.0.0:8081")]
    admin_listen: SocketAddr,
    /// Proxy image for relays that do not name one.
    #[arg(long, env = "PROXY_IMAGE", default_value = concat!("ghcr.io/claude-relay/claude-relay-proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Run without a Lease (a single replica only).
    #[arg(long, env = "DISABLE_LEADER_ELECTION")]
    disable_leader_election: bool,
    #[arg(long, env = "LEASE_NAME", default_value = "claude-relay-operator")]
    lease_name: String,
    /// Namespace of the Lease; the operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often each relay's status is refreshed: breaker state from Redis,
    /// ready replicas.
    #[arg(long, env = "STATUS_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    status_refresh: Duration,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// The default price table, as YAML or JSON (`{as_of: YYYY-MM-DD,
    /// models: [...]}`, the proxy config's `pricing`), for relays that
    /// include the defaults. The chart passes its `pricing` value.
    #[arg(long, env = "DEFAULT_PRICING")]
    default_pricing: Option<String>,
}

/// The default price table of `DEFAULT_PRICING`, checked like a proxy's.
fn default_pricing(text: Option<&str>) -> anyhow::Result<PricingConfig> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(PricingConfig::default());
    };
    let pricing: PricingConfig = serde_yaml_ng::from_str(text)
        .context("DEFAULT_PRICING is not a price table ({as_of, models: [...]})")?;
    let problems = pricing.problems();
    if !problems.is_empty() {
        let problems: Vec<String> = problems
            .into_iter()
            .map(|(path, problem)| format!("{path}: {problem}"))
            .collect();
        bail!(
            "DEFAULT_PRICING is not a valid price table: {}",
            problems.join("; ")
        );
    }
    Ok(pricing)
}

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let pricing = default_pricing(args.default_pricing.as_deref())?;
    info!(
        models = pricing.models.len(),
        as_of = pricing.as_of.as_deref().unwrap_or("-"),
        "default price table"
    );
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        warn!("a rustls crypto provider was already installed");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(signal_shutdown(stop_tx.clone()));

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let state = Arc::new(State::new(registry));
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (ADMIN_LISTEN)", args.admin_listen))?;
    info!(listen = %listener.local_addr()?, "admin listener");
    let admin = tokio::spawn(admin::serve(
        listener,
        state.clone(),
        stopped(stop_rx.clone()),
    ));

    let mut config = kube::Config::infer()
        .await
        .context("cannot find a Kubernetes configuration")?;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(controller::USER_AGENT),
    ));
    let client = Client::try_from(config).context("cannot build a Kubernetes client")?;
    check_crds(&client, args.namespace.as_deref()).await?;
    state.set_ready(true);

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("claude-relay-operator-{}", std::process::id()));
    let elector = (!args.disable_leader_election).then(|| {
        Elector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone(),
                identity: identity.clone(),
                lease_duration: LEASE_DURATION,
                renew_every: RENEW_EVERY,
            },
        )
    });

    let reporter = Reporter {
        controller: "claude-relay-operator".into(),
        instance: Some(identity.clone()),
    };
    let leader_events = Recorder::new(client.clone(), reporter.clone());
    if let Some(elector) = &elector {
        info!(lease = %args.lease_name, %identity, "waiting to become leader");
        if !wait_for_leadership(elector, stop_rx.clone()).await {
            let _ = admin.await;
            return Ok(());
        }
        info!("became leader");
        leader_event(
            &leader_events,
            elector.config(),
            format!("{identity} became leader"),
        )
        .await;
    }
    metrics.leader.set(1);
    let ctx = Context::new(
        client.clone(),
        Defaults {
            image: args.proxy_image.clone(),
            pricing,
        },
        metrics.clone(),
        reporter,
    )
    .with_status_refresh(args.status_refresh);

    // Leadership lost: stop reconciling at once, like a shutdown.
    let (lost_tx, lost_rx) = watch::channel(false);
    let renewer = elector.as_ref().map(|elector| {
        let stop_tx = stop_tx.clone();
        let stop_rx = stop_rx.clone();
        let elector = Elector::new(client.clone(), elector.config().clone());
        tokio::spawn(async move {
            if !keep_leadership(&elector, stop_rx).await {
                let _ = lost_tx.send(true);
                let _ = stop_tx.send(true);
            }
        })
    });

    controller::run(ctx, args.namespace.as_deref(), stopped(stop_rx.clone())).await;
    info!("controller stopped");
    metrics.leader.set(0);
    let lost = *lost_rx.borrow();
    if let Some(renewer) = renewer {
        renewer.abort();
    }
    if let Some(elector) = &elector {
        if lost {
            leader_event(
                &leader_events,
                elector.config(),
                format!("{identity} lost the lease and stopped leading"),
            )
            .await;
        } else {
            match elector.release().await {
                Ok(()) => {
                    leader_event(
                        &leader_events,
                        elector.config(),
                        format!("{identity} stopped leading and released the lease"),
                    )
                    .await
                }
                Err(e) => warn!(error = %e, "cannot release the Lease; it will expire"),
            }
        }
    }
    let _ = admin.await;
    if lost {
        // Restarting puts this replica back among the candidates.
        bail!("lost the leader Lease");
    }
    Ok(())
}

/// Records a leadership change; a failure is logged, never fatal.
async fn leader_event(recorder: &Recorder, config: &LeaseConfig, note: String) {
    if let Err(e) = leader::publish_leader_event(recorder, config, note).await {
        warn!(error = %e, "cannot publish the LeaderElection event");
    }
}

/// Says how to install the CRDs when they are missing, instead of failing
/// every watch later with a bare 404. With a watched namespace the list is
/// in that namespace: a namespaced install has no cluster-wide permission
/// (a missing CRD still answers 404 there).
async fn check_crds(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    async fn check<K>(client: &Client, namespace: Option<&str>) -> anyhow::Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + CustomResourceExt
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => bail!(
                "the CustomResourceDefinition {} is not installed; install the CRDs with `kubectl apply -f crds/yaml/` (or the Helm chart) and restart the operator",
                K::crd_name()
            ),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot list {}", K::crd_name()))),
        }
    }
    check::<ClaudeRelay>(client, namespace).await?;
    check::<UpstreamRegion>(client, namespace).await?;
    Ok(())
}

/// Tries for the Lease until won (true) or shutdown (false).
async fn wait_for_leadership(elector: &Elector, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        match elector.try_acquire().await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot reach the Lease"),
        }
        tokio::select! {
            () = tokio::time::sleep(elector.config().renew_every) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Renews the Lease until shutdown (true) or until it is lost (false): taken
/// by another replica, or not renewed for longer than it lasts.
async fn keep_leadership(elector: &Elector, mut stop: watch::Receiver<bool>) -> bool {
    let mut last_renewed = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(elector.config().renew_every) => {}
            _ = stop.wait_for(|s| *s) => return true,
        }
        match elector.try_acquire().await {
            Ok(true) => last_renewed = Instant::now(),
            Ok(false) => {
                error!("another replica holds the Lease");
                return false;
            }
            Err(e) => warn!(error = %e, "cannot renew the Lease"),
        }
        // Step down before the Lease can expire, so another replica never
        // starts while this one still reconciles.
        if last_renewed.elapsed() + elector.config().renew_every >= elector.config().lease_duration
        {
            error!("could not renew the Lease in time");
            return false;
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn signal_shutdown(stop: watch::Sender<bool>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot listen for SIGTERM");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutting down: finishing reconciles in flight");
    let _ = stop.send(true);
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::default_pricing;

    #[test]
    fn the_default_price_table_is_read_as_the_chart_passes_it() {
        assert_eq!(default_pricing(None).unwrap().models.len(), 0);
        assert_eq!(default_pricing(Some("  ")).unwrap().models.len(), 0);
        // The chart passes its `pricing` value as JSON.
        let shipped: serde_json::Value =
            serde_yaml_ng::from_str(include_str!("../../examples/pricing.yaml")).unwrap();
        let table = default_pricing(Some(&shipped.to_string())).unwrap();
        assert_eq!(table.as_of.as_deref(), Some("2026-12-06"));
        assert!(table.models.len() >= 10);
        let bad = r#"{"models": [{"match": "a*b", "input_usd_per_mtok": -1, "output_usd_per_mtok": 1, "cache_read_usd_per_mtok": 1, "cache_write_5m_usd_per_mtok": 1, "cache_write_1h_usd_per_mtok": 1}]}"#;
        let err = default_pricing(Some(bad)).unwrap_err().to_string();
        assert!(
            err.contains("pricing.models[0].match") && err.contains("input_usd_per_mtok"),
            "{err}"
        );
        let err = default_pricing(Some("[1, 2]")).unwrap_err().to_string();
        assert!(
            err.contains("DEFAULT_PRICING is not a price table"),
            "{err}"
        );
    }
}
