pub mod admin;
pub mod reload;
pub mod runtime;
pub mod tls;
