//! The way to one upstream region: a pooled hyper client over rustls
//! (HTTP/2 where the upstream offers it), its connect timeout, its
//! in-flight cap, and the pool figures that metrics show.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claude_relay_crds::config::RegionConfig;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

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
}

impl TransportKey {
    pub fn new(region: &RegionConfig, ca_pem: Option<Vec<u8>>) -> Self {
        Self {
            base_url: region.base_url.clone(),
            ca_pem,
            connect_timeout: *region.timeouts.connect,
            max_idle_per_host: region.pool.max_idle_per_host,
            pool_idle_timeout: *region.pool.idle_timeout,
            max_in_flight: region.pool.max_in_flight,
        }
    }
}

type Connector = TimeoutConnector<HttpsConnector<CountingConnector>>;
pub type UpstreamClient = Client<Connector, Full<Bytes>>;

/// One region's way out. Each worker thread has its own client (and so its
/// own pool): a request and its upstream connection are served on the same
/// thread, without cross-thread wake-ups. The in-flight cap and the figures
/// are shared.
pub struct Transport {
    pub key: TransportKey,
    clients: Vec<UpstreamClient>,
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the base URL, without a trailing slash.
    prefix: String,
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
        let clients = (0..workers.max(1))
            .map(|_| build_client(&key, tls.clone(), open_connections.clone()))
            .collect();
        Ok(Self {
            in_flight_limit: Arc::new(Semaphore::new(key.max_in_flight)),
            key,
            clients,
            scheme,
            authority,
            prefix,
            open_connections,
            waiting: AtomicI64::new(0),
        })
    }

    /// The client of the calling worker thread.
    pub fn client(&self) -> &UpstreamClient {
        &self.clients[crate::worker::current() % self.clients.len()]
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

fn build_client(
    key: &TransportKey,
    tls: rustls::ClientConfig,
    open: Arc<AtomicI64>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let counting = CountingConnector { inner: http, open };
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(counting);
    let connector = TimeoutConnector {
        inner: https,
        timeout: key.connect_timeout,
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(key.pool_idle_timeout)
        .pool_max_idle_per_host(key.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
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

/// Counts open TCP connections: each connection it makes holds a count
/// until it is dropped.
#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    open: Arc<AtomicI64>,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedIo<<HttpConnector as tower_service::Service<Uri>>::Response>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let open = self.open.clone();
        Box::pin(async move {
            let io = connecting.await?;
            open.fetch_add(1, Ordering::Relaxed);
            Ok(CountedIo { inner: io, open })
        })
    }
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
    Other(String),
}

/// Sorts a hyper client error into connect failure, connect timeout or other.
pub fn classify(error: &hyper_util::client::legacy::Error) -> SendFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<ConnectTimeout>() {
            return SendFailure::ConnectTimeout;
        }
        source = e.source();
    }
    // The innermost cause says the most (refused, reset, unknown host, bad certificate).
    let mut innermost: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    if error.is_connect() {
        SendFailure::Connect(innermost.to_string())
    } else {
        SendFailure::Other(innermost.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(base: &str) -> Transport {
        let region: RegionConfig = serde_json::from_value(serde_json::json!({
            "name": "t", "base_url": base, "api_keys": [{"env": "X"}]
        }))
        .unwrap();
        Transport::new(TransportKey::new(&region, None), 1).unwrap()
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
