//! The building blocks families are made of: linear layers, norms and activations (`ops`),
//! attention over a KV cache (`attention`), and the cache itself (`kv_cache`, which also holds
//! recurrent state).

pub mod attention;
pub mod kv_cache;
pub mod ops;
