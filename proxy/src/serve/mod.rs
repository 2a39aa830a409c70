//! Listeners and connections: the process's start, serve and drain, and the
//! relay's own HTTP/1 server, which hand each request to `stack`.
//!
//! May use anything; nothing imports it.

pub mod h1_server;
pub mod server;
