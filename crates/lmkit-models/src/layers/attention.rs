//! Scaled dot-product attention (Vaswani et al. 2017), the one implementation every family
//! calls: causal (decoders), bidirectional with a padding bias (encoders) and cross-attention
//! (encoder-decoders), with grouped-query key/value heads, over a KV cache when decoding.
//! On the CPU a prompt's causal attention is one kernel over operands packed once
//! (`lmkit_kernels::attend::attend_causal`; where the CPU lacks its micro-kernel, the causal
//! softmax is one fused kernel, masked half skipped); GPT-2's packed q|k|v takes the fused
//! attention kernel of `lmkit-kernels` for whole sequences. On a GPU, the
//! passes that continue KV caches (one sequence's prompt or decoding step, or a serving round's
//! decoding steps and prompt pieces, each continuing its own cache) take one kernel launch a
//! layer that writes their keys and values into the caches and attends over them (two with
//! prompt pieces: the writes, then the attention; [`attend_rows`]).

use crate::layers::kv_cache::KvCache;
use crate::layers::rope::Rope;
use candle_core::{DType, Tensor};

/// Queries whose causal scores are computed at once; longer passes go in blocks.
const QUERY_BLOCK: usize = 512;

/// [`QUERY_BLOCK`] for inference on a CPU without lmkit's micro-kernel, where `attend_causal`
/// does not apply: a block's product skips the keys after its last query, so smaller blocks
/// multiply less of the masked half. SmolLM2-135M's attention (9 query
/// heads over 3, head size 64) over a causal pass of 512 queries: 4.5 ms a layer in blocks of
/// 128, 6.8 in one; 1,024 queries 17.3 against 24.3 ms, 2,048 70.4 against 86.8 ms (blocks of
/// 96 and 192 were no faster).
const CPU_QUERY_BLOCK: usize = 128;

/// Bytes a block's scores may take: the allocator's mmap threshold (see
/// `lmkit_kernels::system::tune_allocator`), so that the buffer is reused from the heap instead
/// of being mapped, faulted in and zeroed for every block (scoring one 4,096-token window of a
/// 135M Llama: 19.5 s with 512-query blocks, 16 s with blocks sized to this).
const BLOCK_SCORE_BYTES: usize = 32 << 20;

/// Which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// The t queries are the last t of the s key positions; query i sees keys 0..=s − t + i.
    Causal,
    /// Every key, plus an additive bias broadcast to the scores [b, heads, t, s] (padding:
    /// [`padding_bias`]), if any.
    Bias(Option<&'a Tensor>),
}

/// softmax(scale·q·kᵀ + mask)·v for q [b, h, t, d] and k, v [b, h_kv, s, d] with h a multiple
/// of h_kv (grouped-query attention: each key/value head serves h / h_kv query heads). Models
/// whose reference implementation scales the queries before the product pass those and
/// `scale` = 1.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("attention: {heads} query heads for {kv_heads} key/value heads");
    }
    if t == 1 && matches!(mask, Mask::Causal | Mask::Bias(None)) {
        // A decoding step: one query per head sees every key.
        if let Some(y) = lmkit_kernels::attend::attend_one(q, k, v, scale)? {
            return Ok(y);
        }
    }
    if t == 1 && heads != kv_heads && matches!(mask, Mask::Causal | Mask::Bias(None)) {
        // One query per head (a decoding step) sees every key: the query heads that share a
        // key/value head go through it as the rows of one product, instead of copying the
        // keys and values once per query head.
        let rep = heads / kv_heads;
        let q = q.contiguous()?.reshape((b, kv_heads, rep, d))?;
        let att = scaled(widened(lmkit_kernels::blas::matmul(&q, &k.t()?)?)?, scale)?;
        let p = probabilities(&att, v.dtype())?;
        return lmkit_kernels::blas::matmul(&p, v)?.reshape((b, heads, 1, d));
    }
    if matches!(mask, Mask::Causal) {
        // A prompt on the CPU (f32; a half-type model's comes back here widened by `in_f32`).
        if let Some(y) = lmkit_kernels::attend::attend_causal(q, k, v, scale)? {
            return Ok(y);
        }
    }
    if let Some(y) = in_f32(q, k, v, mask, scale)? {
        return Ok(y);
    }
    let s = k.dim(2)?;
    let inference = !(q.track_op() || k.track_op() || v.track_op());
    let query_block = if q.device().is_cpu() && inference {
        CPU_QUERY_BLOCK
    } else {
        QUERY_BLOCK
    };
    if matches!(mask, Mask::Causal) && t > query_block {
        // Long causal passes (scoring a long window) in blocks of queries: each block's scores
        // are [b, h, block, keys it sees] instead of one [b, h, t, s], and the keys after a
        // block's last query are never multiplied. Rows come out as the one-pass softmax gives.
        let block = (BLOCK_SCORE_BYTES / (b * heads * s * q.dtype().size_in_bytes()).max(1))
            .clamp(16, query_block);
        let mut rows = Vec::with_capacity(t.div_ceil(block));
        for r0 in (0..t).step_by(block) {
            let n = block.min(t - r0);
            let keys = s - t + r0 + n;
            rows.push(attention(
                &q.narrow(2, r0, n)?,
                &k.narrow(2, 0, keys)?,
                &v.narrow(2, 0, keys)?,
                Mask::Causal,
                scale,
            )?);
        }
        return Tensor::cat(&rows, 2);
    }
    let (k, v) = (
        repeat_kv(k, heads / kv_heads)?,
        repeat_kv(v, heads / kv_heads)?,
    );
    let att = widened(lmkit_kernels::blas::matmul(q, &k.t()?)?)?;
    let att = match mask {
        Mask::Causal => {
            if let Some(p) = lmkit_kernels::fused::causal_softmax(&att, scale)? {
                return lmkit_kernels::blas::matmul(&p.to_dtype(v.dtype())?, &v);
            }
            let att = scaled(att, scale)?;
            if t > 1 {
                att.broadcast_add(&shared_causal_bias(t, s, att.dtype(), q.device())?)?
            } else {
                att
            }
        }
        Mask::Bias(bias) => {
            let att = scaled(att, scale)?;
            match bias {
                Some(b) => att.broadcast_add(&b.to_dtype(att.dtype())?)?,
                None => att,
            }
        }
    };
    let p = probabilities(&att, v.dtype())?;
    lmkit_kernels::blas::matmul(&p, &v)
}

/// A half-type model's attention over several queries on the CPU (a prompt, a prefill): q, k
/// and v widened once and the whole of it computed in f32 — scores, softmax and the weighted
/// sum, as PyTorch's CPU attention keeps its scores in f32 — and the output rounded once.
/// Composed in the half type, each product converted its operands to f32 and rounded its result
/// (the scores too, t × keys values a head), and the conversions took longer than the products.
/// `None` for other types and devices, and for tensors that track gradients.
fn in_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Ok(None);
    }
    let wide = |t: &Tensor| lmkit_kernels::half_ops::convert(t, DType::F32);
    let (Some(qf), Some(kf), Some(vf)) = (wide(q)?, wide(k)?, wide(v)?) else {
        return Ok(None);
    };
    let y = attention(&qf, &kf, &vf, mask, scale)?;
    match lmkit_kernels::half_ops::convert(&y, dtype)? {
        Some(y) => Ok(Some(y)),
        None => y.to_dtype(dtype).map(Some),
    }
}

/// Scores of a half-precision model in f32: its scaling, mask and softmax run in f32, as
/// transformers' attention does (`softmax(..., dtype=torch.float32)`, PyTorch's fused
/// attention); f32 and f64 scores as they are.
fn widened(att: Tensor) -> candle_core::Result<Tensor> {
    att.to_dtype(crate::layers::ops::compute_dtype(att.dtype()))
}

/// The softmax of `att` over its last axis, in the values' type `dtype`.
fn probabilities(att: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    crate::layers::ops::softmax_last_dim(att)?.to_dtype(dtype)
}

fn scaled(att: Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if scale == 1.0 {
        Ok(att)
    } else {
        att * scale
    }
}

/// Causal attention with the usual 1/√d scale.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let d = q.dim(3)?;
    attention(q, k, v, Mask::Causal, 1.0 / (d as f64).sqrt())
}

/// Each of the h_kv heads of `x` [b, h_kv, s, d] repeated `rep` times in place: [b, h_kv·rep, s, d].
pub fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, rep, s, d))?
        .reshape((b, kv * rep, s, d))
}

/// The causal mask as an additive bias [t, s]: 0 where query i (position s − t + i) may see
/// key j, −∞ elsewhere.
pub fn causal_bias(
    t: usize,
    s: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let offset = s.saturating_sub(t);
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
    Tensor::from_vec(mask, (t, s), device)?.to_dtype(dtype)
}

/// Masks of at most this many elements are kept for the next layers ([`shared_causal_bias`]).
const KEPT_MASK_ELEMENTS: usize = 1 << 22;

/// [`causal_bias`], built once for the layers of a pass: every layer of a pass masks the same
/// [t, s], and where the fused softmax does not apply (a GPU, where the mask is built on the CPU
/// and copied over) building it for each layer costs more than the masked softmax. The last two
/// masks of at most [`KEPT_MASK_ELEMENTS`] elements are kept per thread.
fn shared_causal_bias(
    t: usize,
    s: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    type Key = (usize, usize, DType, candle_core::DeviceLocation);
    thread_local! {
        static KEPT: std::cell::RefCell<Vec<(Key, Tensor)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let key = (t, s, dtype, device.location());
    if let Some(mask) =
        KEPT.with_borrow(|kept| kept.iter().find(|(k, _)| *k == key).map(|(_, m)| m.clone()))
    {
        return Ok(mask);
    }
    let mask = causal_bias(t, s, dtype, device)?;
    if t * s <= KEPT_MASK_ELEMENTS {
        KEPT.with_borrow_mut(|kept| {
            if kept.len() == 2 {
                kept.remove(0);
            }
            kept.push((key, mask.clone()));
        });
    }
    Ok(mask)
}

/// Additive bias [b, 1, 1, s] that hides padding (`mask` [b, s]: 1 for tokens, 0 for padding)
/// from attention: 0 or −10⁹ (finite, so a row of only padding stays defined).
pub fn padding_bias(mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s) = mask.dims2()?;
    ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, s))
}

/// A layer's causal attention over KV caches: one cache shared by the whole batch
/// (`caches.len() == 1`), one cache per batch row (sequences at different positions decoded
/// together), or, for a single row, several caches each continued by its queued positions, one
/// after another in the row (a packed continuation: several prompts read in one pass, see
/// [`KvCache::queued`]). q, k, v [rows, heads, t, head_dim]; each sequence's q and k are
/// rotated at its positions (`rope`, if the model has one), its keys and values appended to
/// layer `layer` of its cache, and its queries attend to all its cached keys.
pub fn attend_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [&mut KvCache],
    layer: usize,
    rope: Option<&Rope>,
) -> candle_core::Result<Tensor> {
    attend_rows_as(q, k, v, caches, (layer, rope), false)
}

/// [`attend_rows`]; where `tiles` (a layer whose weights are block-quantized), a prompt's f32
/// queries, keys and values attend on the AMX tiles where the CPU has them, rounded to bf16 as
/// the layer's products round theirs (`lmkit_kernels::attend::attend_causal_on_tiles`).
pub fn attend_rows_as(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [&mut KvCache],
    (layer, rope): (usize, Option<&Rope>),
    tiles: bool,
) -> candle_core::Result<Tensor> {
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor, cache: &mut KvCache| {
        let (q, k) = match rope {
            Some(rope) => {
                let start = cache.len();
                (
                    rope.apply(&q.contiguous()?, start)?,
                    rope.apply(&k.contiguous()?, start)?,
                )
            }
            // (Views of a packed projection on a GPU: the composed ops take them whole.)
            None => (q.contiguous()?, k.contiguous()?),
        };
        let (k, v) = cache.append(layer, &k, &v.contiguous()?)?;
        if tiles && q.dim(2)? > 1 {
            let scale = 1.0 / (q.dim(3)? as f64).sqrt();
            if let Some(y) = lmkit_kernels::attend::attend_causal_on_tiles(&q, &k, &v, scale)? {
                return Ok(y);
            }
        }
        causal_attention(&q, &k, &v)
    };
    let (b, _, t, _) = q.dims4()?;
    if let [cache] = caches {
        if let Some(segments) = cache.segments() {
            return attend_packed(q, k, v, segments, cache.num_layers(), &attend);
        }
        if b == 1 && (t == 1 || !cache.discards_kv()) && gpu_decode(q) {
            // One sequence's prompt or decoding step (batch-1 generation); not a pass whose
            // keys are not kept (scoring whole windows), which the composed ops do in fewer
            // passes over the keys.
            return cached_on_gpu(q, k, v, caches, &[t], layer, rope);
        }
        return attend(q, k, v, cache);
    }
    if b == 1 && caches.len() > 1 {
        return attend_continued(q, k, v, t, caches, (layer, rope), &attend);
    }
    if caches.len() != b {
        candle_core::bail!("{} caches for a batch of {b} rows", caches.len());
    }
    if t == 1 && gpu_decode(q) {
        // Decoding steps, a row each: as the columns of one row for the GPU kernel.
        let cols = |x: &Tensor| x.transpose(0, 2);
        let ones = vec![1; b];
        let y = cached_on_gpu(&cols(q)?, &cols(k)?, &cols(v)?, caches, &ones, layer, rope)?;
        return y.transpose(0, 2);
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

/// Whether passes that continue KV caches take the GPU's attention over all their caches
/// ([`cached_on_gpu`]) on the CPU too: the emulated GPU of the `cuda-emu` feature, for tests.
#[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
static EMULATED_GPU_DECODE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Routes CPU passes that continue KV caches through the emulated GPU's attention kernels (tests
/// of the GPU path where there is no GPU).
#[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
pub fn set_emulated_gpu_decode(on: bool) {
    EMULATED_GPU_DECODE.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Whether a layer hands [`attend_rows`] its heads as views of a packed projection: on a GPU (and
/// on the emulated one while its decoding kernels are on, in tests), whose cache kernels read
/// them in place; the CPU's attention wants them contiguous.
pub fn takes_head_views(x: &Tensor) -> bool {
    !x.device().is_cpu() || emulated_gpu_decode()
}

#[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
fn emulated_gpu_decode() -> bool {
    EMULATED_GPU_DECODE.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(all(feature = "cuda-emu", not(feature = "cuda"))))]
fn emulated_gpu_decode() -> bool {
    false
}

/// Whether passes of these tensors (q [rows, heads, t, head_dim]) that continue KV caches take
/// the GPU's kernels ([`cached_on_gpu`]): f32 or bf16 on a GPU (or the emulated one), without
/// gradients, heads no larger than the kernels take.
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_decode(q: &Tensor) -> bool {
    on_gpu(q)
        && matches!(q.dtype(), DType::F32 | DType::BF16)
        && q.dim(3)
            .is_ok_and(|hd| hd <= lmkit_kernels::cuda::DECODE_MAX_HEAD)
        && !q.track_op()
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn gpu_decode(_: &Tensor) -> bool {
    false
}

/// On a GPU unless LMKIT_CUDA_DECODE=0 (passes over KV caches then take the composed ops, to
/// compare).
#[cfg(feature = "cuda")]
fn on_gpu(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device().is_cuda()
        && *ON.get_or_init(|| std::env::var("LMKIT_CUDA_DECODE").map_or(true, |v| v != "0"))
}

#[cfg(all(feature = "cuda-emu", not(feature = "cuda")))]
fn on_gpu(x: &Tensor) -> bool {
    x.device().is_cpu() && emulated_gpu_decode()
}

/// The attention of sequences that each continue their own cache, sequence i by `news[i]`
/// positions, q, k, v [1, heads, Σ news, head_dim] (sequence after sequence along the third
/// axis; views of the projections are read in place), on the GPU ([`gpu_decode`]): every
/// sequence's q and keys rotated at their positions, its keys and values written into its
/// cache, and its positions attending causally over it — one kernel launch for decoding steps,
/// two with prompt pieces — instead of several small launches per sequence.
/// [1, heads, Σ news, head_dim].
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn cached_on_gpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    caches: &mut [&mut KvCache],
    news: &[usize],
    layer: usize,
    rope: Option<&Rope>,
) -> candle_core::Result<Tensor> {
    let hd = q.dim(3)?;
    let mut buffers = Vec::with_capacity(caches.len());
    let mut start = 0;
    for (cache, &new) in caches.iter_mut().zip(news) {
        buffers.push(cache.extend_in_place(layer, &k.narrow(2, start, new)?)?);
        start += new;
    }
    let slots: Vec<lmkit_kernels::cuda::CacheSlot> = buffers
        .iter()
        .zip(news)
        .map(|((k, v, len), &new)| lmkit_kernels::cuda::CacheSlot {
            k,
            v,
            len: *len,
            new,
        })
        .collect();
    let end = slots.iter().map(|s| s.len + s.new).max().unwrap_or(0);
    let table = rope.map(|r| r.table(end)).transpose()?;
    let table = table
        .as_ref()
        .map(|(t, rotated)| (t, *rotated))
        .filter(|(_, rotated)| *rotated > 0);
    let scale = 1.0 / (hd as f64).sqrt();
    match lmkit_kernels::cuda::cache_attention(q, k, v, &slots, table, scale)? {
        Some(y) => Ok(y),
        // The caches now count positions nothing wrote: fail the pass rather than go on.
        None => candle_core::bail!("cache attention: the GPU kernels did not take this pass"),
    }
}

#[cfg(not(any(feature = "cuda", feature = "cuda-emu")))]
fn cached_on_gpu(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &mut [&mut KvCache],
    _: &[usize],
    _: usize,
    _: Option<&Rope>,
) -> candle_core::Result<Tensor> {
    candle_core::bail!("cache attention: built without the GPU")
}

/// A packed continuation: the row's `t` positions are the caches' queued positions, cache after
/// cache; each sequence attends to its own cache's keys and its own new positions. On the GPU
/// ([`gpu_decode`]) all of them go through [`cached_on_gpu`] together.
fn attend_continued(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    caches: &mut [&mut KvCache],
    (layer, rope): (usize, Option<&Rope>),
    attend: &impl Fn(&Tensor, &Tensor, &Tensor, &mut KvCache) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let queued: usize = caches.iter().map(|c| c.queued()).sum();
    if queued != t || caches.iter().any(|c| c.queued() == 0) {
        candle_core::bail!(
            "{} caches for one row of {t} positions, with {queued} positions queued for them",
            caches.len()
        );
    }
    if gpu_decode(q) {
        let news: Vec<usize> = caches.iter().map(|c| c.queued()).collect();
        return cached_on_gpu(q, k, v, caches, &news, layer, rope);
    }
    let mut parts = Vec::with_capacity(caches.len());
    let mut start = 0;
    for cache in caches.iter_mut() {
        let n = cache.queued();
        parts.push(attend(
            &q.narrow(2, start, n)?,
            &k.narrow(2, start, n)?,
            &v.narrow(2, start, n)?,
            cache,
        )?);
        start += n;
    }
    Tensor::cat(&parts, 2)
}

/// A packed pass (see [`KvCache::packed`]): each row's sequences attend one at a time, each with
/// a fresh cache (its positions start at 0), and their outputs are put back in place.
fn attend_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<usize>],
    num_layers: usize,
    attend: &impl Fn(&Tensor, &Tensor, &Tensor, &mut KvCache) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    if segments.len() != b || segments.iter().any(|s| s.iter().sum::<usize>() != t) {
        candle_core::bail!(
            "packed pass: the sequence lengths do not cover the {b} rows of {t} positions"
        );
    }
    let mut rows = Vec::with_capacity(b);
    for (r, lens) in segments.iter().enumerate() {
        let (qr, kr, vr) = (q.narrow(0, r, 1)?, k.narrow(0, r, 1)?, v.narrow(0, r, 1)?);
        let mut parts = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &n in lens {
            let mut cache = KvCache::single_pass(num_layers);
            parts.push(attend(
                &qr.narrow(2, start, n)?,
                &kr.narrow(2, start, n)?,
                &vr.narrow(2, start, n)?,
                &mut cache,
            )?);
            start += n;
        }
        rows.push(Tensor::cat(&parts, 2)?);
    }
    Tensor::cat(&rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        lmkit_kernels::testing::max_diff(a, b)
    }

    /// A half-type model's attention over several queries is the f32 attention of its widened
    /// q, k and v (scores unrounded), rounded once: causal (one block and several, grouped
    /// heads) and with a padding bias; both half types. (A bf16 causal prompt on AMX tiles
    /// rounds its probabilities to bf16 as well.)
    #[test]
    fn half_type_prompts_attend_in_f32() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let step = lmkit_kernels::testing::rounding_step(dtype);
            for (t, s) in [(40, 40), (QUERY_BLOCK + 30, QUERY_BLOCK + 30), (9, 20)] {
                let r = |shape: &[usize]| {
                    Tensor::randn(0f32, 1.5, shape, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (q, k, v) = (r(&[1, 4, t, 16]), r(&[1, 2, s, 16]), r(&[1, 2, s, 16]));
                let bias = Tensor::randn(0f32, 1.0, (1, 1, t, s), &dev).unwrap();
                let wide = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
                for mask in [Mask::Causal, Mask::Bias(Some(&bias))] {
                    let got = attention(&q, &k, &v, mask, 0.25).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let want = attention(&wide(&q), &wide(&k), &wide(&v), mask, 0.25).unwrap();
                    let size = want.abs().unwrap().max_all().unwrap();
                    let size: f32 = size.to_scalar().unwrap();
                    let err = max_diff(&wide(&got), &want);
                    // One rounding of the output (the f32 path's own sums differ in order only);
                    // a bf16 causal prompt on AMX tiles rounds its probabilities too, which
                    // moves the output by at most a rounding of the values' size.
                    let tiles = dtype == DType::BF16
                        && matches!(mask, Mask::Causal)
                        && lmkit_kernels::amx::available();
                    let values = wide(&v).abs().unwrap().max_all().unwrap();
                    let values: f32 = values.to_scalar().unwrap();
                    let bound = if tiles { size + values } else { size };
                    assert!(
                        err <= bound as f64 * step,
                        "{dtype:?} t {t} s {s} {mask:?}: {err} of {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn long_passes_in_query_blocks_equal_one_pass() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| lmkit_kernels::testing::randn(0f64, 1.0, s, &dev).unwrap();
        // 3 query blocks (9 of the CPU's in inference), the last one partial; 4 query heads
        // over 2 key/value heads; the queries the last t of s positions (a continued window).
        let (t, s) = (QUERY_BLOCK * 2 + 37, QUERY_BLOCK * 2 + 50);
        let (q, k, v) = (r(&[1, 4, t, 8]), r(&[1, 2, s, 8]), r(&[1, 2, s, 8]));
        let got = attention(&q, &k, &v, Mask::Causal, 0.3).unwrap();
        let (k2, v2) = (repeat_kv(&k, 2).unwrap(), repeat_kv(&v, 2).unwrap());
        let att = (q.matmul(&k2.t().unwrap()).unwrap() * 0.3).unwrap();
        let att = att
            .broadcast_add(&causal_bias(t, s, DType::F64, &dev).unwrap())
            .unwrap();
        let want = candle_nn::ops::softmax_last_dim(&att)
            .unwrap()
            .matmul(&v2)
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-10, "{}", max_diff(&got, &want));
        // Tracked for a gradient (training), in the larger blocks: the same rows.
        let tracked = candle_core::Var::from_tensor(&q).unwrap();
        let got = attention(tracked.as_tensor(), &k, &v, Mask::Causal, 0.3).unwrap();
        assert!(max_diff(&got, &want) < 1e-10, "{}", max_diff(&got, &want));
    }

    #[test]
    fn shared_masks_are_the_masks_of_their_shapes() {
        let dev = Device::Cpu;
        for (t, s, dtype) in [
            (3, 5, DType::F32),
            (2, 5, DType::F32),
            (3, 5, DType::F64),
            (3, 5, DType::F32),
            (4, 4, DType::F32),
            (3, 5, DType::F32),
        ] {
            let got = shared_causal_bias(t, s, dtype, &dev).unwrap();
            let want = causal_bias(t, s, dtype, &dev).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            let same = got
                .to_dtype(DType::F64)
                .unwrap()
                .eq(&want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar::<u8>()
                .unwrap();
            assert_eq!(same, 1, "{t}x{s} {dtype:?}");
        }
    }

    #[test]
    fn masks_and_grouped_heads_agree_with_their_definitions() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| lmkit_kernels::testing::randn(0f64, 1.0, s, &dev).unwrap();
        let (q, k, v) = (r(&[2, 4, 3, 8]), r(&[2, 2, 5, 8]), r(&[2, 2, 5, 8]));
        let scale = 1.0 / 8f64.sqrt();
        // Grouped-query attention = repeated heads.
        let (kr, vr) = (repeat_kv(&k, 2).unwrap(), repeat_kv(&v, 2).unwrap());
        assert_eq!(kr.dims(), [2, 4, 5, 8]);
        let grouped = attention(&q, &k, &v, Mask::Causal, scale).unwrap();
        let repeated = attention(&q, &kr, &vr, Mask::Causal, scale).unwrap();
        assert!(max_diff(&grouped, &repeated) < 1e-12);
        // The fused causal path = the causal bias through the bias path.
        let bias = causal_bias(3, 5, DType::F64, &dev).unwrap();
        let biased = attention(&q, &kr, &vr, Mask::Bias(Some(&bias)), scale).unwrap();
        assert!(max_diff(&grouped, &biased) < 1e-12);
        // Pre-scaled queries with scale 1 = scale inside.
        let pre = attention(
            &(&q * scale).unwrap(),
            &kr,
            &vr,
            Mask::Bias(Some(&bias)),
            1.0,
        )
        .unwrap();
        assert!(max_diff(&pre, &biased) < 1e-12);
        // The last query of a causal pass sees every key: same as no mask.
        let all = attention(&q, &kr, &vr, Mask::Bias(None), scale).unwrap();
        let last = |x: &Tensor| x.narrow(2, 2, 1).unwrap();
        assert!(max_diff(&last(&grouped), &last(&all)) < 1e-12);
        assert!(max_diff(&grouped, &all) > 1e-3, "the mask changed nothing");
        // Padding: a padded key gets no weight.
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 0.], [1., 1., 1., 1., 1.]], &dev).unwrap();
        let pad = padding_bias(&mask).unwrap().to_dtype(DType::F64).unwrap();
        let padded = attention(&q, &kr, &vr, Mask::Bias(Some(&pad)), scale).unwrap();
        let cut = |x: &Tensor| x.narrow(0, 0, 1).unwrap().narrow(2, 0, 4).unwrap();
        let short = attention(
            &q.narrow(0, 0, 1).unwrap(),
            &cut(&kr),
            &cut(&vr),
            Mask::Bias(None),
            scale,
        )
        .unwrap();
        assert!(max_diff(&padded.narrow(0, 0, 1).unwrap(), &short) < 1e-9);
        assert!(attention(&q, &r(&[2, 3, 5, 8]), &v, Mask::Causal, scale).is_err());
    }
}
