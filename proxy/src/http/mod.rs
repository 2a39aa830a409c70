//! The HTTP edge: the relay's own HTTP/1 client, headers, content codings,
//! request and response bodies with their deadlines, and the errors the
//! relay answers with (in the Claude API's shape).
//!
//! May use `base`. The response body reports to accounting through its own
//! `body::Report` trait, so nothing here imports a layer above.

pub mod body;
pub mod body_deadline;
pub mod encoding;
pub mod error;
pub mod h1_client;
pub mod headers;
pub mod request_encoding;
