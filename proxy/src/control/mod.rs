//! The configuration in force: the runtime snapshot built from it, reloads,
//! downstream TLS certificates and the admin endpoints.
//!
//! May use every layer below `stack`: `base`, `store`, `http`, `upstream`,
//! `accounting`, `admission`.

pub mod admin;
pub mod reload;
pub mod runtime;
pub mod tls;
