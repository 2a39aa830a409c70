pub mod body;
pub mod body_deadline;
pub mod encoding;
pub mod error;
pub mod h1_client;
pub mod headers;
pub mod request_encoding;
