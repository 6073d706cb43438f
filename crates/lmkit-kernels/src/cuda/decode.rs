//! The attention of a serving round's decoding steps on the GPU: every sequence continues its
//! own KV cache, and one launch a layer ([`Gpu::decode_attention`]) writes each sequence's new
//! key and value into its cache and attends over it, instead of several small launches per
//! sequence (copies into the cache, the two products, the scaling and the softmax).

use super::{DecodeCache, Dev, Gpu, DEC_MAX_HD};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};

/// Sequences of one launch: the cache buffers are held mutably one inside the other (two
/// frames each), so very many sequences go in several launches.
const SEQUENCES_PER_LAUNCH: usize = 64;

/// softmax(scale·q·kᵀ)·v for a decoding step of n sequences that each continue their own KV
/// cache, on the GPU of the tensors (with the `cuda-emu` feature alone: the emulated GPU, whose
/// tensors are CPU tensors). q [1, heads, n, hd]; k_new and v_new [1, kv_heads, n, hd] (the
/// step's keys and values, query head h reading key/value head h / (heads / kv_heads));
/// `caches[i]`: sequence i's key and value buffers ([1, kv_heads, capacity, hd], rows of hd
/// contiguous, the heads `capacity · hd` apart) and the positions they hold, fewer than their
/// capacity: the step's key and value are written at that position. Returns [1, heads, n, hd];
/// `None` (nothing written) where the tensors are not f32 on a GPU, a buffer's layout is not
/// one this reads, or the head size is over 256.
pub fn decode_step_attention(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    caches: &[(&Tensor, &Tensor, usize)],
    scale: f64,
) -> Result<Option<Tensor>> {
    let Some(gpu) = Gpu::of(q.device()) else {
        return Ok(None);
    };
    let (one, heads, n, hd) = q.dims4()?;
    let (_, kv_heads, _, _) = k_new.dims4()?;
    let fits = one == 1
        && n == caches.len()
        && n > 0
        && hd <= DEC_MAX_HD
        && k_new.dims() == [1, kv_heads, n, hd]
        && v_new.dims() == k_new.dims()
        && [q, k_new, v_new]
            .iter()
            .chain(caches.iter().flat_map(|(k, v, _)| [k, v]))
            .all(|t| t.dtype() == DType::F32 && t.device().same_device(q.device()))
        && caches.iter().all(|(k, v, len)| {
            let (s, d) = (k.stride(), k.dims());
            d.len() == 4
                && d[0] == 1
                && d[1] == kv_heads
                && d[2] > *len
                && d[3] == hd
                && s[3] == 1
                && s[2] == hd
                && (kv_heads == 1 || s[1] >= d[2] * hd)
                && v.dims() == k.dims()
                && v.stride() == s
        });
    if !fits {
        return Ok(None);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(SEQUENCES_PER_LAUNCH));
    for first in (0..n).step_by(SEQUENCES_PER_LAUNCH) {
        let m = SEQUENCES_PER_LAUNCH.min(n - first);
        let part = |x: &Tensor| -> Result<Tensor> {
            if m == n {
                x.contiguous()
            } else {
                x.narrow(2, first, m)?.contiguous()
            }
        };
        let chunk = &caches[first..first + m];
        outs.push(launch(
            &gpu,
            (&part(q)?, &part(k_new)?, &part(v_new)?),
            chunk,
            (heads, kv_heads, hd),
            scale,
        )?);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one part")
    } else {
        Tensor::cat(&outs, 2)?
    };
    Ok(Some(out))
}

/// One launch over contiguous q, k_new, v_new of `caches.len()` sequences.
fn launch(
    gpu: &Gpu,
    (q, k_new, v_new): (&Tensor, &Tensor, &Tensor),
    caches: &[(&Tensor, &Tensor, usize)],
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let n = caches.len();
    let buffers: Vec<&Tensor> = caches.iter().flat_map(|(k, v, _)| [*k, *v]).collect();
    // Every cache buffer's storage once, none of them an input's: a storage held mutably twice
    // (or while read as an input) would wait for itself. (The inputs may share one: GPT-2's
    // q, k and v of one row are views of its projection.)
    let base = |t: &Tensor| -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        match Gpu::region(&storage, layout) {
            Some(region) => Ok(region.addr - 4 * layout.start_offset() as u64),
            None => candle_core::bail!("decode attention: a tensor not in f32 on the GPU"),
        }
    };
    let mut bases = buffers
        .iter()
        .map(|t| base(t))
        .collect::<Result<Vec<_>>>()?;
    let inputs = [base(q)?, base(k_new)?, base(v_new)?];
    bases.sort_unstable();
    if bases.windows(2).any(|w| w[0] == w[1]) || bases.iter().any(|b| inputs.contains(b)) {
        candle_core::bail!("decode attention: two operands share a buffer");
    }
    let out = gpu.uninit(heads * n * hd)?;
    let run = |regions: &[Dev<f32>]| -> Result<()> {
        let cached: Vec<DecodeCache> = caches
            .iter()
            .enumerate()
            .map(|(i, (k, _, len))| DecodeCache {
                k: regions[2 * i],
                v: regions[2 * i + 1],
                len: *len,
                head_stride: if kv_heads == 1 {
                    k.dim(2).unwrap_or(0) * hd
                } else {
                    k.stride()[1]
                },
            })
            .collect();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k_new.storage_and_layout();
        let (vs, vl) = v_new.storage_and_layout();
        let (Some(qd), Some(kd), Some(vd)) =
            (Gpu::view(&qs, ql), Gpu::view(&ks, kl), Gpu::view(&vs, vl))
        else {
            candle_core::bail!("decode attention: q, k, v not contiguous f32 on the GPU");
        };
        gpu.decode_attention(
            out.dev(),
            (qd, kd, vd),
            &cached,
            (heads, kv_heads, hd),
            scale as f32,
        )
    };
    let regions = std::cell::RefCell::new(Vec::with_capacity(buffers.len()));
    buffers[0].inplace_op1(&Held {
        buffers: &buffers,
        level: 0,
        regions: &regions,
        run: &run,
    })?;
    gpu.into_tensor(out, (1, heads, n, hd))
}

/// Holds `buffers[level]` mutably (candle's in-place op gives its storage), notes its region,
/// and holds the next one inside; with all of them held, runs `run` on their regions.
#[derive(Clone, Copy)]
struct Held<'a> {
    buffers: &'a [&'a Tensor],
    level: usize,
    regions: &'a std::cell::RefCell<Vec<Dev<f32>>>,
    run: &'a dyn Fn(&[Dev<f32>]) -> Result<()>,
}

impl Held<'_> {
    fn next(&self, region: Option<Dev<f32>>) -> Result<()> {
        let Some(region) = region else {
            candle_core::bail!("decode attention: a cache buffer not in f32 on the GPU");
        };
        self.regions.borrow_mut().push(region);
        match self.buffers.get(self.level + 1) {
            Some(next) => next.inplace_op1(&Held {
                level: self.level + 1,
                ..*self
            }),
            None => {
                let regions = self.regions.borrow().clone();
                (self.run)(&regions)
            }
        }
    }
}

impl InplaceOp1 for Held<'_> {
    fn name(&self) -> &'static str {
        "decode-attention-caches"
    }

    #[cfg(not(feature = "cuda"))]
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.next(Gpu::region_mut(storage, layout))
    }

    #[cfg(feature = "cuda")]
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("decode attention: a cache buffer on the CPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &mut candle_core::cuda_backend::CudaStorage,
        layout: &Layout,
    ) -> Result<()> {
        self.next(Gpu::region_mut(storage, layout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_diff, randn};

    /// softmax(scale·q·kᵀ)·v of one sequence by tensor ops: q [1, heads, 1, hd] against k, v
    /// [1, kv_heads, s, hd].
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (_, heads, _, hd) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((1, kv, heads / kv, s, hd))
                .unwrap()
                .reshape((1, heads, s, hd))
                .unwrap()
        };
        let att = (q.matmul(&rep(k).t().unwrap()).unwrap() * scale).unwrap();
        candle_nn::ops::softmax_last_dim(&att)
            .unwrap()
            .matmul(&rep(v))
            .unwrap()
    }

    /// The kernel (on the emulated GPU with `cuda-emu`) equals each sequence's attention by tensor ops over its cache and
    /// new key, and leaves the new keys and values in the caches at their lengths and nothing
    /// else changed: head sizes 64 (two groups of keys per block), 80 (one, idle threads), 200
    /// (two columns a thread); grouped-query heads; cache lengths 0 (only the new key), under
    /// and over a tile of 128 keys; one key/value head; more sequences than one launch takes.
    #[test]
    fn gpu_decode_step_equals_the_composed_attention_and_writes_the_caches() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| randn(0f32, 1.0, s, &dev).unwrap();
        for (heads, kv, hd, lens) in [
            (6, 2, 64, vec![0, 5, 130, 300]),
            (4, 4, 80, vec![127, 1, 256]),
            (2, 1, 200, vec![3, 129]),
            (3, 1, 32, (0..70).map(|i| i % 9).collect()),
        ] {
            let n = lens.len();
            let q = r(&[1, heads, n, hd]);
            // k_new, v_new as views of a wider tensor (made contiguous by the entry point).
            let kv_new = r(&[1, kv, n, 2 * hd]);
            let (k_new, v_new) = (
                kv_new.narrow(3, 0, hd).unwrap(),
                kv_new.narrow(3, hd, hd).unwrap(),
            );
            let bufs: Vec<(Tensor, Tensor)> = lens
                .iter()
                .map(|&len| (r(&[1, kv, len + 7, hd]), r(&[1, kv, len + 7, hd])))
                .collect();
            let before: Vec<(Tensor, Tensor)> = bufs
                .iter()
                .map(|(k, v)| (k.copy().unwrap(), v.copy().unwrap()))
                .collect();
            let caches: Vec<(&Tensor, &Tensor, usize)> = bufs
                .iter()
                .zip(&lens)
                .map(|((k, v), &len)| (k, v, len))
                .collect();
            let got = decode_step_attention(&q, &k_new, &v_new, &caches, 0.125)
                .unwrap()
                .expect("f32 tensors of the GPU");
            assert_eq!(got.dims(), [1, heads, n, hd]);
            for (i, &len) in lens.iter().enumerate() {
                let row = |x: &Tensor| x.narrow(2, i, 1).unwrap();
                let (k0, v0) = &before[i];
                let keys = Tensor::cat(&[&k0.narrow(2, 0, len).unwrap(), &row(&k_new)], 2).unwrap();
                let vals = Tensor::cat(&[&v0.narrow(2, 0, len).unwrap(), &row(&v_new)], 2).unwrap();
                let want = composed(&row(&q), &keys, &vals, 0.125);
                let diff = max_diff(&row(&got), &want);
                assert!(diff < 1e-5, "hd {hd}, sequence {i} of len {len}: {diff}");
                // The cache now holds the new key and value at `len`; the rest is untouched.
                for (now, was, new) in [(&bufs[i].0, k0, &k_new), (&bufs[i].1, v0, &v_new)] {
                    let want = was.copy().unwrap();
                    want.slice_set(&row(new).contiguous().unwrap(), 2, len)
                        .unwrap();
                    assert_eq!(max_diff(now, &want), 0.0, "hd {hd}, sequence {i}");
                }
            }
        }
    }

    /// Caches whose buffers have no room for the step, or are given twice, are refused without
    /// a write; other layouts are left to the caller.
    #[test]
    fn gpu_decode_step_refuses_what_it_cannot_write() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| randn(0f32, 1.0, s, &dev).unwrap();
        let (q, k, v) = (r(&[1, 2, 2, 8]), r(&[1, 2, 2, 8]), r(&[1, 2, 2, 8]));
        let (a, b) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        // Full: 4 positions held of 4.
        let full = decode_step_attention(&q, &k, &v, &[(&a, &b, 4), (&a, &b, 1)], 1.0).unwrap();
        assert!(full.is_none());
        // The same buffers for two sequences.
        let e = decode_step_attention(&q, &k, &v, &[(&a, &b, 1), (&a, &b, 2)], 1.0).unwrap_err();
        assert!(e.to_string().contains("share a buffer"), "{e}");
        // Not f32.
        let q16 = q.to_dtype(DType::F16).unwrap();
        let (c, d) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        assert!(
            decode_step_attention(&q16, &k, &v, &[(&a, &b, 1), (&c, &d, 1)], 1.0)
                .unwrap()
                .is_none()
        );
    }
}
