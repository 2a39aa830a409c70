//! Errors the relay itself produces, and the one place they become HTTP
//! responses in the Claude API's error envelope:
//! `{"type":"error","error":{"type":"...","message":"..."},"request_id":"..."}`.
//!
//! Messages never carry secrets or request bodies.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::http::body::RelayBody;
use crate::http::headers::RELAY_REQUEST_ID;

/// What the `Accept-Encoding` of a 415 names: the codings `request_encoding` reads.
const ACCEPTED_REQUEST_CODINGS: &str = "gzip, deflate";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("signed request refused: {0}")]
    Signature(#[from] SignatureError),
    #[error("{0}")]
    NotFound(String),
    /// The client sent its request body too slowly.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("request body is larger than the relay's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// A request body in a content coding the relay cannot read (415).
    #[error("{0}")]
    UnsupportedEncoding(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    #[error("could not reach the upstream region {region}: {reason}")]
    UpstreamConnect { region: String, reason: String },
    #[error("upstream region {region} did not answer within {after:?}")]
    UpstreamTimeout { region: String, after: Duration },
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Unavailable(String),
}

impl RelayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) | Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamConnect { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded { .. } | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.type` of the Claude API envelope.
    pub fn error_type(&self) -> &'static str {
        match self {
            // The API uses this type for the 4xx statuses it lists no
            // type for; the SDKs retry a 408 of their own accord.
            Self::InvalidRequest(_) | Self::RequestTimeout(_) | Self::UnsupportedEncoding(_) => {
                "invalid_request_error"
            }
            Self::Unauthenticated(_) | Self::Signature(_) => "authentication_error",
            Self::NotFound(_) => "not_found_error",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::RateLimited { .. } => "rate_limit_error",
            Self::UpstreamConnect { .. } | Self::UpstreamTimeout { .. } => "api_error",
            Self::Overloaded { .. } | Self::Unavailable(_) => "overloaded_error",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            Self::Overloaded { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn into_response(self, request_id: &str) -> Response<RelayBody> {
        let mut response = error_response(
            self.status(),
            self.error_type(),
            &self.to_string(),
            request_id,
            self.retry_after(),
        );
        if let Self::UnsupportedEncoding(_) = self {
            // RFC 9110 §15.5.16: a 415 for a content coding names the ones taken.
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(ACCEPTED_REQUEST_CODINGS),
            );
        }
        response
    }
}

/// An error response in the Claude API envelope.
pub fn error_response(
    status: StatusCode,
    error_type: &str,
    message: &str,
    request_id: &str,
    retry_after: Option<Duration>,
) -> Response<RelayBody> {
    let body = serde_json::json!({
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    });
    let mut response = Response::new(RelayBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        // SDKs read `request-id`; on errors the relay made, that is ours.
        headers.insert("request-id", id.clone());
        headers.insert(RELAY_REQUEST_ID, id);
    }
    if let Some(after) = retry_after {
        // Round up: a client that waits less than asked only gets refused again.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

/// Why a signed request was refused. The message names the failed check and
/// never contains a secret, a signature or a header value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {header} header")]
    Missing { header: &'static str },
    #[error("malformed {field}: {reason}")]
    Malformed {
        field: &'static str,
        reason: &'static str,
    },
    #[error("unknown key id")]
    UnknownKeyId,
    #[error("signed requests are not enabled for this key id")]
    NotAllowed,
    #[error(
        "stale timestamp: {} s {} the relay's clock, more than the allowed {window_secs} s",
        skew_secs.unsigned_abs(),
        if *skew_secs < 0 { "behind" } else { "ahead of" }
    )]
    StaleTimestamp { skew_secs: i64, window_secs: u64 },
    #[error("bad signature")]
    BadSignature,
    /// Not produced by `signing::verify`: the caller's verdict when the store says
    /// the nonce was seen before, so every refusal speaks the same way.
    #[error("replayed nonce")]
    ReplayedNonce,
}

impl SignatureError {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SignatureError::Missing { .. } => "missing_header",
            SignatureError::Malformed { .. } => "malformed_header",
            SignatureError::UnknownKeyId => "unknown_key_id",
            SignatureError::NotAllowed => "not_allowed",
            SignatureError::StaleTimestamp { .. } => "stale_timestamp",
            SignatureError::BadSignature => "bad_signature",
            SignatureError::ReplayedNonce => "replayed_nonce",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_the_claude_shape() {
        let response = RelayError::RateLimited {
            message: "slow down".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response("relay_1");
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["request-id"], "relay_1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["type"], "rate_limit_error");
        assert_eq!(json["error"]["message"], "slow down");
        assert_eq!(json["request_id"], "relay_1");
    }

    #[test]
    fn statuses_match_what_sdks_expect() {
        let cases: [(RelayError, u16, &str); 6] = [
            (
                RelayError::RequestTimeout("slow".into()),
                408,
                "invalid_request_error",
            ),
            (
                RelayError::BodyTooLarge { limit: 1 },
                413,
                "request_too_large",
            ),
            (
                RelayError::Unauthenticated("x"),
                401,
                "authentication_error",
            ),
            (
                RelayError::UpstreamTimeout {
                    region: "us".into(),
                    after: Duration::from_secs(1),
                },
                504,
                "api_error",
            ),
            (
                RelayError::UpstreamConnect {
                    region: "us".into(),
                    reason: "refused".into(),
                },
                502,
                "api_error",
            ),
            (
                RelayError::Overloaded {
                    message: "none".into(),
                    retry_after: None,
                },
                503,
                "overloaded_error",
            ),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.error_type(), kind);
        }
    }
}
