//! The way to one upstream region: connections over rustls (HTTP/2 where
//! the upstream offers it), pooled per worker thread by the relay itself,
//! their connect timeout, the in-flight cap, and the pool figures that
//! metrics show.
//!
//! The pool is ours rather than hyper-util's: a worker's connections sit in
//! a plain list that only that worker touches, with no key hashing, no
//! checkout future and no task per request to hand a connection back. So is
//! the HTTP/1 client (`crate::http::h1_client`): the request's task reads and writes its
//! connection itself. HTTP/2 connections are hyper's.
//!
//! A region with an egress proxy opens each upstream connection as a tunnel
//! through it (`CONNECT host:port`), and TLS to the upstream runs inside
//! the tunnel. Pooled connections are reused, so the tunnel is set up once
//! per connection, never per request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use claude_relay_crds::config::{EgressProxyConfig, RegionConfig};
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::base::secrets::Secret;
use crate::http::h1_client as h1;
use crate::http::headers::{self, X_API_KEY};

/// What the transport of a region depends on; regions whose transport
/// settings did not change keep their pool across a reload.
#[derive(Clone, Debug, PartialEq)]
pub struct TransportKey {
    base_url: String,
    ca_pem: Option<Vec<u8>>,
    connect_timeout: Duration,
    max_idle_per_host: usize,
    pool_idle_timeout: Duration,
    max_in_flight: usize,
    /// New credentials mean a new pool: tunnels made with the old ones go.
    egress: Option<EgressProxy>,
}

impl TransportKey {
    pub fn new(
        region: &RegionConfig,
        ca_pem: Option<Vec<u8>>,
        egress: Option<EgressProxy>,
    ) -> Self {
        Self {
            base_url: region.base_url.clone(),
            ca_pem,
            connect_timeout: *region.timeouts.connect,
            max_idle_per_host: region.pool.max_idle_per_host,
            pool_idle_timeout: *region.pool.idle_timeout,
            max_in_flight: region.pool.max_in_flight,
            egress,
        }
    }
}

/// An egress proxy as the connector uses it: where it is, and the
/// `Proxy-Authorization` value made from its credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressProxy {
    /// `http://host:port` of the proxy, what the TCP connector dials.
    address: Uri,
    authorization: Option<Secret>,
}

impl EgressProxy {
    /// `credentials`: the resolved `credentials_from` (`user:password`).
    /// Errors name the field, never the URL or the credentials.
    pub fn new(config: &EgressProxyConfig, credentials: Option<Secret>) -> Result<Self, String> {
        let address: Uri = config
            .url
            .parse()
            .map_err(|_| "egress_proxy.url is not a valid URL".to_string())?;
        if address.host().is_none() {
            return Err("egress_proxy.url has no host".into());
        }
        let authorization = match credentials {
            Some(credentials) => {
                if !credentials.expose().contains(':') {
                    return Err("egress_proxy.credentials_from must hold user:password".into());
                }
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(credentials.expose());
                Some(Secret::new(format!("Basic {encoded}")))
            }
            None => None,
        };
        Ok(Self {
            address,
            authorization,
        })
    }

    /// Opens a tunnel to `target` (`host:port`) on `stream`, a fresh
    /// connection to the proxy. The answer's head is read whole and nothing
    /// past it, so the tunnel starts clean.
    async fn open_tunnel(&self, stream: &mut TcpStream, target: &str) -> Result<(), EgressError> {
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(authorization) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(authorization.expose());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(EgressError::Io)?;
        drop(head);

        let mut answer = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.map_err(EgressError::Io)?;
            if n == 0 {
                return Err(EgressError::Closed);
            }
            answer.extend_from_slice(&chunk[..n]);
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let status = status_of(&answer[..end]).ok_or(EgressError::NotHttp)?;
                if !status.is_success() {
                    return Err(EgressError::Refused(status));
                }
                // Nothing was sent into the tunnel yet, so nothing may come out of it.
                if answer.len() > end + 4 {
                    return Err(EgressError::NotHttp);
                }
                return Ok(());
            }
            if answer.len() > MAX_CONNECT_ANSWER {
                return Err(EgressError::AnswerTooLong);
            }
        }
    }
}

/// Longest answer head to CONNECT that the connector reads.
const MAX_CONNECT_ANSWER: usize = 8 * 1024;

/// The status of an HTTP/1 response head (`HTTP/1.x NNN reason`).
fn status_of(head: &[u8]) -> Option<http::StatusCode> {
    let line = head.split(|b| *b == b'\r').next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || rest.get(5).is_some_and(|b| *b != b' ') {
        return None;
    }
    http::StatusCode::from_bytes(code).ok()
}

/// The egress proxy did not give a tunnel. Counts as a connect failure of
/// the region. Never carries the credentials, nor what the proxy wrote
/// beyond its status code (a proxy may echo the request).
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot reach the egress proxy: {0}")]
    Unreachable(String),
    #[error("the egress proxy refused the tunnel: {0}")]
    Refused(http::StatusCode),
    #[error("the egress proxy closed the connection before answering CONNECT")]
    Closed,
    #[error("the egress proxy's answer to CONNECT is not HTTP")]
    NotHttp,
    #[error("the egress proxy's answer to CONNECT is longer than {MAX_CONNECT_ANSWER} bytes")]
    AnswerTooLong,
    #[error("egress proxy: {0}")]
    Io(io::Error),
}

type Connector = TimeoutConnector<HttpsConnector<CountingConnector>>;

/// One region's way out. Each worker thread has its own connections (its
/// own pool): a request and its upstream connection are served on the same
/// thread, without cross-thread wake-ups. The in-flight cap and the figures
/// are shared.
pub struct Transport {
    pub key: TransportKey,
    connector: Connector,
    pools: Vec<Arc<WorkerPool>>,
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority/`, what the connector dials.
    base: Uri,
    /// Path prefix of the base URL, without a trailing slash.
    prefix: String,
    /// The `Host` header, built once: left to hyper, it is formatted anew
    /// for every request.
    pub host: HeaderValue,
    pub in_flight_limit: Arc<Semaphore>,
    open_connections: Arc<AtomicI64>,
    waiting: AtomicI64,
}

/// Figures for the pool metrics.
pub struct PoolFigures {
    pub open: i64,
    pub in_flight: i64,
    pub waiting: i64,
}

impl Transport {
    pub fn new(key: TransportKey, workers: usize) -> Result<Self, String> {
        let uri: Uri = key
            .base_url
            .parse()
            .map_err(|e| format!("base_url {:?}: {e}", key.base_url))?;
        let scheme = uri.scheme().cloned().ok_or("base_url has no scheme")?;
        let authority = uri.authority().cloned().ok_or("base_url has no host")?;
        let prefix = uri.path().trim_end_matches('/').to_string();
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| "base_url has an invalid host")?;

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = &key.ca_pem {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("tls.ca_file: {e}"))?;
                roots.add(cert).map_err(|e| format!("tls.ca_file: {e}"))?;
                added += 1;
            }
            if added == 0 {
                return Err("tls.ca_file holds no PEM certificate".into());
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let open_connections = Arc::new(AtomicI64::new(0));
        let connector = build_connector(&key, tls, open_connections.clone());
        let pools = (0..workers.max(1))
            .map(|_| {
                Arc::new(WorkerPool::new(
                    key.max_idle_per_host,
                    key.pool_idle_timeout,
                ))
            })
            .collect();
        let base = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("base_url {:?}: {e}", key.base_url))?;
        Ok(Self {
            base,
            host,
            in_flight_limit: Arc::new(Semaphore::new(key.max_in_flight)),
            key,
            connector,
            pools,
            scheme,
            authority,
            prefix,
            open_connections,
            waiting: AtomicI64::new(0),
        })
    }

    /// Sends `request` over a pooled connection of the calling worker, or a
    /// new one; the response once its head is in. A pooled connection that
    /// closed while idle gives the request back unsent, and it goes out on
    /// another: never a request sent twice.
    pub async fn send(&self, request: &Outgoing<'_>) -> Result<Response<UpstreamBody>, SendError> {
        let pool = &self.pools[crate::base::worker::current() % self.pools.len()];
        for _ in 0..MAX_POOLED_TRIES {
            let Some(sender) = pool.checkout() else {
                break;
            };
            match self.send_on(pool, sender, request).await {
                Ok(response) => return Ok(response),
                Err(Unsent::Back) => {}
                Err(Unsent::Failed(error)) => return Err(error),
            }
        }
        // Boxed: connecting (TLS, tunnels) is several KB of future state that
        // every request would otherwise carry and copy, for a rare step.
        let sender = Box::pin(self.connect(pool)).await?;
        match self.send_on(pool, sender, request).await {
            Ok(response) => Ok(response),
            Err(Unsent::Back) => Err(SendError::Closed),
            Err(Unsent::Failed(error)) => Err(error),
        }
    }

    async fn send_on(
        &self,
        pool: &Arc<WorkerPool>,
        sender: Sender,
        request: &Outgoing<'_>,
    ) -> Result<Response<UpstreamBody>, Unsent> {
        match sender {
            Sender::Http1(conn) => {
                // HTTP/1 takes the origin form; the absolute form is for proxies.
                let pq = request.path_and_query.map_or("/", PathAndQuery::as_str);
                let target = if self.prefix.is_empty() {
                    std::borrow::Cow::Borrowed(pq)
                } else {
                    std::borrow::Cow::Owned(format!("{}{pq}", self.prefix))
                };
                // The client's headers are written as they are filtered, with
                // no header map built for the upstream.
                let ours = request.traceparent.is_some();
                let fields = [(&HOST_FIELD, &self.host)]
                    .into_iter()
                    .chain(
                        headers::for_upstream(request.client_headers)
                            .filter(move |(name, _)| !ours || **name != TRACEPARENT),
                    )
                    .chain(request.traceparent.map(|value| (&TRACEPARENT, value)))
                    .chain([(&API_KEY_FIELD, request.api_key)]);
                // Back in the list when the response's body is done.
                let home: Arc<dyn h1::Home<H1Io>> = pool.clone();
                let sent = conn
                    .send(request.method, &target, fields, &request.body, home)
                    .await;
                match sent {
                    Ok(response) => Ok(response.map(Either::Left)),
                    Err(h1::Failed::Unsent(_)) => Err(Unsent::Back),
                    Err(h1::Failed::Exchange(error)) => {
                        Err(Unsent::Failed(SendError::Exchange(Box::new(error))))
                    }
                }
            }
            // The HTTP/2 connection never left the list.
            Sender::Http2(mut sender) => {
                let uri = self
                    .uri_for(request.path_and_query)
                    .map_err(|e| Unsent::Failed(SendError::Exchange(Box::new(e))))?;
                let mut outgoing = Request::new(Full::new(request.body.clone()));
                *outgoing.method_mut() = request.method.clone();
                *outgoing.uri_mut() = uri;
                let headers = outgoing.headers_mut();
                *headers = headers::upstream_request_headers(request.client_headers);
                headers.insert(X_API_KEY, request.api_key.clone());
                headers.insert(HOST, self.host.clone());
                if let Some(traceparent) = request.traceparent {
                    headers.insert(crate::http::headers::TRACEPARENT, traceparent.clone());
                }
                match sender.try_send_request(outgoing).await {
                    Ok(response) => Ok(response.map(Either::Right)),
                    Err(mut error) => match error.take_message() {
                        Some(_) => Err(Unsent::Back),
                        None => Err(Unsent::Failed(SendError::Exchange(Box::new(
                            error.into_error(),
                        )))),
                    },
                }
            }
        }
    }

    /// A new connection (TCP, tunnel, TLS), HTTP/2 when ALPN chose it. An
    /// HTTP/2 connection's driving task runs on the calling worker's
    /// runtime; an HTTP/1 one has none (its requests drive it).
    async fn connect(&self, pool: &Arc<WorkerPool>) -> Result<Sender, SendError> {
        use tower_service::Service;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.base.clone())
            .await
            .map_err(SendError::Connect)?;
        pool.start_reaper();
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            // One HTTP/2 connection carries all of a worker's requests.
            pool.checkin(Sender::Http2(sender.clone()));
            Ok(Sender::Http2(sender))
        } else {
            Ok(Sender::Http1(h1::Conn::new(TokioIo::new(io))))
        }
    }

    /// The upstream URI of a request path (with query), under the base URL's prefix.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map_or("/", |pq| pq.as_str());
        let builder = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        if self.prefix.is_empty() {
            builder.path_and_query(pq).build()
        } else {
            builder
                .path_and_query(format!("{}{pq}", self.prefix))
                .build()
        }
    }

    /// Waits for a slot under `max_in_flight`, counting the wait.
    pub async fn acquire(&self) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(permit) = self.in_flight_limit.clone().try_acquire_owned() {
            return permit;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = self.in_flight_limit.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit.expect("the in-flight semaphore is never closed")
    }

    pub fn figures(&self) -> PoolFigures {
        let in_flight = (self.key.max_in_flight - self.in_flight_limit.available_permits()) as i64;
        PoolFigures {
            open: self.open_connections.load(Ordering::Relaxed),
            in_flight,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

fn build_connector(
    key: &TransportKey,
    tls: rustls::ClientConfig,
    open: Arc<AtomicI64>,
) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let counting = CountingConnector {
        inner: http,
        open,
        egress: key.egress.clone().map(Arc::new),
    };
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(counting);
    TimeoutConnector {
        inner: https,
        timeout: key.connect_timeout,
    }
}

// Statics, not the consts themselves: the HTTP/1 head borrows them.
static HOST_FIELD: http::HeaderName = HOST;
static API_KEY_FIELD: http::HeaderName = X_API_KEY;
static TRACEPARENT: http::HeaderName = crate::http::headers::TRACEPARENT;

/// Pooled connections tried before a new one is made.
const MAX_POOLED_TRIES: usize = 4;

/// The I/O of an upstream HTTP/1 connection: TCP (or a tunnel), TLS or not.
pub type H1Io = TokioIo<hyper_rustls::MaybeHttpsStream<CountedIo<TcpIo>>>;

/// A pooled connection: an idle HTTP/1 one (out of the list while it
/// carries an exchange), or the sending half of a shared HTTP/2 one.
enum Sender {
    Http1(Box<h1::Conn<H1Io>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Sender::Http1(_) => true,
            Sender::Http2(sender) => sender.is_ready(),
        }
    }

    fn is_closed(&mut self) -> bool {
        match self {
            Sender::Http1(conn) => conn.is_closed(),
            Sender::Http2(sender) => sender.is_closed(),
        }
    }
}

/// An upstream response's body: read by the relay's HTTP/1 client (left),
/// or by hyper's HTTP/2 one (right).
pub type UpstreamBody = Either<h1::ResponseBody<H1Io>, Incoming>;

impl h1::Home<H1Io> for WorkerPool {
    fn take_back(&self, conn: Box<h1::Conn<H1Io>>) {
        self.checkin(Sender::Http1(conn));
    }
}

/// Why a request did not get its response on a connection.
enum Unsent {
    /// It never went out: the connection had closed. Safe to send elsewhere.
    Back,
    Failed(SendError),
}

/// A request as it goes upstream: the client's method, path and headers
/// (filtered on the way out by [`headers::for_upstream`]), the region's
/// key, and the body read whole. `Host` and `Content-Length` are the
/// transport's to write.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub path_and_query: Option<&'a PathAndQuery>,
    pub client_headers: &'a HeaderMap,
    pub api_key: &'a HeaderValue,
    pub body: Bytes,
    /// The relay's `traceparent` (naming the attempt's span), in place of
    /// the client's, when the request is traced.
    pub traceparent: Option<&'a HeaderValue>,
}

struct Pooled {
    sender: Sender,
    since: std::time::Instant,
}

impl Pooled {
    /// Closed, or idle (ready, carrying nothing) for longer than
    /// `idle_timeout`: to be dropped from the list.
    fn is_spent(&mut self, now: std::time::Instant, idle_timeout: Duration) -> bool {
        self.sender.is_closed()
            || (self.sender.is_ready() && now.duration_since(self.since) > idle_timeout)
    }
}

/// One worker's connections to one region. Only that worker's thread takes
/// the lock, so it is never contended.
struct WorkerPool {
    connections: std::sync::Mutex<Vec<Pooled>>,
    /// The region's `pool.max_idle_per_host` and `pool.idle_timeout`.
    max_idle: usize,
    idle_timeout: Duration,
    reaper_started: std::sync::atomic::AtomicBool,
}

impl WorkerPool {
    fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            connections: std::sync::Mutex::default(),
            max_idle,
            idle_timeout,
            reaper_started: std::sync::atomic::AtomicBool::default(),
        }
    }

    /// A connection ready for a request, the most recent first. An HTTP/1
    /// one leaves the list (until `checkin`); the HTTP/2 one stays, shared.
    /// Spent ones are dropped on the way.
    fn checkout(&self) -> Option<Sender> {
        let mut connections = self.connections.lock().expect("pool lock");
        let now = std::time::Instant::now();
        let mut i = connections.len();
        while i > 0 {
            i -= 1;
            let pooled = &mut connections[i];
            if pooled.is_spent(now, self.idle_timeout) {
                connections.swap_remove(i);
                continue;
            }
            // One that is not ready still carries a response: left alone.
            if !pooled.sender.is_ready() {
                continue;
            }
            return Some(match &mut connections[i] {
                Pooled {
                    sender: Sender::Http2(sender),
                    since,
                } => {
                    // In use, so not idle: its clock starts again.
                    *since = now;
                    Sender::Http2(sender.clone())
                }
                Pooled {
                    sender: Sender::Http1(_),
                    ..
                } => connections.swap_remove(i).sender,
            });
        }
        None
    }

    /// Puts a connection (back) in the list; past `max_idle` connections it
    /// is dropped instead, which closes it.
    fn checkin(&self, sender: Sender) {
        let mut connections = self.connections.lock().expect("pool lock");
        if connections.len() < self.max_idle {
            connections.push(Pooled {
                sender,
                since: std::time::Instant::now(),
            });
        }
    }

    /// Drops the spent connections, which closes the idle ones.
    fn prune(&self) {
        let mut connections = self.connections.lock().expect("pool lock");
        let now = std::time::Instant::now();
        connections.retain_mut(|pooled| !pooled.is_spent(now, self.idle_timeout));
    }

    /// On the worker's runtime, once: closes idle connections even when no
    /// request comes to look at them. Ends when the transport is gone.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every =
            (self.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                pool.prune();
            }
        });
    }
}

/// The connect step took longer than the region's connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(pub Duration);

/// Bounds the whole connect, TLS handshake included.
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// Opens TCP connections to the upstream, or tunnels through the region's
/// egress proxy, and counts them: each holds a count until it is dropped.
#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    open: Arc<AtomicI64>,
    egress: Option<Arc<EgressProxy>>,
}

type TcpIo = TokioIo<TcpStream>;

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedIo<TcpIo>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let open = self.open.clone();
        let Some(egress) = self.egress.clone() else {
            let connecting = self.inner.call(uri);
            return Box::pin(async move {
                let io = connecting.await?;
                open.fetch_add(1, Ordering::Relaxed);
                Ok(CountedIo { inner: io, open })
            });
        };
        let connecting = self.inner.call(egress.address.clone());
        Box::pin(async move {
            let target = tunnel_target(&uri)?;
            let io = connecting
                .await
                .map_err(|e| EgressError::Unreachable(innermost(&e).to_string()))?;
            // Counted from here: a tunnel that fails drops (and uncounts) it.
            open.fetch_add(1, Ordering::Relaxed);
            let mut io = CountedIo { inner: io, open };
            egress.open_tunnel(io.inner.inner_mut(), &target).await?;
            Ok(io)
        })
    }
}

/// `host:port` of an upstream URI, the port filled in from the scheme.
fn tunnel_target(uri: &Uri) -> Result<String, BoxError> {
    let host = uri.host().ok_or("the upstream URI has no host")?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        });
    Ok(format!("{host}:{port}"))
}

fn innermost<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut innermost = error;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    innermost
}

pub struct CountedIo<T> {
    inner: T,
    open: Arc<AtomicI64>,
}

impl<T> Drop for CountedIo<T> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: Connection> Connection for CountedIo<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: Read + Unpin> Read for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// Why an upstream exchange failed, for the error response and metrics.
pub enum SendFailure {
    Connect(String),
    ConnectTimeout,
    /// The region's egress proxy gave no tunnel; a connect failure too.
    EgressProxy(String),
    Other(String),
}

/// An upstream exchange that failed before the response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(BoxError),
    #[error("exchange: {0}")]
    Exchange(BoxError),
    #[error("the connection closed before the request was sent")]
    Closed,
}

/// Sorts a send error into connect failure, connect timeout, egress proxy
/// failure or other.
pub fn classify(error: &SendError) -> SendFailure {
    let connect = match error {
        SendError::Connect(error) => &**error,
        SendError::Exchange(error) => return SendFailure::Other(innermost(&**error).to_string()),
        SendError::Closed => return SendFailure::Other(error.to_string()),
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(connect);
    while let Some(e) = source {
        if e.is::<ConnectTimeout>() {
            return SendFailure::ConnectTimeout;
        }
        if let Some(egress) = e.downcast_ref::<EgressError>() {
            return SendFailure::EgressProxy(egress.to_string());
        }
        source = e.source();
    }
    // The innermost cause says the most (refused, reset, unknown host, bad certificate).
    SendFailure::Connect(innermost(connect).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(base: &str) -> Transport {
        let region: RegionConfig = serde_json::from_value(serde_json::json!({
            "name": "t", "base_url": base, "api_keys": [{"env": "X"}]
        }))
        .unwrap();
        Transport::new(TransportKey::new(&region, None, None), 1).unwrap()
    }

    /// A one-shot proxy on a free port: answers the first connection's
    /// request head with `answer`; returns what it was sent.
    async fn scripted_proxy(
        answer: &'static [u8],
    ) -> (EgressProxy, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 512];
            while !seen.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client went away mid-request");
                seen.extend_from_slice(&chunk[..n]);
            }
            // The client may hang up mid-answer (the endless head).
            let _ = stream.write_all(answer).await;
            String::from_utf8(seen).unwrap()
        });
        let config = EgressProxyConfig {
            url,
            credentials_from: None,
        };
        let proxy = EgressProxy::new(&config, Some(Secret::new("relay:pa55word"))).unwrap();
        (proxy, task)
    }

    async fn tunnel(answer: &'static [u8]) -> (Result<(), EgressError>, String) {
        let (proxy, seen) = scripted_proxy(answer).await;
        let addr = format!(
            "{}:{}",
            proxy.address.host().unwrap(),
            proxy.address.port_u16().unwrap()
        );
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let result = proxy.open_tunnel(&mut stream, "api.example.com:443").await;
        (result, seen.await.unwrap())
    }

    #[tokio::test]
    async fn connect_request_names_target_and_credentials() {
        let (result, seen) = tunnel(b"HTTP/1.0 200 Connection established\r\n\r\n").await;
        result.unwrap();
        assert_eq!(
            seen,
            // base64("relay:pa55word")
            "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\
             Proxy-Authorization: Basic cmVsYXk6cGE1NXdvcmQ=\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn refusals_and_garbage_are_clear_errors_without_credentials() {
        let cases: [(&'static [u8], &str); 5] = [
            (
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n<html>relay:pa55word</html>",
                "the egress proxy refused the tunnel: 407 Proxy Authentication Required",
            ),
            (
                b"HTTP/1.1 502 Bad Gateway cmVsYXk6cGE1NXdvcmQ=\r\n\r\n",
                "the egress proxy refused the tunnel: 502 Bad Gateway",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
            // Bytes from the far side before the client spoke: not a clean tunnel.
            (b"HTTP/1.1 200 OK\r\n\r\nsurprise", "not HTTP"),
            (b"HTTP/1.1 200 OK\r\n", "closed the connection"),
        ];
        for (answer, expected) in cases {
            let (result, _) = tunnel(answer).await;
            let message = result.unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
            assert!(
                !message.contains("pa55word") && !message.contains("cmVsYXk6"),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn an_endless_answer_head_is_cut_off() {
        static LONG: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            head.extend(std::iter::repeat_n(b'x', 3 * MAX_CONNECT_ANSWER));
            head
        });
        let (result, _) = tunnel(LONG.as_slice()).await;
        assert!(matches!(result, Err(EgressError::AnswerTooLong)));
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(
            status_of(b"HTTP/1.1 200 Connection established"),
            Some(http::StatusCode::OK)
        );
        assert_eq!(status_of(b"HTTP/1.0 200"), Some(http::StatusCode::OK));
        assert_eq!(status_of(b"HTTP/1.1 2000 x"), None);
        assert_eq!(status_of(b"HTTP/2 200 x"), None);
        assert_eq!(status_of(b"ICY 200 OK"), None);
    }

    #[test]
    fn credentials_must_be_user_and_password_and_never_show() {
        let config = EgressProxyConfig {
            url: "http://proxy:3128".into(),
            credentials_from: None,
        };
        let err = EgressProxy::new(&config, Some(Secret::new("justatoken"))).unwrap_err();
        assert!(!err.contains("justatoken"), "{err}");
        let proxy = EgressProxy::new(&config, Some(Secret::new("u:secretpw"))).unwrap();
        let shown = format!("{proxy:?}");
        assert!(
            !shown.contains("secretpw") && !shown.contains("dTpzZWNyZXRwdw"),
            "{shown}"
        );
    }

    #[test]
    fn uri_joins_prefix_and_query() {
        let t = transport("https://gw.example.com/anthropic/");
        let pq: PathAndQuery = "/v1/messages?beta=true".parse().unwrap();
        assert_eq!(
            t.uri_for(Some(&pq)).unwrap().to_string(),
            "https://gw.example.com/anthropic/v1/messages?beta=true"
        );
        let t = transport("http://127.0.0.1:9");
        assert_eq!(
            t.uri_for(Some(&pq)).unwrap().to_string(),
            "http://127.0.0.1:9/v1/messages?beta=true"
        );
    }
}
