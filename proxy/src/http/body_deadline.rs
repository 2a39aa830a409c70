//! When a request body is late (`server.body_read_timeout`,
//! `server.min_body_rate`): no bytes of it for the timeout, or, once the
//! timeout has passed since it started, an average rate below the minimum
//! (each `min_body_rate` bytes received earn one more second, as in
//! Apache's mod_reqtimeout). Either way the client gets 408 and the
//! connection closes, so a client cannot hold a connection, and the memory
//! of its body, by sending slowly or not at all.
//!
//! The relay's own HTTP/1 loop reads with [`BodyClock`]; bodies hyper reads
//! come through [`TimedIncoming`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use claude_relay_crds::config::ServerConfig;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::http::error::RelayError;

/// A request's body as the relay takes it: read whole already by the
/// relay's own HTTP/1 server (left), or still coming through hyper (right),
/// within the body's deadlines.
pub type RequestBody = http_body_util::Either<http_body_util::Full<Bytes>, TimedIncoming>;

#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub timeout: Duration,
    /// Bytes per second; 0: no minimum.
    pub min_rate: u64,
}

impl BodyLimits {
    pub fn of(server: &ServerConfig) -> Self {
        Self {
            timeout: *server.body_read_timeout,
            min_rate: server.min_body_rate,
        }
    }
}

/// The progress of one request body against its limits.
#[derive(Clone, Copy, Debug)]
pub struct BodyClock {
    limits: BodyLimits,
    started: Instant,
    last: Instant,
    received: u64,
}

impl BodyClock {
    pub fn start(limits: BodyLimits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            started: now,
            last: now,
            received: 0,
        }
    }

    pub fn received(&mut self, bytes: usize) {
        self.received += bytes as u64;
        self.last = Instant::now();
    }

    /// When the body is late if nothing more arrives.
    pub fn due(&self) -> Instant {
        let silent = self.last + self.limits.timeout;
        if self.limits.min_rate == 0 {
            return silent;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.limits.min_rate as f64);
        silent.min(self.started + self.limits.timeout + earned)
    }

    pub fn error(&self) -> RelayError {
        RelayError::RequestTimeout(self.late_message())
    }

    fn late_message(&self) -> String {
        format!(
            "the request body arrived too slowly: {} bytes in {:.1} s (the relay waits {:?} for the next bytes and wants at least {} bytes per second after that)",
            self.received,
            self.started.elapsed().as_secs_f64(),
            self.limits.timeout,
            self.limits.min_rate,
        )
    }
}

/// A body hyper reads, failed with [`BodyLate`] once it is late.
pub struct TimedIncoming {
    inner: hyper::body::Incoming,
    clock: BodyClock,
    /// Armed at the first wait: a body at hand in full never needs it.
    timer: Option<Pin<Box<Sleep>>>,
}

impl TimedIncoming {
    pub fn new(inner: hyper::body::Incoming, limits: BodyLimits) -> Self {
        Self {
            inner,
            clock: BodyClock::start(limits),
            timer: None,
        }
    }
}

/// The request body was late; carries the 408 the client gets.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyLate(String);

impl BodyLate {
    /// The error to answer with, when `error` is a late body.
    pub fn in_error(error: &(dyn std::error::Error + 'static)) -> Option<RelayError> {
        error
            .downcast_ref::<Self>()
            .map(|late| RelayError::RequestTimeout(late.0.clone()))
    }
}

impl Body for TimedIncoming {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.clock.received(frame.data_ref().map_or(0, Bytes::len));
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        // The timer moves only when it fires early: not once per frame.
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(this.clock.due())));
        loop {
            ready!(timer.as_mut().poll(cx));
            let due = this.clock.due();
            if Instant::now() >= due {
                let late = BodyLate(this.clock.late_message());
                return Poll::Ready(Some(Err(Box::new(late))));
            }
            timer.as_mut().reset(due);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_and_a_trickle_are_both_late() {
        let limits = BodyLimits {
            timeout: Duration::from_secs(10),
            min_rate: 100,
        };
        let mut clock = BodyClock::start(limits);
        let start = Instant::now();
        assert_eq!(clock.due(), start + Duration::from_secs(10));
        // 500 bytes at once: 5 s more on the rate, still 10 s of silence.
        clock.received(500);
        assert_eq!(clock.due(), start + Duration::from_secs(10));
        // A byte every 5 s never falls silent for 10 s, but the rate runs out.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(5)).await;
            clock.received(1);
        }
        assert_eq!(
            clock.due(),
            start + Duration::from_secs(15) + Duration::from_millis(30)
        );
        let no_rate = BodyClock::start(BodyLimits {
            min_rate: 0,
            ..limits
        });
        assert_eq!(no_rate.due(), Instant::now() + Duration::from_secs(10));
    }
}
