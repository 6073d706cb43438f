//! Retrieval for lmkit: documents are cut into chunks ([`chunk`]), embedded with a BERT-family
//! sentence encoder ([`embed`]), and stored in an index directory ([`index`]) searched by an HNSW
//! graph or exactly ([`hnsw`]), by BM25 ([`bm25`]), or both fused by reciprocal rank, under
//! metadata filters ([`filter`]). [`prompt`] turns the hits into a grounded prompt with numbered
//! sources.
#![forbid(unsafe_code)]

pub mod bm25;
pub mod chunk;
pub mod embed;
mod error;
pub mod eval;
pub mod filter;
pub mod hnsw;
pub mod index;
pub mod ingest;
pub mod pg;
pub mod prompt;
pub mod sources;
pub mod store;
pub mod words;

pub use error::{RagError, Result};
pub use index::{Found, Hit, Index, Manifest, Mode, SearchOptions, Selector};
pub use store::Store;
