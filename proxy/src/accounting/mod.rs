//! What a request costs and leaves behind: token usage and quotas, the
//! response cache, and the access record written when a response ends.
//!
//! May use `base`, `store`, `http` and `upstream`.

pub mod access;
pub mod cache;
pub mod usage;
