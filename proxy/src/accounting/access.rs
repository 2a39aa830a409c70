//! One record per request: the access-log line and the request metrics,
//! written when the response body is finished or dropped (client gone),
//! so a stream is logged with its whole duration and how it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::accounting::usage::UsageTap;
use crate::base::metrics::{Metrics, Name};
use crate::http::body::{Outcome, Report, SlotRelease};

pub struct Exchange {
    metrics: Arc<Metrics>,
    pub request_id: Arc<str>,
    pub route: &'static str,
    pub method: http::Method,
    pub client: Option<Name>,
    pub upstream: Option<Name>,
    pub status: u16,
    started: Instant,
    pub upstream_ttfb: Option<Duration>,
    pub outcome: Outcome,
    /// Holds the region's in-flight slot until the body is done.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Holds the upstream key's in-flight count until the body is done.
    pub key_lease: Option<crate::upstream::keypool::KeyLease>,
    /// Usage, quota and cache work settled when the exchange ends.
    pub meter: Option<crate::accounting::usage::Meter>,
    /// `hit_l1`, `hit_l2` or `miss` when the response cache was asked.
    pub cache: Option<&'static str>,
    /// The request's span when it is traced ([`crate::trace`]).
    pub trace: Option<Box<crate::accounting::trace::RequestSpan>>,
}

const NO_UPSTREAM: &str = "-";

impl Exchange {
    pub fn start(
        metrics: Arc<Metrics>,
        request_id: Arc<str>,
        route: &'static str,
        method: http::Method,
    ) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            request_id,
            route,
            method,
            client: None,
            upstream: None,
            status: 0,
            started: Instant::now(),
            upstream_ttfb: None,
            outcome: Outcome::ClientGone,
            permit: None,
            key_lease: None,
            meter: None,
            cache: None,
            trace: None,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let upstream = self
            .upstream
            .clone()
            .unwrap_or_else(|| Name(Arc::from(NO_UPSTREAM)));
        self.metrics.in_flight.dec();
        self.metrics
            .count_request(self.route, self.status, &upstream);
        self.metrics
            .route_duration(self.route)
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "access",
            request_id = %self.request_id,
            client = self.client.as_ref().map_or("-", |c| &c.0),
            method = %self.method,
            route = self.route,
            status = self.status,
            upstream = &*upstream.0,
            upstream_ttfb_ms = self.upstream_ttfb.map(|d| d.as_secs_f64() * 1e3),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            outcome = self.outcome.as_str(),
            cache = self.cache.unwrap_or("-"),
        );
        let mut trace = self.trace.take();
        if let Some(span) = &mut trace {
            span.close(
                &self.request_id,
                self.status,
                self.client.as_ref(),
                self.upstream.as_ref(),
                self.cache,
                self.outcome.as_str(),
            );
        }
        if let Some(meter) = self.meter.take() {
            crate::accounting::usage::Finished {
                meter,
                request_id: self.request_id.clone(),
                region: self.upstream.clone(),
                key_id: self.key_lease.as_ref().map(|l| l.id().to_owned()),
                complete: self.outcome == Outcome::Complete,
                trace,
            }
            .spawn();
        }
    }
}

/// The response body reports here: usage is read from its chunks, and its
/// end settles the client's concurrency slot.
impl Report for Exchange {
    fn reads_chunks(&self) -> bool {
        self.tap().is_some()
    }

    fn decodes(&self) -> bool {
        self.tap().is_some_and(UsageTap::decodes)
    }

    fn feed(&mut self, chunk: &Bytes) {
        if let Some(tap) = self.meter.as_mut().and_then(|m| m.tap.as_mut()) {
            tap.feed(chunk);
        }
    }

    fn end(&mut self, outcome: Outcome) -> Option<SlotRelease> {
        self.outcome = outcome;
        let release = self.meter.as_mut()?.release_slot()?;
        Some(Box::pin(release.run()))
    }
}

impl Exchange {
    fn tap(&self) -> Option<&UsageTap> {
        self.meter.as_ref().and_then(|m| m.tap.as_ref())
    }
}
