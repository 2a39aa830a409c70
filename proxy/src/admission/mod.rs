//! Who may send a request: relay keys and their clients, request
//! signatures, and the `sign` command that makes them.
//!
//! May use `base`, `store`, `http` and `accounting` (a client's quota).

pub mod auth;
pub mod sign_cli;
pub mod signing;
