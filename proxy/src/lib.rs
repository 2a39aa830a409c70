//! claude-relay proxy: the data plane. See `stack` for the request path.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod body;
pub mod body_deadline;
pub mod breaker;
pub mod cache;
pub mod encoding;
pub mod error;
pub mod h1_client;
pub mod h1_server;
pub mod headers;
pub mod keypool;
pub mod metrics;
pub mod pricing;
pub mod reload;
pub mod request_encoding;
pub mod routing;
pub mod runtime;
pub mod secrets;
pub mod server;
pub mod sign_cli;
pub mod signing;
pub mod stack;
pub mod store;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod usage;
pub mod worker;
