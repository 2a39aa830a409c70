//! Content codings of upstream answers, decoded on the side.
//!
//! The official SDKs ask for `gzip, deflate` (and `br`, `zstd`), and the
//! Claude API compresses JSON answers and event streams alike. The client
//! gets the compressed bytes as sent; what reads an answer (usage, quotas,
//! the cache) decodes a copy here, chunk by chunk, with the decoder's state
//! kept across chunks, so a stream flushed per event is read per event.
//! Output comes in pieces of at most [`PIECE`] bytes and the reader can stop
//! it at any piece: nothing here grows with what a body expands to.

use std::cell::RefCell;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Decompress, FlushDecompress, Status};
use http::HeaderValue;

/// Decoded bytes handed to the reader at a time.
const PIECE: usize = 16 * 1024;
/// The largest zstd window accepted: 8 MB, the limit RFC 9659 sets for
/// `Content-Encoding: zstd` (libzstd would otherwise allocate up to 128 MB).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Inflaters kept per thread for the next body.
const SPARE_INFLATERS: usize = 16;

thread_local! {
    /// Where decoders write; decoding never spans an await, so one per thread.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; PIECE].into_boxed_slice());
    /// Inflaters whose body is done, reset: a new one allocates its 32 KB
    /// window on first use, past the allocator's thread cache, which cost
    /// more than decoding a 1 KB answer.
    static SPARES: RefCell<Vec<(Flavor, Box<Decompress>)>> = const { RefCell::new(Vec::new()) };
}

/// The framing an inflater reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Gzip,
    Zlib,
    Raw,
}

/// An inflater for `flavor`, reset from this thread's spares if it has one.
fn inflater(flavor: Flavor) -> Box<Decompress> {
    let spare = SPARES
        .try_with(|spares| {
            let mut spares = spares.borrow_mut();
            let at = spares.iter().position(|(f, _)| *f == flavor)?;
            Some(spares.swap_remove(at).1)
        })
        .ok()
        .flatten();
    spare.unwrap_or_else(|| {
        Box::new(match flavor {
            Flavor::Gzip => Decompress::new_gzip(15),
            Flavor::Zlib => Decompress::new(true),
            Flavor::Raw => Decompress::new(false),
        })
    })
}

/// Keeps an inflater for the next body of its flavor.
fn spare(flavor: Flavor, mut inflate: Box<Decompress>) {
    // A gzip inflater resets to gzip: it keeps its window bits (31).
    inflate.reset(flavor != Flavor::Raw);
    let _ = SPARES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARE_INFLATERS {
            spares.push((flavor, inflate));
        }
    });
}

/// A content coding the relay can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// zlib-wrapped as HTTP says; raw deflate, which some servers send, too.
    Deflate,
    Brotli,
    Zstd,
}

/// What a response's `Content-Encoding` says about reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoded {
    /// No coding (or `identity`): the bytes are the answer.
    Identity,
    Coded(Coding),
    /// A coding the relay cannot read, or several stacked.
    Unsupported,
}

impl Coding {
    /// The metric label of the coding.
    pub fn label(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }

    /// A coding by its HTTP name (case-insensitive; `x-gzip` is gzip).
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        [
            ("gzip", Self::Gzip),
            ("x-gzip", Self::Gzip),
            ("deflate", Self::Deflate),
            ("br", Self::Brotli),
            ("zstd", Self::Zstd),
        ]
        .into_iter()
        .find_map(|(known, coding)| name.eq_ignore_ascii_case(known).then_some(coding))
    }
}

impl Encoded {
    /// Reads a response's `Content-Encoding`.
    pub fn of(content_encoding: Option<&HeaderValue>) -> Self {
        let Some(value) = content_encoding else {
            return Self::Identity;
        };
        let Ok(value) = value.to_str() else {
            return Self::Unsupported;
        };
        // Codings listed in the order applied; identity adds nothing.
        let mut codings = value
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        match (codings.next(), codings.next()) {
            (None, _) => Self::Identity,
            (Some(name), None) => Coding::from_name(name).map_or(Self::Unsupported, Self::Coded),
            (Some(_), Some(_)) => Self::Unsupported,
        }
    }
}

/// Whether a request's `Accept-Encoding` lets it have an uncoded answer:
/// yes unless it says `identity;q=0`, or `*;q=0` without naming identity
/// (RFC 9110, 12.5.3). No header, or an empty one, is a yes.
pub fn accepts_identity(headers: &http::HeaderMap) -> bool {
    let mut identity = None;
    let mut any = None;
    for value in headers.get_all(http::header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|param| {
                param
                    .trim()
                    .strip_prefix("q=")
                    .or_else(|| param.trim().strip_prefix("Q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if coding.eq_ignore_ascii_case("identity") {
                identity = Some(!refused);
            } else if coding == "*" {
                any = Some(!refused);
            }
        }
    }
    identity.or(any).unwrap_or(true)
}

/// Why a body did not decode. Static text: the bytes are never quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub &'static str);

/// Whether the reader wants more output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    More,
    Stop,
}

/// Where a decoder stands after a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything given was decoded; more input may follow.
    NeedsInput,
    /// The compressed stream ended (a gzip trailer checked, a zstd frame
    /// closed): the body is whole. Bytes after it are ignored.
    Ended,
    /// The reader said stop.
    Stopped,
}

/// A streaming decoder of one body.
pub struct Decoder {
    state: State,
    /// The compressed stream has ended (for zstd: its last frame so far).
    ended: bool,
}

enum State {
    Gzip(Box<Decompress>),
    /// Zlib or raw deflate, told apart by the first two bytes (the first
    /// one is held while it is alone).
    DeflateStart(Option<u8>),
    Deflate(Flavor, Box<Decompress>),
    Brotli(Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
    /// Another frame may follow a closed one.
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
    /// The decoder's memory is given back once its stream has ended.
    Done,
}

impl Decoder {
    pub fn new(coding: Coding) -> Result<Self, DecodeError> {
        let state = match coding {
            Coding::Gzip => State::Gzip(inflater(Flavor::Gzip)),
            Coding::Deflate => State::DeflateStart(None),
            Coding::Brotli => State::Brotli(Box::new(BrotliState::new(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
            Coding::Zstd => {
                let unset = |_| DecodeError("the zstd decoder could not be set up");
                let mut decoder = zstd::stream::raw::Decoder::new().map_err(unset)?;
                decoder
                    .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                        ZSTD_WINDOW_LOG_MAX,
                    ))
                    .map_err(unset)?;
                State::Zstd(Box::new(decoder))
            }
        };
        Ok(Self {
            state,
            ended: false,
        })
    }

    /// Whether the compressed stream has ended: the decoded body is whole.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Decodes a chunk, handing the output to `out` piece by piece.
    pub fn decode(
        &mut self,
        input: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Flow,
    ) -> Result<Progress, DecodeError> {
        SCRATCH.with_borrow_mut(|scratch| {
            let progress = self.decode_into(input, scratch, out)?;
            self.ended = progress == Progress::Ended;
            if self.ended && !matches!(self.state, State::Zstd(_)) {
                self.give_back();
            }
            Ok(progress)
        })
    }

    fn decode_into(
        &mut self,
        mut input: &[u8],
        scratch: &mut [u8],
        out: &mut dyn FnMut(&[u8]) -> Flow,
    ) -> Result<Progress, DecodeError> {
        match &mut self.state {
            // Bytes after the end are not part of the body.
            State::Done => Ok(Progress::Ended),
            State::DeflateStart(held) => {
                let (first, second) = match (*held, input) {
                    (_, []) => return Ok(Progress::NeedsInput),
                    (None, [only]) => {
                        *held = Some(*only);
                        return Ok(Progress::NeedsInput);
                    }
                    (None, [first, second, ..]) => (*first, *second),
                    (Some(first), [second, ..]) => (first, *second),
                };
                let held = held.take();
                let flavor = if zlib_header(first, second) {
                    Flavor::Zlib
                } else {
                    Flavor::Raw
                };
                self.state = State::Deflate(flavor, inflater(flavor));
                if let Some(first) = held {
                    let progress = self.decode_into(&[first], scratch, out)?;
                    if progress != Progress::NeedsInput {
                        return Ok(progress);
                    }
                }
                self.decode_into(input, scratch, out)
            }
            State::Deflate(_, inflate) => inflate_chunk(inflate, input, scratch, out),
            State::Gzip(inflate) => loop {
                let before = inflate.total_in();
                let progress = inflate_chunk(inflate, input, scratch, out)?;
                input = &input[(inflate.total_in() - before) as usize..];
                // Another member may follow (gzip allows several); other
                // bytes after the end are not part of the body.
                if progress == Progress::Ended && input.first() == Some(&0x1f) {
                    inflate.reset(true);
                    continue;
                }
                break Ok(progress);
            },
            State::Brotli(state) => brotli_chunk(state, input, scratch, out),
            State::Zstd(decoder) => zstd_chunk(decoder, input, scratch, out),
        }
    }
}

impl Decoder {
    /// Ends decoding; an inflater goes back to this thread's spares.
    fn give_back(&mut self) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Gzip(inflate) => spare(Flavor::Gzip, inflate),
            State::Deflate(flavor, inflate) => spare(flavor, inflate),
            _ => {}
        }
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// RFC 1950: the method is deflate, the window at most 32 KB, and the two
/// bytes a multiple of 31. Raw deflate rarely starts that way.
pub fn zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

fn inflate_chunk(
    inflate: &mut Decompress,
    mut input: &[u8],
    scratch: &mut [u8],
    out: &mut dyn FnMut(&[u8]) -> Flow,
) -> Result<Progress, DecodeError> {
    loop {
        let (in_before, out_before) = (inflate.total_in(), inflate.total_out());
        let status = inflate
            .decompress(input, scratch, FlushDecompress::None)
            .map_err(|_| DecodeError("the compressed data is corrupt"))?;
        let consumed = (inflate.total_in() - in_before) as usize;
        let produced = (inflate.total_out() - out_before) as usize;
        input = &input[consumed..];
        if produced > 0 && out(&scratch[..produced]) == Flow::Stop {
            return Ok(Progress::Stopped);
        }
        match status {
            Status::StreamEnd => return Ok(Progress::Ended),
            // Room left in the output: everything at hand is decoded.
            _ if produced < scratch.len() && input.is_empty() => {
                return Ok(Progress::NeedsInput);
            }
            _ if produced == 0 && consumed == 0 => return Ok(Progress::NeedsInput),
            _ => {}
        }
    }
}

fn brotli_chunk(
    state: &mut BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    input: &[u8],
    scratch: &mut [u8],
    out: &mut dyn FnMut(&[u8]) -> Flow,
) -> Result<Progress, DecodeError> {
    let mut available_in = input.len();
    let mut input_offset = 0;
    loop {
        let mut available_out = scratch.len();
        let mut output_offset = 0;
        let mut total_out = 0;
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            scratch,
            &mut total_out,
            state,
        );
        if output_offset > 0 && out(&scratch[..output_offset]) == Flow::Stop {
            return Ok(Progress::Stopped);
        }
        match result {
            BrotliResult::ResultSuccess => return Ok(Progress::Ended),
            BrotliResult::NeedsMoreInput => return Ok(Progress::NeedsInput),
            BrotliResult::NeedsMoreOutput => {}
            BrotliResult::ResultFailure => {
                return Err(DecodeError("the brotli data is corrupt"));
            }
        }
    }
}

fn zstd_chunk(
    decoder: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    scratch: &mut [u8],
    out: &mut dyn FnMut(&[u8]) -> Flow,
) -> Result<Progress, DecodeError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut source = InBuffer::around(input);
    loop {
        let mut sink = OutBuffer::around(&mut *scratch);
        // NB: libzstd's messages name the problem, never the data.
        let hint = decoder
            .run(&mut source, &mut sink)
            .map_err(|_| DecodeError("the zstd data is corrupt or needs a window over 8 MB"))?;
        let produced = sink.pos();
        if produced > 0 && out(&scratch[..produced]) == Flow::Stop {
            return Ok(Progress::Stopped);
        }
        let all_in = source.pos() == input.len();
        if hint == 0 && all_in {
            // A frame closed and flushed, and nothing follows it.
            return Ok(Progress::Ended);
        }
        if all_in && produced < scratch.len() {
            return Ok(Progress::NeedsInput);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_relay_testkit::compress::{self, CODINGS, StreamEncoder};

    fn sample() -> Vec<u8> {
        let mut text = Vec::new();
        for i in 0..2000 {
            text.extend(format!("event: ping\ndata: {{\"type\":\"ping\",\"n\":{i}}}\n\n").bytes());
        }
        text
    }

    fn coding(name: &str) -> Coding {
        Coding::from_name(compress::label(name)).unwrap()
    }

    fn decode_all(coding: Coding, body: &[u8], chunk: usize) -> (Vec<u8>, Progress) {
        let mut decoder = Decoder::new(coding).unwrap();
        let mut decoded = Vec::new();
        let mut last = Progress::NeedsInput;
        for piece in body.chunks(chunk) {
            last = decoder
                .decode(piece, &mut |bytes| {
                    decoded.extend_from_slice(bytes);
                    Flow::More
                })
                .unwrap();
        }
        (decoded, last)
    }

    #[test]
    fn every_coding_decodes_whatever_the_chunking() {
        let data = sample();
        for name in CODINGS {
            let body = compress::encode(name, &data);
            for chunk in [1, 2, 3, 100, body.len()] {
                let (decoded, last) = decode_all(coding(name), &body, chunk);
                assert!(decoded == data, "{name} in chunks of {chunk}");
                assert_eq!(last, Progress::Ended, "{name} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn a_stream_flushed_per_event_decodes_per_event() {
        for name in CODINGS {
            let mut encoder = StreamEncoder::new(name).unwrap();
            let mut decoder = Decoder::new(coding(name)).unwrap();
            for i in 0..20 {
                let event = format!("event: ping\ndata: {{\"n\":{i}}}\n\n");
                let mut decoded = Vec::new();
                let progress = decoder
                    .decode(&encoder.chunk(event.as_bytes()), &mut |bytes| {
                        decoded.extend_from_slice(bytes);
                        Flow::More
                    })
                    .unwrap();
                assert_eq!(progress, Progress::NeedsInput, "{name}");
                assert_eq!(
                    decoded,
                    event.as_bytes(),
                    "{name}: event {i} whole on arrival"
                );
                assert!(!decoder.ended());
            }
            let progress = decoder
                .decode(&encoder.finish(), &mut |bytes| {
                    assert!(bytes.is_empty(), "{name}: nothing after the last event");
                    Flow::More
                })
                .unwrap();
            assert_eq!(progress, Progress::Ended, "{name}");
            assert!(decoder.ended());
        }
    }

    #[test]
    fn two_gzip_members_are_one_body() {
        let mut body = compress::encode("gzip", b"first half, ").to_vec();
        body.extend(compress::encode("gzip", b"second half"));
        let (decoded, last) = decode_all(Coding::Gzip, &body, body.len());
        assert_eq!(decoded, b"first half, second half");
        assert_eq!(last, Progress::Ended);
    }

    #[test]
    fn a_reader_stops_the_output_at_any_piece() {
        for name in CODINGS {
            let zeros = compress::encode(name, &vec![0u8; 10 * 1024 * 1024]);
            assert!(zeros.len() < 64 * 1024, "{name}: {}", zeros.len());
            let mut decoder = Decoder::new(coding(name)).unwrap();
            let mut seen = 0;
            let progress = decoder
                .decode(&zeros, &mut |bytes| {
                    assert!(bytes.len() <= PIECE);
                    seen += bytes.len();
                    if seen >= 100_000 {
                        Flow::Stop
                    } else {
                        Flow::More
                    }
                })
                .unwrap();
            assert_eq!(progress, Progress::Stopped, "{name}");
            assert!(seen < 100_000 + PIECE, "{name}");
        }
    }

    #[test]
    fn corrupt_data_is_an_error_without_the_bytes() {
        for name in CODINGS {
            let mut body = compress::encode(name, &sample()).to_vec();
            for byte in &mut body[8..40] {
                *byte ^= 0x5a;
            }
            let mut decoder = Decoder::new(coding(name)).unwrap();
            let error = decoder.decode(&body, &mut |_| Flow::More).expect_err(name);
            assert!(error.0.contains("corrupt"), "{name}: {error}");
        }
    }

    #[test]
    fn inflaters_are_reused_clean_after_any_end() {
        let data = sample();
        for name in ["gzip", "deflate", "deflate-raw"] {
            let body = compress::encode(name, &data);
            // Broken off midway, corrupt, then whole: each on a reused inflater.
            let mut cut = Decoder::new(coding(name)).unwrap();
            cut.decode(&body[..body.len() / 2], &mut |_| Flow::More)
                .unwrap();
            drop(cut);
            let mut corrupt = body.to_vec();
            for byte in &mut corrupt[8..40] {
                *byte ^= 0x5a;
            }
            let mut bad = Decoder::new(coding(name)).unwrap();
            assert!(bad.decode(&corrupt, &mut |_| Flow::More).is_err());
            drop(bad);
            for _ in 0..3 {
                let (decoded, last) = decode_all(coding(name), &body, 1000);
                assert!(decoded == data, "{name}");
                assert_eq!(last, Progress::Ended, "{name}");
            }
        }
        assert!(SPARES.with_borrow(|spares| spares.len()) <= SPARE_INFLATERS);
    }

    #[test]
    fn identity_is_acceptable_unless_refused() {
        let accepts = |values: &[&'static str]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append("accept-encoding", HeaderValue::from_static(v));
            }
            accepts_identity(&headers)
        };
        assert!(accepts(&[]));
        assert!(accepts(&[""]));
        assert!(accepts(&["gzip, deflate"]));
        assert!(accepts(&["gzip, deflate, br, zstd"]));
        assert!(accepts(&["gzip;q=1.0, identity; q=0.5, *;q=0"]));
        assert!(!accepts(&["gzip, identity;q=0"]));
        assert!(!accepts(&["gzip", "Identity; Q=0.000"]));
        assert!(!accepts(&["gzip, *;q=0"]));
        assert!(accepts(&["*"]));
    }

    #[test]
    fn content_encoding_values() {
        let of = |v: &'static str| Encoded::of(Some(&HeaderValue::from_static(v)));
        assert_eq!(Encoded::of(None), Encoded::Identity);
        assert_eq!(of("identity"), Encoded::Identity);
        assert_eq!(of("GZIP"), Encoded::Coded(Coding::Gzip));
        assert_eq!(of(" br "), Encoded::Coded(Coding::Brotli));
        assert_eq!(of("zstd"), Encoded::Coded(Coding::Zstd));
        assert_eq!(of("deflate"), Encoded::Coded(Coding::Deflate));
        assert_eq!(of("compress"), Encoded::Unsupported);
        assert_eq!(of("gzip, br"), Encoded::Unsupported);
    }
}
