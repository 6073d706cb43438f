//! The attention of a serving round on the GPU: every sequence continues its own KV cache, by
//! one position (a decoding step) or several (a prompt piece). A round of decoding steps takes
//! one launch a layer ([`Gpu::decode_attention`]) that writes each sequence's new key and value
//! into its cache and attends over it; a round with prompt pieces takes two
//! ([`Gpu::extend_attention`]: the writes, then the attention), instead of several small
//! launches per sequence (rotation, copies into the cache, the two products, the scaling, the
//! mask and the softmax).

use super::{Data, DecodeCache, DecodeRows, Gpu, DECODE_MAX_HEAD};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};

/// Sequences of one launch: the cache buffers are held mutably one inside the other (two
/// frames each), so very many sequences go in several launches.
const SEQUENCES_PER_LAUNCH: usize = 64;

/// One sequence of [`cache_attention`]: its cache's key and value buffers ([1, kv_heads,
/// capacity, hd], contiguous), the `len` positions they hold and the `new` positions the pass
/// brings (room for them within the capacity).
#[derive(Clone, Copy, Debug)]
pub struct CacheSlot<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub len: usize,
    pub new: usize,
}

/// softmax(scale·q·kᵀ)·v, causal, for sequences that each continue their own KV cache, on the
/// GPU of the tensors (with the `cuda-emu` feature alone: the emulated GPU, whose tensors are
/// CPU tensors). q [1, heads, n, hd]; k_new and v_new [1, kv_heads, n, hd] (the new positions'
/// keys and values, query head h reading key/value head h / (heads / kv_heads)); any strides
/// with rows of hd contiguous (views of the projections are read in place). The n columns are
/// the sequences' new positions in order: `seqs[0].new` columns first. Sequence i's keys and
/// values are written into its buffers at positions `len`, `len + 1`, ..., and each of its new
/// positions attends to its cache up to itself. With `rope` ((table [positions, rotated]: each
/// position's cos values, then its sin values), rotated), q's and the new keys' first
/// `rotated` columns are rotated at their positions first, as the rotary embedding does.
/// Returns [1, heads, n, hd] (a view of [n, heads, hd] rows); `None` (nothing written) where
/// the tensors are not all f32 or all bf16 on a GPU (the rotary table f32), a buffer's layout is
/// not one this reads, or the head size is over 256.
pub fn cache_attention(
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    seqs: &[CacheSlot],
    rope: Option<(&Tensor, usize)>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let Some(gpu) = Gpu::of(q.device()) else {
        return Ok(None);
    };
    let (one, heads, n, hd) = q.dims4()?;
    let (_, kv_heads, _, _) = k_new.dims4()?;
    let dtype = q.dtype();
    let here = |t: &Tensor| t.dtype() == dtype && t.device().same_device(q.device());
    let ends = || seqs.iter().map(|s| s.len + s.new);
    let fits = one == 1
        && matches!(dtype, DType::F32 | DType::BF16)
        && n == seqs.iter().map(|s| s.new).sum::<usize>()
        && n > 0
        && seqs.iter().all(|s| s.new > 0)
        && hd <= DECODE_MAX_HEAD
        && k_new.dims() == [1, kv_heads, n, hd]
        && v_new.dims() == k_new.dims()
        && [q, k_new, v_new]
            .into_iter()
            .chain(seqs.iter().flat_map(|s| [s.k, s.v]))
            .all(here)
        && seqs.iter().all(|s| {
            let d = s.k.dims();
            d.len() == 4
                && d[0] == 1
                && d[1] == kv_heads
                && d[2] >= s.len + s.new
                && d[3] == hd
                && s.k.is_contiguous()
                && s.v.dims() == d
                && s.v.is_contiguous()
        })
        && rope.is_none_or(|(t, rotated)| {
            t.dtype() == DType::F32
                && t.device().same_device(q.device())
                && t.is_contiguous()
                && t.dims2()
                    .is_ok_and(|(positions, r)| r == rotated && ends().all(|e| e <= positions))
        });
    if !fits {
        return Ok(None);
    }
    let mut outs = Vec::with_capacity(seqs.len().div_ceil(SEQUENCES_PER_LAUNCH));
    let mut col = 0;
    for part in seqs.chunks(SEQUENCES_PER_LAUNCH) {
        let m: usize = part.iter().map(|s| s.new).sum();
        let cols = |x: &Tensor| -> Result<Tensor> {
            let x = if m == n {
                x.clone()
            } else {
                x.narrow(2, col, m)?
            };
            // Rows of hd contiguous, as the kernels read them.
            if x.stride()[3] == 1 {
                Ok(x)
            } else {
                x.contiguous()
            }
        };
        outs.push(launch(
            &gpu,
            (&cols(q)?, &cols(k_new)?, &cols(v_new)?),
            part,
            rope,
            (heads, kv_heads, hd),
            scale,
        )?);
        col += m;
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
    let Some(data) = Gpu::region_data(&storage, layout) else {
        candle_core::bail!("decode attention: an input not in f32 or bf16 on the GPU");
    };
    let stride = layout.stride();
    Ok(DecodeRows {
        data,
        head_stride: stride[1],
        seq_stride: stride[2],
    })
}

/// One launch (or two, with prompt pieces) over `seqs.len()` sequences: [1, heads, n, hd].
fn launch(
    gpu: &Gpu,
    (q, k_new, v_new): (&Tensor, &Tensor, &Tensor),
    seqs: &[CacheSlot],
    rope: Option<(&Tensor, usize)>,
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let n: usize = seqs.iter().map(|s| s.new).sum();
    let buffers: Vec<&Tensor> = seqs.iter().flat_map(|s| [s.k, s.v]).collect();
    // Every cache buffer's storage once, none of them an input's: a storage held mutably twice
    // (or while read as an input) would wait for itself. (The inputs may share one: the q, k
    // and v of a row are views of its projections.)
    let base = |t: &Tensor| -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let size = t.dtype().size_in_bytes() as u64;
        match Gpu::region_data(&storage, layout) {
            Some(region) => {
                Ok(region.need(0, "decode attention")? - size * layout.start_offset() as u64)
            }
            None => candle_core::bail!("decode attention: a tensor not in f32 or bf16 on the GPU"),
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
    // Of the inputs' type.
    let out = gpu.stored(q.dtype() == DType::BF16, n * heads * hd)?;
    let run = |regions: &[Data]| -> Result<()> {
        let cached: Vec<DecodeCache> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| DecodeCache {
                k: regions[2 * i],
                v: regions[2 * i + 1],
                len: s.len,
                new: s.new,
                head_stride: s.k.dim(2).unwrap_or(0) * hd,
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
        let shape = (heads, kv_heads, hd);
        let out = out.data();
        if seqs.iter().all(|s| s.new == 1) {
            gpu.decode_attention(out, inputs, &cached, table, shape, scale as f32)
        } else {
            gpu.extend_attention(out, inputs, &cached, table, shape, scale as f32)
        }
    };
    let regions = std::cell::RefCell::new(Vec::with_capacity(buffers.len()));
    buffers[0].inplace_op1(&Held {
        buffers: &buffers,
        level: 0,
        regions: &regions,
        run: &run,
    })?;
    // [n, heads, hd] rows, seen as [1, heads, n, hd].
    let rows = gpu.stored_tensor(out, (n, heads, hd))?;
    rows.transpose(0, 1)?.unsqueeze(0)
}

/// Holds `buffers[level]` mutably (candle's in-place op gives its storage), notes its region,
/// and holds the next one inside; with all of them held, runs `run` on their regions.
#[derive(Clone, Copy)]
struct Held<'a> {
    buffers: &'a [&'a Tensor],
    level: usize,
    regions: &'a std::cell::RefCell<Vec<Data>>,
    run: &'a dyn Fn(&[Data]) -> Result<()>,
}

impl Held<'_> {
    fn next(&self, region: Option<Data>) -> Result<()> {
        let Some(region) = region else {
            candle_core::bail!("decode attention: a cache buffer not in f32 or bf16 on the GPU");
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
        self.next(Gpu::region_mut_data(storage, layout))
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
        self.next(Gpu::region_mut_data(storage, layout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_diff, randn};

    /// Causal softmax(scale·q·kᵀ)·v of one sequence by tensor ops: q [1, heads, t, hd], the
    /// last t of the s positions of k, v [1, kv_heads, s, hd] (query row r sees keys
    /// 0..=s − t + r).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (_, heads, t, hd) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .expand((1, kv, heads / kv, s, hd))
                .unwrap()
                .reshape((1, heads, s, hd))
                .unwrap()
        };
        let mask: Vec<f32> = (0..t)
            .flat_map(|r| (0..s).map(move |j| if j + t <= s + r { 0.0 } else { -1e30 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), q.device()).unwrap();
        // Contiguous operands: candle's CUDA products take no other layout.
        let c = |x: Tensor| x.contiguous().unwrap();
        let att = (c(q.clone()).matmul(&c(rep(k).t().unwrap())).unwrap() * scale).unwrap();
        let att = att.broadcast_add(&mask).unwrap();
        candle_nn::ops::softmax_last_dim(&att)
            .unwrap()
            .matmul(&c(rep(v)))
            .unwrap()
    }

    /// Rows `pos`, `pos + 1`, ... of a rotary table applied to the first `rotated` columns of
    /// x [1, heads, t, hd] (rotate-half pairs c, c + rotated / 2), by tensor ops.
    fn rotate(x: &Tensor, table: &Tensor, pos: usize, rotated: usize) -> Tensor {
        let (half, hd, t) = (rotated / 2, x.dim(3).unwrap(), x.dim(2).unwrap());
        let rows = table.narrow(0, pos, t).unwrap();
        let (c, s) = (
            rows.narrow(1, 0, half).unwrap(),
            rows.narrow(1, half, half).unwrap(),
        );
        let x1 = x.narrow(3, 0, half).unwrap();
        let x2 = x.narrow(3, half, half).unwrap();
        let a = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
        let b = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
        let rest = x.narrow(3, rotated, hd - rotated).unwrap();
        Tensor::cat(&[&a, &b, &rest], 3).unwrap()
    }

    /// Runs the kernels (on the emulated GPU with `cuda-emu`) for sequences of (cached
    /// positions, new positions) and checks that each sequence's output equals its causal
    /// attention by tensor ops over its cache and new keys, and that its cache holds the new
    /// keys (rotated) and values at their positions and nothing else changed. q, k and v are
    /// read in place from one row of projections per new position. With `dtype` bf16 the rows,
    /// caches and output are bf16 (the reference widens them to f32, and rounds the rotated new
    /// keys to bf16 as the cache keeps them).
    fn check_against_composed(
        (heads, kv, hd): (usize, usize, usize),
        seqs: &[(usize, usize)],
        rotated: usize,
        dtype: DType,
    ) {
        let dev = crate::testing::gpu_device().expect("a GPU");
        let r = |s: &[usize]| {
            randn(0f32, 1.0, s, &dev)
                .and_then(|x| x.to_dtype(dtype))
                .unwrap()
        };
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let rounded = |x: &Tensor| f(&x.to_dtype(dtype).unwrap());
        // One bf16 step of the values (at most 4 or so) for bf16, f32's rounding otherwise.
        let (tol_out, tol_cache) = if dtype == DType::BF16 {
            (2e-2, 3e-2)
        } else {
            (1e-5, 1e-6)
        };
        let n: usize = seqs.iter().map(|s| s.1).sum();
        // Each position's q|k|v in one row [n, (heads + 2·kv)·hd], as a fused projection gives
        // them: q, k and v are strided views of it.
        let qkv = r(&[n, (heads + 2 * kv) * hd]);
        let view = |from: usize, h: usize| {
            qkv.narrow(1, from * hd, h * hd)
                .and_then(|x| x.reshape((n, h, hd)))
                .and_then(|x| x.transpose(0, 1))
                .and_then(|x| x.unsqueeze(0))
                .unwrap()
        };
        let (q, k_new, v_new) = (view(0, heads), view(heads, kv), view(heads + kv, kv));
        let positions = seqs.iter().map(|&(len, new)| len + new).max().unwrap_or(0) + 5;
        // No table without rotation (a GPU allocates no empty buffer).
        let table = (rotated > 0).then(|| {
            let angles = randn(0f32, 1.0, &[positions, rotated / 2], &dev).unwrap();
            Tensor::cat(&[&angles.cos().unwrap(), &angles.sin().unwrap()], 1).unwrap()
        });
        let rope = table.as_ref().map(|t| (t, rotated));
        let bufs: Vec<(Tensor, Tensor)> = seqs
            .iter()
            .map(|&(len, new)| {
                (
                    r(&[1, kv, len + new + 7, hd]),
                    r(&[1, kv, len + new + 7, hd]),
                )
            })
            .collect();
        let before: Vec<(Tensor, Tensor)> = bufs
            .iter()
            .map(|(k, v)| (k.copy().unwrap(), v.copy().unwrap()))
            .collect();
        let slots: Vec<CacheSlot> = bufs
            .iter()
            .zip(seqs)
            .map(|((k, v), &(len, new))| CacheSlot { k, v, len, new })
            .collect();
        let got = cache_attention(&q, &k_new, &v_new, &slots, rope, 0.125)
            .unwrap()
            .expect("f32 or bf16 tensors of the GPU");
        assert_eq!(got.dims(), [1, heads, n, hd]);
        assert_eq!(got.dtype(), dtype);
        let got = f(&got);
        let mut col = 0;
        for (i, &(len, new)) in seqs.iter().enumerate() {
            let cols = |x: &Tensor| f(&x.narrow(2, col, new).unwrap());
            let turned = |x: &Tensor| match rope {
                Some((table, _)) => rotate(&cols(x), table, len, rotated),
                None => cols(x),
            };
            let (k0, v0) = (f(&before[i].0), f(&before[i].1));
            let new_k = rounded(&turned(&k_new));
            let keys = Tensor::cat(&[&k0.narrow(2, 0, len).unwrap(), &new_k], 2).unwrap();
            let vals = Tensor::cat(&[&v0.narrow(2, 0, len).unwrap(), &cols(&v_new)], 2).unwrap();
            let want = composed(&turned(&q), &keys, &vals, 0.125);
            let diff = max_diff(&cols(&got), &want);
            assert!(
                diff < tol_out,
                "{dtype:?} hd {hd}, sequence {i} ({len} + {new}): {diff}"
            );
            // The cache now holds the new keys and values from `len`; the rest is untouched.
            for (now, was, new) in [(&bufs[i].0, &k0, &new_k), (&bufs[i].1, &v0, &cols(&v_new))] {
                let want = was.copy().unwrap();
                want.slice_set(&new.contiguous().unwrap(), 2, len).unwrap();
                let diff = max_diff(&f(now), &want);
                assert!(
                    diff < tol_cache,
                    "{dtype:?} hd {hd}, sequence {i}: cache differs by {diff}"
                );
            }
            col += new;
        }
    }

    /// One decoding step (a new row) for each cache length.
    fn steps(lens: &[usize]) -> Vec<(usize, usize)> {
        lens.iter().map(|&l| (l, 1)).collect()
    }

    /// Decoding steps (one launch): head sizes 64 (two groups of keys per block), 80 (one,
    /// idle threads), 200 (two columns a thread); grouped-query heads; cache lengths 0 (only
    /// the new key), under and over a tile of 128 keys; one key/value head; more sequences
    /// than one launch takes; rotary tables over the whole head and over part of it. Few
    /// sequences split their keys over blocks (2 splits in the first two cases, 4 in the last,
    /// where the short sequence leaves three splits without keys).
    #[test]
    fn gpu_decode_step_equals_the_composed_attention_and_writes_the_caches() {
        if crate::testing::gpu_device().is_none() {
            return;
        }
        let f32 = DType::F32;
        check_against_composed((6, 2, 64), &steps(&[0, 5, 130, 300]), 64, f32);
        check_against_composed((4, 4, 80), &steps(&[127, 1, 256]), 0, f32);
        check_against_composed((2, 1, 200), &steps(&[3, 129]), 100, f32);
        let many: Vec<usize> = (0..70).map(|i| i % 9).collect();
        check_against_composed((3, 1, 32), &steps(&many), 0, f32);
        check_against_composed((2, 1, 64), &steps(&[1000, 7]), 64, f32);
    }

    /// Prompt pieces beside decoding steps (the two launches): fresh prompts (cache 0), pieces
    /// continuing a cache, pieces of one tile, of several (16 rows a tile) and a partial last
    /// tile, caches crossing several key tiles; head sizes 64, 80, 200, 256; grouped heads;
    /// more sequences than one launch takes.
    #[test]
    fn gpu_prompt_pieces_equal_the_composed_causal_attention_and_write_the_caches() {
        if crate::testing::gpu_device().is_none() {
            return;
        }
        let seqs = [(0, 7), (5, 1), (130, 33), (0, 16), (3, 17), (200, 1)];
        let f32 = DType::F32;
        check_against_composed((6, 2, 64), &seqs, 64, f32);
        check_against_composed((4, 4, 80), &[(0, 40), (17, 2)], 0, f32);
        check_against_composed((2, 1, 200), &[(31, 5), (0, 1), (1, 20)], 100, f32);
        check_against_composed((2, 2, 256), &[(9, 18)], 256, f32);
        let many: Vec<(usize, usize)> = (0..70).map(|i| (i % 5, 1 + i % 3)).collect();
        check_against_composed((3, 1, 32), &many, 0, f32);
    }

    /// The bf16 kernels (a model loaded in bf16): decoding steps (one split and several, head
    /// sizes 64 and 200, grouped heads, part of a head rotated) and prompt pieces beside them
    /// (several tiles, a cache over one key tile), the output and the caches in bf16.
    #[test]
    fn gpu_bf16_cache_attention_equals_the_composed_attention() {
        if crate::testing::gpu_device().is_none() {
            return;
        }
        let bf16 = DType::BF16;
        check_against_composed((6, 2, 64), &steps(&[0, 5, 130, 300]), 64, bf16);
        check_against_composed((2, 1, 200), &steps(&[3, 129]), 100, bf16);
        check_against_composed((2, 1, 64), &steps(&[1000, 7]), 64, bf16);
        check_against_composed((6, 2, 64), &[(0, 7), (5, 1), (130, 33), (3, 17)], 64, bf16);
        check_against_composed((2, 1, 200), &[(31, 5), (0, 1)], 100, bf16);
    }

    /// Caches whose buffers have no room for the new positions, or are given twice, are
    /// refused without a write; other layouts are left to the caller.
    #[test]
    fn gpu_cache_attention_refuses_what_it_cannot_write() {
        let Some(dev) = crate::testing::gpu_device() else {
            return;
        };
        let r = |s: &[usize]| randn(0f32, 1.0, s, &dev).unwrap();
        let (q, k, v) = (r(&[1, 2, 3, 8]), r(&[1, 2, 3, 8]), r(&[1, 2, 3, 8]));
        let (a, b) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        let slot = |len, new| CacheSlot {
            k: &a,
            v: &b,
            len,
            new,
        };
        // Full: 4 positions held of 4; 3 held and 2 new.
        for full in [[slot(4, 1), slot(1, 2)], [slot(3, 2), slot(0, 1)]] {
            assert!(cache_attention(&q, &k, &v, &full, None, 1.0)
                .unwrap()
                .is_none());
        }
        // The same buffers for two sequences.
        let e = cache_attention(&q, &k, &v, &[slot(1, 2), slot(0, 1)], None, 1.0).unwrap_err();
        assert!(e.to_string().contains("share a buffer"), "{e}");
        // Columns that are not the new positions' count; not f32.
        let (c, d) = (r(&[1, 2, 4, 8]), r(&[1, 2, 4, 8]));
        let other = CacheSlot {
            k: &c,
            v: &d,
            len: 1,
            new: 1,
        };
        assert!(cache_attention(&q, &k, &v, &[slot(1, 1), other], None, 1.0)
            .unwrap()
            .is_none());
        let q16 = q.to_dtype(DType::F16).unwrap();
        assert!(
            cache_attention(&q16, &k, &v, &[slot(1, 2), other], None, 1.0)
                .unwrap()
                .is_none()
        );
    }
}
