//! Compressed request bodies (`Content-Encoding: gzip`, which the Claude API
//! accepts, and `deflate`). The bytes go upstream as sent, header and all;
//! only the relay's own readers of the body (the JSON check, the cache key)
//! see it decoded, and no more than `server.max_body_bytes` of it: a small
//! compressed body that inflates past the cap is refused (413) without the
//! decoded bytes ever outgrowing the cap.
//!
//! Any other coding (`br`, `zstd`, ...) on a body the relay must read is
//! refused with 415 and `Accept-Encoding: gzip, deflate` (RFC 9110 §15.5.16):
//! the upstream would not take it either, and SDKs do not retry a 415.

use std::io::Read;
use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, header};
use tokio::sync::Semaphore;

use crate::http::error::RelayError;

/// The content coding of a request body (a 415 names these: see
/// `error::ACCEPTED_REQUEST_CODINGS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
}

impl Coding {
    /// The request's coding; an unknown one, or more than one, is refused.
    pub fn of(headers: &HeaderMap) -> Result<Self, RelayError> {
        let mut coding = Coding::Identity;
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let text = value.to_str().unwrap_or("\u{fffd}");
            for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case("identity") {
                    continue;
                }
                let next = match crate::http::encoding::Coding::from_name(token) {
                    Some(crate::http::encoding::Coding::Gzip) => Coding::Gzip,
                    Some(crate::http::encoding::Coding::Deflate) => Coding::Deflate,
                    _ => return Err(unsupported(token)),
                };
                if coding != Coding::Identity {
                    return Err(RelayError::UnsupportedEncoding(
                        "request bodies with more than one content coding are not supported; send gzip or deflate alone".into(),
                    ));
                }
                coding = next;
            }
        }
        Ok(coding)
    }
}

fn unsupported(token: &str) -> RelayError {
    // The token is the client's own header, not a secret; bounded all the same.
    let shown: String = token.chars().take(32).collect();
    RelayError::UnsupportedEncoding(format!(
        "request body Content-Encoding {shown:?} is not supported; send it as gzip, deflate or uncompressed"
    ))
}

/// [`decode`] on the blocking pool, as many at a time as there are cores.
/// Off the worker: inflating up to `limit` bytes takes tens of
/// milliseconds, which every other connection of the single-threaded
/// worker would wait out (compressed requests are rare; the hand-over costs
/// microseconds). A few at a time: each may hold `limit` bytes, so a flood
/// of small bombs holds at most cores × `limit`, as decoding in place did.
pub async fn decode_aside(body: Bytes, coding: Coding, limit: u64) -> Result<Bytes, RelayError> {
    static DECODING: LazyLock<Semaphore> = LazyLock::new(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    // Never closed.
    let _turn = DECODING.acquire().await;
    tokio::task::spawn_blocking(move || decode(&body, coding, limit))
        .await
        .unwrap_or_else(|error| {
            Err(RelayError::InvalidRequest(format!(
                "request body could not be decoded: {error}"
            )))
        })
}

/// The body as its readers see it: decoded, at most `limit` bytes (413
/// past it), 400 when it does not decode.
pub fn decode(body: &Bytes, coding: Coding, limit: u64) -> Result<Bytes, RelayError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // HTTP's `deflate` is the zlib format; some clients send raw deflate.
    let zlib =
        matches!(&body[..], [cmf, flg, ..] if crate::http::encoding::zlib_header(*cmf, *flg));
    match coding {
        Coding::Identity => return Ok(body.clone()),
        Coding::Gzip => bounded(flate2::bufread::MultiGzDecoder::new(&body[..]), body, limit),
        Coding::Deflate if zlib => {
            bounded(flate2::bufread::ZlibDecoder::new(&body[..]), body, limit)
        }
        Coding::Deflate => bounded(flate2::bufread::DeflateDecoder::new(&body[..]), body, limit),
    }
    .map(Bytes::from)
}

/// Reads `decoder` to its end, a chunk at a time, into a buffer that never
/// holds (nor reserves) more than `limit` bytes.
fn bounded(mut decoder: impl Read, body: &[u8], limit: usize) -> Result<Vec<u8>, RelayError> {
    // JSON compresses some 4 to 10 times: a first guess that rarely grows.
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match decoder.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(RelayError::InvalidRequest(format!(
                    "request body could not be decoded as its Content-Encoding says: {error}"
                )));
            }
        };
        if n > limit - out.len() {
            return Err(RelayError::BodyTooLarge {
                limit: limit as u64,
            });
        }
        if out.capacity() - out.len() < n {
            // Doubling, but never reserving past the cap.
            out.reserve_exact(out.capacity().max(n).min(limit - out.len()));
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        Bytes::from(e.finish().unwrap())
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, value.parse().unwrap());
        h
    }

    #[test]
    fn codings_are_read_from_the_header() {
        assert_eq!(Coding::of(&HeaderMap::new()).unwrap(), Coding::Identity);
        assert_eq!(Coding::of(&headers("GZIP")).unwrap(), Coding::Gzip);
        assert_eq!(
            Coding::of(&headers("identity, gzip")).unwrap(),
            Coding::Gzip
        );
        assert_eq!(Coding::of(&headers("deflate")).unwrap(), Coding::Deflate);
        for refused in ["br", "zstd", "gzip, deflate", "compress"] {
            let error = Coding::of(&headers(refused)).unwrap_err();
            assert_eq!(error.status(), 415, "{refused}");
        }
    }

    #[test]
    fn gzip_and_both_deflates_decode() {
        let json = br#"{"model":"claude-test","messages":[]}"#;
        let decoded = decode(&gzip(json), Coding::Gzip, 1024).unwrap();
        assert_eq!(&decoded[..], json);
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(json).unwrap();
        let zlib = Bytes::from(zlib.finish().unwrap());
        assert_eq!(&decode(&zlib, Coding::Deflate, 1024).unwrap()[..], json);
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(json).unwrap();
        let raw = Bytes::from(raw.finish().unwrap());
        assert_eq!(&decode(&raw, Coding::Deflate, 1024).unwrap()[..], json);
    }

    #[test]
    fn a_bomb_stops_at_the_cap_and_never_reserves_past_it() {
        let bomb = gzip(&vec![b' '; 4 << 20]);
        assert!(bomb.len() < 8 * 1024, "{}", bomb.len());
        let error = decode(&bomb, Coding::Gzip, 1 << 20).unwrap_err();
        assert_eq!(error.status(), 413);
        // Exactly at the cap is fine, and the buffer grew to the cap, not past it.
        let at_cap = gzip(&vec![b' '; 1 << 20]);
        let decoder = flate2::bufread::GzDecoder::new(&at_cap[..]);
        let out = bounded(decoder, &at_cap, 1 << 20).unwrap();
        assert_eq!((out.len(), out.capacity()), (1 << 20, 1 << 20));
    }

    #[test]
    fn corrupt_or_cut_gzip_is_a_bad_request() {
        let good = gzip(br#"{"a":1}"#);
        let cut = good.slice(..good.len() - 6);
        assert_eq!(decode(&cut, Coding::Gzip, 1024).unwrap_err().status(), 400);
        let mut flipped = good.to_vec();
        let at = flipped.len() - 5;
        flipped[at] ^= 0xff; // the length in the trailer
        let flipped = Bytes::from(flipped);
        assert_eq!(
            decode(&flipped, Coding::Gzip, 1024).unwrap_err().status(),
            400
        );
        let garbage = Bytes::from_static(b"{\"not\":\"gzip\"}");
        assert_eq!(
            decode(&garbage, Coding::Gzip, 1024).unwrap_err().status(),
            400
        );
    }
}
