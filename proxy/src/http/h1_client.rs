//! The relay's HTTP/1.1 client side of an upstream connection: it writes a
//! request, reads the response head, and hands the body on frame by frame.
//!
//! Ours rather than hyper's `client::conn::http1`, which drives every
//! connection from a task of its own: each exchange crossed to that task and
//! back over channels, two wake-ups and a dispatch loop per request. Here
//! the request's own task writes and reads the socket, and a connection
//! whose body is done goes straight back to its worker's list. HTTP/2 stays
//! with hyper.
//!
//! Response framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and
//! 304; `Transfer-Encoding: chunked`; `Content-Length`; otherwise the body
//! runs to the end of the connection, which is then not reused.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Longest response head read (status line and header fields).
const MAX_HEAD: usize = 64 * 1024;
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Most header fields in a response head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line or trailer field line.
const MAX_LINE: usize = 8 * 1024;
/// Request bodies up to this size are copied behind the head, so that the
/// request goes out in one write; larger ones are written on their own.
const COALESCE_BODY: usize = 16 * 1024;
/// Room for a request head without regrowing, as the relay sends them.
const HEAD_ROOM: usize = 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;

/// Where a connection goes when its response body is done and it can carry
/// another request: its worker's pool.
pub trait Home<Io>: Send + Sync {
    fn take_back(&self, conn: Box<Conn<Io>>);
}

/// One HTTP/1.1 connection to the upstream, idle between exchanges.
pub struct Conn<Io> {
    io: Io,
    /// Bytes read and not yet used: part of a head, or of a body.
    buf: BytesMut,
    /// The relayed fields of the response head being parsed, their values
    /// as places in the buffer; kept to reuse its allocation.
    fields: Fields,
}

/// Header fields found by a parse: each name, and where its value lies
/// in the head. The values are then cut from the head itself, without a
/// copy or an allocation each.
pub(crate) type Fields = Vec<(HeaderName, std::ops::Range<usize>)>;

/// Where `value`, a slice httparse took from `head`, lies in it.
pub(crate) fn place_in(head: &[u8], value: &[u8]) -> std::ops::Range<usize> {
    let at = value.as_ptr() as usize - head.as_ptr() as usize;
    at..at + value.len()
}

/// The header map of a parsed head: `fields` taken, values sharing `head`.
pub(crate) fn header_map(head: &Bytes, fields: &mut Fields) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields.drain(..) {
        headers.append(
            name,
            HeaderValue::from_maybe_shared(head.slice(value)).ok()?,
        );
    }
    Some(headers)
}

/// Why an exchange gave no response.
#[derive(Debug)]
pub enum Failed {
    /// No byte of the request reached the connection (it had closed): the
    /// request may go out on another connection.
    Unsent(io::Error),
    /// The request went out (or part of it); the response did not come.
    Exchange(io::Error),
}

/// Reads what `io` has into `buf`, holding no memory while it waits, as
/// nginx frees a keep-alive connection's buffers between requests: a
/// connection that waits (idle in a pool or on a client, or a stream
/// between events) would otherwise keep a read buffer each, and thousands
/// of streams keep thousands.
///
/// An empty buffer whose read would block is let go. An empty buffer
/// without room (its bytes were handed on and still live) is not grown
/// before the read: the read lands on the stack, and the buffer is then
/// made the size of what came. Otherwise the read goes straight into the
/// buffer: an empty one that nothing shares any more starts again at the
/// front of its allocation, so a busy connection keeps reading into the
/// same few cache-warm lines; a partly filled one grows only when little
/// room is left (bytes handed on, a body chunk or header values, share the
/// buffer, and reserving a full chunk while they live would allocate a new
/// one at every read).
pub(crate) fn poll_read_lean<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.is_empty() {
        if !buf.try_reclaim(READ_CHUNK) {
            let mut landing = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut landing);
            ready!(Pin::new(io).poll_read(cx, &mut read))?;
            *buf = BytesMut::from(read.filled());
            return Poll::Ready(Ok(buf.len()));
        }
    } else if buf.capacity() - buf.len() < MIN_ROOM {
        buf.reserve(READ_CHUNK);
    }
    let polled = poll_read_buf(Pin::new(io), cx, buf);
    if polled.is_pending() && buf.is_empty() {
        *buf = BytesMut::new();
    }
    polled
}

/// Room below which a read buffer grows before a read.
const MIN_ROOM: usize = 4 * 1024;

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<Io: AsyncRead + Unpin> Conn<Io> {
    /// Reads what the upstream has sent into the buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_read_lean(&mut self.io, cx, &mut self.buf)
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn<Io> {
    pub fn new(io: Io) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            fields: Vec::new(),
        })
    }

    /// Whether the idle connection can no longer carry a request: the
    /// upstream closed it (or sent bytes nobody asked for). Looks without
    /// waiting: a read that would block means the connection is fine.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // Ready means the end of the stream, an error, or bytes nobody asked for.
        self.poll_fill(&mut cx).is_ready()
    }

    /// Sends the request (`target` in origin form; `fields` with `Host`,
    /// without `Content-Length`, which is written from `body`) and reads the
    /// response head. The body comes after, from the response's body; when
    /// it is done the connection goes to `home` if it can be reused.
    pub async fn send<'f>(
        mut self: Box<Self>,
        method: &Method,
        target: &str,
        fields: impl IntoIterator<Item = (&'f HeaderName, &'f HeaderValue)>,
        body: &Bytes,
        home: Arc<dyn Home<Io>>,
    ) -> Result<Response<ResponseBody<Io>>, Failed> {
        let coalesced = body.len() <= COALESCE_BODY;
        // Made for each request rather than kept: an idle pooled connection
        // (or one carrying a long stream) then holds no copy of a request
        // that may have carried a 16 KB body.
        let mut head = Vec::with_capacity(HEAD_ROOM + if coalesced { body.len() } else { 0 });
        encode_head(&mut head, method, target, fields, body, coalesced);
        // A write refused at once (the upstream had closed the connection)
        // sent nothing of the request.
        let first = self.io.write(&head).await.map_err(Failed::Unsent)?;
        if first == 0 {
            return Err(Failed::Unsent(io::ErrorKind::WriteZero.into()));
        }
        let io = &mut self.io;
        let rest = async {
            io.write_all(&head[first..]).await?;
            if !coalesced {
                io.write_all(body).await?;
            }
            io.flush().await
        };
        if let Err(write_error) = rest.await {
            // An upstream may answer (413, say) and close before it has read
            // a large body: its answer, when there is one, is what counts.
            return match self.read_head(method, home).await {
                Ok(mut response) => {
                    response.body_mut().keep_alive = false;
                    Ok(response)
                }
                Err(_) => Err(Failed::Exchange(write_error)),
            };
        }
        drop(head);
        self.read_head(method, home).await.map_err(Failed::Exchange)
    }

    async fn read_head(
        mut self: Box<Self>,
        method: &Method,
        home: Arc<dyn Home<Io>>,
    ) -> io::Result<Response<ResponseBody<Io>>> {
        loop {
            if !self.buf.is_empty()
                && let Some(parsed) = parse_head(&self.buf, method, &mut self.fields)?
            {
                let head = self.buf.split_to(parsed.len).freeze();
                // Interim answers (100 Continue, 103 Early Hints) are not relayed.
                if parsed.status.is_informational() {
                    self.fields.clear();
                    continue;
                }
                let headers = header_map(&head, &mut self.fields).ok_or_else(|| {
                    invalid("the upstream's response has an invalid header value")
                })?;
                let mut response = Response::new(ResponseBody {
                    conn: Some(self),
                    framing: parsed.framing,
                    keep_alive: parsed.keep_alive,
                    home,
                });
                *response.status_mut() = parsed.status;
                *response.version_mut() = parsed.version;
                *response.headers_mut() = headers;
                return Ok(response);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("the upstream's response head is too large"));
            }
            let read = std::future::poll_fn(|cx| self.poll_fill(cx)).await?;
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the response head",
                ));
            }
        }
    }
}

/// Writes the request head (and a small body) into `out`.
fn encode_head<'f>(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    fields: impl IntoIterator<Item = (&'f HeaderName, &'f HeaderValue)>,
    body: &Bytes,
    with_body: bool,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Methods that define no body go without a length when they have none,
    // as the SDKs send them.
    let bodiless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !body.is_empty() || !bodiless {
        out.extend_from_slice(b"content-length: ");
        push_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if with_body {
        out.extend_from_slice(body);
    }
}

/// Writes `n` in decimal, without the allocation of `to_string`.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

struct ParsedHead {
    len: usize,
    status: StatusCode,
    version: Version,
    framing: Framing,
    keep_alive: bool,
}

/// A complete response head at the start of `buf`, or `None` for more
/// bytes. The fields to relay are left in `fields`.
fn parse_head(buf: &[u8], method: &Method, fields: &mut Fields) -> io::Result<Option<ParsedHead>> {
    // Left uninitialised: the parser fills what it uses.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let len = match parser.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(invalid(
                "the upstream's response has too many header fields",
            ));
        }
        Err(_) => return Err(invalid("the upstream's response head is not valid HTTP/1")),
    };
    let code = parsed.code.unwrap_or_default();
    let status = StatusCode::from_u16(code)
        .map_err(|_| invalid("the upstream's response has an invalid status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(invalid("the upstream switched protocols unasked"));
    }
    let http10 = parsed.version == Some(0);
    let mut keep_alive = !http10;
    let mut content_length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    fields.clear();
    for field in parsed.headers.iter() {
        let name = crate::http::headers::name_from_wire(field.name.as_bytes())
            .map_err(|_| invalid("the upstream's response has an invalid header name"))?;
        if name == CONTENT_LENGTH {
            let n = parse_content_length(field.value)?;
            if content_length.is_some_and(|seen| seen != n) {
                return Err(invalid("the upstream's response has conflicting lengths"));
            }
            content_length = Some(n);
        } else if name == TRANSFER_ENCODING {
            // The last coding decides: chunked, or a body that runs to the close.
            let last = field
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            // The body is decoded here; the relay's own framing goes on.
            continue;
        } else if name == CONNECTION {
            let mut lists_others = false;
            for token in field.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive |= http10;
                } else if !token.is_empty() {
                    lists_others = true;
                }
            }
            // Read here and never relayed, unless it names other headers
            // that the relay must then drop too.
            if !lists_others {
                continue;
            }
        } else if name == KEEP_ALIVE {
            // Hop-by-hop, and only ever an idle-time hint: not relayed.
            continue;
        }
        fields.push((name, place_in(buf, field.value)));
    }
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Done
    } else if let Some(chunked) = chunked {
        // A length beside a transfer coding is a smuggling risk: the
        // coding wins, and the connection is not trusted again.
        if content_length.is_some() || !chunked {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some(ParsedHead {
        len,
        status,
        version: if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        framing,
        keep_alive,
    }))
}

fn parse_content_length(value: &[u8]) -> io::Result<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid(
            "the upstream's response has an invalid content-length",
        ));
    }
    Ok(digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How the rest of a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body's reader stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes still to come.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields (dropped) until an empty line.
    Trailers,
}

enum Step {
    Data(Bytes),
    /// Nothing can be done with the bytes at hand: read more.
    More,
    End,
}

/// Takes from `buf` what the framing allows: data (when `data` is true)
/// or the framing's own bytes (sizes, line ends, trailers).
fn step(framing: &mut Framing, buf: &mut BytesMut, data: bool) -> io::Result<Step> {
    loop {
        match framing {
            Framing::Done => return Ok(Step::End),
            Framing::Length(0) => {
                *framing = Framing::Done;
                return Ok(Step::End);
            }
            Framing::Length(left) => {
                if buf.is_empty() || !data {
                    return Ok(Step::More);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                return Ok(Step::Data(buf.split_to(n as usize).freeze()));
            }
            Framing::UntilClose => {
                if buf.is_empty() || !data {
                    return Ok(Step::More);
                }
                return Ok(Step::Data(buf.split().freeze()));
            }
            Framing::Chunked(chunk) => match *chunk {
                Chunk::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    let size = parse_chunk_size(&line)?;
                    *chunk = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() || !data {
                        return Ok(Step::More);
                    }
                    let n = left.min(buf.len() as u64);
                    *chunk = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                    return Ok(Step::Data(buf.split_to(n as usize).freeze()));
                }
                Chunk::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if !line.is_empty() {
                        return Err(invalid("a chunk of the upstream's body overran its size"));
                    }
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::More);
                    };
                    if line.is_empty() {
                        *framing = Framing::Done;
                        return Ok(Step::End);
                    }
                }
            },
        }
    }
}

/// One line from the front of `buf`, without its line end (CRLF, or a bare
/// LF as lenient parsers take it); `None` until the line is complete.
fn take_line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_LINE {
            return Err(invalid("a line of the upstream's chunked body is too long"));
        }
        return Ok(None);
    };
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// A chunk-size line: hex digits, then perhaps extensions (ignored).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(invalid(
            "the upstream's chunked body has an invalid chunk size",
        ));
    }
    Ok(line[..digits].iter().fold(0u64, |n, d| {
        let value = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n * 16 + u64::from(value)
    }))
}

/// A response body read straight off its connection. Done, the connection
/// goes home if it can carry another request; dropped before, it closes.
pub struct ResponseBody<Io> {
    conn: Option<Box<Conn<Io>>>,
    framing: Framing,
    keep_alive: bool,
    home: Arc<dyn Home<Io>>,
}

impl<Io> ResponseBody<Io> {
    /// The body is complete: the connection goes home when nothing else
    /// came after the body and the upstream keeps it open.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.home.take_back(conn);
        }
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl<Io: AsyncRead + Unpin> Body for ResponseBody<Io> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match step(&mut this.framing, &mut conn.buf, true) {
                Err(error) => return this.fail(error),
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Data(data)) => {
                    // The framing bytes already here may end the body: then
                    // it ends with this frame, and the connection is free now.
                    // A framing error is reported on the next poll.
                    if let Ok(Step::End) = step(&mut this.framing, &mut conn.buf, false) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::More) => match conn.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return this.fail(error),
                    Poll::Ready(Ok(0)) if this.framing == Framing::UntilClose => {
                        this.framing = Framing::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Ok(0)) => {
                        return this.fail(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed the connection before the body was complete",
                        ));
                    }
                    Poll::Ready(Ok(_)) => {}
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_head` and the header map it leaves for the caller to build.
    fn parse(head: &[u8]) -> io::Result<Option<(ParsedHead, HeaderMap)>> {
        let mut fields = Fields::new();
        let Some(parsed) = parse_head(head, &Method::POST, &mut fields)? else {
            return Ok(None);
        };
        let headers = header_map(&Bytes::copy_from_slice(head), &mut fields).expect("valid values");
        Ok(Some((parsed, headers)))
    }
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// Counts the connections that came home.
    #[derive(Default)]
    struct Kennel(Mutex<usize>);

    impl Home<DuplexStream> for Kennel {
        fn take_back(&self, _conn: Box<Conn<DuplexStream>>) {
            *self.0.lock().unwrap() += 1;
        }
    }

    /// Sends a POST over a fresh duplex connection whose far end answers
    /// with `answer`, written in pieces of `piece` bytes; returns what the
    /// far end read, the body's frames (or error), and whether the
    /// connection went home.
    async fn exchange(
        method: Method,
        answer: &'static [u8],
        piece: usize,
    ) -> (String, Result<Vec<Bytes>, io::Error>, bool, u16) {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let home = Arc::new(Kennel::default());
        let server = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let n = far.read(&mut got).await.unwrap();
            for part in answer.chunks(piece) {
                far.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            // Held open: a body delimited by the close ends when it drops.
            (String::from_utf8_lossy(&got[..n]).into_owned(), far)
        });
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("upstream"));
        headers.insert("x-api-key", HeaderValue::from_static("k"));
        let body = Bytes::from_static(b"{\"a\":1}");
        let response = Conn::new(near)
            .send(
                &method,
                "/v1/messages?beta=true",
                &headers,
                &body,
                home.clone(),
            )
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let (sent, far) = server.await.unwrap();
        let closing = answer.windows(5).any(|w| w == b"close") || !answer.contains(&b'\n');
        if closing {
            drop(far);
        } else {
            std::mem::forget(far);
        }
        let mut frames = Vec::new();
        let result = loop {
            match body.frame().await {
                Some(Ok(frame)) => frames.push(frame.into_data().unwrap()),
                Some(Err(e)) => break Err(e),
                None => break Ok(frames),
            }
        };
        let home_count = *home.0.lock().unwrap();
        (sent, result, home_count == 1, status)
    }

    fn joined(frames: &[Bytes]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.iter().copied()).collect()
    }

    #[tokio::test]
    async fn request_head_carries_target_headers_and_length() {
        let (sent, _, _, _) = exchange(
            Method::POST,
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            1024,
        )
        .await;
        assert_eq!(
            sent,
            "POST /v1/messages?beta=true HTTP/1.1\r\nhost: upstream\r\nx-api-key: k\r\n\
             content-length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[tokio::test]
    async fn length_delimited_body_arrives_whole_and_connection_goes_home() {
        for piece in [1, 3, 1024] {
            let (_, frames, home, status) = exchange(
                Method::POST,
                b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nrequest-id: r1\r\n\r\nhello world",
                piece,
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(joined(&frames.unwrap()), b"hello world", "piece {piece}");
            assert!(home, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn chunked_body_is_decoded_and_trailers_dropped() {
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            5;ext=1\r\nevent\r\n1A\r\n: the rest of the stream!!\r\n0\r\nx-trailer: t\r\n\r\n";
        for piece in [1, 2, 7, 4096] {
            let (_, frames, home, _) = exchange(Method::POST, answer, piece).await;
            assert_eq!(
                joined(&frames.unwrap()),
                b"event: the rest of the stream!!",
                "piece {piece}"
            );
            assert!(home, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let (_, frames, _, status) = exchange(
            Method::POST,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            4096,
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(joined(&frames.unwrap()), b"ok");
    }

    #[tokio::test]
    async fn a_body_to_the_close_ends_with_it_and_is_not_reused() {
        let (_, frames, home, _) = exchange(
            Method::POST,
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
            4,
        )
        .await;
        assert_eq!(joined(&frames.unwrap()), b"until the end");
        assert!(!home);
    }

    #[tokio::test]
    async fn head_and_no_content_have_no_body() {
        let (_, frames, home, _) = exchange(
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n",
            4096,
        )
        .await;
        assert!(frames.unwrap().is_empty());
        assert!(home);
        let (_, frames, home, status) =
            exchange(Method::DELETE, b"HTTP/1.1 204 No Content\r\n\r\n", 4096).await;
        assert_eq!(status, 204);
        assert!(frames.unwrap().is_empty());
        assert!(home);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
        let (_, frames, home, _) = exchange(
            Method::POST,
            b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\nconnection: close\r\n\r\nonly this",
            4096,
        )
        .await;
        let error = frames.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!home);
    }

    #[tokio::test]
    async fn bad_framing_is_an_error() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        ] {
            let (_, frames, home, _) = exchange(Method::POST, answer, 4096).await;
            assert_eq!(
                frames.unwrap_err().kind(),
                io::ErrorKind::InvalidData,
                "{}",
                String::from_utf8_lossy(answer)
            );
            assert!(!home);
        }
    }

    #[test]
    fn heads_that_are_not_http_or_disagree_on_length_are_refused() {
        for head in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad\x01name: x\r\n\r\n",
        ] {
            assert!(parse(head).is_err(), "{}", String::from_utf8_lossy(head));
        }
        // A length beside chunked: the coding wins, the connection is not kept.
        let parsed =
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(parsed.0.framing, Framing::Chunked(Chunk::Size));
        assert!(!parsed.0.keep_alive);
        // HTTP/1.0 keeps the connection only when asked to.
        let parsed = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!parsed.0.keep_alive);
        assert_eq!(parsed.0.version, Version::HTTP_10);
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
    }

    #[test]
    fn hop_by_hop_fields_are_read_and_not_relayed() {
        let parsed = parse(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
              transfer-encoding: chunked\r\nrequest-id: r\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.1.len(), 1, "{:?}", parsed.1);
        assert_eq!(parsed.1["request-id"], "r");
        assert!(parsed.0.keep_alive);
        // A Connection naming other fields stays, so that they are dropped too.
        let parsed = parse(
            b"HTTP/1.1 200 OK\r\nconnection: close, x-hop\r\nx-hop: 1\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.1["connection"], "close, x-hop");
        assert!(!parsed.0.keep_alive);
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_seen_and_a_live_one_is_not() {
        let (near, far) = tokio::io::duplex(1024);
        let mut conn = Conn::new(near);
        assert!(!conn.is_closed());
        drop(far);
        assert!(conn.is_closed());
    }

    #[tokio::test]
    async fn a_request_to_a_closed_connection_comes_back_unsent() {
        let (near, far) = tokio::io::duplex(1024);
        drop(far);
        let home: Arc<dyn Home<DuplexStream>> = Arc::new(Kennel::default());
        let failed = Conn::new(near)
            .send(
                &Method::POST,
                "/",
                &HeaderMap::new(),
                &Bytes::from_static(b"x"),
                home,
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(failed, Failed::Unsent(_)), "{failed:?}");
    }

    #[tokio::test]
    async fn a_read_that_waits_holds_no_buffer() {
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let mut cx = Context::from_waker(Waker::noop());
        let mut buf = BytesMut::new();
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_pending());
        assert_eq!(buf.capacity(), 0);
        // What comes is read into a buffer of its size.
        far.write_all(b"data: one\n\n").await.unwrap();
        let Poll::Ready(Ok(11)) = poll_read_lean(&mut near, &mut cx, &mut buf) else {
            panic!("not read");
        };
        assert_eq!(&buf[..], b"data: one\n\n");
        assert!(buf.capacity() < 64, "{}", buf.capacity());
        // Handed on and still alive, then a wait: the buffer is let go.
        let event = buf.split().freeze();
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_pending());
        assert_eq!(buf.capacity(), 0);
        // Part of a head is kept across a wait, and grown to read the rest.
        far.write_all(b"HTTP/1.1 200").await.unwrap();
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_ready());
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_pending());
        assert_eq!(&buf[..], b"HTTP/1.1 200");
        far.write_all(b" OK\r\n").await.unwrap();
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_ready());
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n");
        // A busy connection whose bytes were all used reads into the same
        // allocation again, without a copy through the stack.
        let at = buf.as_ptr();
        buf.clear();
        far.write_all(b"more").await.unwrap();
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_ready());
        assert_eq!(&buf[..], b"more");
        assert_eq!(buf.as_ptr(), at);
        assert_eq!(&event[..], b"data: one\n\n");
        // Used up with room to spare, then a wait: let go all the same.
        let more = buf.split().freeze();
        assert!(buf.capacity() > 0);
        assert!(poll_read_lean(&mut near, &mut cx, &mut buf).is_pending());
        assert_eq!(buf.capacity(), 0);
        assert_eq!(&more[..], b"more");
        // More than the landing holds comes in more than one read.
        let big = vec![b'x'; READ_CHUNK + 100];
        buf.clear();
        far.write_all(&big).await.unwrap();
        let mut got = 0;
        while let Poll::Ready(Ok(n)) = poll_read_lean(&mut near, &mut cx, &mut buf) {
            got += n;
            if got == big.len() {
                break;
            }
        }
        assert_eq!(&buf[..], &big[..]);
        drop(far);
        buf.clear();
        assert!(matches!(
            poll_read_lean(&mut near, &mut cx, &mut buf),
            Poll::Ready(Ok(0))
        ));
    }

    #[tokio::test]
    async fn a_stream_between_events_holds_no_buffer() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let home: Arc<dyn Home<DuplexStream>> = Arc::new(Kennel::default());
        let answering = tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let _ = far.read(&mut request).await.unwrap();
            far.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\n6\r\nping\n\n\r\n",
            )
            .await
            .unwrap();
            far
        });
        let mut response = Conn::new(near)
            .send(
                &Method::POST,
                "/v1/messages",
                &HeaderMap::new(),
                &Bytes::from_static(b"{}"),
                home,
            )
            .await
            .map_err(|_| "no response")
            .unwrap();
        let mut far = answering.await.unwrap();
        let event = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(event.into_data().unwrap(), "ping\n\n");
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            Pin::new(response.body_mut())
                .poll_frame(&mut cx)
                .is_pending()
        );
        let conn = response.body().conn.as_ref().unwrap();
        assert_eq!(conn.buf.capacity(), 0);
        far.write_all(b"6\r\npong\n\n\r\n0\r\n\r\n").await.unwrap();
        let event = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(event.into_data().unwrap(), "pong\n\n");
        assert!(response.body_mut().frame().await.is_none());
    }
}
