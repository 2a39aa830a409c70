//! Worker threads: the proxy runs one single-threaded runtime per core, each
//! with its own listener (SO_REUSEPORT) and its own upstream pools, so a
//! request is served start to end on one thread, as nginx workers do.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Index of the calling worker thread (0 off the workers).
pub fn current() -> usize {
    index().unwrap_or(0)
}

/// Index of the calling worker thread; `None` off the workers.
pub fn index() -> Option<usize> {
    WORKER.with(Cell::get)
}

pub fn set_current(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// Workers beyond this many share the control thread's Redis connections
/// instead of having one of their own.
pub const MAX_WORKERS: usize = 256;

/// `server.workers`, with 0 meaning one per available core.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}
