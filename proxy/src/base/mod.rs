//! What every layer leans on: the metrics registry, secrets read from files,
//! and the worker threads' identity.
//!
//! Uses nothing else in the crate.

pub mod metrics;
pub mod secrets;
pub mod worker;
