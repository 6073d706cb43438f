//! The attention of a decoding step: one query position per head against every cached key
//! (CPU; f32 caches, or bf16/f16 ones read in their type and widened in registers). Through BLAS
//! this was three small products per layer, each waking the thread pool, and the softmax between
//! them (and a half-precision model's caches were converted to f32 whole, every layer and step). Here a short cache is one loop per key/value head on the
//! calling thread, reading each cached key row once for all the query heads that share it; a
//! longer one is split by query head over the polling [`crate::team`].
//!
//! And the causal attention of a prompt (several queries, the last of the keys): [`attend_causal`],
//! on the built-in micro-kernel with each key/value head packed once, as the training pass's
//! attention does, instead of block products through BLAS over repeated key/value heads (a
//! 1,024-token prompt of a SmolLM2-shaped model: 1.19x the tokens/s in f32); a bf16 prompt on a
//! CPU with AMX tiles on them ([`crate::amx::causal_attention`]).

use crate::blas::{causal_strips_fwd, CausalRows, Role};
use crate::few_rows::WeightValue;
use crate::simd::prefetch;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// Keys read (batch × query heads × positions × head size) from which the query heads are split
/// over [`crate::team`]; below it, one thread does the step's attention sooner.
const SPLIT_FROM: usize = 1 << 15;

/// Key/value rows ahead of the one being read that are asked into cache: a step reads each
/// cached row once, and the hardware prefetcher alone leaves the loop waiting on memory.
const AHEAD: usize = 8;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::AHEAD;
    use crate::few_rows::{load8, WeightValue};
    use crate::simd::prefetch;
    use crate::vector::avx2::dot;
    use std::arch::x86_64::*;

    /// o ← Σⱼ pⱼ·vⱼ (row j of `v` at j·stride, d values): 64 columns at a time, held in eight
    /// registers across all the rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn weighted_rows<W: WeightValue>(p: &[f32], v: &[W], stride: usize, o: &mut [f32]) {
        let d = o.len();
        let mut c0 = 0;
        while c0 + 64 <= d {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &pj) in p.iter().enumerate() {
                prefetch(v.as_ptr().wrapping_add((j + AHEAD) * stride + c0));
                let row = &v[j * stride + c0..j * stride + c0 + 64];
                let w = _mm256_set1_ps(pj);
                for (c, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `row` holds 64 values and 8·c + 8 ≤ 64.
                    let x = unsafe { load8(row.as_ptr().add(8 * c)) };
                    *a = _mm256_fmadd_ps(w, x, *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: c0 + 64 ≤ d, the length of `o`.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * c), *a) };
            }
            c0 += 64;
        }
        if c0 < d {
            super::weighted_rows_scalar(p, &v[c0..], stride, &mut o[c0..]);
        }
    }

    /// [`super::attend_group`] with AVX2, FMA and F16C.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_group<W: WeightValue>(
        q: &[f32],
        k: &[W],
        v: &[W],
        d: usize,
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        super::attend_group_with(
            (q, k, v),
            (d, stride, scale),
            scores,
            o,
            |x, y| dot(x, y),
            |p, v, stride, o| weighted_rows(p, v, stride, o),
        )
    }
}

/// o ← Σⱼ pⱼ·vⱼ, one value at a time.
fn weighted_rows_scalar<W: WeightValue>(p: &[f32], v: &[W], stride: usize, o: &mut [f32]) {
    let d = o.len();
    o.iter_mut().for_each(|x| *x = 0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (x, &w) in o.iter_mut().zip(&v[j * stride..j * stride + d]) {
            *x += pj * w.widen();
        }
    }
}

/// Σ xᵢ·yᵢ, one value at a time.
fn dot_scalar<W: WeightValue>(x: &[f32], y: &[W]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a * b.widen()).sum()
}

/// The query heads that share one key/value head: for each query row of `q` (rep × d), its
/// `scores` row ← softmax(scale·q·kⱼ) over the key rows (row j of `k` and `v` at j·stride), then
/// its `o` row ← Σⱼ scoresⱼ·vⱼ.
#[allow(clippy::too_many_arguments)]
fn attend_group<W: WeightValue>(
    q: &[f32],
    k: &[W],
    v: &[W],
    d: usize,
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 {
        // SAFETY: simd_level checked that the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::attend_group(q, k, v, d, stride, scale, scores, o) };
    }
    attend_group_with(
        (q, k, v),
        (d, stride, scale),
        scores,
        o,
        dot_scalar,
        weighted_rows_scalar,
    )
}

/// [`attend_group`] with the given dot product and weighted sum of rows (inlined into the
/// vector version, whose target features the closures inherit).
#[inline(always)]
fn attend_group_with<W: WeightValue>(
    (q, k, v): (&[f32], &[W], &[W]),
    (d, stride, scale): (usize, usize, f32),
    scores: &mut [f32],
    o: &mut [f32],
    dot: impl Fn(&[f32], &[W]) -> f32,
    weighted_rows: impl Fn(&[f32], &[W], usize, &mut [f32]),
) {
    let rep = q.len() / d.max(1);
    let s = scores.len() / rep.max(1);
    for j in 0..s {
        prefetch(k.as_ptr().wrapping_add((j + AHEAD) * stride));
        let kr = &k[j * stride..j * stride + d];
        for r in 0..rep {
            scores[r * s + j] = dot(&q[r * d..(r + 1) * d], kr);
        }
    }
    for (row, out) in scores.chunks_mut(s.max(1)).zip(o.chunks_mut(d.max(1))) {
        crate::fused::softmax_row(row, s, scale);
        weighted_rows(row, v, stride, out);
    }
}

/// Where row 0 of each (batch, head) matrix of a [b, heads, s, d] layout starts, and the step
/// between rows (rows themselves contiguous).
fn head_rows(l: &Layout) -> candle_core::Result<(Vec<usize>, usize)> {
    let (dims, st) = (l.dims(), l.stride());
    if dims.len() != 4 || st[3] != 1 {
        candle_core::bail!(
            "attention: keys and values must be [b, heads, s, d] with contiguous rows"
        );
    }
    let starts = (0..dims[0])
        .flat_map(|b| (0..dims[1]).map(move |h| l.start_offset() + b * st[0] + h * st[1]))
        .collect();
    Ok((starts, st[2]))
}

struct AttendOne {
    scale: f64,
}

impl CustomOp3 for AttendOne {
    fn name(&self) -> &'static str {
        "lmkit-attend-one"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((q0, q1)) = lq.contiguous_offsets() else {
            candle_core::bail!("attend_one: the queries must be contiguous");
        };
        // Half-precision queries widened (a row a head); keys and values read where they are.
        fn wide<T: WeightValue>(q: &[T]) -> Vec<f32> {
            q.iter().map(|v| v.widen()).collect()
        }
        let out = match (sq, sk, sv) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(&q[q0..q1], lq, (k, lk), (v, lv))?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let o = self.run(&wide(&q[q0..q1]), lq, (k, lk), (v, lv))?;
                CpuStorage::BF16(o.into_iter().map(half::bf16::from_f32).collect())
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let o = self.run(&wide(&q[q0..q1]), lq, (k, lk), (v, lv))?;
                CpuStorage::F16(o.into_iter().map(half::f16::from_f32).collect())
            }
            _ => candle_core::bail!("attend_one: f32, bf16 or f16 queries, keys and values"),
        };
        Ok((out, lq.shape().clone()))
    }
}

impl AttendOne {
    /// The step's attention for the queries `q` (laid out as `lq` says, in f32) against keys and
    /// values of type W: [b, heads, 1, d] in f32.
    fn run<W: WeightValue>(
        &self,
        q: &[f32],
        lq: &Layout,
        (k, lk): (&[W], &Layout),
        (v, lv): (&[W], &Layout),
    ) -> candle_core::Result<Vec<f32>> {
        let heads = lq.dims()[1];
        let (kd, vd) = (lk.dims(), lv.dims());
        let (b, kv_heads, s, d) = (kd[0], kd[1], kd[2], kd[3]);
        let (k_starts, stride) = head_rows(lk)?;
        let (v_starts, v_stride) = head_rows(lv)?;
        if vd != kd
            || v_stride != stride
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || q.len() != b * heads * d
        {
            candle_core::bail!(
                "attend_one: queries {:?} against keys {kd:?} and values {vd:?}",
                lq.dims()
            );
        }
        let end = |starts: &[usize]| {
            starts
                .iter()
                .max()
                .map_or(0, |&m| m + s.saturating_sub(1) * stride + d)
        };
        if s == 0 || end(&k_starts) > k.len() || end(&v_starts) > v.len() {
            candle_core::bail!("attend_one: no keys, or keys and values past their storage");
        }
        let rep = heads / kv_heads;
        let mut out = vec![0f32; b * heads * d];
        let scale = self.scale as f32;
        if b * heads * s * d >= SPLIT_FROM {
            // One task per query head on the polling team (a step's attention comes between
            // its products, once per layer); query head i reads key/value head i / rep.
            crate::team::for_each_chunk_mut(&mut out, d, |i, o| {
                let g = i / rep;
                let mut scores = vec![0f32; s];
                let (k, v) = (&k[k_starts[g]..], &v[v_starts[g]..]);
                attend_group(
                    &q[i * d..(i + 1) * d],
                    k,
                    v,
                    d,
                    stride,
                    scale,
                    &mut scores,
                    o,
                );
            });
        } else {
            // One key/value head at a time: its query heads are adjacent rows of q and of out,
            // and each key row is read once for all of them.
            let mut scores = vec![0f32; rep * s];
            for (i, o) in out.chunks_mut(rep * d).enumerate() {
                let (k, v) = (&k[k_starts[i]..], &v[v_starts[i]..]);
                let q = &q[i * rep * d..(i + 1) * rep * d];
                attend_group(q, k, v, d, stride, scale, &mut scores, o);
            }
        }
        Ok(out)
    }
}

/// softmax(scale·q·kᵀ)·v for one query position per head (a decoding step, which sees every
/// key): q [b, h, 1, d], k and v [b, h_kv, s, d] with h a multiple of h_kv (grouped-query heads)
/// and contiguous rows (views of a KV cache's buffers are read in place). On the CPU without
/// gradients, all three f32, bf16 or f16 (a half-precision model: scores, softmax and sums in
/// f32, the output rounded once); `None` otherwise (the caller computes it another way).
pub fn attend_one(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    let fits = matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && [q, k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype && t.rank() == 4 && !t.track_op())
        && q.dim(2)? == 1
        && k.dims() == v.dims()
        && k.stride() == v.stride()
        && k.stride()[3] == 1;
    if !fits {
        return Ok(None);
    }
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &AttendOne { scale })
        .map(Some)
}

/// The causal attention of a prompt's queries ([`attend_causal`]; f32 ones on the AMX tiles
/// where `tiles`, [`attend_causal_on_tiles`]).
struct AttendCausal {
    scale: f64,
    tiles: bool,
}

impl CustomOp3 for AttendCausal {
    fn name(&self) -> &'static str {
        "lmkit-attend-causal"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((q0, q1)) = lq.contiguous_offsets() else {
            candle_core::bail!("attend_causal: the queries must be contiguous");
        };
        let &[b, heads, t, d] = lq.dims() else {
            candle_core::bail!("attend_causal: queries must be [b, heads, t, d]");
        };
        let (kd, vd) = (lk.dims(), lv.dims());
        let (k_starts, k_ld) = head_rows(lk)?;
        let (v_starts, v_ld) = head_rows(lv)?;
        let (kv_heads, s) = (kd[1], kd[2]);
        if vd != kd || kd[0] != b || kd[3] != d || s < t {
            candle_core::bail!(
                "attend_causal: queries {:?} against keys {kd:?} and values {vd:?}",
                lq.dims()
            );
        }
        let seqs = vec![(t, s - t); b];
        let start = |role, bi: usize, h: usize| match role {
            Role::Q => (bi * heads + h) * t * d,
            Role::K => k_starts[bi * kv_heads + h],
            Role::V => v_starts[bi * kv_heads + h],
            Role::Y => bi * t * heads * d + h * d,
        };
        // The operands of either type.
        macro_rules! rows {
            ($q:expr, $k:expr, $v:expr) => {
                CausalRows {
                    seqs: &seqs,
                    heads,
                    kv_heads,
                    hd: d,
                    q: ($q, d),
                    k: ($k, k_ld),
                    v: ($v, v_ld),
                    y_ld: heads * d,
                    start: &start,
                }
            };
        }
        let mut y = crate::buffers::zeros(b * t * heads * d);
        let scale = self.scale as f32;
        let y = match (sq, sk, sv) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let rows = rows!(&q[q0..q1], k, v);
                if !(self.tiles && crate::amx::causal_attention(&rows, &mut y, scale)?) {
                    causal_strips_fwd(&rows, &mut y, scale)?;
                }
                CpuStorage::F32(y)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                if !crate::amx::causal_attention(&rows!(&q[q0..q1], k, v), &mut y, scale)? {
                    candle_core::bail!("attend_causal: bf16 needs the AMX tiles");
                }
                CpuStorage::BF16(crate::half_weights::narrowed_bf16(&y))
            }
            _ => candle_core::bail!("attend_causal: f32 (or bf16) queries, keys and values"),
        };
        Ok((y, Shape::from((b, t, heads, d))))
    }
}

/// softmax(scale·q·kᵀ)·v for the queries of a prompt (or of a piece of one): q [b, h, t, d]
/// the last t of the s key positions of k and v [b, h_kv, s, d] (query i sees keys
/// 0 ..= s − t + i), h a multiple of h_kv (grouped-query heads), keys and values with contiguous
/// rows (views of a KV cache's buffers are read in place). On the built-in micro-kernel, each
/// key/value head packed once for the query heads that share it and each strip of queries
/// multiplying only the keys it sees. The output [b, h, t, d] is a view of [b, t, h, d] values,
/// the layout a layer's output projection reads. For f32 on the CPU without gradients where the
/// CPU has the kernel, and for bf16 where it has AMX tiles (on them: the probabilities rounded
/// to bf16 for p·v, the output rounded once); `None` otherwise (the caller computes it another
/// way).
pub fn attend_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    causal_op(q, k, v, scale, false)
}

/// [`attend_causal`] with f32 queries, keys and values on the AMX tiles too, where the CPU has
/// them: each value rounded to bf16 as it is packed, the probabilities rounded to bf16 for p·v,
/// f32 sums and output (the arithmetic of a model whose weights are block-quantized, whose
/// products run on the tiles from bf16-rounded values). Elsewhere as [`attend_causal`].
pub fn attend_causal_on_tiles(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    causal_op(q, k, v, scale, crate::amx::available())
}

fn causal_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    tiles: bool,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    let kernel = match dtype {
        DType::F32 => tiles || crate::gemm::isa().is_some(),
        DType::BF16 => crate::amx::available(),
        _ => false,
    };
    let fits = kernel
        && [q, k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype && t.rank() == 4 && !t.track_op())
        && k.dims() == v.dims()
        && k.stride()[3] == 1
        && v.stride()[3] == 1
        && q.dim(2)? <= k.dim(2)?;
    if !fits {
        return Ok(None);
    }
    let y = q
        .contiguous()?
        .apply_op3_no_bwd(k, v, &AttendCausal { scale, tiles })?;
    y.transpose(1, 2).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The loop equals softmax(scale·q·kᵀ)·v computed by tensor ops, for grouped-query heads,
    /// a batch of two, and keys/values that are views of larger buffers (as a KV cache gives):
    /// one thread by key/value head (37 keys) and the query heads split over the team (300).
    #[test]
    fn equals_the_composed_attention() {
        for s in [37, 300] {
            compare_with_composed_attention(s);
        }
    }

    fn compare_with_composed_attention(s: usize) {
        let dev = Device::Cpu;
        let r = |s: &[usize]| crate::testing::randn(0f32, 1.0, s, &dev).unwrap();
        let (b, h, kv, d) = (2, 6, 2, 20);
        assert_eq!(
            b * h * s * d >= SPLIT_FROM,
            s > 37,
            "the two cases take the two paths"
        );
        let q = r(&[b, h, 1, d]);
        let kb = r(&[b, kv, 320, d]);
        let vb = r(&[b, kv, 320, d]);
        let (k, v) = (kb.narrow(2, 0, s).unwrap(), vb.narrow(2, 0, s).unwrap());
        let got = attend_one(&q, &k, &v, 0.3)
            .unwrap()
            .expect("takes f32 CPU views");
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((b, kv, h / kv, s, d))
                .unwrap()
                .reshape((b, h, s, d))
                .unwrap()
        };
        let att = (q.matmul(&rep(&k).t().unwrap()).unwrap() * 0.3).unwrap();
        let p = candle_nn_softmax(&att);
        let want = p.matmul(&rep(&v)).unwrap();
        assert!(crate::testing::max_diff(&got, &want) < 1e-5);
        // Tracked tensors (training) are left to the differentiable path.
        let var = candle_core::Var::from_tensor(&q).unwrap();
        assert!(attend_one(var.as_tensor(), &k, &v, 0.3).unwrap().is_none());
    }

    /// Causal prompts of `dtype` against the masked product computed in f64 by tensor ops
    /// (scale 0.3): grouped-query heads, a batch of two, a head size that is not a whole tile
    /// (40), keys and values that are views of larger buffers (a KV cache), prompts with and
    /// without cached keys before them, of one query and of several blocks of queries with a
    /// partial last strip or block. `bound(max |v|)` is the error allowed.
    fn prompts_against_the_masked_product(dtype: DType, bound: impl Fn(f64) -> f64) {
        masked_product_of(dtype, false, bound)
    }

    /// As [`prompts_against_the_masked_product`], through [`attend_causal_on_tiles`] where
    /// `tiles`, the reference's values then rounded to bf16 (as the tiles round them).
    fn masked_product_of(dtype: DType, tiles: bool, bound: impl Fn(f64) -> f64) {
        let dev = Device::Cpu;
        let r = |s: &[usize]| {
            let x = crate::testing::randn(0f32, 1.0, s, &dev).unwrap();
            x.to_dtype(dtype).unwrap()
        };
        let (b, h, kv, d) = (2, 6, 2, 40);
        // (40, 500): the tiles' probabilities rows of 512 keys, a line further apart.
        for (t, s) in [
            (1, 1),
            (2, 9),
            (7, 7),
            (150, 150),
            (133, 170),
            (5, 300),
            (40, 500),
        ] {
            let q = r(&[b, h, t, d]);
            let (kb, vb) = (r(&[b, kv, 512, d]), r(&[b, kv, 512, d]));
            let (k, v) = (kb.narrow(2, 0, s).unwrap(), vb.narrow(2, 0, s).unwrap());
            let attend = if tiles {
                attend_causal_on_tiles
            } else {
                attend_causal
            };
            let got = attend(&q, &k, &v, 0.3).unwrap().expect("takes CPU views");
            assert_eq!((got.dims(), got.dtype()), (&[b, h, t, d][..], dtype));
            let wide = |x: &Tensor| {
                let x = if tiles {
                    x.to_dtype(DType::BF16).unwrap()
                } else {
                    x.clone()
                };
                x.to_dtype(DType::F64).unwrap()
            };
            let rep = |x: &Tensor| {
                wide(x)
                    .unsqueeze(2)
                    .unwrap()
                    .expand((b, kv, h / kv, s, d))
                    .unwrap()
                    .reshape((b, h, s, d))
                    .unwrap()
            };
            let mask: Vec<f64> = (0..t)
                .flat_map(|i| (0..s).map(move |j| if j <= s - t + i { 0.0 } else { -1e300 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), &dev).unwrap();
            let att = (wide(&q).matmul(&rep(&k).t().unwrap()).unwrap() * 0.3).unwrap();
            let p = candle_nn_softmax(&att.broadcast_add(&mask).unwrap());
            let want = p.matmul(&rep(&v)).unwrap();
            let size: f64 = wide(&v)
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let err = crate::testing::max_diff(&wide(&got), &want);
            assert!(
                err <= bound(size),
                "{dtype:?}, {t} queries over {s} keys: {err}"
            );
        }
    }

    /// An f32 prompt's causal attention on the micro-kernel equals the masked product (see
    /// [`prompts_against_the_masked_product`]); tracked tensors, f16 and more queries than keys
    /// are declined.
    #[test]
    fn prompts_attend_as_the_masked_product() {
        if crate::gemm::isa().is_none() {
            return;
        }
        prompts_against_the_masked_product(DType::F32, |_| 1e-5);
        let r = |s: &[usize]| crate::testing::randn(0f32, 1.0, s, &Device::Cpu).unwrap();
        let (q, k) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        let var = candle_core::Var::from_tensor(&q).unwrap();
        assert!(attend_causal(var.as_tensor(), &k, &k, 0.3)
            .unwrap()
            .is_none());
        let half = q.to_dtype(DType::F16).unwrap();
        assert!(attend_causal(&half, &half, &half, 0.3).unwrap().is_none());
        let short = k.narrow(2, 0, 3).unwrap();
        assert!(attend_causal(&q, &short, &short, 0.3).unwrap().is_none());
    }

    /// A bf16 prompt's causal attention on the AMX tiles equals the masked product of its
    /// values computed in f64, within the rounding of its probabilities and of its output to
    /// bf16 (a 128th of the values' size).
    #[test]
    fn bf16_prompts_attend_on_the_tiles() {
        if !crate::amx::available() {
            return;
        }
        prompts_against_the_masked_product(DType::BF16, |size| size / 128.0);
    }

    /// f32 queries, keys and values on the tiles (a block-quantized model's prompt): the masked
    /// product of their bf16-rounded values in f64, within the rounding of the probabilities; and
    /// not the f32 kernel's result (the values were rounded).
    #[test]
    fn f32_prompts_attend_on_the_tiles_as_rounded() {
        if !crate::amx::available() {
            return;
        }
        masked_product_of(DType::F32, true, |size| size / 256.0);
        let r = |s: &[usize]| crate::testing::randn(0f32, 1.0, s, &Device::Cpu).unwrap();
        let (q, k, v) = (r(&[1, 4, 50, 32]), r(&[1, 2, 50, 32]), r(&[1, 2, 50, 32]));
        let tiles = attend_causal_on_tiles(&q, &k, &v, 0.2)
            .unwrap()
            .expect("f32 on tiles");
        let exact = attend_causal(&q, &k, &v, 0.2).unwrap().expect("f32");
        assert!(crate::testing::max_diff(&tiles, &exact) > 1e-5);
    }

    /// Half-precision queries, keys and values (a bf16 or f16 model's KV cache, read in place):
    /// the attention of their values computed in f64, rounded once to the type.
    #[test]
    fn half_precision_caches_are_read_in_their_type() {
        let dev = Device::Cpu;
        let (b, h, kv, d) = (2, 6, 2, 72);
        for (dtype, step) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
            for s in [37, 300] {
                let r = |s: &[usize]| {
                    let x = crate::testing::randn(0f32, 1.0, s, &dev).unwrap();
                    x.to_dtype(dtype).unwrap()
                };
                let q = r(&[b, h, 1, d]);
                let (kb, vb) = (r(&[b, kv, 320, d]), r(&[b, kv, 320, d]));
                let (k, v) = (kb.narrow(2, 0, s).unwrap(), vb.narrow(2, 0, s).unwrap());
                let got = attend_one(&q, &k, &v, 0.1)
                    .unwrap()
                    .expect("takes half types");
                assert_eq!(got.dtype(), dtype);
                let wide = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
                let rep = |x: &Tensor| {
                    wide(x)
                        .unsqueeze(2)
                        .unwrap()
                        .expand((b, kv, h / kv, s, d))
                        .unwrap()
                        .reshape((b, h, s, d))
                        .unwrap()
                };
                let att = (wide(&q).matmul(&rep(&k).t().unwrap()).unwrap() * 0.1).unwrap();
                let want = candle_nn_softmax(&att).matmul(&rep(&v)).unwrap();
                let size: f64 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let err = crate::testing::max_diff(&wide(&got), &want);
                assert!(err <= step * size, "{dtype:?}, {s} keys: {err} of {size}");
            }
        }
    }

    /// The scalar loop (CPUs without AVX2) gives what the dispatched one gives, for f32 keys
    /// and values and for bf16 ones.
    #[test]
    fn the_scalar_loop_agrees() {
        let dev = Device::Cpu;
        let r = |n: usize| {
            crate::testing::randn(0f32, 1.0, n, &dev)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (rep, s, d, stride) = (3, 29, 72, 80);
        let (q, k, v) = (r(rep * d), r(s * stride), r(s * stride));
        fn agree<W: WeightValue>(q: &[f32], k: &[W], v: &[W], (rep, s, d, stride): Dims) {
            let (mut s1, mut o1) = (vec![0f32; rep * s], vec![0f32; rep * d]);
            let (mut s2, mut o2) = (s1.clone(), o1.clone());
            attend_group(q, k, v, d, stride, 0.2, &mut s1, &mut o1);
            let (scalar_dot, scalar_rows) = (dot_scalar, weighted_rows_scalar);
            attend_group_with(
                (q, k, v),
                (d, stride, 0.2),
                &mut s2,
                &mut o2,
                scalar_dot,
                scalar_rows,
            );
            assert!(o1.iter().zip(&o2).all(|(a, b)| (a - b).abs() < 1e-5));
        }
        type Dims = (usize, usize, usize, usize);
        agree(&q, &k, &v, (rep, s, d, stride));
        let half = |x: &[f32]| {
            x.iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>()
        };
        agree(&q, &half(&k), &half(&v), (rep, s, d, stride));
    }

    fn candle_nn_softmax(x: &Tensor) -> Tensor {
        let m = x.max_keepdim(3).unwrap();
        let e = x.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
    }
}
