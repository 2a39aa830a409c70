pub mod auth;
pub mod sign_cli;
pub mod signing;
