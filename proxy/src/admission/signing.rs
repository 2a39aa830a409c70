//! HMAC-SHA256 request signing, the scheme written down in `docs/signing.md`.
//!
//! A signed request carries four headers:
//!
//! | header | value |
//! |---|---|
//! | `x-relay-key-id` | the client id from the config: 1-63 of `A-Z a-z 0-9 . _ -` |
//! | `x-relay-timestamp` | unix seconds, decimal, no sign or leading zeros |
//! | `x-relay-nonce` | 16-64 of `A-Z a-z 0-9 _ -`, fresh for every request |
//! | `x-relay-signature` | `v1=` and the HMAC-SHA256 as 64 hex digits (written lowercase; uppercase is read too) |
//!
//! The HMAC is computed over the canonical string: these lines joined by `\n`,
//! no trailing newline:
//!
//! ```text
//! claude-relay-hmac-sha256-v1
//! {key id}
//! {method}
//! {path with query, exactly as on the request line}
//! {timestamp}
//! {nonce}
//! {hex SHA-256 of the body}
//! ```
//!
//! No field can contain `\n` (each one is checked against its alphabet), so
//! bytes cannot slide from one field into the next.
//!
//! Everything here is pure: the caller passes the clock, and claims the nonce in
//! the shared store only after [`verify`] succeeded.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::http::error::SignatureError;

pub const KEY_ID_HEADER: &str = "x-relay-key-id";
pub const TIMESTAMP_HEADER: &str = "x-relay-timestamp";
pub const NONCE_HEADER: &str = "x-relay-nonce";
pub const SIGNATURE_HEADER: &str = "x-relay-signature";

/// The four names parsed once: a lookup by `&str` parses and hashes the
/// name again on every request, signed or not.
static HEADER_NAMES: [HeaderName; 4] = [
    HeaderName::from_static(KEY_ID_HEADER),
    HeaderName::from_static(TIMESTAMP_HEADER),
    HeaderName::from_static(NONCE_HEADER),
    HeaderName::from_static(SIGNATURE_HEADER),
];

/// First line of the canonical string; a later scheme gets a new one, so a
/// signature can never be valid under two schemes.
pub const SCHEME: &str = "claude-relay-hmac-sha256-v1";
/// Prefix of the signature header's value.
pub const SIGNATURE_PREFIX: &str = "v1=";
pub const NONCE_MIN_LEN: usize = 16;
pub const NONCE_MAX_LEN: usize = 64;
/// Shorter secrets are refused: they could be guessed offline from one signed request.
pub const MIN_SECRET_LEN: usize = 32;
/// At most 12 digits: enough for the year 33658, and keeps parsing trivially bounded.
const TIMESTAMP_MAX_DIGITS: usize = 12;
/// Slack on top of the nonce TTL for clocks that differ between replicas.
const NONCE_TTL_SLACK: Duration = Duration::from_secs(60);

type HmacSha256 = Hmac<Sha256>;

/// One signing secret of a client, ready to use. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningSecret {
    // Keyed once, cloned per use: saves hashing the key on every request.
    mac: HmacSha256,
}

impl SigningSecret {
    /// The secret's bytes as written (a secret file's content with surrounding
    /// white space already removed); not hex- or base64-decoded.
    pub fn new(bytes: &[u8]) -> Result<Self, ShortSecret> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(ShortSecret);
        }
        let mac = HmacSha256::new_from_slice(bytes).expect("HMAC takes keys of any length");
        Ok(Self { mac })
    }

    fn mac(&self, canonical: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(canonical.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(redacted)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a signing secret must be at least {MIN_SECRET_LEN} bytes")]
pub struct ShortSecret;

/// The parts of a request that the signature covers besides the headers.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target as received (`/v1/messages?beta=true`), not decoded.
    pub path_and_query: &'a str,
    /// The body exactly as received.
    pub body: &'a [u8],
}

/// What identifies one signed request: who, when, and its once-only nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub key_id: &'a str,
    pub timestamp: u64,
    pub nonce: &'a str,
}

/// The signature headers of a request, parsed and checked for form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignatureHeaders<'a> {
    pub stamp: Stamp<'a>,
    signature: [u8; 32],
}

/// A request whose signature matched one of the client's secrets. The nonce
/// still has to be claimed in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified<'a> {
    pub stamp: Stamp<'a>,
    /// Which of the secrets matched: lets the caller see when an old secret
    /// is no longer used and can be removed.
    pub secret_index: usize,
}

fn malformed(field: &'static str, reason: &'static str) -> SignatureError {
    SignatureError::Malformed { field, reason }
}

/// The string the HMAC is computed over (see the module docs).
pub fn canonical_string(stamp: &Stamp<'_>, request: &Request<'_>) -> String {
    use std::fmt::Write;
    let body_hash = Sha256::digest(request.body);
    let mut out = String::with_capacity(
        SCHEME.len()
            + stamp.key_id.len()
            + request.method.len()
            + request.path_and_query.len()
            + stamp.nonce.len()
            + 2 * body_hash.len()
            + 32,
    );
    for field in [SCHEME, stamp.key_id, request.method, request.path_and_query] {
        out.push_str(field);
        out.push('\n');
    }
    let _ = write!(out, "{}\n{}\n", stamp.timestamp, stamp.nonce);
    push_hex(&mut out, &body_hash);
    out
}

/// Lowercase hex of `bytes`, appended: on the hot path, without the
/// per-character collect of `hex::encode`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
}

/// The value of the `x-relay-signature` header: `v1=` and lowercase hex.
pub fn sign(secret: &SigningSecret, stamp: &Stamp<'_>, request: &Request<'_>) -> String {
    let mac = secret.mac(&canonical_string(stamp, request));
    let mut signature = String::with_capacity(SIGNATURE_PREFIX.len() + 2 * mac.len());
    signature.push_str(SIGNATURE_PREFIX);
    push_hex(&mut signature, &mac);
    signature
}

/// The four headers of a signed request, in the order of the module docs.
pub fn signature_headers(
    secret: &SigningSecret,
    stamp: &Stamp<'_>,
    request: &Request<'_>,
) -> [(&'static str, String); 4] {
    [
        (KEY_ID_HEADER, stamp.key_id.to_owned()),
        (TIMESTAMP_HEADER, stamp.timestamp.to_string()),
        (NONCE_HEADER, stamp.nonce.to_owned()),
        (SIGNATURE_HEADER, sign(secret, stamp, request)),
    ]
}

impl<'a> SignatureHeaders<'a> {
    /// `Ok(None)` when the request carries none of the four headers (it may
    /// use a relay key instead); an error when some are there but not all, or
    /// one is malformed or repeated.
    pub fn from_headers(headers: &'a HeaderMap) -> Result<Option<Self>, SignatureError> {
        if HEADER_NAMES.iter().all(|name| !headers.contains_key(name)) {
            return Ok(None);
        }
        let [key_id, timestamp, nonce, signature] =
            [0, 1, 2, 3].map(|i| single_value(headers, &HEADER_NAMES[i]));
        Self::parse(key_id?, timestamp?, nonce?, signature?).map(Some)
    }

    /// Checks the form of each header value.
    pub fn parse(
        key_id: &'a str,
        timestamp: &'a str,
        nonce: &'a str,
        signature: &str,
    ) -> Result<Self, SignatureError> {
        check_key_id(key_id)?;
        let timestamp = parse_timestamp(timestamp)?;
        check_nonce(nonce)?;
        let signature = parse_signature(signature)?;
        Ok(Self {
            stamp: Stamp {
                key_id,
                timestamp,
                nonce,
            },
            signature,
        })
    }
}

fn single_value<'h>(
    headers: &'h HeaderMap,
    header: &'static HeaderName,
) -> Result<&'h str, SignatureError> {
    let name = header.as_str();
    let mut values = headers.get_all(header).iter();
    let value = values
        .next()
        .ok_or(SignatureError::Missing { header: name })?;
    if values.next().is_some() {
        return Err(malformed(name, "given more than once"));
    }
    value
        .to_str()
        .map_err(|_| malformed(name, "not visible ASCII"))
}

/// The key id is the client id, so it has the client id's alphabet.
pub fn check_key_id(key_id: &str) -> Result<(), SignatureError> {
    let ok = (1..=63).contains(&key_id.len())
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(malformed(
            KEY_ID_HEADER,
            "must be 1 to 63 characters of A-Z a-z 0-9 . _ -",
        ))
    }
}

pub fn check_nonce(nonce: &str) -> Result<(), SignatureError> {
    let ok = (NONCE_MIN_LEN..=NONCE_MAX_LEN).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(malformed(
            NONCE_HEADER,
            "must be 16 to 64 characters of A-Z a-z 0-9 _ -",
        ))
    }
}

fn parse_timestamp(text: &str) -> Result<u64, SignatureError> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || text.len() > TIMESTAMP_MAX_DIGITS {
        return Err(malformed(
            TIMESTAMP_HEADER,
            "must be unix seconds as decimal digits",
        ));
    }
    // The canonical string prints the number, so only one spelling may be valid.
    if text.len() > 1 && text.starts_with('0') {
        return Err(malformed(TIMESTAMP_HEADER, "must not have leading zeros"));
    }
    text.parse()
        .map_err(|_| malformed(TIMESTAMP_HEADER, "out of range"))
}

fn parse_signature(text: &str) -> Result<[u8; 32], SignatureError> {
    let hex_digits = text
        .strip_prefix(SIGNATURE_PREFIX)
        .ok_or(malformed(SIGNATURE_HEADER, "must start with v1="))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out)
        .map_err(|_| malformed(SIGNATURE_HEADER, "must be v1= and 64 hex digits"))?;
    Ok(out)
}

/// Checks the request target and method, which the canonical string holds
/// verbatim: a newline in either would make the string ambiguous.
fn check_request(request: &Request<'_>) -> Result<(), SignatureError> {
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !visible(request.method) {
        return Err(malformed("method", "must be visible ASCII"));
    }
    if !request.path_and_query.starts_with('/') || !visible(request.path_and_query) {
        return Err(malformed(
            "request target",
            "must start with / and be visible ASCII",
        ));
    }
    Ok(())
}

/// Verifies a signed request against the secrets of its key id. An empty
/// `secrets` means the key id is unknown. Checks, in order: request form,
/// key id, timestamp within `window` of `now_unix` either way, then the
/// signature against each secret in constant time.
pub fn verify<'a>(
    headers: &SignatureHeaders<'a>,
    request: &Request<'_>,
    secrets: &[SigningSecret],
    now_unix: u64,
    window: Duration,
) -> Result<Verified<'a>, SignatureError> {
    check_request(request)?;
    if secrets.is_empty() {
        return Err(SignatureError::UnknownKeyId);
    }
    let stamp = headers.stamp;
    let window_secs = window.as_secs();
    if stamp.timestamp.abs_diff(now_unix) > window_secs {
        let skew_secs = if stamp.timestamp >= now_unix {
            i64::try_from(stamp.timestamp - now_unix).unwrap_or(i64::MAX)
        } else {
            i64::try_from(now_unix - stamp.timestamp).map_or(i64::MIN, |d| -d)
        };
        return Err(SignatureError::StaleTimestamp {
            skew_secs,
            window_secs,
        });
    }
    let canonical = canonical_string(&stamp, request);
    // Every secret is tried, so the time taken does not tell which one matched.
    let mut matched = None;
    for (index, secret) in secrets.iter().enumerate() {
        let equal: bool = secret.mac(&canonical).ct_eq(&headers.signature).into();
        if equal && matched.is_none() {
            matched = Some(index);
        }
    }
    match matched {
        Some(secret_index) => Ok(Verified {
            stamp,
            secret_index,
        }),
        None => Err(SignatureError::BadSignature),
    }
}

/// How long a nonce must be remembered: a timestamp stays acceptable for
/// twice the window (from `window` ahead of the clock to `window` behind),
/// plus slack for replicas whose clocks differ.
pub fn nonce_ttl(window: Duration) -> Duration {
    window * 2 + NONCE_TTL_SLACK
}

/// The current time in unix seconds, as [`verify`] takes it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh nonce: 32 characters of `A-Z a-z 0-9 _ -` (192 random bits).
pub fn generate_nonce() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    // 64 divides 256, so taking the low six bits keeps every character equally likely.
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const SECRET: &[u8] = b"test-secret-0123456789abcdefghijklmnop";
    const OTHER_SECRET: &[u8] = b"other-secret-0123456789abcdefghijklmno";
    const NOW: u64 = 1_764_136_800;
    const WINDOW: Duration = Duration::from_secs(300);
    const NONCE: &str = "n0nce-0123456789_abc";
    const BODY: &[u8] = br#"{"model":"claude-sonnet-4-5","max_tokens":16}"#;

    fn secret(bytes: &[u8]) -> SigningSecret {
        SigningSecret::new(bytes).unwrap()
    }

    fn request() -> Request<'static> {
        Request {
            method: "POST",
            path_and_query: "/v1/messages?beta=true",
            body: BODY,
        }
    }

    fn stamp() -> Stamp<'static> {
        Stamp {
            key_id: "app",
            timestamp: NOW,
            nonce: NONCE,
        }
    }

    fn header_map(headers: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    /// Signs `signed` with `signer`, then verifies `received` against `secrets` at `now`.
    fn check(
        signer: &SigningSecret,
        signed: (Stamp<'_>, Request<'_>),
        received: (Stamp<'_>, Request<'_>),
        secrets: &[SigningSecret],
        now: u64,
    ) -> Result<usize, SignatureError> {
        let signature = sign(signer, &signed.0, &signed.1);
        let received_stamp = received.0;
        let timestamp = received_stamp.timestamp.to_string();
        let headers = SignatureHeaders::parse(
            received_stamp.key_id,
            &timestamp,
            received_stamp.nonce,
            &signature,
        )?;
        verify(&headers, &received.1, secrets, now, WINDOW).map(|v| v.secret_index)
    }

    #[test]
    fn canonical_string_has_one_field_per_line() {
        let text = canonical_string(&stamp(), &request());
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(
            lines,
            [
                "claude-relay-hmac-sha256-v1",
                "app",
                "POST",
                "/v1/messages?beta=true",
                "1764136800",
                NONCE,
                hex::encode(Sha256::digest(BODY)).as_str(),
            ]
        );
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn signature_round_trips_through_headers() {
        let s = secret(SECRET);
        let headers = signature_headers(&s, &stamp(), &request());
        let signature = &headers[3].1;
        assert!(signature.starts_with("v1="));
        assert_eq!(signature.len(), 3 + 64);
        assert!(
            signature[3..]
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        );

        let map = header_map(&headers);
        let parsed = SignatureHeaders::from_headers(&map).unwrap().unwrap();
        let verified = verify(&parsed, &request(), &[s], NOW, WINDOW).unwrap();
        assert_eq!(verified.stamp, stamp());
        assert_eq!(verified.secret_index, 0);
    }

    #[test]
    fn every_signed_field_change_breaks_the_signature() {
        let s = secret(SECRET);
        let secrets = [s.clone()];
        let signed = (stamp(), request());
        assert_eq!(check(&s, signed, signed, &secrets, NOW), Ok(0));

        let changed_requests = [
            Request {
                method: "PUT",
                ..request()
            },
            Request {
                path_and_query: "/v1/messages/count_tokens?beta=true",
                ..request()
            },
            Request {
                path_and_query: "/v1/messages?beta=false",
                ..request()
            },
            Request {
                path_and_query: "/v1/messages",
                ..request()
            },
            Request {
                body: br#"{"model":"claude-sonnet-4-5","max_tokens":17}"#,
                ..request()
            },
            Request {
                body: b"",
                ..request()
            },
        ];
        for changed in changed_requests {
            assert_eq!(
                check(&s, signed, (stamp(), changed), &secrets, NOW),
                Err(SignatureError::BadSignature),
                "{changed:?}"
            );
        }
        let changed_stamps = [
            Stamp {
                timestamp: NOW + 1,
                ..stamp()
            },
            Stamp {
                nonce: "n0nce-0123456789_abd",
                ..stamp()
            },
            Stamp {
                key_id: "app2",
                ..stamp()
            },
        ];
        for changed in changed_stamps {
            assert_eq!(
                check(&s, signed, (changed, request()), &secrets, NOW),
                Err(SignatureError::BadSignature),
                "{changed:?}"
            );
        }
        // Another client's secret does not verify this client's request.
        assert_eq!(
            check(&s, signed, signed, &[secret(OTHER_SECRET)], NOW),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn bytes_cannot_slide_between_fields() {
        // With plain concatenation these two would sign the same bytes.
        let a = Stamp {
            nonce: "aaaaaaaaaaaaaaaa1",
            ..stamp()
        };
        let b = Stamp {
            nonce: "aaaaaaaaaaaaaaaa",
            ..stamp()
        };
        let ra = Request {
            path_and_query: "/v1/x",
            ..request()
        };
        let rb = Request {
            path_and_query: "/v1/x1",
            ..request()
        };
        assert_ne!(canonical_string(&a, &ra), canonical_string(&b, &rb));
        let s = secret(SECRET);
        assert_ne!(sign(&s, &a, &ra), sign(&s, &b, &rb));
    }

    #[test]
    fn timestamp_window_holds_on_both_sides() {
        let s = secret(SECRET);
        let secrets = [s.clone()];
        let at = |timestamp: u64| {
            let st = Stamp {
                timestamp,
                ..stamp()
            };
            check(&s, (st, request()), (st, request()), &secrets, NOW)
        };
        assert_eq!(at(NOW - 300), Ok(0));
        assert_eq!(at(NOW + 300), Ok(0));
        assert_eq!(
            at(NOW - 301),
            Err(SignatureError::StaleTimestamp {
                skew_secs: -301,
                window_secs: 300
            })
        );
        assert_eq!(
            at(NOW + 301),
            Err(SignatureError::StaleTimestamp {
                skew_secs: 301,
                window_secs: 300
            })
        );
        let message = at(NOW - 301).unwrap_err().to_string();
        assert_eq!(
            message,
            "stale timestamp: 301 s behind the relay's clock, more than the allowed 300 s"
        );
        // Far outside, with no overflow in the skew arithmetic.
        assert!(matches!(at(0), Err(SignatureError::StaleTimestamp { .. })));
        assert!(matches!(
            at(999_999_999_999),
            Err(SignatureError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn rotation_accepts_every_listed_secret() {
        let old = secret(SECRET);
        let new = secret(OTHER_SECRET);
        let both = [old.clone(), new.clone()];
        let signed = (stamp(), request());
        assert_eq!(check(&old, signed, signed, &both, NOW), Ok(0));
        assert_eq!(check(&new, signed, signed, &both, NOW), Ok(1));
        let only_new = [new.clone()];
        assert_eq!(
            check(&old, signed, signed, &only_new, NOW),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(check(&new, signed, signed, &only_new, NOW), Ok(0));
    }

    #[test]
    fn unknown_key_id_when_no_secrets() {
        let s = secret(SECRET);
        let signed = (stamp(), request());
        assert_eq!(
            check(&s, signed, signed, &[], NOW),
            Err(SignatureError::UnknownKeyId)
        );
    }

    #[test]
    fn absent_headers_are_not_an_error() {
        assert_eq!(SignatureHeaders::from_headers(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn malformed_headers_name_the_check() {
        let s = secret(SECRET);
        let good = signature_headers(&s, &stamp(), &request());
        let with = |name: &str, value: Option<&str>| {
            let mut headers = good.to_vec();
            headers.retain(|(n, _)| *n != name);
            if let Some(value) = value {
                let name = good.iter().find(|(n, _)| *n == name).unwrap().0;
                headers.push((name, value.to_owned()));
            }
            let map = header_map(&headers);
            SignatureHeaders::from_headers(&map).map(|_| ())
        };
        assert_eq!(with(NONCE_HEADER, Some(NONCE)), Ok(()));

        let cases: &[(&str, Option<&str>, &str)] = &[
            (KEY_ID_HEADER, None, "missing x-relay-key-id header"),
            (SIGNATURE_HEADER, None, "missing x-relay-signature header"),
            (KEY_ID_HEADER, Some(""), "malformed x-relay-key-id"),
            (KEY_ID_HEADER, Some("a/b"), "malformed x-relay-key-id"),
            (
                TIMESTAMP_HEADER,
                Some("17641368OO"),
                "malformed x-relay-timestamp",
            ),
            (
                TIMESTAMP_HEADER,
                Some("-1764136800"),
                "malformed x-relay-timestamp",
            ),
            (TIMESTAMP_HEADER, Some("01764136800"), "leading zeros"),
            (
                TIMESTAMP_HEADER,
                Some("1764136800000"),
                "malformed x-relay-timestamp",
            ),
            (TIMESTAMP_HEADER, Some(""), "malformed x-relay-timestamp"),
            (NONCE_HEADER, Some("short-nonce"), "malformed x-relay-nonce"),
            (
                NONCE_HEADER,
                Some(&"x".repeat(65)),
                "malformed x-relay-nonce",
            ),
            (
                NONCE_HEADER,
                Some("nonce+with/base64=="),
                "malformed x-relay-nonce",
            ),
            (
                NONCE_HEADER,
                Some("nonce with spaces 123"),
                "malformed x-relay-nonce",
            ),
            (
                SIGNATURE_HEADER,
                Some(&good[3].1[3..]),
                "must start with v1=",
            ),
            (SIGNATURE_HEADER, Some(&good[3].1[..66]), "64 hex digits"),
            (
                SIGNATURE_HEADER,
                Some(&format!("{}0", good[3].1)),
                "64 hex digits",
            ),
            (
                SIGNATURE_HEADER,
                Some(&format!("v1={}", "g".repeat(64))),
                "64 hex digits",
            ),
        ];
        for (name, value, expected) in cases {
            let err = with(name, *value).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}={value:?}: {err}");
        }
        // The 16- and 64-character ends of the nonce length are accepted.
        assert_eq!(with(NONCE_HEADER, Some(&"x".repeat(16))), Ok(()));
        assert_eq!(with(NONCE_HEADER, Some(&"x".repeat(64))), Ok(()));
        assert!(with(NONCE_HEADER, Some(&"x".repeat(15))).is_err());
        // Uppercase hex is accepted too.
        let upper = format!("v1={}", good[3].1[3..].to_uppercase());
        assert_eq!(with(SIGNATURE_HEADER, Some(&upper)), Ok(()));

        // A repeated header is refused rather than one copy picked.
        let mut map = header_map(&good);
        map.append(
            NONCE_HEADER,
            HeaderValue::from_static("another-nonce-1234567"),
        );
        let err = SignatureHeaders::from_headers(&map)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "malformed x-relay-nonce: given more than once");
        // Not visible ASCII.
        let mut map = header_map(&good);
        map.insert(
            NONCE_HEADER,
            HeaderValue::from_bytes(b"nonce\xff0123456789abc").unwrap(),
        );
        assert!(SignatureHeaders::from_headers(&map).is_err());
    }

    #[test]
    fn request_target_with_a_newline_is_refused() {
        let s = secret(SECRET);
        let st = stamp();
        let bad = Request {
            path_and_query: "/v1/messages\n1764136800",
            ..request()
        };
        let err = check(&s, (st, bad), (st, bad), std::slice::from_ref(&s), NOW).unwrap_err();
        assert_eq!(err.label(), "malformed_header");
        let bad = Request {
            path_and_query: "v1/messages",
            ..request()
        };
        assert!(check(&s, (st, bad), (st, bad), std::slice::from_ref(&s), NOW).is_err());
    }

    #[test]
    fn secrets_are_never_shown() {
        assert!(matches!(SigningSecret::new(b"too short"), Err(ShortSecret)));
        let s = secret(SECRET);
        assert_eq!(format!("{s:?}"), "SigningSecret(redacted)");
        let signed = (stamp(), request());
        let err = check(&secret(OTHER_SECRET), signed, signed, &[s], NOW).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("test-secret"), "{text}");
        assert!(!text.contains(NONCE), "{text}");
    }

    #[test]
    fn generated_nonces_are_valid_and_distinct() {
        let a = generate_nonce().unwrap();
        let b = generate_nonce().unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(check_nonce(&a), Ok(()));
        assert_ne!(a, b);
    }

    #[test]
    fn nonce_ttl_covers_the_whole_validity() {
        assert!(nonce_ttl(WINDOW) >= WINDOW * 2);
    }
}
