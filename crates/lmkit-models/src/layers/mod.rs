//! The building blocks families are made of: the one linear layer and stacked projections
//! (`linear`) and the LoRA adapters it may carry (`lora`), norms and activations (`ops`), rotary embeddings (`rope`), attention over a KV
//! cache (`attention`), the cache itself (`kv_cache`, which also holds recurrent state), and
//! sentence-transformers pooling of an encoder's states (`pooling`), and post-norm layers' parts
//! as training passes read them (`parts`).

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod parts;
pub mod pooling;
pub mod rope;
