//! What every stage of lmkit shares, with one home each: progress reports ([`Progress`]), atomic
//! file writes ([`atomic`]), input discovery ([`inputs`]), seeded random numbers ([`rng`]), the
//! error that names a file ([`PathError`]) and the special-token names ([`tokens`]).
#![deny(unsafe_code)]

pub mod atomic;
pub mod decompress;
pub mod error;
pub mod inputs;
pub mod memory;
pub mod mmap;
pub mod progress;
pub mod rng;
pub mod stop;
pub mod tokens;

pub use atomic::{write_atomic, write_atomic_bytes, AtomicDir, AtomicFile, OutputDir};
pub use error::{PathError, PathResultExt};
pub use inputs::{collect_inputs, is_gguf, lines_within, read_line_within, MAX_LINE_BYTES};
pub use progress::{NoProgress, Progress, Unit};
