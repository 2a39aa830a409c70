//! claude-relay proxy: the data plane. See `stack` for the request path.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod admission;
pub mod base;
pub mod control;
pub mod http;
pub mod serve;
pub mod stack;
pub mod store;
pub mod upstream;
