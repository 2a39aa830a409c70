//! Content codings as the Claude API applies them: a JSON answer encoded
//! whole, an event stream encoded live and flushed after every event, so
//! that a client can decode each event as it arrives.

use std::io::Write;

use bytes::Bytes;

/// The codings the double speaks. `deflate` is zlib-wrapped, as HTTP
/// says; `deflate-raw` is the bare deflate some servers send instead
/// (labelled `deflate` on the wire).
pub const CODINGS: [&str; 5] = ["gzip", "deflate", "deflate-raw", "br", "zstd"];

/// A body labelled gzip that is not: what a broken upstream sends.
pub const CORRUPT_GZIP: &str = "corrupt-gzip";

/// The `Content-Encoding` a coding is labelled with.
pub fn label(coding: &str) -> &'static str {
    match coding {
        "gzip" | CORRUPT_GZIP => "gzip",
        "deflate" | "deflate-raw" => "deflate",
        "br" => "br",
        "zstd" => "zstd",
        other => panic!("no such coding: {other}"),
    }
}

/// A live encoder of one body.
pub enum StreamEncoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zlib(flate2::write::ZlibEncoder<Vec<u8>>),
    Raw(flate2::write::DeflateEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    /// [`CORRUPT_GZIP`]: the bytes as they are.
    Plain(Vec<u8>),
}

impl StreamEncoder {
    /// An encoder for `coding` (one of [`CODINGS`]); `None` for any other.
    pub fn new(coding: &str) -> Option<Self> {
        let level = flate2::Compression::default();
        Some(match coding {
            "gzip" => Self::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            "deflate" => Self::Zlib(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            "deflate-raw" => Self::Raw(flate2::write::DeflateEncoder::new(Vec::new(), level)),
            // Quality 5 and a 4 MB window: what servers use for dynamic content.
            "br" => Self::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            "zstd" => Self::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3).ok()?),
            CORRUPT_GZIP => Self::Plain(Vec::new()),
            _ => return None,
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Self::Gzip(e) => e,
            Self::Zlib(e) => e,
            Self::Raw(e) => e,
            Self::Brotli(e) => &mut **e,
            Self::Zstd(e) => e,
            Self::Plain(bytes) => bytes,
        }
    }

    fn output(&mut self) -> Bytes {
        let out = match self {
            Self::Gzip(e) => e.get_mut(),
            Self::Zlib(e) => e.get_mut(),
            Self::Raw(e) => e.get_mut(),
            Self::Brotli(e) => e.get_mut(),
            Self::Zstd(e) => e.get_mut(),
            Self::Plain(bytes) => bytes,
        };
        Bytes::from(std::mem::take(out))
    }

    /// Encodes `data` and flushes: what is returned, with all before it,
    /// decodes to everything given so far.
    pub fn chunk(&mut self, data: &[u8]) -> Bytes {
        let writer = self.writer();
        writer.write_all(data).expect("encode into memory");
        writer.flush().expect("flush into memory");
        self.output()
    }

    /// Ends the body: its trailer (gzip's checksum, zstd's frame end).
    pub fn finish(self) -> Bytes {
        let rest = match self {
            Self::Gzip(e) => e.finish().expect("finish"),
            Self::Zlib(e) => e.finish().expect("finish"),
            Self::Raw(e) => e.finish().expect("finish"),
            Self::Brotli(e) => e.into_inner(),
            Self::Zstd(e) => e.finish().expect("finish"),
            Self::Plain(bytes) => bytes,
        };
        Bytes::from(rest)
    }
}

/// `data` encoded whole.
pub fn encode(coding: &str, data: &[u8]) -> Bytes {
    let mut encoder =
        StreamEncoder::new(coding).unwrap_or_else(|| panic!("no such coding: {coding}"));
    let mut whole = encoder.chunk(data).to_vec();
    whole.extend_from_slice(&encoder.finish());
    Bytes::from(whole)
}

/// Decodes a whole body, as a client would.
pub fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    read_decoded(coding, body, &mut out)
        .unwrap_or_else(|e| panic!("{coding} body does not decode: {e}"));
    out
}

/// Decodes as much of a body as came, as a client reading a stream that
/// broke off would.
pub fn decode_prefix(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // The error a cut stream ends with is the point; what came before it counts.
    let _ = read_decoded(coding, body, &mut out);
    out
}

/// Reads `body` decoded into `out`, as far as it decodes.
fn read_decoded(coding: &str, body: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::io::Read;
    match label(coding) {
        "gzip" => flate2::read::MultiGzDecoder::new(body).read_to_end(out),
        "deflate" if coding == "deflate-raw" => {
            flate2::read::DeflateDecoder::new(body).read_to_end(out)
        }
        "deflate" => flate2::read::ZlibDecoder::new(body).read_to_end(out),
        "br" => brotli::Decompressor::new(body, 4096).read_to_end(out),
        _ => zstd::stream::read::Decoder::new(body).and_then(|mut d| d.read_to_end(out)),
    }
}

/// A client's live decoder: each chunk's output as it arrives.
pub enum StreamDecoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl StreamDecoder {
    pub fn new(coding: &str) -> Self {
        match coding {
            "gzip" => Self::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            "deflate" => Self::Zlib(flate2::write::ZlibDecoder::new(Vec::new())),
            "deflate-raw" => Self::Raw(flate2::write::DeflateDecoder::new(Vec::new())),
            "br" => Self::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
            "zstd" => Self::Zstd(zstd::stream::write::Decoder::new(Vec::new()).expect("zstd")),
            other => panic!("no such coding: {other}"),
        }
    }

    /// What `chunk` decodes to, given all before it.
    pub fn chunk(&mut self, chunk: &[u8]) -> Vec<u8> {
        fn drain<W: Write>(w: &mut W, chunk: &[u8], out: fn(&mut W) -> &mut Vec<u8>) -> Vec<u8> {
            w.write_all(chunk).expect("decode");
            w.flush().expect("decode");
            std::mem::take(out(w))
        }
        match self {
            Self::Gzip(d) => drain(d, chunk, |d| d.get_mut()),
            Self::Zlib(d) => drain(d, chunk, |d| d.get_mut()),
            Self::Raw(d) => drain(d, chunk, |d| d.get_mut()),
            Self::Brotli(d) => drain(&mut **d, chunk, |d| d.get_mut()),
            Self::Zstd(d) => drain(d, chunk, |d| d.get_mut()),
        }
    }
}

/// The coding a server picks for an `Accept-Encoding`: the highest
/// q-value among those it speaks; at equal q, gzip, then zstd, br and
/// deflate. `None`: identity.
pub fn negotiate(accept_encoding: &str) -> Option<&'static str> {
    const PREFERRED: [&str; 4] = ["gzip", "zstd", "br", "deflate"];
    let mut best: Option<(f32, usize)> = None;
    let mut wildcard: Option<f32> = None;
    let mut named = [false; 4];
    let mut offers = Vec::new();
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .find_map(|p| {
                p.trim()
                    .to_ascii_lowercase()
                    .strip_prefix("q=")
                    .map(str::to_owned)
            })
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if name == "*" {
            wildcard = Some(q);
        } else if let Some(rank) = PREFERRED.iter().position(|c| *c == name) {
            named[rank] = true;
            offers.push((q, rank));
        }
    }
    if let Some(q) = wildcard {
        offers.extend((0..4).filter(|rank| !named[*rank]).map(|rank| (q, rank)));
    }
    for (q, rank) in offers {
        if q <= 0.0 {
            continue;
        }
        let better = match best {
            None => true,
            Some((best_q, best_rank)) => q > best_q || (q == best_q && rank < best_rank),
        };
        if better {
            best = Some((q, rank));
        }
    }
    best.map(|(_, rank)| PREFERRED[rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_picks_as_the_client_prefers() {
        assert_eq!(negotiate(""), None);
        assert_eq!(negotiate("identity"), None);
        assert_eq!(negotiate("gzip, deflate"), Some("gzip"));
        assert_eq!(negotiate("deflate, gzip, br, zstd"), Some("gzip"));
        assert_eq!(negotiate("br"), Some("br"));
        assert_eq!(negotiate("gzip;q=0.5, br;q=0.9"), Some("br"));
        assert_eq!(negotiate("gzip;q=0, deflate"), Some("deflate"));
        assert_eq!(negotiate("*"), Some("gzip"));
        assert_eq!(negotiate("gzip;q=0, *"), Some("zstd"));
    }

    #[test]
    fn encoded_bodies_decode() {
        for coding in CODINGS {
            let mut encoder = StreamEncoder::new(coding).unwrap();
            let mut body = Vec::new();
            let mut text = Vec::new();
            for i in 0..5 {
                let event = format!("event: ping\ndata: {{\"n\":{i}}}\n\n");
                body.extend_from_slice(&encoder.chunk(event.as_bytes()));
                text.extend_from_slice(event.as_bytes());
            }
            body.extend_from_slice(&encoder.finish());
            assert_eq!(decode(coding, &body), text, "{coding}");
            assert_eq!(decode(coding, &encode(coding, &text)), text, "{coding}");
        }
    }
}
