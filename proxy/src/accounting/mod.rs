pub mod access;
pub mod cache;
pub mod usage;
