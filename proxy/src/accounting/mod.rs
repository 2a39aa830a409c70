//! What a request costs and leaves behind: token usage and quotas, prices,
//! the response cache, the access record written when a response ends, and
//! its trace spans.
//!
//! May use `base`, `store`, `http` and `upstream`.

pub mod access;
pub mod cache;
pub mod pricing;
pub mod trace;
pub mod usage;
