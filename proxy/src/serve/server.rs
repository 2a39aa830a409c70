//! Listeners and the life of the process: start, serve, drain on SIGTERM.
//!
//! Threads: one worker per core (see [`crate::base::worker`]), each a
//! single-threaded runtime with its own SO_REUSEPORT listener on the API
//! address; and this control thread, which runs the admin listener, the
//! config reloader and the signal handling. HTTP/1 connections are served
//! by the relay's own loop ([`crate::serve::h1_server`]), HTTP/2 by hyper.
//!
//! Client connections are capped by `server.max_connections`, across the
//! workers: at the cap a worker stops accepting, so new connections wait in
//! the kernel's listen backlog instead of taking file descriptors. The
//! admin listener has no cap.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::base::worker;
use crate::control::admin;
use crate::control::reload::{ConfigSource, Reloader};
use crate::control::runtime::App;
use crate::serve::h1_server;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept aside from client connections and the upstream
/// connections their requests hold: listeners, the store, idle pooled
/// connections, config and secret files.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-files limit to the hard one (as Go programs do at
/// start), and says how many client connections it leaves room for: one
/// descriptor each, and one more for the upstream connection a request
/// holds.
fn open_files_room() -> (u64, usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limits = getrlimit(Resource::Nofile);
    // None is unlimited.
    let below_hard = match (limits.current, limits.maximum) {
        (Some(current), Some(maximum)) => current < maximum,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        let raised = rustix::process::Rlimit {
            current: limits.maximum,
            ..limits
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(%error, "cannot raise the open-files limit");
        }
    }
    // Unlimited counts as a large limit.
    let files = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
    let room = (files.saturating_sub(FD_RESERVE) / 2).max(1);
    (files, usize::try_from(room).unwrap_or(usize::MAX))
}

/// Binds `count` listeners on one address with SO_REUSEPORT, so the kernel
/// spreads connections over the workers. Port 0 picks one port for all.
fn bind_api(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// The runtime of the control thread: admin listener, reloader, signals,
/// and the shared store's connections.
pub fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("relay-control")
        .build()
}

/// Listen addresses given on the command line; they replace the config's
/// `server.listen` and `server.admin_listen` for the life of the process.
#[derive(Clone, Debug, Default)]
pub struct ListenOverride {
    pub api: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Where to write the addresses bound, once serving (`--ready-file`):
    /// with port 0 in an address, the only way to learn the port.
    pub ready_file: Option<PathBuf>,
}

/// Writes `{"api": "…", "admin": "…"}` to `path`, whole or not at all
/// (written aside, then renamed), so a reader never sees half of it.
fn write_ready_file(path: &Path, api: SocketAddr, admin: SocketAddr) -> std::io::Result<()> {
    let text = serde_json::json!({"api": api.to_string(), "admin": admin.to_string()}).to_string();
    let mut aside = path.as_os_str().to_owned();
    aside.push(".tmp");
    std::fs::write(&aside, text)?;
    std::fs::rename(&aside, path)
}

/// Serves until `shutdown` resolves, then drains connections for at most
/// the configured grace period. Blocks the calling thread, which drives
/// `control` (see [`control_runtime`]).
pub fn run(
    control: tokio::runtime::Runtime,
    app: Arc<App>,
    config_source: Option<ConfigSource>,
    listen_override: ListenOverride,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (listen, admin_listen, max_connections) = {
        let snapshot = app.snapshot.load();
        (
            listen_override.api.unwrap_or(snapshot.config.server.listen),
            listen_override
                .admin
                .unwrap_or(snapshot.config.server.admin_listen),
            snapshot.config.server.max_connections,
        )
    };
    let (open_files, room) = open_files_room();
    let max_connections = match max_connections {
        Some(max) => {
            if max as usize > room {
                tracing::warn!(
                    max_connections = max,
                    open_files,
                    "server.max_connections is more than the open-files limit leaves room for; the relay may run out of file descriptors"
                );
            }
            max as usize
        }
        None => room,
    };
    // Shared by the workers: the cap is on the process.
    let slots = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    let api = bind_api(listen, app.workers)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (server.listen): {e}"))?;
    let bound = api[0].local_addr()?;
    let admin = std::net::TcpListener::bind(admin_listen).map_err(|e| {
        anyhow::anyhow!("cannot listen on {admin_listen} (server.admin_listen): {e}")
    })?;
    admin.set_nonblocking(true)?;
    let admin_bound = admin.local_addr()?;
    let tls = match app.snapshot.load().downstream_cert {
        Some(_) => Some(TlsAcceptor::from(Arc::new(
            server_config(app.clone()).map_err(anyhow::Error::msg)?,
        ))),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Vec::with_capacity(api.len());
    for (index, listener) in api.into_iter().enumerate() {
        let (app, tls, stop, slots) = (app.clone(), tls.clone(), stop_rx.clone(), slots.clone());
        let thread = std::thread::Builder::new()
            .name(format!("relay-worker-{index}"))
            .spawn(move || {
                worker::set_current(index);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("worker runtime");
                runtime.block_on(serve_api(app, listener, tls, stop, slots));
            })?;
        workers.push(thread);
    }

    control.block_on(async {
        let admin = TcpListener::from_std(admin)?;
        if let Some(source) = config_source {
            tokio::spawn(Reloader::new(source, app.clone()).run());
        }
        let admin_task = tokio::spawn(serve_admin(app.clone(), admin));
        app.ready.store(true, Ordering::Relaxed);
        tracing::info!(listen = %bound, admin_listen = %admin_bound, workers = app.workers, tls = tls.is_some(), max_connections, "claude-relay proxy serving");
        if let Some(path) = &listen_override.ready_file {
            write_ready_file(path, bound, admin_bound).map_err(|e| {
                anyhow::anyhow!("cannot write the ready file {}: {e}", path.display())
            })?;
        }

        shutdown.await;
        app.ready.store(false, Ordering::Relaxed);
        tracing::info!(grace = ?app.shutdown_grace(), "shutting down: no new connections, draining those in flight");
        let _ = stop_tx.send(true);
        // Joining blocks: keep it off this runtime, which still serves /readyz.
        let joined = tokio::task::spawn_blocking(move || {
            for thread in workers {
                let _ = thread.join();
            }
        })
        .await;
        admin_task.abort();
        // What the last requests owe the store (usage, budgets, slots).
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            app.services.accounting.flush_once(),
        )
        .await;
        joined.map_err(anyhow::Error::from)
    })
}

async fn serve_api(
    app: Arc<App>,
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    slots: Arc<Semaphore>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "worker cannot use its listener");
            return;
        }
    };
    let serving = Serving {
        app: app.clone(),
        builder: Arc::new(connection_builder()),
        tls,
        graceful: GracefulShutdown::new(),
        // What each connection watches; the loop's own copy waits below.
        stop: stop.clone(),
        slots: slots.clone(),
    };
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        // Room for one more connection before accepting it: past
        // `server.max_connections` new connections wait in the listen
        // backlog, not on a file descriptor. The room is only looked at:
        // a worker waiting in accept must not hold a slot that a
        // connection queued at another worker's listener needs.
        if slots.available_permits() == 0
            && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            warned = Some(tokio::time::Instant::now());
            tracing::warn!(
                worker = worker::current(),
                "server.max_connections reached; new connections wait until one closes"
            );
        }
        tokio::select! {
            room = slots.acquire() => drop(room),
            _ = stop.wait_for(|stop| *stop) => break,
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(ok) => ok,
                    Err(error) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                spawn_connection(&serving, stream, peer);
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(app.shutdown_grace(), serving.graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = worker::current(),
            "grace period over; closing the connections still open"
        );
    }
}

/// What a worker gives each connection it accepts.
struct Serving {
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    graceful: GracefulShutdown,
    stop: watch::Receiver<bool>,
    /// `server.max_connections`, shared by the workers.
    slots: Arc<Semaphore>,
}

fn spawn_connection(serving: &Serving, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (app, builder) = (serving.app.clone(), serving.builder.clone());
    let watcher = serving.graceful.watcher();
    let mut stop = serving.stop.clone();
    let slots = &serving.slots;
    let slot = slots.clone().try_acquire_owned().map_err(|_| slots.clone());
    let open = serving.app.metrics.client_connections.clone();
    // HTTP/1 goes to the relay's own loop, which hands anything it does
    // not serve (HTTP/2 prior knowledge included) to hyper.
    let Some(acceptor) = serving.tls.clone() else {
        tokio::spawn(async move {
            // Held for the life of the connection.
            let Some(_slot) = take_slot(slot, &mut stop, open).await else {
                return;
            };
            h1_server::serve(app, stream, peer, builder, watcher, stop).await;
        });
        return;
    };
    tokio::spawn(async move {
        let Some(_slot) = take_slot(slot, &mut stop, open).await else {
            return;
        };
        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            h1_server::serve(app, stream, peer, builder, watcher, stop).await;
            return;
        }
        h1_server::serve_with_hyper(app, stream, peer, &builder, watcher).await;
    });
}

/// A connection's place under `server.max_connections`, counted in
/// `claude_relay_client_connections` while it is held.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's slot: at hand, or, when another worker took the room
/// this one saw before accepting, the next one to free up; `None` at
/// shutdown.
async fn take_slot(
    slot: Result<OwnedSemaphorePermit, Arc<Semaphore>>,
    stop: &mut watch::Receiver<bool>,
    open: Gauge,
) -> Option<Slot> {
    let permit = match slot {
        Ok(permit) => permit,
        // Boxed: rare, and kept out of every connection's future.
        Err(slots) => {
            Box::pin(async move {
                tokio::select! {
                    slot = slots.acquire_owned() => slot.ok(),
                    _ = stop.wait_for(|stop| *stop) => None,
                }
            })
            .await?
        }
    };
    open.inc();
    Some(Slot {
        _permit: permit,
        open,
    })
}

async fn serve_admin(app: Arc<App>, listener: TcpListener) {
    let builder = Arc::new(connection_builder());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(admin::handle(&app, &request).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
}

/// Serves whatever certificate the snapshot in force holds.
#[derive(Debug)]
pub struct SnapshotCert(pub Arc<App>);

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

impl ResolvesServerCert for SnapshotCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.snapshot.load().downstream_cert.clone()
    }
}

pub fn server_config(app: Arc<App>) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(SnapshotCert(app)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
