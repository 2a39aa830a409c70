pub mod h1_server;
pub mod server;
