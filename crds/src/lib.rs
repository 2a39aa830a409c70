//! The API of claude-relay: the proxy configuration document that the proxy
//! reads and the operator renders, and (with the operator) the custom resources.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
#[cfg(feature = "kube")]
pub mod resources;

pub use config::ProxyConfig;
pub use duration::HumanDuration;
#[cfg(feature = "kube")]
pub use resources::{ClaudeRelay, UpstreamRegion};
