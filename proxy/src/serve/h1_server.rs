//! The relay's own HTTP/1.1 server loop for client connections, plaintext
//! or TLS (when ALPN did not choose HTTP/2).
//!
//! The common request (HTTP/1.1, a body of known length up to
//! [`INLINE_BODY`], or none) is read, handed to the stack and answered
//! here: one read for the request, one write for a response whose body is
//! at hand, no dispatch loop. Anything else on the connection (HTTP/2
//! prior knowledge, a chunked or large body, `Expect: 100-continue`,
//! HTTP/1.0, `HEAD`, an upgrade, a head that does not parse) goes, with the
//! bytes already read, to hyper, which serves the connection from then on
//! (HTTP/1 only once a request was answered here).
//!
//! A body that did not come with its head is waited for only after the head
//! passed authentication ([`stack::refuse_before_body`]), and within the
//! body's deadlines ([`crate::http::body_deadline`]); a request refused or late
//! is answered and its connection closed, its body unread. A response is
//! framed by its length when its body knows it: never more is written, and
//! a body that ends short of it closes the connection.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::control::runtime::App;
use crate::http::body::RelayBody;
use crate::http::body_deadline::{BodyClock, BodyLimits, RequestBody, TimedIncoming};
use crate::http::error::RelayError;
use crate::http::h1_client::{Fields, header_map, place_in, poll_read_lean, push_decimal};
use crate::stack;

/// Bodies up to this size are read here; larger ones stream through hyper,
/// which also drains a too-large one before its 413.
pub const INLINE_BODY: u64 = 256 * 1024;
/// Longest request head read here; a longer one goes to hyper, whose own
/// limit then applies.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Time to receive a request head, idle time before it included: what
/// hyper's `header_read_timeout` gives the connections it serves.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, and how much, a refused client's unread bytes are thrown away
/// before its connection closes (what nginx's lingering close does).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
/// An HTTP/2 client's first line.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
/// Response bytes gathered before a write, when the body has more at hand.
const WRITE_BATCH: usize = 64 * 1024;
/// Room for a response head without regrowing, as the relay sends them.
const HEAD_ROOM: usize = 1024;
/// A chunk's size line and line ends around its data.
const CHUNK_FRAMING: usize = 16 + 4;

/// Serves one plaintext connection until the client closes it, the relay
/// shuts down, or a request needs hyper.
pub async fn serve<Io>(
    app: Arc<App>,
    stream: Io,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    // Held for the life of the connection: shutdown waits for it.
    watcher: Watcher,
    stop: watch::Receiver<bool>,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn {
        io: stream,
        // Both made when bytes come and go, not held while the connection
        // waits (see `poll_read_lean`).
        buf: BytesMut::new(),
        out: Vec::new(),
        fields: Fields::new(),
    };
    // Armed once and moved only when it fires early: resetting a timer for
    // every request is a timer-wheel update each time.
    let mut head_deadline = Box::pin(tokio::time::sleep(HEADER_READ_TIMEOUT));
    // One wait for shutdown for the life of the connection: made anew for
    // every request, it joined and left the waiter list that every
    // connection shares each time.
    let mut stopping = stop.clone();
    let stopped = stopping.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    // Once a request is answered here the connection is HTTP/1 for good.
    let mut served = false;
    loop {
        let head_due = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
        let head = loop {
            if !conn.buf.is_empty() {
                match parse_request(&conn.buf, &mut conn.fields) {
                    Parse::Complete(head) => break head,
                    Parse::Partial if conn.buf.len() <= MAX_HEAD => {}
                    Parse::Partial | Parse::NotOurs => {
                        if served && conn.buf.starts_with(H2_PREFACE_START) {
                            let refused = stack::refuse(
                                &app,
                                &Method::from_bytes(b"PRI").unwrap_or_default(),
                                "*",
                                RelayError::InvalidRequest(
                                    "an HTTP/2 preface on a connection that has spoken HTTP/1: a connection keeps its version".into(),
                                ),
                            );
                            conn.buf.clear();
                            Box::pin(conn.respond_and_close(refused)).await;
                            return;
                        }
                        // Boxed: hyper's connection state is not carried by
                        // every connection this loop serves.
                        return Box::pin(hand_over(app, conn, peer, &builder, watcher, served))
                            .await;
                    }
                }
            }
            tokio::select! {
                biased;
                read = conn.read_more() => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = &mut head_deadline => {
                    if tokio::time::Instant::now() >= head_due {
                        return;
                    }
                    head_deadline.as_mut().reset(head_due);
                }
                // Idle at shutdown: nothing is lost by closing now.
                _ = &mut stopped, if conn.buf.is_empty() => return,
            }
        };
        let head_bytes = conn.buf.split_to(head.len).freeze();
        // Checked by the parse, so this cannot fail.
        let Some(headers) = header_map(&head_bytes, &mut conn.fields) else {
            return;
        };
        if (conn.buf.len() as u64) < head.body_len {
            // Memory and time for the rest of the body only if the client may
            // send it: a refused one is answered now and the body left unread.
            if let Some(refused) =
                stack::refuse_before_body(&app, &head.method, head.uri.path(), &headers)
            {
                Box::pin(conn.respond_and_close(refused)).await;
                return;
            }
            let limits = BodyLimits::of(&app.snapshot.load().config.server);
            let mut clock = BodyClock::start(limits);
            clock.received(conn.buf.len());
            while (conn.buf.len() as u64) < head.body_len {
                match tokio::time::timeout_at(clock.due(), conn.read_more()).await {
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(n)) => clock.received(n),
                    Err(_) => {
                        let late =
                            stack::refuse(&app, &head.method, head.uri.path(), clock.error());
                        conn.buf.clear();
                        Box::pin(conn.respond_and_close(late)).await;
                        return;
                    }
                }
            }
        }
        let body = conn.buf.split_to(head.body_len as usize).freeze();
        let keep_alive = head.keep_alive;
        let mut request = Request::new(RequestBody::Left(Full::new(body)));
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.headers_mut() = headers;

        // A client that goes away before the answer cancels the request.
        let answered = {
            // Boxed, and so only while the request is handled: inline, its
            // state (several KB) would be part of every connection's task,
            // idle or streaming, for the connection's life.
            let mut handled = Box::pin(stack::handle(app.clone(), request, peer));
            poll_fn(|cx| {
                if let Poll::Ready(response) = handled.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                match conn.poll_client_gone(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        let Some(response) = answered else {
            return;
        };
        let closing = !keep_alive || *stop.borrow();
        if conn.respond(response, closing).await.is_err() {
            return;
        }
        // An idle keep-alive connection holds no write buffer.
        conn.out = Vec::new();
        served = true;
        if closing {
            // A TLS client is told the end is meant (close_notify).
            let _ = conn.io.shutdown().await;
            return;
        }
    }
}

struct Conn<Io> {
    io: Io,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// Response bytes not yet written.
    out: Vec<u8>,
    /// The fields of the request head being parsed; kept to reuse its allocation.
    fields: Fields,
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Conn<Io> {
    async fn read_more(&mut self) -> io::Result<usize> {
        poll_fn(|cx| poll_read_lean(&mut self.io, cx, &mut self.buf)).await
    }

    /// Ready when the client has closed (or broken) the connection. Bytes
    /// it sends meanwhile (a pipelined request) are kept, up to a bound.
    fn poll_client_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.buf.len() > MAX_HEAD {
            // Enough kept; the client's close is seen at the next write.
            return Poll::Pending;
        }
        loop {
            match ready!(poll_read_lean(&mut self.io, cx, &mut self.buf)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) if self.buf.len() > MAX_HEAD => return Poll::Pending,
                Ok(_) => {}
            }
        }
    }

    /// Writes the response; its body frame by frame, each written as soon
    /// as nothing more is at hand, so a stream's events are never held.
    async fn respond(
        &mut self,
        response: http::Response<RelayBody>,
        closing: bool,
    ) -> io::Result<()> {
        let (parts, mut body) = response.into_parts();
        let framing = if parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
        {
            Framing::Bodiless
        } else if let Some(length) = body.size_hint().exact() {
            Framing::Length(length)
        } else {
            Framing::Chunked
        };
        self.out.clear();
        let at_hand = match framing {
            Framing::Length(length) => length.min(WRITE_BATCH as u64) as usize,
            _ => 0,
        };
        self.out.reserve(HEAD_ROOM + at_hand);
        encode_head(
            &mut self.out,
            parts.status,
            &parts.headers,
            framing,
            closing,
        );
        // The header values may share the upstream's read buffer: not kept
        // for the life of a stream.
        drop(parts);
        if framing == Framing::Bodiless {
            // Read to its end (it has none to send), so that the exchange
            // is recorded as complete.
            while let Some(Ok(_)) = body.frame().await {}
            return self.flush_out().await;
        }
        let chunked = framing == Framing::Chunked;
        // What the declared length still owes: never more is written, and a
        // body that ends short of it leaves the connection unusable.
        let mut owed = match framing {
            Framing::Length(length) => length,
            _ => u64::MAX,
        };
        loop {
            let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Next::Frame(frame)),
                Poll::Ready(Some(Err(_))) => Poll::Ready(Next::BrokeOff),
                Poll::Ready(None) => Poll::Ready(Next::End),
                // Nothing more at hand: what is gathered goes out now.
                Poll::Pending if !self.out.is_empty() => Poll::Ready(Next::Flush),
                Poll::Pending => {
                    // Nothing to write until the body has more: a stream
                    // between events holds no write buffer.
                    if self.out.capacity() != 0 {
                        self.out = Vec::new();
                    }
                    self.poll_client_gone(cx).map(|()| Next::BrokeOff)
                }
            })
            .await;
            match next {
                Next::Flush => self.flush_out().await?,
                Next::End => {
                    if chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    } else if owed > 0 {
                        // Short of its length: the client must see the end
                        // of the connection, not read the next response as
                        // the rest of this one.
                        self.flush_out().await?;
                        return Err(io::Error::other(
                            "the response body ended short of its length",
                        ));
                    }
                    return self.flush_out().await;
                }
                // The body broke off, or the client went away: the client
                // gets what came before the break, then sees the connection
                // end before the body does, as hyper would show it.
                Next::BrokeOff => {
                    self.flush_out().await?;
                    return Err(io::Error::other("the response body broke off"));
                }
                Next::Frame(frame) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        self.out.reserve(data.len() + CHUNK_FRAMING);
                        push_hex(&mut self.out, data.len());
                        self.out.extend_from_slice(b"\r\n");
                        self.out.extend_from_slice(&data);
                        self.out.extend_from_slice(b"\r\n");
                    } else if data.len() as u64 > owed {
                        // More than declared: the bytes past the length
                        // would be read as the start of the next response.
                        self.out.extend_from_slice(&data[..owed as usize]);
                        self.flush_out().await?;
                        return Err(io::Error::other("the response body overran its length"));
                    } else {
                        owed -= data.len() as u64;
                        self.out.extend_from_slice(&data);
                    }
                    if self.out.len() >= WRITE_BATCH {
                        self.flush_out().await?;
                    }
                }
            }
        }
    }

    /// Answers a request whose body is left unread, then closes (boxed by
    /// its callers: rare, and kept out of every connection's future): the
    /// client is told, its write side is shut, and what it still sends is
    /// read and thrown away for a moment, so that the close does not reset
    /// the connection (and lose the answer) while its bytes are in flight.
    async fn respond_and_close(&mut self, response: http::Response<RelayBody>) {
        if self.respond(response, true).await.is_err() || self.io.shutdown().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(LINGER_TIME, async {
            let mut discarded = 0;
            while discarded < LINGER_BYTES {
                self.buf.clear();
                match self.read_more().await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
            }
        })
        .await;
    }

    async fn flush_out(&mut self) -> io::Result<()> {
        self.io.write_all(&self.out).await?;
        // TLS holds what was written until flushed.
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }
}

/// How a response body goes out.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// 1xx, 204, 304: no body, no length.
    Bodiless,
    Length(u64),
    /// A body whose length is not known before it ends.
    Chunked,
}

/// What the response body gives next, as the writer sees it.
enum Next {
    Frame(http_body::Frame<Bytes>),
    End,
    /// Nothing at hand now: write out what is gathered.
    Flush,
    /// The body failed, or the client went away.
    BrokeOff,
}

fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    closing: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in headers {
        // Framing is the server's to write, from the body itself.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::push_now(out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Bodiless => {}
        Framing::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, length);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = DIGITS[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The `Date` header, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn push_now(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second || text.is_empty() {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

struct Head {
    len: usize,
    method: Method,
    uri: Uri,
    body_len: u64,
    keep_alive: bool,
}

enum Parse {
    Complete(Head),
    Partial,
    /// For hyper: a request this loop does not serve, or one hyper should
    /// refuse in its own words.
    NotOurs,
}

/// A request head at the start of `buf`; its fields are left in `fields`,
/// their values checked, to be cut from the head once it is taken.
fn parse_request(buf: &[u8], fields: &mut Fields) -> Parse {
    // Left uninitialised: the parser fills what it uses.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::NotOurs,
    };
    if parsed.version != Some(1) {
        return Parse::NotOurs;
    }
    let Ok(method) = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes()) else {
        return Parse::NotOurs;
    };
    if method == Method::HEAD || method == Method::CONNECT {
        return Parse::NotOurs;
    }
    let path = parsed.path.unwrap_or_default();
    // Origin form only; the absolute and authority forms are hyper's.
    if !path.starts_with('/') {
        return Parse::NotOurs;
    }
    let Ok(uri) = Uri::from_maybe_shared(Bytes::copy_from_slice(path.as_bytes())) else {
        return Parse::NotOurs;
    };
    fields.clear();
    let mut body_len: Option<u64> = None;
    let mut keep_alive = true;
    for field in parsed.headers.iter() {
        let Ok(name) = crate::http::headers::name_from_wire(field.name.as_bytes()) else {
            return Parse::NotOurs;
        };
        // What `HeaderValue` accepts (httparse also lets DEL through).
        if !field
            .value
            .iter()
            .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
        {
            return Parse::NotOurs;
        }
        if name == header::CONTENT_LENGTH {
            let digits = field.value.trim_ascii();
            let valid =
                !digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit);
            let n = digits.iter().fold(0u64, |n, d| {
                n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'))
            });
            if !valid || body_len.is_some_and(|seen| seen != n) || n > INLINE_BODY {
                return Parse::NotOurs;
            }
            body_len = Some(n);
        } else if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return Parse::NotOurs;
        } else if name == header::CONNECTION {
            for token in field.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parse::NotOurs;
                }
            }
        }
        fields.push((name, place_in(buf, field.value)));
    }
    Parse::Complete(Head {
        len,
        method,
        uri,
        body_len: body_len.unwrap_or(0),
        keep_alive,
    })
}

/// Hands the connection, with what was read of it, to hyper.
async fn hand_over<Io>(
    app: Arc<App>,
    conn: Conn<Io>,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    served: bool,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn { io, buf, .. } = conn;
    let io = Replay {
        read: buf.freeze(),
        io,
    };
    if served {
        // HTTP/1 already spoken here: no switch to HTTP/2 now.
        let http1 = builder.clone().http1_only();
        serve_with_hyper(app, io, peer, &http1, watcher).await;
    } else {
        serve_with_hyper(app, io, peer, builder, watcher).await;
    }
}

/// Serves a connection with hyper (HTTP/1 or HTTP/2) until it ends.
pub async fn serve_with_hyper<Io>(
    app: Arc<App>,
    io: Io,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move {
            let limits = BodyLimits::of(&app.snapshot.load().config.server);
            let request = request.map(|body| RequestBody::Right(TimedIncoming::new(body, limits)));
            Ok::<_, std::convert::Infallible>(stack::handle(app, request, peer).await)
        }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// A connection whose first bytes were already read: they are read again.
struct Replay<Io> {
    read: Bytes,
    io: Io,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Replay<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Replay<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(text: &str) -> Parse {
        parse_request(text.as_bytes(), &mut Fields::new())
    }

    #[test]
    fn the_common_request_is_ours() {
        let Parse::Complete(head) = parse(
            "POST /v1/messages?beta=true HTTP/1.1\r\nhost: relay\r\ncontent-length: 7\r\n\
             x-api-key: k\r\n\r\n{\"a\":1}",
        ) else {
            panic!("not parsed");
        };
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/v1/messages?beta=true");
        assert_eq!(head.body_len, 7);
        assert!(head.keep_alive);
        // The values are cut from the head as read, as the loop does.
        let text = "POST /v1/messages HTTP/1.1\r\nHost: relay\r\nX-Api-Key:  k \r\n\
                    anthropic-beta: a\r\nanthropic-beta: b\r\n\r\n";
        let mut fields = Fields::new();
        let Parse::Complete(head) = parse_request(text.as_bytes(), &mut fields) else {
            panic!("not parsed");
        };
        let head_bytes = Bytes::copy_from_slice(&text.as_bytes()[..head.len]);
        let headers = header_map(&head_bytes, &mut fields).unwrap();
        assert_eq!(headers.len(), 4);
        assert_eq!(headers["host"], "relay");
        assert_eq!(headers["x-api-key"], "k");
        let betas: Vec<_> = headers.get_all("anthropic-beta").iter().collect();
        assert_eq!(betas, ["a", "b"]);
        assert!(fields.is_empty());
        let Parse::Complete(head) = parse("GET /v1/models HTTP/1.1\r\nconnection: close\r\n\r\n")
        else {
            panic!("not parsed");
        };
        assert_eq!(head.body_len, 0);
        assert!(!head.keep_alive);
        assert!(matches!(
            parse("POST /v1/messages HTTP/1.1\r\nhost"),
            Parse::Partial
        ));
    }

    #[test]
    fn what_hyper_serves_goes_to_hyper() {
        for text in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 999999999\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "HEAD / HTTP/1.1\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            "NOT HTTP AT ALL\r\n\r\n",
            "GET / HTTP/1.1\r\nx-del: a\x7fb\r\n\r\n",
        ] {
            assert!(matches!(parse(text), Parse::NotOurs), "{text:?}");
        }
    }

    #[test]
    fn response_heads_carry_their_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("request-id", HeaderValue::from_static("r"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        encode_head(
            &mut out,
            StatusCode::OK,
            &headers,
            Framing::Length(5),
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nrequest-id: r\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("\r\ncontent-length: 5\r\n\r\n"), "{text}");
        let mut out = Vec::new();
        encode_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            Framing::Chunked,
            true,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("transfer-encoding: chunked\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        let mut hex = Vec::new();
        push_hex(&mut hex, 0x1f3);
        assert_eq!(hex, b"1f3");
    }

    /// A response body that gives what the test sends, and waits between.
    struct Events(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Events {
        type Data = Bytes;
        type Error = crate::http::body::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|event| event.map(|data| Ok(http_body::Frame::data(data))))
        }
    }

    #[tokio::test]
    async fn a_stream_between_events_holds_no_buffers() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut conn = Conn {
            io: near,
            buf: BytesMut::new(),
            out: Vec::new(),
            fields: Fields::new(),
        };
        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let body = RelayBody::upstream(
            Events(received),
            Duration::from_secs(60),
            tokio::time::Instant::now() + Duration::from_secs(3600),
            true,
        );
        let mut response = http::Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let event = "event: ping\ndata: {\"type\":\"ping\"}\n\n";
        events.send(Bytes::from(event)).unwrap();
        {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut writing = std::pin::pin!(conn.respond(response, false));
            // Polled until the event is out and the body waits for the next.
            for _ in 0..4 {
                assert!(writing.as_mut().poll(&mut cx).is_pending());
            }
        }
        let mut sent = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut far, &mut sent)
            .await
            .unwrap();
        let sent = String::from_utf8_lossy(&sent[..n]);
        assert!(sent.starts_with("HTTP/1.1 200 OK\r\n"), "{sent}");
        assert!(
            sent.ends_with(&format!("\r\n\r\n{:x}\r\n{event}\r\n", event.len())),
            "{sent}"
        );
        // Waiting for the next event (and watching for the client's close),
        // the connection holds neither its write nor its read buffer.
        assert_eq!(conn.out.capacity(), 0);
        assert_eq!(conn.buf.capacity(), 0);
        // A pipelined request the client sends meanwhile is kept, whole.
        let pipelined = b"GET /v1/models HTTP/1.1\r\nhost: relay\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut far, pipelined)
            .await
            .unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(conn.poll_client_gone(&mut cx).is_pending());
        assert_eq!(&conn.buf[..], pipelined);
        // The client's close is seen.
        drop(far);
        conn.buf.clear();
        assert!(conn.poll_client_gone(&mut cx).is_ready());
    }
}
