pub mod breaker;
pub mod keypool;
pub mod pool;
pub mod routing;
