//! Scaled dot-product attention with a causal mask (Vaswani et al. 2017).

use crate::layers::kv_cache::KvCache;
use candle_core::Tensor;

/// Attention over KV caches: one cache shared by the whole batch (`caches.len() == 1`), or one
/// cache per batch row (sequences at different positions decoded together). `attend` gets the
/// rows' q, k, v ([rows, heads, t, head_dim]) and their cache, and returns their output.
pub fn attend_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [&mut KvCache],
    attend: impl Fn(&Tensor, &Tensor, &Tensor, &mut KvCache) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if let [cache] = caches {
        return attend(q, k, v, cache);
    }
    let b = q.dim(0)?;
    if caches.len() != b {
        candle_core::bail!("{} caches for a batch of {b} rows", caches.len());
    }
    let rows = caches
        .iter_mut()
        .enumerate()
        .map(|(r, cache)| {
            attend(
                &q.narrow(0, r, 1)?,
                &k.narrow(0, r, 1)?,
                &v.narrow(0, r, 1)?,
                cache,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// softmax(q·kᵀ/√d + causal mask)·v for q [b, h, t, d] and k, v [b, h, s, d] with s ≥ t; the t
/// queries are the last t of the s positions.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let att = lmkit_kernels::blas::matmul(q, &k.t()?)?;
    if let Some(att) = lmkit_kernels::fused::causal_softmax(&att, scale)? {
        return lmkit_kernels::blas::matmul(&att, v);
    }
    let att = (att * scale)?;
    let att = if t > 1 {
        // Query i (absolute position s - t + i) sees keys 0..=s - t + i.
        let offset = s - t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), q.device())?.to_dtype(att.dtype())?;
        att.broadcast_add(&mask)?
    } else {
        att
    };
    let att = crate::layers::ops::softmax_last_dim(&att)?;
    lmkit_kernels::blas::matmul(&att, v)
}
