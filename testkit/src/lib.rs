//! Test parts for claude-relay: real servers and processes, started by tests.
pub mod compress;
pub mod egress;
pub mod http;
pub mod otlp;
pub mod proxy;
pub mod redis;
pub mod upstream;
