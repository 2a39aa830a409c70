//! The admin listener, on its own port: `/healthz` (the process serves),
//! `/readyz` (config loaded, listener up, not shutting down), `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::body::RelayBody;
use crate::metrics::UpstreamLabels;
use crate::runtime::App;

pub fn handle<B>(app: &Arc<App>, request: &Request<B>) -> Response<RelayBody> {
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if app.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            refresh_pool_figures(app);
            let mut response = Response::new(RelayBody::full(Bytes::from(app.metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

/// Pool gauges are read from the transports at scrape time, not kept up to
/// date on the hot path.
fn refresh_pool_figures(app: &App) {
    let snapshot = app.snapshot.load();
    let m = &app.metrics;
    for region in &snapshot.regions {
        let figures = region.transport.figures();
        let labels = UpstreamLabels {
            upstream: region.name.clone(),
        };
        m.pool_open.get_or_create(&labels).set(figures.open);
        m.pool_in_use.get_or_create(&labels).set(figures.in_flight);
        m.pool_waiting.get_or_create(&labels).set(figures.waiting);
        // HTTP/1 view: a connection carries one request at a time.
        m.pool_idle
            .get_or_create(&labels)
            .set((figures.open - figures.in_flight).max(0));
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
