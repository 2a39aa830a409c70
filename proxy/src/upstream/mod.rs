//! The way out: which regions may serve a request (`routing`), their
//! circuit breakers, the upstream keys' pools, and the connection pools and
//! egress proxies that carry requests (`pool`).
//!
//! May use `base`, `store` and `http`.

pub mod breaker;
pub mod keypool;
pub mod pool;
pub mod routing;
