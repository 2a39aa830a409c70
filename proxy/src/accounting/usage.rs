//! Usage accounting and quotas.
//!
//! [`UsageTap`] reads the usage the upstream reports as the response passes:
//! on a stream, the `usage` of `message_start` and of every (cumulative)
//! `message_delta`, parsed from those lines only, each chunk once it has
//! been handed on unchanged (so reading never delays an event); on a JSON
//! answer, the body's chunks are kept by reference and `model` and `usage`
//! read where the API puts them once the response is over, off the
//! response path. A compressed answer (`Content-Encoding`) is decoded on
//! the side first ([`crate::http::encoding`]), up to a cap on the decoded bytes,
//! each chunk once the writer has had its turn to send it, the last one
//! when the body is dropped; the client's bytes are never touched.
//!
//! [`Meter`] rides on the request's [`crate::accounting::access::Exchange`]. Its
//! concurrency slot goes back as the answer ends, before the client sees
//! the end ([`Meter::release_slot`]), so that a client's next request never
//! meets its own last one. When the exchange ends (complete, cut off or
//! abandoned) what was reported is priced ([`crate::pricing`]: an unpriced
//! model is counted, never guessed), counted in metrics and put in an
//! outbox. Every 100 ms the outbox is written to the store, one script per
//! client for all its finished requests: tokens and dollars charged to its
//! budgets, usage and cost added to its day's counters. No request waits for it; a store that is
//! down gets it when it is back.
//!
//! [`Accounting`] outlives reloads: the slots in flight (their leases are
//! renewed in the background), the state of a store outage, and the local
//! budgets quotas fall back to once the outage outlasts its grace.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::time::Instant;

use crate::accounting::pricing::Pricing;
use crate::base::metrics::{
    CostCounter, CostLabels, FastMap, Metrics, ModelLabels, Name, TokenLabels,
};
use crate::http::encoding::{Coding, DecodeError, Decoder, Encoded, Flow, Progress};
use crate::store::{
    AnyStore, Charges, MemoryStore, QuotaAsk, QuotaDecision, Settlement, Store, StoreError, Usage,
    unix_ms,
};

/// How long a concurrency slot is held without renewal: a replica that dies
/// with requests in flight frees their slots within this.
pub const SLOT_LEASE: Duration = Duration::from_secs(60);
/// How often the leases of slots in use are renewed.
const RENEW_EVERY: Duration = Duration::from_secs(20);
/// How often finished requests are written to the store (one call per
/// client): the delay before a budget sees a response's tokens.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Slot releases kept for retry while the store is down (their leases lapse anyway).
const MAX_RETRIED_RELEASES: usize = 10_000;
/// The largest JSON answer whose usage is read (a Messages answer is far smaller).
const JSON_CAP: usize = 16 * 1024 * 1024;
/// The most of a compressed JSON answer decoded and kept (a Messages answer
/// of 128k output tokens is about 1 MB): what a compression bomb can cost.
pub const DECODED_JSON_CAP: usize = 4 * 1024 * 1024;
/// The most of a compressed event stream decoded: only the current line is
/// kept, so this bounds the CPU a bomb costs, far above a long stream.
pub const DECODED_STREAM_CAP: usize = 64 * 1024 * 1024;
/// A stream line longer than this cannot be a usage event; it is skipped.
const SSE_LINE_CAP: usize = 64 * 1024;
/// Distinct model label values before new ones are counted as `other`.
const MODEL_LABELS: usize = 64;
/// How often an unpriced model's answers are logged (each is counted).
const UNPRICED_WARN_EVERY: Duration = Duration::from_secs(60);

/// The `usage` object of the Messages API; absent fields stay as they were.
#[derive(Debug, Default, Deserialize)]
struct ReportedUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

/// `usage.cache_creation`: the cache writes by lifetime.
#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

impl ReportedUsage {
    fn apply_to(&self, usage: &mut Usage) {
        if let Some(n) = self
            .cache_creation
            .as_ref()
            .and_then(|c| c.ephemeral_1h_input_tokens)
        {
            usage.cache_creation_1h_input_tokens = n;
        }
        let fields = [
            (self.input_tokens, &mut usage.input_tokens),
            (self.output_tokens, &mut usage.output_tokens),
            (
                self.cache_creation_input_tokens,
                &mut usage.cache_creation_input_tokens,
            ),
            (
                self.cache_read_input_tokens,
                &mut usage.cache_read_input_tokens,
            ),
        ];
        for (reported, kept) in fields {
            if let Some(n) = reported {
                *kept = n;
            }
        }
    }
}

/// A Messages answer, or the `message` of `message_start`: only what
/// accounting needs; serde skips the rest without building it.
#[derive(Debug, Default, Deserialize)]
struct MessageUsage {
    id: Option<String>,
    model: Option<String>,
    usage: Option<ReportedUsage>,
}

#[derive(Debug, Deserialize)]
struct StreamEvent<'a> {
    /// Borrowed from the line: no allocation for the events of every stream.
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    message: Option<MessageUsage>,
    usage: Option<ReportedUsage>,
}

/// What a response reported, so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    pub model: Option<String>,
    /// The message id (`msg_...`), for traces.
    pub id: Option<String>,
    pub usage: Usage,
    /// Whether any usage was seen at all.
    pub seen: bool,
}

/// Reads usage out of a response body as it passes.
pub enum UsageTap {
    Sse(SseUsage),
    Json(JsonChunks),
    /// A compressed answer, decoded on the side.
    Decoded(Box<DecodedTap>),
    /// An answer in a coding the relay cannot read: no usage.
    Unreadable,
}

impl UsageTap {
    pub fn sse() -> Self {
        Self::Sse(SseUsage::default())
    }

    pub fn json() -> Self {
        Self::Json(JsonChunks::default())
    }

    /// The tap of an answer: an event stream or JSON, as its
    /// `Content-Encoding` has it.
    pub fn for_answer(sse: bool, content_encoding: Option<&http::HeaderValue>) -> Self {
        match Encoded::of(content_encoding) {
            Encoded::Identity if sse => Self::sse(),
            Encoded::Identity => Self::json(),
            Encoded::Coded(coding) => {
                let cap = if sse {
                    DECODED_STREAM_CAP
                } else {
                    DECODED_JSON_CAP
                };
                Self::Decoded(Box::new(DecodedTap::new(coding, sse, cap)))
            }
            Encoded::Unsupported => Self::Unreadable,
        }
    }

    /// Whether chunks are decoded before they are read (the body then
    /// waits for the writer to have its chance before feeding a chunk).
    pub fn decodes(&self) -> bool {
        matches!(self, Self::Decoded(_))
    }

    /// Looks at one chunk of the body on its way to the client.
    pub fn feed(&mut self, chunk: &Bytes) {
        match self {
            Self::Sse(sse) => sse.feed(chunk),
            Self::Json(json) => json.feed(chunk),
            Self::Decoded(decoded) => decoded.feed(chunk),
            Self::Unreadable => {}
        }
    }

    /// The whole body when it was kept (JSON, within the cap; a compressed
    /// one decoded, and only when its compressed stream ended).
    pub fn body(&self) -> Option<Bytes> {
        match self {
            Self::Sse(_) | Self::Unreadable => None,
            Self::Json(json) => json.whole(),
            Self::Decoded(decoded) => match &decoded.reader {
                DecodedReader::Json { whole, .. } => whole.clone(),
                DecodedReader::Sse(_) => None,
            },
        }
    }

    /// What the body reported; parses a JSON body (call off the response path).
    pub fn reported(&self) -> Reported {
        match self {
            Self::Sse(sse) => sse.reported.clone(),
            Self::Json(json) => json
                .whole()
                .map_or_else(Reported::default, |body| json_reported(&body)),
            Self::Decoded(decoded) => match &decoded.reader {
                DecodedReader::Sse(sse) => sse.reported.clone(),
                DecodedReader::Json { whole, .. } => whole
                    .as_deref()
                    .map_or_else(Reported::default, json_reported),
            },
            Self::Unreadable => Reported::default(),
        }
    }

    /// How decoding went, for a compressed answer: its coding's label and
    /// a result (`decoded`, `capped`, `error`, `unsupported`), with the
    /// error if there was one.
    pub fn decode_result(&self) -> Option<(&'static str, &'static str, Option<DecodeError>)> {
        match self {
            Self::Sse(_) | Self::Json(_) => None,
            Self::Unreadable => Some(("other", "unsupported", None)),
            Self::Decoded(decoded) => Some(match decoded.reading {
                Reading::On => (decoded.coding.label(), "decoded", None),
                Reading::Capped => (decoded.coding.label(), "capped", None),
                Reading::Failed(error) => (decoded.coding.label(), "error", Some(error)),
            }),
        }
    }
}

fn json_reported(body: &[u8]) -> Reported {
    message_usage(body)
        .map(|message| {
            let mut reported = Reported {
                model: message.model,
                id: message.id,
                ..Reported::default()
            };
            if let Some(usage) = message.usage {
                usage.apply_to(&mut reported.usage);
                reported.seen = true;
            }
            reported
        })
        .unwrap_or_default()
}

/// A compressed answer read through its decoder: an event stream line by
/// line as it decodes, a JSON answer kept decoded, both up to a cap on the
/// decoded bytes (a compression bomb stops there).
pub struct DecodedTap {
    coding: Coding,
    /// Made at the first chunk, after the response head is on its way;
    /// dropped (its window freed) once reading stops.
    decoder: Option<Decoder>,
    reader: DecodedReader,
    /// Decoded bytes read so far, and the most that will be.
    decoded: usize,
    cap: usize,
    reading: Reading,
}

enum DecodedReader {
    Sse(SseUsage),
    Json {
        buffer: Vec<u8>,
        /// The decoded body, once its compressed stream ended.
        whole: Option<Bytes>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    On,
    Capped,
    Failed(DecodeError),
}

impl DecodedTap {
    fn new(coding: Coding, sse: bool, cap: usize) -> Self {
        Self {
            coding,
            decoder: None,
            reader: if sse {
                DecodedReader::Sse(SseUsage::default())
            } else {
                DecodedReader::Json {
                    buffer: Vec::new(),
                    whole: None,
                }
            },
            decoded: 0,
            cap,
            reading: Reading::On,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        if self.reading != Reading::On {
            return;
        }
        let decoder = match &mut self.decoder {
            Some(decoder) => decoder,
            None => match Decoder::new(self.coding) {
                Ok(decoder) => self.decoder.insert(decoder),
                Err(error) => {
                    self.reading = Reading::Failed(error);
                    return;
                }
            },
        };
        let (reader, decoded, cap) = (&mut self.reader, &mut self.decoded, self.cap);
        let mut capped = false;
        let result = decoder.decode(chunk, &mut |piece| {
            let take = piece.len().min(cap - *decoded);
            *decoded += take;
            match reader {
                DecodedReader::Sse(sse) => sse.feed(&piece[..take]),
                DecodedReader::Json { buffer, whole } => {
                    // A zstd frame after one that closed: the body goes on.
                    if let Some(ended) = whole.take() {
                        *buffer = Vec::from(ended);
                    }
                    buffer.extend_from_slice(&piece[..take]);
                }
            }
            capped = take < piece.len();
            if capped { Flow::Stop } else { Flow::More }
        });
        let stop = match result {
            _ if capped => Reading::Capped,
            Err(error) => Reading::Failed(error),
            Ok(Progress::Ended) => {
                if let DecodedReader::Json { buffer, whole } = &mut self.reader {
                    *whole = Some(Bytes::from(std::mem::take(buffer)));
                }
                return;
            }
            Ok(_) => return,
        };
        self.reading = stop;
        self.decoder = None;
        if let DecodedReader::Json { buffer, .. } = &mut self.reader {
            // Part of a JSON answer tells nothing.
            *buffer = Vec::new();
        }
    }
}

/// The usage events of a stream, found line by line. Only the current
/// unfinished line is kept, and only while it may be a usage event.
/// The `model` and `usage` of a Messages response. The API writes `model`
/// among the first members, after plain strings (`id`, `type`, `role`), and
/// `usage` last, so both are read where they stand and the content between
/// them is not parsed: a third of the relay's work per request went to
/// parsing it. A body laid out otherwise is parsed whole.
fn message_usage(body: &[u8]) -> Option<MessageUsage> {
    if let (Some(usage), Some(model)) = (trailing_usage(body), leading_member(body, b"model")) {
        return Some(MessageUsage {
            id: leading_member(body, b"id"),
            model: Some(model),
            usage: Some(usage),
        });
    }
    serde_json::from_slice(body).ok()
}

/// `usage` as the last member of the top-level object. The value must run
/// exactly to the object's closing brace, so a `"usage"` key nested deeper
/// (whose object more brackets would follow) is never taken for it.
fn trailing_usage(body: &[u8]) -> Option<ReportedUsage> {
    let inner = body.trim_ascii_end().strip_suffix(b"}")?;
    let at = USAGE_KEY.rfind(inner)?;
    if !matches!(inner[..at].trim_ascii_end().last(), Some(b',' | b'{')) {
        return None;
    }
    let value = inner[at + 7..].trim_ascii_start().strip_prefix(b":")?;
    let value = value.trim_ascii_start();
    if !value.starts_with(b"{") {
        return None;
    }
    match flat_usage(value) {
        Some(usage) => Some(usage),
        None => serde_json::from_slice(value).ok(),
    }
}

/// `"usage"`, searched from the end of a body; built once.
static USAGE_KEY: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(b"\"usage\""));

/// The usage object in the form the API writes it: token counts, and
/// plain strings, numbers, literals and flat objects (`cache_creation`,
/// `server_tool_use`) beside them. Read by hand at a fraction of serde's
/// cost; `None` means "not this form", and serde then decides, so the
/// answer is always serde's.
fn flat_usage(value: &[u8]) -> Option<ReportedUsage> {
    let mut json = Flat { s: value, at: 0 };
    let mut usage = ReportedUsage::default();
    let mut seen = [false; 5];
    json.object(|json, key| {
        let field = match key {
            b"input_tokens" => 0,
            b"output_tokens" => 1,
            b"cache_creation_input_tokens" => 2,
            b"cache_read_input_tokens" => 3,
            b"cache_creation" => 4,
            _ => return json.skip_value(true),
        };
        // serde refuses a repeated field; let it say so.
        if std::mem::replace(&mut seen[field], true) {
            return None;
        }
        if field == 4 {
            usage.cache_creation = Some(json.cache_creation()?);
            return Some(());
        }
        *[
            &mut usage.input_tokens,
            &mut usage.output_tokens,
            &mut usage.cache_creation_input_tokens,
            &mut usage.cache_read_input_tokens,
        ][field] = json.count()?;
        Some(())
    })?;
    json.ws();
    (json.at == value.len()).then_some(usage)
}

/// A cursor for [`flat_usage`]: every step either reads exactly what JSON
/// allows there or gives up.
struct Flat<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Flat<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let here = self.peek() == Some(b);
        self.at += usize::from(here);
        here
    }

    fn byte(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string of printable ASCII without escapes (else: give up).
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.byte(b'"')?;
        let rest = &self.s[self.at..];
        let end = rest.iter().position(|&b| b == b'"')?;
        let content = &rest[..end];
        if !content
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return None;
        }
        self.at += end + 1;
        Some(content)
    }

    /// A token count: `null` (absent) or an integer that fits a u64.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let digits = self.digits()?;
        if matches!(self.peek(), Some(b'.' | b'e' | b'E'))
            || (digits.len() > 1 && digits[0] == b'0')
        {
            return None;
        }
        digits
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .map(Some)
    }

    fn digits(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        (self.at > start).then(|| &self.s[start..self.at])
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let here = self.s[self.at..].starts_with(word);
        if here {
            self.at += word.len();
        }
        here
    }

    /// An object whose keys are plain strings: `value` reads the value of
    /// each member, given its key.
    fn object(&mut self, mut value: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.byte(b'{')?;
        self.ws();
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            self.ws();
            let key = self.plain_string()?;
            self.ws();
            self.byte(b':')?;
            self.ws();
            value(self, key)?;
            self.ws();
            if !self.eat(b',') {
                return self.byte(b'}');
            }
        }
    }

    /// `cache_creation`: an object of counts by lifetime (`null`: given up
    /// on, serde decides), other members skipped.
    fn cache_creation(&mut self) -> Option<CacheCreation> {
        let mut creation = CacheCreation::default();
        let mut seen = [false; 2];
        self.object(|json, key| {
            let field = match key {
                b"ephemeral_5m_input_tokens" => 0,
                b"ephemeral_1h_input_tokens" => 1,
                _ => return json.skip_value(false),
            };
            if std::mem::replace(&mut seen[field], true) {
                return None;
            }
            *[
                &mut creation.ephemeral_5m_input_tokens,
                &mut creation.ephemeral_1h_input_tokens,
            ][field] = json.count()?;
            Some(())
        })?;
        Some(creation)
    }

    /// A value beside the counts: a plain string, a number, a literal, or
    /// (when `nested` is allowed) an object of those.
    fn skip_value(&mut self, nested: bool) -> Option<()> {
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'-' | b'0'..=b'9' => self.number(),
            b'{' if nested => self.object(|json, _| json.skip_value(false)),
            _ => (self.literal(b"null") || self.literal(b"true") || self.literal(b"false"))
                .then_some(()),
        }
    }

    /// JSON's number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        let int = self.digits()?;
        if int.len() > 1 && int[0] == b'0' {
            return None;
        }
        if self.eat(b'.') {
            self.digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.digits()?;
        }
        Some(())
    }
}

/// A member (`model`, `id`) among the leading members of the top-level
/// object, when only plain strings come before it.
fn leading_member(body: &[u8], wanted: &[u8]) -> Option<String> {
    let mut rest = body.trim_ascii_start().strip_prefix(b"{")?;
    for _ in 0..8 {
        let (key, after) = plain_string(rest.trim_ascii_start())?;
        let value = after.trim_ascii_start().strip_prefix(b":")?;
        let (value, after) = plain_string(value.trim_ascii_start())?;
        if key == wanted {
            return std::str::from_utf8(value).ok().map(str::to_owned);
        }
        rest = after.trim_ascii_start().strip_prefix(b",")?;
    }
    None
}

/// A JSON string without escapes at the start of `s`: its content and what follows.
fn plain_string(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let s = s.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', s)?;
    (s[end] == b'"').then(|| (&s[..end], &s[end + 1..]))
}

#[derive(Default)]
pub struct SseUsage {
    partial: Vec<u8>,
    /// Inside a line known not to matter, until its end.
    skipping: bool,
    /// The current event was named `message_start` or `message_delta`.
    usage_event: bool,
    pub reported: Reported,
}

impl SseUsage {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let line = &chunk[..end];
                    if self.skipping {
                        self.skipping = false;
                    } else if self.partial.is_empty() {
                        self.line(line);
                    } else {
                        let mut whole = std::mem::take(&mut self.partial);
                        whole.extend_from_slice(line);
                        self.line(&whole);
                        whole.clear();
                        self.partial = whole;
                    }
                    chunk = &chunk[end + 1..];
                }
                None => {
                    if !self.skipping {
                        self.partial.extend_from_slice(chunk);
                        let decided = self.partial.len() >= PREFIX_WINDOW;
                        let wanted = self.usage_event || may_carry_usage(&self.partial);
                        if (decided && !wanted) || self.partial.len() > SSE_LINE_CAP {
                            self.partial.clear();
                            self.skipping = true;
                        }
                    }
                    return;
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(name) = line.strip_prefix(b"event:") {
            let name = name.strip_prefix(b" ").unwrap_or(name);
            self.usage_event = name == b"message_start" || name == b"message_delta";
            return;
        }
        if line.is_empty() {
            self.usage_event = false;
            return;
        }
        if !(line.starts_with(b"data:") && (self.usage_event || may_carry_usage(line))) {
            return;
        }
        let data = line[5..].strip_prefix(b" ").unwrap_or(&line[5..]);
        let Ok(event) = serde_json::from_slice::<StreamEvent<'_>>(data) else {
            return;
        };
        match &*event.kind {
            "message_start" => {
                if let Some(message) = event.message {
                    if message.model.is_some() {
                        self.reported.model = message.model;
                    }
                    if message.id.is_some() {
                        self.reported.id = message.id;
                    }
                    if let Some(usage) = message.usage {
                        usage.apply_to(&mut self.reported.usage);
                        self.reported.seen = true;
                    }
                }
            }
            "message_delta" => {
                // Cumulative: each count reported replaces the one before.
                if let Some(usage) = event.usage {
                    usage.apply_to(&mut self.reported.usage);
                    self.reported.seen = true;
                }
            }
            _ => {}
        }
    }
}

/// Bytes of a line enough to tell a usage event (`data: {"type":"message_start"`).
const PREFIX_WINDOW: usize = 64;

/// A `data:` line whose start names `message_start` or `message_delta` (for
/// a stream without `event:` lines; the API writes `type` first). Text
/// deltas, most of a stream, are dismissed by their first bytes.
fn may_carry_usage(line: &[u8]) -> bool {
    if !line.starts_with(b"data:") {
        return false;
    }
    let head = &line[..line.len().min(PREFIX_WINDOW)];
    head.windows(13)
        .any(|w| w == b"message_start" || w == b"message_delta")
}

/// A JSON body's chunks, kept by reference (no copy) up to a cap.
#[derive(Default)]
pub struct JsonChunks {
    chunks: Vec<Bytes>,
    len: usize,
    over: bool,
}

impl JsonChunks {
    fn feed(&mut self, chunk: &Bytes) {
        if self.over {
            return;
        }
        self.len += chunk.len();
        if self.len > JSON_CAP {
            self.over = true;
            self.chunks.clear();
        } else {
            self.chunks.push(chunk.clone());
        }
    }

    fn whole(&self) -> Option<Bytes> {
        if self.over {
            return None;
        }
        match &self.chunks[..] {
            [one] => Some(one.clone()),
            chunks => Some(Bytes::from(chunks.concat())),
        }
    }
}

/// Where a request's concurrency slot is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotHeld {
    /// In the shared store (released there; its lease renewed meanwhile).
    Store,
    /// In this replica's fallback budgets (the store was down).
    Local,
}

/// A client's quota as the hot path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub tokens_per_minute: u64,
    pub tokens_per_day: u64,
    /// Nano-dollars per UTC day and calendar month.
    pub usd_nanos_per_day: u64,
    pub usd_nanos_per_month: u64,
    pub max_concurrent: u32,
    pub count_cache_reads: bool,
}

impl Quota {
    pub fn from_config(quota: &claude_relay_crds::config::ClientQuota) -> Self {
        let nanos = |usd: Option<f64>| {
            usd.and_then(claude_relay_crds::config::nano_usd)
                .unwrap_or(0)
        };
        Self {
            tokens_per_minute: quota.tokens_per_minute.unwrap_or(0),
            tokens_per_day: quota.tokens_per_day.unwrap_or(0),
            usd_nanos_per_day: nanos(quota.usd_per_day),
            usd_nanos_per_month: nanos(quota.usd_per_month),
            max_concurrent: quota.max_concurrent.unwrap_or(0),
            count_cache_reads: quota.count_cache_reads,
        }
    }

    /// Whether spending is limited in dollars.
    pub fn has_usd_budget(&self) -> bool {
        self.usd_nanos_per_day > 0 || self.usd_nanos_per_month > 0
    }

    /// The admission question for request `slot`, now.
    pub fn ask<'a>(&self, slot: &'a str) -> QuotaAsk<'a> {
        let now_ms = unix_ms();
        QuotaAsk {
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent: self.max_concurrent,
            usd_nanos_per_day: self.usd_nanos_per_day,
            usd_nanos_per_month: self.usd_nanos_per_month,
            slot,
            now_ms,
            lease_until_ms: now_ms + SLOT_LEASE.as_millis() as u64,
        }
    }
}

/// What is settled when a request ends: attached to its exchange.
pub struct Meter {
    pub accounting: Arc<Accounting>,
    pub store: Arc<AnyStore>,
    pub client: Name,
    pub quota: Option<Quota>,
    /// The prices of the config the request came in under.
    pub pricing: Arc<Pricing>,
    /// The slot (the request id) and where it is held.
    pub slot: Option<(Arc<str>, SlotHeld)>,
    pub retention: Duration,
    /// `usage.enabled`: whether responses get a tap at all.
    pub usage_enabled: bool,
    /// Reads the response's usage; set when the response may report some.
    pub tap: Option<UsageTap>,
    /// Stores the response in the cache when it completes.
    pub cache_fill: Option<crate::accounting::cache::Fill>,
}

impl Meter {
    /// Releases the request's concurrency slot now, if it holds one: in
    /// this process at once (the memory store, or this replica's fallback
    /// budgets); in Redis by the [`SlotRelease`] returned, which the end of
    /// the response waits for. Afterwards the slot is no longer renewed.
    pub fn release_slot(&mut self) -> Option<SlotRelease> {
        let (slot, held) = self.slot.take()?;
        self.accounting.forget_slot(&slot);
        match (held, &*self.store) {
            (SlotHeld::Local, _) => {
                self.accounting.fallback.release(&self.client.0, &slot);
                None
            }
            (SlotHeld::Store, AnyStore::Memory(memory)) => {
                memory.release(&self.client.0, &slot);
                None
            }
            (SlotHeld::Store, AnyStore::Redis(_)) => Some(SlotRelease {
                accounting: self.accounting.clone(),
                store: self.store.clone(),
                client: self.client.clone(),
                slot,
                retention: self.retention,
            }),
        }
    }
}

/// A concurrency slot to release in Redis: one command on the worker's own
/// connection, awaited before the response's last bytes go out, so that
/// the client's next request, on any replica, finds the slot free.
pub struct SlotRelease {
    accounting: Arc<Accounting>,
    store: Arc<AnyStore>,
    client: Name,
    slot: Arc<str>,
    retention: Duration,
}

impl SlotRelease {
    /// Releases the slot; a store that fails gets the release again with
    /// the outbox's next flush (and its retries), while the lease runs out
    /// anyway.
    pub async fn run(self) {
        if let Err(error) = self.store.release_slot(&self.client.0, &self.slot).await {
            self.accounting.store_error(&error);
            tracing::debug!(client = &*self.client.0, %error, "slot not released yet; retried with the next flush");
            self.to_outbox();
        }
    }

    /// Leaves the release to the outbox's next flush.
    fn to_outbox(&self) {
        let settlement = Settlement {
            quota_tokens: 0,
            quota_nanos: 0,
            usage: None,
            slot: Some(&self.slot),
            now_ms: unix_ms(),
            retention: self.retention,
        };
        self.accounting
            .enqueue(&self.client, &self.store, &settlement);
    }
}

/// Everything a finished request leaves for the background task.
pub struct Finished {
    pub meter: Meter,
    pub request_id: Arc<str>,
    pub region: Option<Name>,
    pub key_id: Option<String>,
    pub complete: bool,
    /// The request's span, told the answer's usage (`crate::trace`).
    pub trace: Option<Box<crate::accounting::trace::RequestSpan>>,
}

impl Finished {
    /// Accounts for the request. The response has gone out by now, so a
    /// JSON body's usage is parsed here: a spawned task for it cost three
    /// times the parse (the task moves the whole state into its cell). Only
    /// a cache fill, which waits for the store, goes to a task, boxed so the
    /// task stays small. With no runtime (a test dropping an exchange
    /// outside one) a cache fill is skipped and the request accounted here.
    pub fn spawn(mut self) {
        let runtime = tokio::runtime::Handle::try_current();
        // Still held: the response did not reach its end (the client left,
        // or it never got its body). The slot goes back at once.
        if let Some(release) = self.meter.release_slot() {
            match &runtime {
                Ok(runtime) => drop(runtime.spawn(release.run())),
                Err(_) => release.to_outbox(),
            }
        }
        let meter = &self.meter;
        if meter.tap.is_none() && meter.cache_fill.is_none() {
            return;
        }
        match runtime {
            Ok(runtime) if meter.cache_fill.is_some() => {
                runtime.spawn(Box::pin(self.settle()));
            }
            _ => self.account(),
        }
    }

    async fn settle(mut self) {
        if let (Some(fill), true, Some(body)) = (
            self.meter.cache_fill.take(),
            self.complete,
            self.meter.tap.as_ref().and_then(UsageTap::body),
        ) {
            fill.store(body, &self.meter.store).await;
        }
        self.account();
    }

    /// Metrics and the usage log line now; budgets and usage counters go
    /// to the outbox, which the store sees at the next flush (the slot went
    /// back before, see [`Meter::release_slot`]).
    fn account(self) {
        let Finished {
            meter,
            request_id,
            region,
            key_id,
            complete,
            trace,
        } = self;
        if let Some((encoding, result, error)) =
            meter.tap.as_ref().and_then(UsageTap::decode_result)
        {
            meter.accounting.count_decode(encoding, result);
            if let Some(error) = error {
                tracing::warn!(request_id = %request_id, encoding, %error, "usage not read: the upstream's compressed answer did not decode (the client got it as sent)");
            }
        }
        let reported = match &meter.tap {
            Some(tap) if meter.usage_enabled => tap.reported(),
            _ => Reported::default(),
        };
        if let Some(mut span) = trace {
            span.answered(
                reported.model.as_deref(),
                reported.id.as_deref(),
                reported.seen.then_some(&reported.usage),
            );
        }
        let accounting = &meter.accounting;
        let model = reported.model.as_deref().unwrap_or("unknown");
        // Priced only when usage was reported: an answer without usage (an
        // error, or unreadable) costs nothing the relay could know.
        let cost_nanos = reported
            .seen
            .then(|| meter.pricing.cost_nanos(model, &reported.usage))
            .flatten();
        if reported.seen {
            accounting.count_tokens(&meter.client, model, &reported.usage);
            match cost_nanos {
                Some(nanos) => accounting.count_cost(&meter.client, model, nanos),
                None => {
                    // Said once a minute per model, not per answer: a log
                    // line for every answer of an unpriced model cost more
                    // CPU than relaying it, and the metric counts them all.
                    if accounting.count_unpriced(model) {
                        tracing::warn!(request_id = %request_id, client = &*meter.client.0, model, "answer not priced: no pricing.models entry matches its model (counted in claude_relay_unpriced_answers_total; said once a minute per model)");
                    }
                }
            }
            tracing::info!(
                target: "usage",
                request_id = %request_id,
                client = &*meter.client.0,
                region = region.as_ref().map_or("-", |r| &r.0),
                upstream_key = key_id.as_deref().unwrap_or("-"),
                model,
                input_tokens = reported.usage.input_tokens,
                output_tokens = reported.usage.output_tokens,
                cache_creation_input_tokens = reported.usage.cache_creation_input_tokens,
                cache_creation_1h_input_tokens = reported.usage.cache_creation_1h_input_tokens,
                cache_read_input_tokens = reported.usage.cache_read_input_tokens,
                cost_usd = cost_nanos.map(crate::accounting::pricing::usd),
                complete,
            );
        }
        let quota_tokens = meter
            .quota
            .filter(|q| q.tokens_per_minute > 0 || q.tokens_per_day > 0)
            .map_or(0, |q| reported.usage.quota_tokens(q.count_cache_reads));
        let quota_nanos = meter
            .quota
            .filter(Quota::has_usd_budget)
            .and(cost_nanos)
            .unwrap_or(0);
        let settlement = Settlement {
            quota_tokens,
            quota_nanos,
            usage: reported
                .seen
                .then_some((model, reported.usage, cost_nanos.unwrap_or(0))),
            slot: None,
            now_ms: unix_ms(),
            retention: meter.retention,
        };
        if quota_tokens > 0 || quota_nanos > 0 || settlement.usage.is_some() {
            accounting.enqueue(&meter.client, &meter.store, &settlement);
        }
    }
}

/// What finished requests of one client owe the store.
struct Pending {
    store: Arc<AnyStore>,
    /// Not yet tried.
    fresh: Charges,
    /// Tried and failed (the store was down): already charged to the
    /// fallback budgets, retried until the store takes it.
    retry: Charges,
}

/// A model's unpriced answers: their counter, and when one was last logged.
type UnpricedCounter = (Counter, Option<Instant>);

/// Accounting state that outlives reloads.
pub struct Accounting {
    metrics: Arc<Metrics>,
    /// Slots held in the store by this replica: slot → (client, store).
    slots: Mutex<FastMap<Arc<str>, HeldSlot>>,
    /// Since when the store has failed quota checks, if it does now.
    outage_since: Mutex<Option<Instant>>,
    /// This replica's own budgets, used once an outage outlasts its grace.
    pub fallback: MemoryStore,
    /// Model label values in use, to bound the metric's cardinality.
    models: Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>,
    /// The token counters of each kind ([`Usage::KINDS`]) per client and model.
    token_counters: Mutex<FastMap<TokenKey, [Counter; 4]>>,
    /// The cost counter (nano-dollars, exported as dollars) per client and model.
    cost_counters: Mutex<FastMap<TokenKey, CostCounter>>,
    /// The unpriced answer counters per model label.
    unpriced_counters: Mutex<FastMap<Arc<str>, UnpricedCounter>>,
    /// The decode counters by coding and result, looked up once.
    decode_counters: Mutex<FastMap<(&'static str, &'static str), Counter>>,
    /// Per client, what the next flush writes to the store.
    outbox: Mutex<FastMap<Name, Pending>>,
}

/// The client holding a slot, and the store it is held in (`None`: this
/// replica's fallback budgets).
type HeldSlot = (Name, Option<Arc<AnyStore>>);
/// Client, model label.
type TokenKey = (Name, Arc<str>);

/// How a quota was checked when the store could not answer.
pub enum Unchecked {
    /// Within the grace period: let through.
    FailOpen,
    /// Past it: decided by this replica's own budgets.
    Local(QuotaDecision),
}

impl Accounting {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            slots: Mutex::default(),
            outage_since: Mutex::default(),
            fallback: MemoryStore::new(1),
            models: Mutex::default(),
            token_counters: Mutex::default(),
            cost_counters: Mutex::default(),
            unpriced_counters: Mutex::default(),
            decode_counters: Mutex::default(),
            outbox: Mutex::default(),
        })
    }

    fn enqueue(&self, client: &Name, store: &Arc<AnyStore>, settlement: &Settlement<'_>) {
        let mut outbox = lock(&self.outbox);
        let pending = outbox.entry(client.clone()).or_insert_with(|| Pending {
            store: store.clone(),
            fresh: Charges::default(),
            retry: Charges::default(),
        });
        if !Arc::ptr_eq(&pending.store, store) {
            // The store changed with the config: what is owed goes to the new one.
            pending.store = store.clone();
        }
        pending.fresh.add(settlement);
    }

    /// Writes the outbox every [`FLUSH_EVERY`]: one store call per client
    /// with requests finished since the last flush, all in parallel.
    pub fn spawn_flush(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        crate::upstream::breaker::spawn_periodic(FLUSH_EVERY, move || {
            let this = this.clone();
            async move { this.flush_once().await }
        })
    }

    pub async fn flush_once(&self) {
        let batch: Vec<(Name, Pending)> = lock(&self.outbox).drain().collect();
        if batch.is_empty() {
            return;
        }
        let mut owed = Vec::with_capacity(batch.len());
        for (client, pending) in batch {
            let mut all = pending.retry;
            all.merge(pending.fresh.clone());
            owed.push((client, pending.store, pending.fresh, all));
        }
        let calls = owed
            .iter()
            .map(|(client, store, _, all)| store.settle(&client.0, all));
        let results = futures_util::future::join_all(calls).await;
        let now_ms = unix_ms();
        for ((client, store, fresh, all), result) in owed.into_iter().zip(results) {
            let Err(error) = result else {
                continue;
            };
            self.store_error(&error);
            // What the outage hides from the store, this replica's budgets see.
            self.fallback.apply(
                &client.0,
                &Charges {
                    usage: Default::default(),
                    release: Vec::new(),
                    ..fresh
                },
            );
            if !error.transient {
                tracing::error!(client = &*client.0, %error, "usage and quota charges dropped: the store refused them");
                continue;
            }
            tracing::warn!(client = &*client.0, %error, "usage and quota charges not written yet: the store is unavailable; retrying");
            let mut retry = all.still_due(now_ms);
            retry.release.truncate(MAX_RETRIED_RELEASES);
            let mut outbox = lock(&self.outbox);
            let pending = outbox.entry(client).or_insert_with(|| Pending {
                store,
                fresh: Charges::default(),
                retry: Charges::default(),
            });
            pending.retry.merge(retry);
        }
    }

    /// Keeps the lease of a slot renewed until the request ends.
    pub fn hold_slot(&self, slot: Arc<str>, client: Name, store: Option<Arc<AnyStore>>) {
        lock(&self.slots).insert(slot, (client, store));
    }

    fn forget_slot(&self, slot: &str) {
        lock(&self.slots).remove(slot);
    }

    /// The store answered: any outage is over.
    pub fn store_ok(&self) {
        let mut since = lock(&self.outage_since);
        if since.take().is_some() {
            tracing::info!("the store answers quota checks again");
        }
    }

    pub fn store_error(&self, error: &StoreError) {
        self.metrics
            .store_errors
            .get_or_create(&crate::base::metrics::ResultLabels {
                result: error.label(),
            })
            .inc();
    }

    /// The store failed a quota check: within `grace` of the outage's start
    /// the request passes; after that this replica's own budgets decide.
    pub async fn unchecked(&self, client: &str, ask: &QuotaAsk<'_>, grace: Duration) -> Unchecked {
        let started = *lock(&self.outage_since).get_or_insert_with(Instant::now);
        let result = if started.elapsed() < grace {
            Unchecked::FailOpen
        } else {
            match self.fallback.check_quota(client, ask).await {
                Ok(decision) => Unchecked::Local(decision),
                Err(_) => Unchecked::FailOpen,
            }
        };
        let label = match result {
            Unchecked::FailOpen => "fail_open",
            Unchecked::Local(_) => "local",
        };
        self.metrics
            .quota_unchecked
            .get_or_create(&crate::base::metrics::ResultLabels { result: label })
            .inc();
        result
    }

    /// Counts how a compressed answer was read.
    fn count_decode(&self, encoding: &'static str, result: &'static str) {
        lock(&self.decode_counters)
            .entry((encoding, result))
            .or_insert_with(|| {
                self.metrics
                    .usage_decodes
                    .get_or_create(&crate::base::metrics::DecodeLabels { encoding, result })
                    .clone()
            })
            .inc();
    }

    fn count_tokens(&self, client: &Name, model: &str, usage: &Usage) {
        let model = self.model_label(model);
        let mut counters = lock(&self.token_counters);
        let kinds = counters
            .entry((client.clone(), model.clone()))
            .or_insert_with(|| {
                Usage::KINDS.map(|kind| {
                    self.metrics
                        .tokens
                        .get_or_create(&TokenLabels {
                            client: client.clone(),
                            model: Name(model.clone()),
                            kind,
                        })
                        .clone()
                })
            });
        for (counter, count) in kinds.iter().zip(usage.counts()) {
            if count > 0 {
                counter.inc_by(count);
            }
        }
    }

    /// Adds an answer's cost to its client's and model's spend.
    fn count_cost(&self, client: &Name, model: &str, nanos: u64) {
        let model = self.model_label(model);
        lock(&self.cost_counters)
            .entry((client.clone(), model.clone()))
            .or_insert_with(|| {
                self.metrics
                    .cost
                    .get_or_create(&CostLabels {
                        client: client.clone(),
                        model: Name(model),
                    })
                    .clone()
            })
            .inc_by(crate::accounting::pricing::usd(nanos));
    }

    /// Counts an answer whose model has no price; true when the model's
    /// last warning is [`UNPRICED_WARN_EVERY`] old or more (or there was none).
    fn count_unpriced(&self, model: &str) -> bool {
        let model = self.model_label(model);
        let now = Instant::now();
        let mut counters = lock(&self.unpriced_counters);
        let (counter, warned) = counters.entry(model.clone()).or_insert_with(|| {
            let counter = self
                .metrics
                .unpriced_answers
                .get_or_create(&ModelLabels { model: Name(model) })
                .clone();
            (counter, None)
        });
        counter.inc();
        let due = warned.is_none_or(|at| now.duration_since(at) >= UNPRICED_WARN_EVERY);
        if due {
            *warned = Some(now);
        }
        due
    }

    /// The model as a label value: a plausible model name among the first
    /// [`MODEL_LABELS`] seen, else `other`.
    fn model_label(&self, model: &str) -> Arc<str> {
        let plausible = !model.is_empty()
            && model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:@".contains(&b));
        let mut models = lock(&self.models);
        if let Some(known) = models.get(model) {
            return known.clone();
        }
        if !plausible || models.len() >= MODEL_LABELS {
            return Arc::from("other");
        }
        let label: Arc<str> = Arc::from(model);
        models.insert(label.clone());
        label
    }

    /// Renews the leases of the slots this replica holds, every
    /// [`RENEW_EVERY`], so long streams keep theirs.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        crate::upstream::breaker::spawn_periodic(RENEW_EVERY, move || {
            let this = this.clone();
            async move { this.renew_once().await }
        })
    }

    pub async fn renew_once(&self) {
        type Group = (Option<Arc<AnyStore>>, Vec<String>);
        let mut by_client: HashMap<(Name, usize), Group> = HashMap::new();
        for (slot, (client, store)) in lock(&self.slots).iter() {
            let store_id = store.as_ref().map_or(0, |s| Arc::as_ptr(s) as usize);
            by_client
                .entry((client.clone(), store_id))
                .or_insert_with(|| (store.clone(), Vec::new()))
                .1
                .push(slot.to_string());
        }
        let until = unix_ms() + SLOT_LEASE.as_millis() as u64;
        for ((client, _), (store, slots)) in by_client {
            let renewed = match store {
                Some(store) => store.renew_slots(&client.0, &slots, until).await,
                None => self.fallback.renew_slots(&client.0, &slots, until).await,
            };
            if let Err(error) = renewed {
                tracing::debug!(client = &*client.0, %error, "slot leases not renewed");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(model: &str) -> Vec<u8> {
        let events = [
            format!(
                r#"{{"type":"message_start","message":{{"id":"m","model":"{model}","usage":{{"input_tokens":25,"output_tokens":1,"cache_creation_input_tokens":7,"cache_read_input_tokens":3,"cache_creation":{{"ephemeral_5m_input_tokens":5,"ephemeral_1h_input_tokens":2}}}}}}}}"#
            ),
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"message_delta is just text here"}}"#.into(),
            r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":10}}"#.into(),
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15,"input_tokens":26}}"#.into(),
        ];
        let mut out = Vec::new();
        for data in events {
            let name = data.split('"').nth(3).unwrap().to_string();
            out.extend(format!("event: {name}\ndata: {data}\n\n").into_bytes());
        }
        out
    }

    fn expected() -> Usage {
        Usage {
            input_tokens: 26,
            output_tokens: 15,
            cache_creation_input_tokens: 7,
            cache_read_input_tokens: 3,
            cache_creation_1h_input_tokens: 2,
        }
    }

    #[test]
    fn stream_usage_is_the_same_however_the_bytes_are_split() {
        let body = stream_of("claude-x");
        for size in [1, 2, 3, 7, 13, 64, 100, body.len()] {
            let mut tap = SseUsage::default();
            for chunk in body.chunks(size) {
                tap.feed(chunk);
            }
            assert_eq!(tap.reported.usage, expected(), "chunks of {size}");
            assert_eq!(tap.reported.model.as_deref(), Some("claude-x"));
            assert!(tap.partial.is_empty());
        }
    }

    #[test]
    fn a_stream_cut_midway_keeps_what_was_reported() {
        let body = stream_of("claude-x");
        let cut = body
            .windows(13)
            .position(|w| w == b"message_delta")
            .unwrap();
        let mut tap = SseUsage::default();
        tap.feed(&body[..cut + 40]);
        assert!(tap.reported.seen);
        assert_eq!(tap.reported.usage.input_tokens, 25);
        assert_eq!(tap.reported.usage.output_tokens, 1);
    }

    #[test]
    fn event_names_find_usage_whatever_the_key_order() {
        let sorted = concat!(
            "event: message_start\n",
            r#"data: {"message":{"content":[],"id":"m","model":"claude-z","role":"assistant","usage":{"input_tokens":9,"output_tokens":1}},"type":"message_start"}"#,
            "\n\nevent: message_delta\n",
            r#"data: {"delta":{"stop_reason":"end_turn"},"type":"message_delta","usage":{"output_tokens":4}}"#,
            "\n\n"
        );
        let mut tap = SseUsage::default();
        for chunk in sorted.as_bytes().chunks(5) {
            tap.feed(chunk);
        }
        assert_eq!(tap.reported.usage.input_tokens, 9);
        assert_eq!(tap.reported.usage.output_tokens, 4);
        assert_eq!(tap.reported.model.as_deref(), Some("claude-z"));
        // Without event names, a data line naming its type first still counts.
        let mut bare = SseUsage::default();
        bare.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":3}}\n\n");
        assert_eq!(bare.reported.usage.output_tokens, 3);
    }

    #[test]
    fn long_text_lines_are_not_kept() {
        let mut tap = SseUsage::default();
        let mut line = b"data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"".to_vec();
        line.extend(std::iter::repeat_n(b'x', 10_000));
        for chunk in line.chunks(512) {
            tap.feed(chunk);
            assert!(tap.partial.len() < 1024, "kept {}", tap.partial.len());
        }
        tap.feed(b"\"}}\n\n");
        tap.feed(&stream_of("m"));
        assert_eq!(tap.reported.usage, expected());
    }

    #[test]
    fn json_usage_is_read_from_the_whole_body() {
        let body = br#"{"id":"m","model":"claude-y","content":[{"type":"text","text":"\"usage\": {\"input_tokens\": 999}"}],"usage":{"input_tokens":12,"output_tokens":34,"cache_creation_input_tokens":0,"cache_read_input_tokens":5}}"#;
        let mut tap = UsageTap::json();
        for chunk in body.chunks(10) {
            tap.feed(&Bytes::copy_from_slice(chunk));
        }
        let reported = tap.reported();
        assert_eq!(reported.model.as_deref(), Some("claude-y"));
        assert_eq!(
            reported.usage,
            Usage {
                input_tokens: 12,
                output_tokens: 34,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 5,
                cache_creation_1h_input_tokens: 0,
            }
        );
        assert_eq!(tap.body().unwrap().as_ref(), &body[..]);
    }

    /// What the whole-body parse finds: the fast path must agree with it
    /// whenever it answers, and answer for the API's own layout.
    fn parsed_whole(body: &[u8]) -> Option<(Option<String>, Option<Usage>)> {
        let message: MessageUsage = serde_json::from_slice(body).ok()?;
        Some((message.model, message.usage.map(|u| to_usage(&u))))
    }

    fn to_usage(reported: &ReportedUsage) -> Usage {
        let mut usage = Usage::default();
        reported.apply_to(&mut usage);
        usage
    }

    #[test]
    fn json_usage_is_read_where_the_api_puts_it_and_never_from_content() {
        let api = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-a","content":[{"type":"tool_use","id":"t","name":"f","input":{"usage":{"input_tokens":999}}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":7,"output_tokens":8}}"#;
        assert!(trailing_usage(api).is_some() && leading_member(api, b"model").is_some());
        let tricky: [&[u8]; 8] = [
            api,
            // Pretty-printed, with spaces and a newline at the end.
            b"{ \"id\" : \"m\" ,\n \"model\" : \"claude-b\", \"content\": [],\n \"usage\" : {\"output_tokens\": 3} }\n",
            // A nested "usage" last: the real one is elsewhere.
            br#"{"model":"claude-c","usage":{"input_tokens":1},"content":[{"input":{"usage":{"input_tokens":999}}}]}"#,
            // A key ending in usage, escaped quote included.
            br#"{"model":"claude-d","content":[],"usage":{"input_tokens":2},"x"usage":{"input_tokens":999}}"#,
            // Model after the content, or with an escape in it.
            br#"{"content":[{"model":"fake"}],"model":"claude-e","usage":{"input_tokens":3}}"#,
            br#"{"id":"m","model":"claude-f","usage":{"input_tokens":4}}"#,
            // Usage as an array, or no usage at all.
            br#"{"model":"claude-g","usage":[5,6,7,8]}"#,
            br#"{"model":"claude-h","content":[{"text":""usage":{"input_tokens":999}}"}]}"#,
        ];
        for body in tricky {
            let fast = message_usage(body).map(|m| (m.model, m.usage.map(|u| to_usage(&u))));
            assert_eq!(
                fast,
                parsed_whole(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            message_usage(api)
                .unwrap()
                .usage
                .map(|u| to_usage(&u).input_tokens),
            Some(7)
        );
    }

    #[test]
    fn the_usage_read_by_hand_is_always_what_serde_reads() {
        let api = br#"{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":7,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":180,"service_tier":"standard","server_tool_use":{"web_search_requests":1}}"#;
        let cases: [&[u8]; 31] = [
            api,
            br#"{"input_tokens":1,"cache_creation_input_tokens":9,"cache_creation":{"ephemeral_5m_input_tokens":4,"ephemeral_1h_input_tokens":5}}"#,
            br#"{"cache_creation":{"ephemeral_1h_input_tokens":5,"future_lifetime":"x"}}"#,
            // Given up on by hand; serde decides.
            br#"{"cache_creation":null,"input_tokens":2}"#,
            br#"{"cache_creation":{"ephemeral_1h_input_tokens":1,"ephemeral_1h_input_tokens":2}}"#,
            br#"{"cache_creation":{"nested":{"a":1}}}"#,
            br#"{"input_tokens":25,"output_tokens":180}"#,
            b"{ \"input_tokens\" : 1 ,\n\t\"output_tokens\":2\r\n}  ",
            br#"{}"#,
            br#"{"input_tokens":null,"output_tokens":0}"#,
            br#"{"x":-1.5e+3,"y":true,"z":false,"w":null,"v":{},"input_tokens":3}"#,
            br#"{"input_tokens":18446744073709551615}"#,
            // Given up on by hand; serde decides.
            br#"{"input_tokens":18446744073709551616}"#,
            br#"{"input_tokens":1.0}"#,
            br#"{"input_tokens":1e3}"#,
            br#"{"input_tokens":-1}"#,
            br#"{"input_tokens":01}"#,
            br#"{"input_tokens":"5"}"#,
            br#"{"input_tokens":1,"input_tokens":2}"#,
            br#"{"input_tokens":1,}"#,
            br#"{"input_tokens":1"#,
            br#"{"input_tokens":1} x"#,
            br#"{"inp\u0075t_tokens":4}"#,
            br#"{"tier":"caf\u00e9","input_tokens":4}"#,
            "{\"tier\":\"café\",\"input_tokens\":4}".as_bytes(),
            b"{\"tier\":\"a\tb\",\"input_tokens\":4}",
            br#"{"a":{"b":{"c":1}},"input_tokens":4}"#,
            br#"{"a":[1,2],"input_tokens":4}"#,
            br#"{"a":01,"input_tokens":4}"#,
            br#"{"a":1.,"input_tokens":4}"#,
            br#"{"a":tru,"input_tokens":4}"#,
        ];
        let counts = |u: &ReportedUsage| {
            let creation = u.cache_creation.as_ref();
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_creation_input_tokens,
                u.cache_read_input_tokens,
                creation.map(|c| (c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens)),
            )
        };
        let mut by_hand = 0;
        for case in cases {
            let serde = serde_json::from_slice::<ReportedUsage>(case).ok();
            if let Some(flat) = flat_usage(case) {
                by_hand += 1;
                assert_eq!(
                    Some(counts(&flat)),
                    serde.as_ref().map(counts),
                    "{}",
                    String::from_utf8_lossy(case)
                );
            }
        }
        // The API's own forms are read by hand.
        assert_eq!(by_hand, 9);
        assert_eq!(
            flat_usage(api).map(|u| counts(&u)),
            Some((
                Some(25),
                Some(180),
                Some(0),
                Some(7),
                Some((Some(0), Some(0)))
            ))
        );
        assert_eq!(
            flat_usage(cases[1]).map(|u| to_usage(&u).cache_creation_1h_input_tokens),
            Some(5)
        );
    }

    fn content_encoding(coding: &str) -> http::HeaderValue {
        http::HeaderValue::from_static(claude_relay_testkit::compress::label(coding))
    }

    #[test]
    fn compressed_streams_and_json_are_read_as_they_decode() {
        use claude_relay_testkit::compress::{self, CODINGS, StreamEncoder};
        let stream = stream_of("claude-x");
        let json = br#"{"id":"m","model":"claude-y","content":[],"usage":{"input_tokens":12,"output_tokens":34}}"#;
        for coding in CODINGS {
            let header = content_encoding(coding);
            // A stream flushed per event: usage read event by event.
            let mut tap = UsageTap::for_answer(true, Some(&header));
            assert!(tap.decodes());
            let mut encoder = StreamEncoder::new(coding).unwrap();
            let events: Vec<&[u8]> = stream.split_inclusive(|&b| b == b'\n').collect();
            for (i, line) in events.iter().enumerate() {
                tap.feed(&encoder.chunk(line));
                if i == 1 {
                    assert_eq!(tap.reported().usage.input_tokens, 25, "{coding}");
                }
            }
            tap.feed(&encoder.finish());
            assert_eq!(tap.reported().usage, expected(), "{coding}");
            assert_eq!(tap.reported().model.as_deref(), Some("claude-x"));
            assert_eq!(
                tap.decode_result(),
                Some((compress::label(coding), "decoded", None))
            );
            assert!(tap.body().is_none());

            // JSON in any chunking: the decoded body, once whole, is what
            // a cache fill stores.
            let body = compress::encode(coding, json);
            let mut tap = UsageTap::for_answer(false, Some(&header));
            let (head, last) = body.split_at(body.len() / 2);
            for piece in head.chunks(7) {
                tap.feed(&Bytes::copy_from_slice(piece));
            }
            assert!(tap.body().is_none(), "{coding}: not before the last chunk");
            tap.feed(&Bytes::copy_from_slice(last));
            assert_eq!(tap.body().as_deref(), Some(&json[..]), "{coding}");
            assert_eq!(tap.reported().usage.output_tokens, 34, "{coding}");
        }
        // Cut short: no body to store, the usage of a JSON answer unknown.
        let body = compress::encode("gzip", json);
        let mut tap = UsageTap::for_answer(false, Some(&content_encoding("gzip")));
        tap.feed(&body.slice(..body.len() - 4));
        assert!(tap.body().is_none());
        assert!(!tap.reported().seen);
    }

    #[test]
    fn decoding_stops_at_the_cap_and_errors_are_kept() {
        use claude_relay_testkit::compress;
        let mut stream = stream_of("claude-x");
        // A long text line after message_start, then the rest.
        let split = stream.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let mut long = b"event: content_block_delta\ndata: ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 100_000));
        long.extend_from_slice(b"\n\n");
        stream.splice(split..split, long);
        let body = compress::encode("br", &stream);
        assert!(body.len() < 2_000);
        let mut capped = UsageTap::Decoded(Box::new(DecodedTap::new(Coding::Brotli, true, 50_000)));
        capped.feed(&body);
        let reported = capped.reported();
        assert_eq!(reported.usage.input_tokens, 25, "read up to the cap");
        assert_eq!(reported.usage.output_tokens, 1, "not past it");
        assert_eq!(capped.decode_result(), Some(("br", "capped", None)));
        let UsageTap::Decoded(decoded) = &capped else {
            unreachable!()
        };
        assert!(decoded.decoder.is_none() && decoded.decoded == 50_000);

        // JSON over the cap: nothing kept.
        let json = compress::encode("zstd", &vec![b' '; 10_000]);
        let mut tap = UsageTap::Decoded(Box::new(DecodedTap::new(Coding::Zstd, false, 1_000)));
        tap.feed(&json);
        assert_eq!(tap.decode_result(), Some(("zstd", "capped", None)));
        assert!(tap.body().is_none());

        let mut broken = UsageTap::for_answer(true, Some(&content_encoding("gzip")));
        broken.feed(&Bytes::from_static(b"event: message_start\n"));
        let Some(("gzip", "error", Some(error))) = broken.decode_result() else {
            panic!("{:?}", broken.decode_result());
        };
        assert!(error.to_string().contains("corrupt"));
        // Unknown codings and stacked ones are not read.
        let unknown =
            UsageTap::for_answer(false, Some(&http::HeaderValue::from_static("compress")));
        assert_eq!(
            unknown.decode_result(),
            Some(("other", "unsupported", None))
        );
        assert!(UsageTap::for_answer(true, None).decode_result().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn unpriced_answers_are_all_counted_and_said_once_a_minute() {
        let metrics = Arc::new(Metrics::new());
        let accounting = Accounting::new(metrics.clone());
        assert!(
            accounting.count_unpriced("mystery-model"),
            "the first is said"
        );
        assert!(!accounting.count_unpriced("mystery-model"));
        assert!(accounting.count_unpriced("other-model"), "per model");
        tokio::time::advance(UNPRICED_WARN_EVERY - Duration::from_secs(1)).await;
        assert!(!accounting.count_unpriced("mystery-model"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(accounting.count_unpriced("mystery-model"), "a minute on");
        let counted = |model: &str| {
            metrics
                .unpriced_answers
                .get_or_create(&ModelLabels {
                    model: Name(Arc::from(model)),
                })
                .get()
        };
        assert_eq!(counted("mystery-model"), 4);
        assert_eq!(counted("other-model"), 1);
    }

    #[test]
    fn model_labels_are_bounded() {
        let accounting = Accounting::new(Arc::new(Metrics::new()));
        assert_eq!(
            &*accounting.model_label("claude-sonnet-4-5"),
            "claude-sonnet-4-5"
        );
        assert_eq!(&*accounting.model_label("bad model {}"), "other");
        for i in 0..MODEL_LABELS * 2 {
            accounting.model_label(&format!("m-{i}"));
        }
        assert_eq!(&*accounting.model_label("one-too-many"), "other");
        assert_eq!(
            &*accounting.model_label("claude-sonnet-4-5"),
            "claude-sonnet-4-5"
        );
    }
}
