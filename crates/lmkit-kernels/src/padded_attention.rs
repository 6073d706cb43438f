//! Attention over a padded batch, forward and backward: each sequence's queries attend over its
//! own real keys only (optionally causally), so padding costs nothing and no [b, h, t, s] score
//! tensor or additive mask is built. Queries and keys/values may come from different buffers
//! (cross-attention) or one packed q|k|v buffer (self-attention). Per (sequence, head):
//! S = q·kᵀ over the real rows, P = softmax(scale·S) row by row, y = P·v; padded rows of y are
//! zero. The backward pass recomputes P.

use crate::blas::{contiguous, gemm_raw, heads_of, require, BlasFloat, Gemm, Heads, SharedOut};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Where a padded batch's queries, keys and values lie: sequence i's query rows start at row
/// i·`q_rows` of the query buffer (rows `q_ld` values apart, head h's values at column
/// `q_col` + h·hd), its keys and values at row i·`k_rows` of the key/value buffer (columns
/// `k_col` + h·hd and `v_col` + h·hd, rows `kv_ld` apart); its first `q_lens[i]` query rows
/// attend over its first `k_lens[i]` keys (with `causal`, row j over keys 0..=j only).
#[derive(Clone, Copy)]
pub struct Padded<'a> {
    pub heads: usize,
    pub hd: usize,
    pub q_rows: usize,
    pub k_rows: usize,
    pub q_lens: &'a [usize],
    pub k_lens: &'a [usize],
    pub q_ld: usize,
    pub q_col: usize,
    pub kv_ld: usize,
    pub k_col: usize,
    pub v_col: usize,
    pub causal: bool,
}

impl Padded<'_> {
    /// Self-attention over a packed q|k|v buffer [b, t, 3c]: every sequence's `lens[i]` rows.
    pub fn packed(heads: usize, hd: usize, t: usize, lens: &[usize], causal: bool) -> Padded<'_> {
        let c = heads * hd;
        Padded {
            heads,
            hd,
            q_rows: t,
            k_rows: t,
            q_lens: lens,
            k_lens: lens,
            q_ld: 3 * c,
            q_col: 0,
            kv_ld: 3 * c,
            k_col: c,
            v_col: 2 * c,
            causal,
        }
    }

    /// Values in an output row (every head).
    pub fn width(&self) -> usize {
        self.heads * self.hd
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.q_lens.len()
    }

    /// Buffers that hold every row and column the description names.
    fn check(&self, q: usize, kv: usize, what: &str) -> candle_core::Result<()> {
        let (b, c) = (self.batch(), self.width());
        let fits = self.k_lens.len() == b
            && self.q_lens.iter().all(|&n| n <= self.q_rows)
            && self.k_lens.iter().all(|&n| n <= self.k_rows)
            && self.q_col + c <= self.q_ld
            && self.k_col.max(self.v_col) + c <= self.kv_ld
            && q >= b * self.q_rows * self.q_ld
            && kv >= b * self.k_rows * self.kv_ld;
        if !fits {
            candle_core::bail!(
                "{what}: buffers of {q} and {kv} values or lengths {:?}/{:?} do not match \
                 {b} sequences of {} query and {} key rows of {} heads × {}",
                self.q_lens,
                self.k_lens,
                self.q_rows,
                self.k_rows,
                self.heads,
                self.hd
            );
        }
        Ok(())
    }

    /// Keys query row j of a sequence with `nk` keys sees.
    fn seen(&self, j: usize, nk: usize) -> usize {
        if self.causal {
            (j + 1).min(nk)
        } else {
            nk
        }
    }

    /// Where head `h` of sequence `bi` starts in the query buffer and in the key buffer.
    fn starts(&self, bi: usize, h: usize) -> (usize, usize) {
        (
            bi * self.q_rows * self.q_ld + self.q_col + h * self.hd,
            bi * self.k_rows * self.kv_ld + self.k_col + h * self.hd,
        )
    }

    /// P = softmax(scale·q·kᵀ) of head `h` of sequence `bi` into `p` [nq, nk].
    #[allow(clippy::too_many_arguments)]
    fn probs<T: BlasFloat>(
        &self,
        gemm: Gemm<T>,
        q: &[T],
        kv: &[T],
        (bi, h): (usize, usize),
        (nq, nk): (usize, usize),
        scale: T,
        p: &mut [T],
    ) {
        let (qo, ko) = self.starts(bi, h);
        // SAFETY: query rows 0..nq and key rows 0..nk of (bi, h) lie at qo/ko + i·ld .. + hd
        // within `q` and `kv` (`check`); P [nq, nk] fits `p` (the caller's buffer holds the
        // longest sequences).
        unsafe {
            gemm_raw(
                gemm,
                T::one(),
                (nq, nk, self.hd),
                (q[qo..].as_ptr(), self.q_ld, false),
                (kv[ko..].as_ptr(), self.kv_ld, true),
                (p.as_mut_ptr(), nk),
            );
        }
        for (j, row) in p[..nq * nk].chunks_mut(nk).enumerate() {
            crate::fused::softmax_row(row, self.seen(j, nk), scale);
        }
    }

    /// Pᵀ [nk, nq] of head `h` of sequence `bi` into `p`: Sᵀ = k·qᵀ, then each query's column
    /// softmax(scale·S) (see [`crate::fused::softmax_columns`]). In this layout a strip of P's
    /// rows for the product P·v is a plain copy of Pᵀ's rows (P itself needs a transposing pack,
    /// a full extra pass over every P); `stats` holds 2·nq scratch values.
    #[allow(clippy::too_many_arguments)]
    fn probs_t<T: BlasFloat>(
        &self,
        gemm: Gemm<T>,
        q: &[T],
        kv: &[T],
        (bi, h): (usize, usize),
        (nq, nk): (usize, usize),
        scale: T,
        (p, stats): (&mut [T], &mut [T]),
    ) {
        let (qo, ko) = self.starts(bi, h);
        // SAFETY: as in `probs`, with the operands swapped: key rows 0..nk and query rows 0..nq
        // of (bi, h) lie within `kv` and `q`; Pᵀ [nk, nq] fits `p`.
        unsafe {
            gemm_raw(
                gemm,
                T::one(),
                (nk, nq, self.hd),
                (kv[ko..].as_ptr(), self.kv_ld, false),
                (q[qo..].as_ptr(), self.q_ld, true),
                (p.as_mut_ptr(), nq),
            );
        }
        crate::fused::softmax_columns(p, nk, nq, self.causal, scale, stats);
    }

    /// (sequence, head) tasks with at least one query and one key, and the largest P they need.
    fn tasks(&self) -> (Vec<(usize, usize)>, usize) {
        let big = (0..self.batch())
            .map(|i| self.q_lens[i] * self.k_lens[i])
            .max()
            .unwrap_or(0);
        let tasks = (0..self.batch() * self.heads)
            .map(|task| (task / self.heads, task % self.heads))
            .filter(|&(bi, _)| self.q_lens[bi] > 0 && self.k_lens[bi] > 0)
            .collect();
        (tasks, big)
    }
}

/// The attention output [b·q_rows, heads·hd] of queries `q` over keys and values `kv` (the same
/// buffer for packed self-attention) as `s` places them.
pub fn masked_attention_fwd<T: BlasFloat>(
    gemm: Gemm<T>,
    q: &[T],
    kv: &[T],
    s: Padded,
    scale: T,
) -> candle_core::Result<Vec<T>> {
    s.check(q.len(), kv.len(), "attention")?;
    let (hd, c) = (s.hd, s.width());
    let mut y = vec![T::zero(); s.batch() * s.q_rows * c];
    let out = SharedOut(y.as_mut_ptr());
    let (tasks, big) = s.tasks();
    let most = s.q_lens.iter().copied().max().unwrap_or(0);
    tasks.into_par_iter().for_each_init(
        || (vec![T::zero(); big], vec![T::zero(); 2 * most]),
        |(p, stats), (bi, h)| {
            let (nq, nk) = (s.q_lens[bi], s.k_lens[bi]);
            s.probs_t(gemm, q, kv, (bi, h), (nq, nk), scale, (p, stats));
            let vo = bi * s.k_rows * s.kv_ld + s.v_col + h * hd;
            // SAFETY: value rows 0..nk of (bi, h) lie within `kv` (`check`); Pᵀ [nk, nq] is in
            // `p`; task (bi, h) alone writes y[bi·q_rows .. + nq, h·hd .. (h+1)·hd] (ldc c).
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (nq, hd, nk),
                    (p.as_ptr(), nq, true),
                    (kv[vo..].as_ptr(), s.kv_ld, false),
                    (out.at(bi * s.q_rows * c + h * hd), c),
                )
            };
        },
    );
    Ok(y)
}

/// The gradients of the queries and of the keys and values from dy [b·q_rows, heads·hd]:
/// dV = Pᵀ·dY, dP = dY·Vᵀ, dS = scale·P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS·K, dK = dSᵀ·Q, written
/// into `dq` at the queries' places and into `dkv` at the keys' and values' (into `dq` as well
/// when `dkv` is `None`: packed self-attention). Both must be zero where nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn masked_attention_bwd<T: BlasFloat>(
    gemm: Gemm<T>,
    q: &[T],
    kv: &[T],
    dy: &[T],
    s: Padded,
    scale: T,
    dq: &mut [T],
    dkv: Option<&mut [T]>,
) -> candle_core::Result<()> {
    s.check(q.len(), kv.len(), "attention backward")?;
    let (hd, c) = (s.hd, s.width());
    let dkv_len = dkv.as_ref().map_or(dq.len(), |d| d.len());
    if dy.len() < s.batch() * s.q_rows * c {
        candle_core::bail!("attention backward: dy holds {} values, too few", dy.len());
    }
    s.check(dq.len(), dkv_len, "attention backward's gradients")?;
    let dq_out = SharedOut(dq.as_mut_ptr());
    let dkv_out = dkv.map(|d| SharedOut(d.as_mut_ptr()));
    let (tasks, big) = s.tasks();
    tasks.into_par_iter().for_each_init(
        || (vec![T::zero(); big], vec![T::zero(); big]),
        |(p, dp), (bi, h)| {
            let (nq, nk) = (s.q_lens[bi], s.k_lens[bi]);
            s.probs(gemm, q, kv, (bi, h), (nq, nk), scale, p);
            let (qo, ko) = s.starts(bi, h);
            let vo = bi * s.k_rows * s.kv_ld + s.v_col + h * hd;
            let dyo = bi * s.q_rows * c + h * hd;
            let dkv_at = |i: usize| dkv_out.as_ref().unwrap_or(&dq_out).at(i);
            // SAFETY: reads stay within `q`, `kv`, `dy` (checked) and the P buffers; task
            // (bi, h) alone writes its sequence's rows of head h's query columns of `dq` and
            // key and value columns of `dkv` (or `dq`), which no other task writes (heads'
            // columns are disjoint, sequences' rows are disjoint).
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (nk, hd, nq),
                    (p.as_ptr(), nk, true),
                    (dy[dyo..].as_ptr(), c, false),
                    (dkv_at(vo), s.kv_ld),
                );
                gemm_raw(
                    gemm,
                    T::one(),
                    (nq, nk, hd),
                    (dy[dyo..].as_ptr(), c, false),
                    (kv[vo..].as_ptr(), s.kv_ld, true),
                    (dp.as_mut_ptr(), nk),
                );
            }
            for (j, (pr, dr)) in p[..nq * nk]
                .chunks(nk)
                .zip(dp[..nq * nk].chunks_mut(nk))
                .enumerate()
            {
                let seen = s.seen(j, nk);
                crate::fused::softmax_bwd_row(&pr[..seen], &mut dr[..seen], scale);
                dr[seen..].iter_mut().for_each(|v| *v = T::zero());
            }
            // SAFETY: as above.
            unsafe {
                gemm_raw(
                    gemm,
                    T::one(),
                    (nq, hd, nk),
                    (dp.as_ptr(), nk, false),
                    (kv[ko..].as_ptr(), s.kv_ld, false),
                    (dq_out.at(qo), s.q_ld),
                );
                gemm_raw(
                    gemm,
                    T::one(),
                    (nk, hd, nq),
                    (dp.as_ptr(), nk, true),
                    (q[qo..].as_ptr(), s.q_ld, false),
                    (dkv_at(ko), s.kv_ld),
                );
            }
        },
    );
    Ok(())
}

/// The attention output [b, t, c] of the packed q|k|v [b, t, 3c]; sequence i has `lens[i]` real
/// tokens at its start.
pub fn padded_attention_fwd<T: BlasFloat>(
    qkv: &[T],
    lens: &[usize],
    s: Heads,
    scale: T,
) -> candle_core::Result<Vec<T>> {
    let blas = require("encoder attention")?;
    if lens.len() != s.b {
        candle_core::bail!(
            "encoder attention: {} lengths for {} sequences",
            lens.len(),
            s.b
        );
    }
    let p = Padded::packed(s.heads, s.hd, s.t, lens, false);
    masked_attention_fwd(T::gemm(blas), qkv, qkv, p, scale)
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
    use candle_core::{Device, Var, D};

    /// Σ R ⊙ attention(q, kv) through composed candle ops (a large negative bias for the masked
    /// keys, padded query rows left out) and its gradients by autograd: the reference for the
    /// training kernels.
    fn reference(q: &Var, kv: &Var, s: Padded, scale: f64, r: &Tensor) -> (f64, Tensor, Tensor) {
        let b = s.batch();
        let (h, hd, c) = (s.heads, s.hd, s.width());
        let split = |x: &Tensor, rows: usize, col: usize| {
            x.reshape((b, rows, ()))
                .unwrap()
                .narrow(2, col, c)
                .unwrap()
                .reshape((b, rows, h, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let qh = split(q.as_tensor(), s.q_rows, s.q_col);
        let kh = split(kv.as_tensor(), s.k_rows, s.k_col);
        let vh = split(kv.as_tensor(), s.k_rows, s.v_col);
        let mut bias = Vec::new();
        let mut keep = Vec::new();
        for bi in 0..b {
            for i in 0..s.q_rows {
                keep.push(if i < s.q_lens[bi] { 1.0 } else { 0.0 });
                for j in 0..s.k_rows {
                    let ok = j < s.k_lens[bi] && (!s.causal || j <= i);
                    bias.push(if ok { 0.0 } else { -1e9 });
                }
            }
        }
        let dev = Device::Cpu;
        let bias = Tensor::from_vec(bias, (b, 1, s.q_rows, s.k_rows), &dev).unwrap();
        let keep = Tensor::from_vec(keep, (b, s.q_rows, 1), &dev).unwrap();
        let att = (qh.matmul(&kh.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let e = att
            .broadcast_sub(&att.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let y = p
            .matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s.q_rows, c))
            .unwrap()
            .broadcast_mul(&keep)
            .unwrap();
        let loss = (y * r.reshape((b, s.q_rows, c)).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = |v: &Var| g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        (loss.to_scalar::<f64>().unwrap(), grad(q), grad(kv))
    }

    fn close(got: &[f64], want: &Tensor, what: &str) {
        let want = want.to_vec1::<f64>().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        let size = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(size > 0.0, "{what}: a zero gradient tests nothing");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-10 * size.max(1.0),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Self-attention over a packed q|k|v (bidirectional and causal) and cross-attention from
    /// a query buffer to a separate key/value buffer: outputs and gradients equal the composed
    /// ops' in f64, with padded rows, an empty sequence and query/key columns inside wider rows.
    #[test]
    fn training_kernels_equal_autograd_f64() {
        if !crate::blas::available() {
            eprintln!("skipped: {}", crate::blas::backend());
            return;
        }
        let gemm = f64::gemm(require("test").unwrap());
        let dev = Device::Cpu;
        let (heads, hd) = (2, 3);
        let c = heads * hd;
        let lens = [6usize, 3, 0, 1];
        let q_lens = [4usize, 5, 0, 2];
        let scale = 0.7;
        for (name, cross, causal) in [
            ("bidirectional", false, false),
            ("causal", false, true),
            ("cross", true, false),
        ] {
            let b = lens.len();
            let s = if cross {
                Padded {
                    heads,
                    hd,
                    q_rows: 5,
                    k_rows: 6,
                    q_lens: &q_lens,
                    k_lens: &lens,
                    q_ld: c + 2,
                    q_col: 1,
                    kv_ld: 2 * c,
                    k_col: 0,
                    v_col: c,
                    causal,
                }
            } else {
                Padded::packed(heads, hd, 6, &lens, causal)
            };
            let randn = |rows: usize, ld: usize| {
                Var::from_tensor(&crate::testing::randn(0f64, 1.0, (b * rows, ld), &dev).unwrap())
                    .unwrap()
            };
            let q = randn(s.q_rows, s.q_ld);
            let kv = if cross {
                randn(s.k_rows, s.kv_ld)
            } else {
                q.clone()
            };
            let r = crate::testing::randn(0f64, 1.0, b * s.q_rows * c, &dev).unwrap();
            let (want, dq_want, dkv_want) = reference(&q, &kv, s, scale, &r);
            let flat = |v: &Var| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            let (qd, kvd) = (flat(&q), flat(&kv));
            let y = masked_attention_fwd(gemm, &qd, &kvd, s, scale).unwrap();
            let rv = r.to_vec1::<f64>().unwrap();
            let got: f64 = y.iter().zip(&rv).map(|(a, b)| a * b).sum();
            assert!(
                (got - want).abs() < 1e-10 * want.abs().max(1.0),
                "{name}: {got} vs {want}"
            );
            for (bi, &nq) in s.q_lens.iter().enumerate() {
                let pad = &y[(bi * s.q_rows + nq) * c..(bi + 1) * s.q_rows * c];
                assert!(
                    pad.iter().all(|&v| v == 0.0),
                    "{name}: padded rows are zero"
                );
            }
            let mut dq = vec![0f64; qd.len()];
            if cross {
                let mut dkv = vec![0f64; kvd.len()];
                masked_attention_bwd(gemm, &qd, &kvd, &rv, s, scale, &mut dq, Some(&mut dkv))
                    .unwrap();
                close(&dkv, &dkv_want, &format!("{name} dkv"));
            } else {
                masked_attention_bwd(gemm, &qd, &kvd, &rv, s, scale, &mut dq, None).unwrap();
            }
            close(&dq, &dq_want, &format!("{name} dq"));
        }
        let bad = Padded::packed(heads, hd, 2, &lens, false);
        let buf = vec![0f64; 4 * 2 * 3 * c];
        let e = masked_attention_fwd(gemm, &buf, &buf, bad, scale).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
    }

    #[test]
    fn the_inference_op_is_the_training_kernel() {
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
        assert_eq!(y.dims(), [b, t, c]);
        // The op is the training kernel (held to composed ops below) on the tensor's data.
        let flat = qkv.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gemm = f64::gemm(require("test").unwrap());
        let s = Padded::packed(heads, hd, t, &lens, false);
        let want = masked_attention_fwd(gemm, &flat, &flat, s, scale).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), want);
    }
}
