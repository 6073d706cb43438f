//! Names of the special tokens that lmkit's tokenizers add and its models and tools look for.

/// Separates documents; also the start and end of a text for decoders.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";
/// Masked-LM input token.
pub const MASK: &str = "<|mask|>";
pub const SYSTEM: &str = "<|system|>";
pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
/// Ends a chat turn.
pub const END_OF_TURN: &str = "<|end|>";

/// Special tokens added by default: end of text, padding, masking (for BERT-style models) and
/// chat roles.
pub const DEFAULT_SPECIAL_TOKENS: &[&str] =
    &[ENDOFTEXT, PAD, MASK, SYSTEM, USER, ASSISTANT, END_OF_TURN];

/// Mask tokens of the tokenizers lmkit reads: its own, BERT's (WordPiece) and RoBERTa/BART's.
pub const MASK_TOKENS: &[&str] = &[MASK, "[MASK]", "<mask>"];

/// Where a chat model's reply ends, for stop conditions in generation.
pub const CHAT_STOPS: &[&str] = &[END_OF_TURN, USER, ENDOFTEXT];
