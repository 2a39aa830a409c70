//! The admin listener: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// What the admin listener reports; shared with the rest of the operator.
pub struct State {
    pub registry: Registry,
    ready: AtomicBool,
}

impl State {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            ready: AtomicBool::new(false),
        }
    }

    /// Ready once the CRDs are found and the process can do its work
    /// (as leader or as standby).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

pub fn respond(state: &State, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode metrics\n".into(),
                ),
            }
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Serves on `listener` (bound by the caller, so that a taken port stops
/// the operator at start instead of leaving it without probes) until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept");
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&state, req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn routes() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.error("api");
        let state = State::new(registry);
        assert_eq!(respond(&state, "/healthz").status(), StatusCode::OK);
        assert_eq!(
            respond(&state, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.set_ready(true);
        assert_eq!(respond(&state, "/readyz").status(), StatusCode::OK);
        assert_eq!(respond(&state, "/nope").status(), StatusCode::NOT_FOUND);
        let metrics = respond(&state, "/metrics");
        assert_eq!(metrics.status(), StatusCode::OK);
        let body = format!("{:?}", metrics.body());
        assert!(
            body.contains("claude_relay_operator_reconcile_errors_total"),
            "{body}"
        );
    }
}
