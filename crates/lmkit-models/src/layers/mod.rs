//! The building blocks families are made of: the one linear layer (`linear`), norms, rope and
//! activations (`ops`),
//! attention over a KV cache (`attention`), and the cache itself (`kv_cache`, which also holds
//! recurrent state).

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod ops;
pub mod rope;
