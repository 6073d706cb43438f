//! Bidirectional (encoder) self-attention over a padded batch, for inference: each sequence
//! attends over its own real tokens only, so padding costs nothing and no [b, h, t, t] score
//! tensor or additive mask is built. Per (sequence, head): S = q·kᵀ over the first `len` rows,
//! P = softmax(scale·S) row by row, y = P·v; padded rows of y are zero.

use crate::blas::{contiguous, gemm_raw, heads_of, require, BlasFloat, Heads, SharedOut};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The attention output [b, t, c] of the packed q|k|v [b, t, 3c]; sequence i has `lens[i]` real
/// tokens at its start.
pub fn padded_attention_fwd<T: BlasFloat>(
    qkv: &[T],
    lens: &[usize],
    s: Heads,
    scale: T,
) -> candle_core::Result<Vec<T>> {
    let blas = require("encoder attention")?;
    let gemm = T::gemm(blas);
    let (t, hd, c) = (s.t, s.hd, s.c());
    let c3 = 3 * c;
    if qkv.len() != s.b * t * c3 || lens.len() != s.b || lens.iter().any(|&l| l > t) {
        candle_core::bail!(
            "encoder attention: q|k|v or lengths do not match [{}, {t}, {c3}]",
            s.b
        );
    }
    let mut y = vec![T::zero(); s.b * t * c];
    let out = SharedOut(y.as_mut_ptr());
    (0..s.b * s.heads).into_par_iter().for_each_init(
        || vec![T::zero(); t * t],
        |p, task| {
            let (bi, h) = (task / s.heads, task % s.heads);
            let n = lens[bi];
            if n == 0 {
                return;
            }
            let (q, k, v) = s.qkv(bi, h);
            // SAFETY: q, k and v rows 0..n of (bi, h) lie at offset + i·3c .. + hd within `qkv`
            // (checked above: [b, t, 3c], n ≤ t); P is n×n (ldc n) within its t·t elements; task
            // (bi, h) alone writes y[bi, 0..n, h·hd .. (h+1)·hd] (ldc c).
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (n, n, hd),
                    (qkv[q..].as_ptr(), c3, false),
                    (qkv[k..].as_ptr(), c3, true),
                    (p.as_mut_ptr(), n),
                );
            }
            for row in p[..n * n].chunks_mut(n) {
                crate::fused::softmax_row(row, n, scale);
            }
            // SAFETY: as above.
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (n, hd, n),
                    (p.as_ptr(), n, false),
                    (qkv[v..].as_ptr(), c3, false),
                    (out.at(bi * t * c + h * hd), c),
                );
            }
        },
    );
    Ok(y)
}

struct PaddedAttention {
    heads: usize,
    lens: Vec<usize>,
    scale: f64,
}

impl CustomOp1 for PaddedAttention {
    fn name(&self) -> &'static str {
        "lmkit-encoder-attention"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = heads_of(l, self.heads)?;
        let y = match st {
            CpuStorage::F32(v) => CpuStorage::F32(padded_attention_fwd(
                contiguous(v, l)?,
                &self.lens,
                s,
                self.scale as f32,
            )?),
            CpuStorage::F64(v) => CpuStorage::F64(padded_attention_fwd(
                contiguous(v, l)?,
                &self.lens,
                s,
                self.scale,
            )?),
            _ => candle_core::bail!("encoder attention: f32 or f64 only"),
        };
        Ok((y, (s.b, s.t, s.c()).into()))
    }
}

/// Bidirectional multi-head attention of the packed q|k|v [b, t, 3c] to [b, t, c], sequence i
/// attending over its first `lens[i]` tokens (inference only: it has no backward pass). `None`
/// when it does not apply (not CPU f32/f64, or no BLAS library).
pub fn encoder_attention(
    qkv: &Tensor,
    heads: usize,
    lens: &[usize],
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !(qkv.device().is_cpu()
        && matches!(qkv.dtype(), DType::F32 | DType::F64)
        && crate::blas::available())
    {
        return Ok(None);
    }
    qkv.contiguous()?
        .apply_op1_no_bwd(&PaddedAttention {
            heads,
            lens: lens.to_vec(),
            scale,
        })
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn matches_masked_softmax_attention() {
        if !crate::blas::available() {
            eprintln!("skipped: {}", crate::blas::backend());
            return;
        }
        let (b, t, heads, hd) = (3, 7, 2, 4);
        let c = heads * hd;
        let dev = Device::Cpu;
        let qkv = crate::testing::randn(0f64, 1.0, (b, t, 3 * c), &dev).unwrap();
        let lens = [7usize, 4, 1];
        let scale = 0.5;
        let y = encoder_attention(&qkv, heads, &lens, scale)
            .unwrap()
            .unwrap();
        let split = |i: usize| {
            qkv.narrow(2, i * c, c)
                .unwrap()
                .reshape((b, t, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let mask: Vec<f64> = lens
            .iter()
            .flat_map(|&n| (0..t).map(move |j| if j < n { 0.0 } else { f64::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, t), &dev).unwrap();
        let att = ((q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap())
            .broadcast_add(&mask)
            .unwrap();
        let e = att
            .broadcast_sub(&att.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let want = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, c))
            .unwrap();
        let (y, want) = (y.to_vec3::<f64>().unwrap(), want.to_vec3::<f64>().unwrap());
        for bi in 0..b {
            for i in 0..t {
                for j in 0..c {
                    let w = if i < lens[bi] { want[bi][i][j] } else { 0.0 };
                    assert!((y[bi][i][j] - w).abs() < 1e-12, "{bi} {i} {j}");
                }
            }
        }
    }
}
