//! A process-wide request to stop long work early (Ctrl-C, SIGTERM): the command line sets it,
//! loops that can end cleanly (training saves a checkpoint first) poll it.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks running work to stop at its next safe point. Returns whether it had been asked already.
pub fn request() -> bool {
    REQUESTED.swap(true, Ordering::SeqCst)
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
