pub mod metrics;
pub mod secrets;
pub mod worker;
