//! The response body the relay sends: either bytes it made itself (errors,
//! admin) or the upstream's body passed through frame by frame, never
//! buffered, with an idle timeout between chunks and an overall deadline.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the exchange ended, as the access log tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response reached the client.
    Complete,
    /// The client went away before the response was complete.
    ClientGone,
    /// The upstream broke the response body off.
    UpstreamBodyError,
    /// The upstream was silent longer than the idle timeout, or the total cap passed.
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::ClientGone => "client_gone",
            Self::UpstreamBodyError => "upstream_body_error",
            Self::Timeout => "timeout",
        }
    }
}

/// What a response body tells the request's record as it goes: the chunks
/// it handed on and how it ended. Accounting implements it (the access
/// record with its usage meter), so this layer needs none of its types; the
/// record is written when the report is dropped.
pub trait Report: Send {
    /// Usage is read from the chunks: each one handed on is to be fed.
    fn reads_chunks(&self) -> bool;
    /// The chunks are compressed, and decoding one costs: it is fed after
    /// the writer has had a turn to send it.
    fn decodes(&self) -> bool;
    fn feed(&mut self, chunk: &Bytes);
    /// The body ended so. What it gives back, if anything, releases the
    /// client's concurrency slot, and the end waits for it.
    fn end(&mut self, outcome: Outcome) -> Option<SlotRelease>;
}

pub type SlotRelease = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A body passed through: an upstream's response, whichever client read it.
pub trait PassThrough: Body<Data = Bytes, Error = BoxError> + Send + Unpin {}

impl<B: Body<Data = Bytes, Error = BoxError> + Send + Unpin> PassThrough for B {}

pub struct RelayBody {
    inner: Inner,
    /// Boxed: the record is large, and a response is moved several times
    /// on its way out.
    exchange: Option<Box<dyn Report>>,
    /// The body has ended and its concurrency slot is being released in
    /// the store: its last frame (or its end) waits for that.
    ending: Option<Box<Ending>>,
}

/// The end of a body whose client caps its concurrent requests: the slot
/// goes back before the client can see the end and send its next request,
/// which any replica then admits.
struct Ending {
    release: SlotRelease,
    /// What the body gives once the slot is released; `None` until the
    /// poll that ended the body has returned it.
    then: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(Box<Streaming<dyn PassThrough>>),
}

/// Generic only to be unsized: the upstream's body is the last field, so
/// the one box holds it with the rest.
struct Streaming<B: ?Sized> {
    timer: Pin<Box<Sleep>>,
    idle: Duration,
    deadline: Instant,
    /// An SSE stream whose last chunk ended an event: a relay error event
    /// can be appended without corrupting the stream. `None` for any other
    /// body, and for an event stream framed by `Content-Length`, which has
    /// no room for bytes beyond those it declared.
    sse_boundary: Option<bool>,
    ended: bool,
    /// The upstream's failure, handed on at the poll after the one that saw
    /// it: a writer given the last chunk in the same pass writes it out
    /// first (hyper drops what it holds when a body fails).
    broke: Option<BoxError>,
    /// The chunk that went out last, read for usage on the next poll (or
    /// when the exchange ends): after it is on its way to the client, so
    /// reading it never delays an event.
    unread: Option<Bytes>,
    /// The usage tap decodes (a compressed answer): a chunk is decoded once
    /// the writer has had a turn to send it ([`Self::yielded`]), the last
    /// one when the body is dropped.
    decoding: bool,
    /// A poll came back to let the writer send `unread` before decoding it.
    yielded: bool,
    /// Its HTTP/1 connection goes back to the pool when it is done.
    body: B,
}

/// The relay ended a stream: the upstream fell silent or ran past the cap.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamCut(&'static str);

impl RelayBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Full(Some(bytes)),
            exchange: None,
            ending: None,
        }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// The upstream body, cut off after `idle` without a chunk or at `deadline`.
    pub fn upstream(
        body: impl PassThrough + 'static,
        idle: Duration,
        deadline: Instant,
        sse: bool,
    ) -> Self {
        let first = (Instant::now() + idle).min(deadline);
        let length_framed = body.size_hint().exact().is_some();
        Self {
            inner: Inner::Upstream(Box::new(Streaming {
                timer: Box::pin(tokio::time::sleep_until(first)),
                idle,
                deadline,
                sse_boundary: (sse && !length_framed).then_some(true),
                ended: false,
                broke: None,
                unread: None,
                decoding: false,
                yielded: false,
                body,
            })),
            exchange: None,
            ending: None,
        }
    }

    /// Attaches the request's record, written when this body is done or dropped.
    pub fn with_exchange(mut self, exchange: Box<dyn Report>) -> Self {
        if let Inner::Upstream(stream) = &mut self.inner {
            stream.decoding = exchange.decodes();
        }
        self.exchange = Some(exchange);
        self
    }

    fn finish(&mut self, outcome: Outcome) {
        // The last chunk of a compressed answer may not be out yet: it is
        // decoded, and the exchange written, when this body is dropped,
        // once the server is done with it.
        let decoding = matches!(&self.inner, Inner::Upstream(stream) if stream.decoding);
        if !decoding {
            self.read_usage();
        }
        let Some(exchange) = self.exchange.as_mut() else {
            return;
        };
        // Released in this process at once, or in Redis before the end goes
        // out (see `poll_frame`), whatever the answer's coding.
        if let Some(release) = exchange.end(outcome) {
            self.ending = Some(Box::new(Ending {
                release,
                then: None,
            }));
        }
        if !decoding {
            // Written now: the access log and the meter's settlement.
            self.exchange = None;
        }
    }

    /// Feeds the usage tap the chunk that went out last.
    fn read_usage(&mut self) {
        let Inner::Upstream(stream) = &mut self.inner else {
            return;
        };
        read_unread(stream, &mut self.exchange);
    }
}

fn read_unread(stream: &mut Streaming<dyn PassThrough>, exchange: &mut Option<Box<dyn Report>>) {
    stream.yielded = false;
    if let Some(chunk) = stream.unread.take()
        && let Some(report) = exchange.as_mut()
        && report.reads_chunks()
    {
        report.feed(&chunk);
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        // The client went away, or a compressed answer is done: what the
        // last chunk reported still counts.
        self.read_usage();
        // Gone while the slot was being released: the release still goes on.
        if let Some(ending) = self.ending.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn(ending.release));
        }
    }
}

fn sse_error_event(message: &str) -> Bytes {
    let data = serde_json::json!({
        "type": "error",
        "error": {"type": "api_error", "message": message},
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(ending) = this.ending.as_mut() {
                ready!(ending.release.as_mut().poll(cx));
                if let Some(then) = this.ending.take().and_then(|ending| ending.then) {
                    return Poll::Ready(then);
                }
                // NB: the poll that ended the body gave nothing yet (a break
                // is handed on at the next one): the body still has its say.
            }
            let next = ready!(this.poll_body(cx));
            match &mut this.ending {
                None => return Poll::Ready(next),
                // This poll ended the body: what it gives waits for the release.
                Some(ending) => ending.then = Some(next),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.ending.is_some() {
            return false;
        }
        match &self.inner {
            // NB: claiming the end early would let hyper skip polling, and the
            // exchange would be logged as abandoned.
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Upstream(stream) => stream.ended && stream.broke.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.inner {
            Inner::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(stream) => stream.body.size_hint(),
        };
        // A last frame held back while the slot is released is still to come.
        if let Some(Some(Some(Ok(frame)))) = self.ending.as_ref().map(|e| &e.then)
            && let Some(data) = frame.data_ref()
        {
            let held = data.len() as u64;
            // Upper first: a lower bound above the upper one panics.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + held);
            }
            hint.set_lower(hint.lower() + held);
        }
        hint
    }
}

impl RelayBody {
    /// The next frame of the body itself.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        if matches!(&this.inner, Inner::Upstream(stream) if !stream.decoding) {
            this.read_usage();
        }
        let stream = match &mut this.inner {
            Inner::Full(bytes) => {
                // Handed to hyper is as complete as a body the relay made gets.
                let taken = bytes.take();
                this.finish(Outcome::Complete);
                return Poll::Ready(taken.filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))));
            }
            Inner::Upstream(stream) => stream,
        };
        if stream.ended {
            return Poll::Ready(stream.broke.take().map(Err));
        }
        match Pin::new(&mut stream.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(boundary), Some(data)) = (&mut stream.sse_boundary, frame.data_ref())
                    && !data.is_empty()
                {
                    *boundary = data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
                }
                if stream.decoding {
                    // The chunk before went out with this one's batch.
                    read_unread(stream, &mut this.exchange);
                }
                // Usage is read from the bytes once they are handed on, unchanged.
                let tapped = this.exchange.as_ref().is_some_and(|e| e.reads_chunks());
                if let (true, Some(data)) = (tapped, frame.data_ref()) {
                    stream.unread = Some(data.clone());
                }
                if stream.body.is_end_stream() {
                    // NB: with a known length hyper stops polling after the last
                    // byte, so the end must be noticed here.
                    stream.ended = true;
                    this.finish(Outcome::Complete);
                } else {
                    let next = (Instant::now() + stream.idle).min(stream.deadline);
                    stream.timer.as_mut().reset(next);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                stream.ended = true;
                this.finish(Outcome::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                let can_tell = stream.sse_boundary == Some(true);
                stream.ended = true;
                if !can_tell {
                    stream.broke = Some(error);
                }
                this.finish(Outcome::UpstreamBodyError);
                if can_tell {
                    // SDKs turn an error event into an exception with this message.
                    Poll::Ready(Some(Ok(Frame::data(sse_error_event(
                        "the upstream connection broke off the stream",
                    )))))
                } else {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
            Poll::Pending => {
                if stream.decoding && stream.unread.is_some() {
                    if stream.yielded {
                        // The writer has had its turn: the chunk is out.
                        read_unread(stream, &mut this.exchange);
                    } else {
                        // Nothing more at hand: the writer sends the chunk
                        // now, and this poll comes back to decode it.
                        stream.yielded = true;
                        cx.waker().wake_by_ref();
                    }
                }
                ready!(stream.timer.as_mut().poll(cx));
                let why = if Instant::now() >= stream.deadline {
                    "the response ran past the relay's total timeout"
                } else {
                    "the upstream was silent longer than the relay's idle timeout"
                };
                let can_tell = stream.sse_boundary == Some(true);
                stream.ended = true;
                this.finish(Outcome::Timeout);
                if can_tell {
                    Poll::Ready(Some(Ok(Frame::data(sse_error_event(why)))))
                } else {
                    Poll::Ready(Some(Err(Box::new(StreamCut(why)))))
                }
            }
        }
    }
}
