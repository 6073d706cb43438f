//! Tokenizers: byte-level BPE training and use through Hugging Face `tokenizers` (tokenizer.json),
//! special and chat-role tokens, and token shards (writer + memory-mapped reader) for training.
#![forbid(unsafe_code)]

pub mod bpe;
pub mod chat;
pub mod error;
pub mod fim;
pub mod gguf;
mod jinja;
pub mod shards;
pub mod stream;

pub use bpe::{
    add_special_tokens, decode, encode_batch, encode_each, encode_prompt, encode_with_specials,
    load, pieces, save, special_affixes, token_bytes, train, train_with_report, TokenStats,
    TrainOptions, TrainReport, BATCH_BYTES, CHUNK_BYTES, DEFAULT_SPECIAL_TOKENS, ENDOFTEXT,
    MAX_PIECE_BYTES,
};
pub use error::{Result, TokenizeError};
pub use shards::{Dtype, ShardHeader, ShardWriter, TokenDataset, TokenShard};
pub use stream::DocStream;
pub use tokenizers::Tokenizer;
