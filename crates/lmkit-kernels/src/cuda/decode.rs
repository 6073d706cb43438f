//! The attention of a serving round's decoding steps on the GPU: every sequence continues its
//! own KV cache, and one launch a layer ([`Gpu::decode_attention`]) writes each sequence's new
//! key and value into its cache and attends over it, instead of several small launches per
//! sequence (rotation, copies into the cache, the two products, the scaling and the softmax).

use super::{DecodeCache, DecodeRows, Dev, Gpu, DECODE_MAX_HEAD};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};

/// Sequences of one launch: the cache buffers are held mutably one inside the other (two
/// frames each), so very many sequences go in several launches.
const SEQUENCES_PER_LAUNCH: usize = 64;

/// softmax(scale·q·kᵀ)·v for a decoding step of n sequences that each continue their own KV
/// cache, on the GPU of the tensors (with the `cuda-emu` feature alone: the emulated GPU, whose
/// tensors are CPU tensors). q [1, heads, n, hd]; k_new and v_new [1, kv_heads, n, hd] (the
/// step's keys and values, query head h reading key/value head h / (heads / kv_heads)); any
/// strides with rows of hd contiguous (views of the projections are read in place).
/// `caches[i]`: sequence i's key and value buffers ([1, kv_heads, capacity, hd], contiguous)
/// and the positions they hold, fewer than their capacity: the step's key and value are written
/// at that position. With `rope` ((table [positions, rotated]: each position's cos values, then
/// its sin values), rotated), q's and the new keys' first `rotated` columns are rotated at the
/// sequence's position first, as the rotary embedding does. Returns [1, heads, n, hd] (a view of
/// [n, heads, hd] rows); `None` (nothing written) where the tensors are not f32 on a GPU, a
/// buffer's layout is not one this reads, or the head size is over 256.
pub fn decode_step_attention(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    caches: &[(&Tensor, &Tensor, usize)],
    rope: Option<(&Tensor, usize)>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let Some(gpu) = Gpu::of(q.device()) else {
        return Ok(None);
    };
    let (one, heads, n, hd) = q.dims4()?;
    let (_, kv_heads, _, _) = k_new.dims4()?;
    let f32_here = |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(q.device());
    let fits = one == 1
        && n == caches.len()
        && n > 0
        && hd <= DECODE_MAX_HEAD
        && k_new.dims() == [1, kv_heads, n, hd]
        && v_new.dims() == k_new.dims()
        && [q, k_new, v_new]
            .into_iter()
            .chain(caches.iter().flat_map(|(k, v, _)| [*k, *v]))
            .all(f32_here)
        && caches.iter().all(|(k, v, len)| {
            let d = k.dims();
            d.len() == 4
                && d[0] == 1
                && d[1] == kv_heads
                && d[2] > *len
                && d[3] == hd
                && k.is_contiguous()
                && v.dims() == d
                && v.is_contiguous()
        })
        && rope.is_none_or(|(t, rotated)| {
            f32_here(t)
                && t.is_contiguous()
                && t.dims2().is_ok_and(|(positions, r)| {
                    r == rotated && caches.iter().all(|(_, _, len)| *len < positions)
                })
        });
    if !fits {
        return Ok(None);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(SEQUENCES_PER_LAUNCH));
    for first in (0..n).step_by(SEQUENCES_PER_LAUNCH) {
        let m = SEQUENCES_PER_LAUNCH.min(n - first);
        let part = |x: &Tensor| -> Result<Tensor> {
            let x = if m == n {
                x.clone()
            } else {
                x.narrow(2, first, m)?
            };
            // Rows of hd contiguous, as the kernel reads them.
            if x.stride()[3] == 1 {
                Ok(x)
            } else {
                x.contiguous()
            }
        };
        outs.push(launch(
            &gpu,
            (&part(q)?, &part(k_new)?, &part(v_new)?),
            &caches[first..first + m],
            rope,
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

/// The rows of one input of the kernel.
fn rows(t: &Tensor) -> Result<DecodeRows> {
    let (storage, layout) = t.storage_and_layout();
    let Some(data) = Gpu::region(&storage, layout) else {
        candle_core::bail!("decode attention: an input not in f32 on the GPU");
    };
    let stride = layout.stride();
    Ok(DecodeRows {
        data,
        head_stride: stride[1],
        seq_stride: stride[2],
    })
}

/// One launch over `caches.len()` sequences: [1, heads, n, hd].
fn launch(
    gpu: &Gpu,
    (q, k_new, v_new): (&Tensor, &Tensor, &Tensor),
    caches: &[(&Tensor, &Tensor, usize)],
    rope: Option<(&Tensor, usize)>,
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let n = caches.len();
    let buffers: Vec<&Tensor> = caches.iter().flat_map(|(k, v, _)| [*k, *v]).collect();
    // Every cache buffer's storage once, none of them an input's: a storage held mutably twice
    // (or while read as an input) would wait for itself. (The inputs may share one: the q, k
    // and v of a row are views of its projections.)
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
    let mut inputs = vec![base(q)?, base(k_new)?, base(v_new)?];
    if let Some((table, _)) = rope {
        inputs.push(base(table)?);
    }
    bases.sort_unstable();
    if bases.windows(2).any(|w| w[0] == w[1]) || bases.iter().any(|b| inputs.contains(b)) {
        candle_core::bail!("decode attention: two operands share a buffer");
    }
    let out = gpu.uninit(n * heads * hd)?;
    let run = |regions: &[Dev<f32>]| -> Result<()> {
        let cached: Vec<DecodeCache> = caches
            .iter()
            .enumerate()
            .map(|(i, (k, _, len))| DecodeCache {
                k: regions[2 * i],
                v: regions[2 * i + 1],
                len: *len,
                head_stride: k.dim(2).unwrap_or(0) * hd,
            })
            .collect();
        let inputs = (rows(q)?, rows(k_new)?, rows(v_new)?);
        let table = match rope {
            Some((t, rotated)) => {
                let (storage, layout) = t.storage_and_layout();
                let Some(d) = Gpu::view(&storage, layout) else {
                    candle_core::bail!("decode attention: the rotary table not f32 on the GPU");
                };
                Some((d, rotated))
            }
            None => None,
        };
        gpu.decode_attention(
            out.dev(),
            inputs,
            &cached,
            table,
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
    // [n, heads, hd] rows, seen as [1, heads, n, hd].
    gpu.into_tensor(out, (n, heads, hd))?
        .transpose(0, 1)?
        .unsqueeze(0)
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

    /// Row `pos` of a rotary table applied to the first `rotated` columns of x [.., hd]
    /// (rotate-half pairs c, c + rotated / 2), by tensor ops.
    fn rotate(x: &Tensor, table: &Tensor, pos: usize, rotated: usize) -> Tensor {
        let (half, hd) = (rotated / 2, x.dim(3).unwrap());
        let row = table.narrow(0, pos, 1).unwrap();
        let (c, s) = (
            row.narrow(1, 0, half).unwrap(),
            row.narrow(1, half, half).unwrap(),
        );
        let x1 = x.narrow(3, 0, half).unwrap();
        let x2 = x.narrow(3, half, half).unwrap();
        let a = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
        let b = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
        let rest = x.narrow(3, rotated, hd - rotated).unwrap();
        Tensor::cat(&[&a, &b, &rest], 3).unwrap()
    }

    /// The kernel (on the emulated GPU with `cuda-emu`) equals each sequence's attention by
    /// tensor ops over its cache and new key, and leaves the new keys (rotated) and values in
    /// the caches at their lengths and nothing else changed: head sizes 64 (two groups of keys
    /// per block), 80 (one, idle threads), 200 (two columns a thread); grouped-query heads;
    /// cache lengths 0 (only the new key), under and over a tile of 128 keys; one key/value
    /// head; more sequences than one launch takes; q, k and v read in place from one row of
    /// projections per sequence; rotary tables over the whole head and over part of it.
    #[test]
    fn gpu_decode_step_equals_the_composed_attention_and_writes_the_caches() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| randn(0f32, 1.0, s, &dev).unwrap();
        for (heads, kv, hd, lens, rotated) in [
            (6, 2, 64, vec![0, 5, 130, 300], 64),
            (4, 4, 80, vec![127, 1, 256], 0),
            (2, 1, 200, vec![3, 129], 100),
            (3, 1, 32, (0..70).map(|i| i % 9).collect(), 0),
        ] {
            let n = lens.len();
            // Each sequence's q|k|v in one row [n, (heads + 2·kv)·hd], as a fused projection
            // gives them: q, k and v are strided views of it.
            let qkv = r(&[n, (heads + 2 * kv) * hd]);
            let view = |from: usize, h: usize| {
                qkv.narrow(1, from * hd, h * hd)
                    .and_then(|x| x.reshape((n, h, hd)))
                    .and_then(|x| x.transpose(0, 1))
                    .and_then(|x| x.unsqueeze(0))
                    .unwrap()
            };
            let (q, k_new, v_new) = (view(0, heads), view(heads, kv), view(heads + kv, kv));
            let positions = 400;
            let angles = r(&[positions, rotated / 2]);
            let table = Tensor::cat(&[&angles.cos().unwrap(), &angles.sin().unwrap()], 1).unwrap();
            let rope = (rotated > 0).then_some((&table, rotated));
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
            let got = decode_step_attention(&q, &k_new, &v_new, &caches, rope, 0.125)
                .unwrap()
                .expect("f32 tensors of the GPU");
            assert_eq!(got.dims(), [1, heads, n, hd]);
            for (i, &len) in lens.iter().enumerate() {
                let row = |x: &Tensor| x.narrow(2, i, 1).unwrap();
                let turned = |x: &Tensor| match rope {
                    Some(_) => rotate(&row(x), &table, len, rotated),
                    None => row(x),
                };
                let (k0, v0) = &before[i];
                let new_k = turned(&k_new);
                let keys = Tensor::cat(&[&k0.narrow(2, 0, len).unwrap(), &new_k], 2).unwrap();
                let vals = Tensor::cat(&[&v0.narrow(2, 0, len).unwrap(), &row(&v_new)], 2).unwrap();
                let want = composed(&turned(&q), &keys, &vals, 0.125);
                let diff = max_diff(&row(&got), &want);
                assert!(diff < 1e-5, "hd {hd}, sequence {i} of len {len}: {diff}");
                // The cache now holds the new key and value at `len`; the rest is untouched.
                for (now, was, new) in [(&bufs[i].0, k0, &new_k), (&bufs[i].1, v0, &row(&v_new))] {
                    let want = was.copy().unwrap();
                    want.slice_set(&new.contiguous().unwrap(), 2, len).unwrap();
                    let diff = max_diff(now, &want);
                    assert!(
                        diff < 1e-6,
                        "hd {hd}, sequence {i}: cache differs by {diff}"
                    );
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
        let full =
            decode_step_attention(&q, &k, &v, &[(&a, &b, 4), (&a, &b, 1)], None, 1.0).unwrap();
        assert!(full.is_none());
        // The same buffers for two sequences.
        let e =
            decode_step_attention(&q, &k, &v, &[(&a, &b, 1), (&a, &b, 2)], None, 1.0).unwrap_err();
        assert!(e.to_string().contains("share a buffer"), "{e}");
        // Not f32.
        let q16 = q.to_dtype(DType::F16).unwrap();
        let (c, d) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        assert!(
            decode_step_attention(&q16, &k, &v, &[(&a, &b, 1), (&c, &d, 1)], None, 1.0)
                .unwrap()
                .is_none()
        );
    }
}
