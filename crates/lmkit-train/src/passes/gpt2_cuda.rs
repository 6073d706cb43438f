//! GPT-2's hand-written training pass on a CUDA GPU: the CPU pass's steps (gpt2.rs) over device
//! buffers, with cuBLAS products (TF32 tensor cores by default) and the kernels of
//! `lmkit_kernels::cuda`. No autograd graph: each activation is written once into a buffer kept
//! for the backward pass, biases and residuals are folded into the products (beta = 1), and each
//! gradient is written once. Attention keeps each head's probabilities [t, t] from the forward
//! pass (batched products over the heads), or, selected with LMKIT_CUDA_ATTENTION=flash (or
//! [`set_flash_attention`]) where the products are TF32 or bf16, runs the flash kernels
//! (`Gpu::flash_attention`: one log-sum-exp per row kept, the probabilities recomputed in the
//! backward pass). The logits are made a chunk of rows at a time. With bf16 products
//! (`train.dtype = "bf16"`) the products' operands are bf16, as autocast makes them: the weights'
//! bf16 copies made at the start of the pass, the norms' and activation's outputs written as
//! bf16 by their kernels (and kept so), the attention output and the gradients rounded to bf16
//! before their products, and, for the flash kernels, q|k|v and the attention output's
//! gradient rounded to bf16 (their tiles then copied asynchronously); the residual stream, the
//! products' results, the bias and norm gradients' column sums and everything the optimizer sees
//! stay f32.
//!
//! Checked against candle's autograd on the CPU (the reference the CPU pass is held to) in the
//! tests below, which run where a GPU is present.

use super::LossAndGrads;
use candle_core::{Result, Tensor};
use lmkit_kernels::cuda::{
    plain, rows, transposed, Added, AttnShape, Batched, Bf16, Buf, Data, Dev, Gpu, Mat, Operand,
    Stored,
};
use lmkit_models::gpt2::{Gpt2, Gpt2BlockParams, Gpt2Params};
use std::sync::atomic::{AtomicU8, Ordering};

/// The attention the pass runs: 0 not chosen yet (LMKIT_CUDA_ATTENTION decides), 1 the flash
/// kernels, 2 the kept probabilities.
static ATTENTION: AtomicU8 = AtomicU8::new(0);

/// Chooses the flash attention kernels (`true`) or the kept [t, t] probabilities for this
/// process's GPU passes; without a call, LMKIT_CUDA_ATTENTION=flash chooses the flash kernels
/// and anything else (or nothing) the kept probabilities. The flash kernels run where the
/// products are in reduced precision: TF32 tiles, or bf16 operands with `train.dtype = "bf16"`;
/// with full f32 products (`train.tf32 = false`) the probabilities are kept either way.
pub fn set_flash_attention(on: bool) {
    ATTENTION.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

pub(super) fn flash_attention_chosen() -> bool {
    match ATTENTION.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("LMKIT_CUDA_ATTENTION").is_ok_and(|v| v == "flash");
            set_flash_attention(on);
            on
        }
        v => v == 1,
    }
}

/// Whether the flash kernels passed their run-time check ([`Gpu::flash_check`] against the f64
/// reference) on this GPU for head size `hd` in its precision: checked once per process, GPU, head
/// size and precision. A failed check is reported once, and the caller keeps the probabilities
/// (GPT-2) or differentiates the graph (Llama) instead.
pub(super) fn flash_trusted(gpu: &Gpu, hd: usize) -> Result<bool> {
    /// GPU, head size, bf16.
    type Checked = (usize, usize, bool);
    static CHECKED: std::sync::Mutex<Vec<(Checked, bool)>> = std::sync::Mutex::new(Vec::new());
    let key = (gpu.ordinal(), hd, gpu.bf16);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ok)) = checked.iter().find(|(k, _)| *k == key) {
        return Ok(*ok);
    }
    let err = gpu.flash_check(Gpu::flash_check_shape(hd))?;
    let tol = gpu.flash_tolerance();
    let ok = err < tol;
    if !ok {
        let precision = if gpu.bf16 { "bf16" } else { "TF32" };
        eprintln!(
            "warning: the flash attention kernels ({precision}, head size {hd}) differ from the \
             f64 reference by {err:.1e} of the largest value on GPU {} (tolerance {tol:.0e}); \
             attention runs without them (LMKIT_CUDA_ATTENTION=materialized chooses that and \
             skips this check)",
            gpu.ordinal()
        );
    }
    checked.push((key, ok));
    Ok(ok)
}

/// Logit elements made at a time (1 GiB of f32).
const LOGIT_ELEMENTS: usize = if cfg!(test) { 64 } else { 1 << 28 };

/// One block's activations kept for the backward pass; the norms' and the activation's outputs
/// (a1, a2, g), only products' operands, are bf16 with bf16 products, and so is `y_op`, the
/// attention output as the projection's operand (`y` itself with the flash kernels, which write
/// it in bf16 then).
struct Saved {
    x: Buf<f32>,
    ln1: Buf<f32>,
    a1: Stored,
    qkv: Stored,
    att: Buf<f32>,
    y: Stored,
    y_op: Operand,
    xm: Buf<f32>,
    ln2: Buf<f32>,
    a2: Stored,
    /// The MLP's first product with its bias: f32, or bf16 as the GELU's epilogue keeps it.
    h: Stored,
    g: Stored,
}

/// A block's weight matrices as products' operands (bf16 copies with bf16 products).
struct BlockWeights {
    c_attn: Operand,
    attn_proj: Operand,
    c_fc: Operand,
    mlp_proj: Operand,
}

/// Attention sizes: batch, tokens, heads, head size; `flash`: the flash kernels, which keep
/// [b, heads, t] log-sum-exps in `att` instead of [b, heads, t, t] probabilities.
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    t: usize,
    heads: usize,
    hd: usize,
    flash: bool,
}

impl Heads {
    fn shape(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            heads: self.heads,
            kv_heads: self.heads,
            hd: self.hd,
        }
    }

    /// Elements `att` holds.
    fn kept(&self) -> usize {
        let per_row = if self.flash { 1 } else { self.t };
        self.b * self.heads * self.t * per_row
    }

    fn c(&self) -> usize {
        self.heads * self.hd
    }
    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
    /// One product per head, the operands `a`, `b`, `c` elements apart from head to head.
    fn per_head(&self, a: usize, b: usize, c: usize) -> Batched {
        Batched {
            count: self.heads,
            a,
            b,
            c,
        }
    }
}

/// The loss and gradients of GPT-2 `model` on the GPU its parameters live on; `None` where the
/// parameters are not contiguous f32 tensors on a CUDA device. `ids`/`targets` were checked
/// against the vocabulary and `n_positions` by the caller.
pub(super) fn pass(
    model: &Gpt2,
    tensors: &Gpt2Params<&Tensor>,
    gelu: bool,
    ids: &[u32],
    targets: &[u32],
    (b, t): (usize, usize),
    scale: f64,
) -> Result<Option<LossAndGrads>> {
    let Some(mut gpu) = Gpu::of(tensors.wte.device()) else {
        return Ok(None);
    };
    // TF32 products where candle's f32 products use them (`train.tf32`).
    gpu.tf32 = lmkit_kernels::cuda::tf32_products();
    let guards = tensors.clone().map(|p| p.storage_and_layout());
    let data = guards.as_ref().try_map(|(st, l)| {
        let storage: &candle_core::Storage = st;
        Gpu::view(storage, l).ok_or(())
    });
    let Ok(data) = data else {
        return Ok(None);
    };
    let cfg = &model.cfg;
    let dims = Dims {
        b,
        t,
        c: cfg.n_embd,
        hid: cfg.n_inner(),
        v: cfg.vocab_size,
        positions: cfg.n_positions,
        eps: cfg.layer_norm_epsilon as f32,
        heads: cfg.n_head,
    };
    let (loss, grads) = backprop(&gpu, &data, dims, gelu, ids, targets, scale)?;
    drop(data);
    drop(guards);
    let grads = tensors
        .clone()
        .into_vec()
        .into_iter()
        .zip(grads.into_vec())
        .map(|(p, g)| Ok((p.clone(), gpu.into_tensor(g, p.shape())?)))
        .collect::<Result<_>>()?;
    Ok(Some(LossAndGrads { loss, grads }))
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    hid: usize,
    v: usize,
    positions: usize,
    eps: f32,
    heads: usize,
}

/// Column sums of `src` [n, cols] (a bias's or a norm weight's gradient) into a new buffer.
fn column_sums(gpu: &Gpu, src: Dev<f32>, n: usize, cols: usize) -> Result<Buf<f32>> {
    let out = gpu.uninit(cols)?;
    gpu.column_sums(out.dev(), src, (n, cols))?;
    Ok(out)
}

/// The output layer and the mean cross-entropy of the hidden states `hf` [n, c] against
/// `targets`, a chunk of rows at a time: the logits (`hf · lmᵀ`, lm [v, c]) become their gradient
/// in place, then give the hidden states' and the output weights' gradients (times `scale`):
/// (loss, dhf [n, c], dlm [v, c]). Where `hf` and `lm` are bf16 the logits are made in bf16, as
/// autocast's output layer makes them (the softmax in f32, the gradient rounded to bf16).
pub(super) fn output_loss(
    gpu: &Gpu,
    hf: Data,
    lm: Data,
    targets: Dev<u32>,
    (n, c, v): (usize, usize, usize),
    scale: f64,
) -> Result<(f64, Buf<f32>, Buf<f32>)> {
    let sc = (scale / n as f64) as f32;
    let chunk = (LOGIT_ELEMENTS / v).clamp(1, n);
    let logits = gpu.stored(lm.is_bf16(), chunk * v)?;
    let lg = logits.data();
    let losses = gpu.uninit(n)?;
    let dhf = gpu.uninit(n * c)?;
    let dlm = gpu.uninit(v * c)?;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let hc = hf.at(r0 * c)?;
        gpu.linear(
            (rows, v, c),
            plain(hc, c),
            transposed(lm, c),
            Added::default(),
            lg,
        )?;
        gpu.cross_entropy(lg, losses.dev().at(r0)?, targets.at(r0)?, (rows, v), sc)?;
        gpu.set_product(
            (rows, c, v),
            plain(lg, v),
            plain(lm, c),
            (dhf.dev().at(r0 * c)?, c),
            Batched::ONE,
        )?;
        gpu.mm(
            (v, c, rows),
            transposed(lg, v),
            plain(hc, c),
            (dlm.dev(), c),
            1.0,
            if r0 > 0 { 1.0 } else { 0.0 },
            Batched::ONE,
        )?;
    }
    drop(logits);
    // Row losses summed in order on the host: the same total every run.
    let loss = gpu
        .download(&losses, n)?
        .iter()
        .map(|&l| l as f64)
        .sum::<f64>()
        / n as f64;
    Ok((loss, dhf, dlm))
}

/// A Conv1D layer into a new [n, out] buffer: `residual + input · w + bias` (no residual: the
/// product and the bias alone; [`Gpu::linear`]).
fn conv1d(
    gpu: &Gpu,
    residual: Option<Dev<f32>>,
    input: Data,
    (w, bias): (Data, Dev<f32>),
    (n, out, inner): (usize, usize, usize),
) -> Result<Buf<f32>> {
    let y = gpu.uninit(n * out)?;
    let added = Added {
        bias: Some(bias.into()),
        residual: residual.map(Data::from),
    };
    gpu.linear(
        (n, out, inner),
        plain(input, inner),
        plain(w, out),
        added,
        y.dev().into(),
    )?;
    Ok(y)
}

/// A layer output's gradient as [`conv1d_bwd`] takes it.
enum Dy {
    /// f32, whose column sums are the bias's gradient, with the products' operand in the
    /// precision of the layer's input and weight where one was made beside it (else made from
    /// it where they are bf16).
    F32(Dev<f32>, Option<Data>),
    /// The products' operand alone, with the bias's gradient already summed.
    Summed(Data, Buf<f32>),
}

/// The gradients of a Conv1D layer `y = input · w + bias` ([n, inner] → [n, out]) from dy:
/// (dw, dbias), and dinput into `dinput` where given (f32, or bf16 where it is only a product's
/// operand); the bias's gradient is summed from dy in f32 unless it comes with dy.
fn conv1d_bwd(
    gpu: &Gpu,
    dy: Dy,
    input: Data,
    w: Data,
    (n, out, inner): (usize, usize, usize),
    dinput: Option<Data>,
) -> Result<(Buf<f32>, Buf<f32>)> {
    let copy;
    let (dy, db) = match dy {
        Dy::F32(dy, Some(op)) => (op, column_sums(gpu, dy, n, out)?),
        Dy::F32(dy, None) => {
            copy = gpu.operand(dy)?;
            (copy.data(), column_sums(gpu, dy, n, out)?)
        }
        Dy::Summed(op, db) => (op, db),
    };
    let dw = product(
        gpu,
        (inner, out, n),
        transposed(input, inner),
        plain(dy, out),
    )?;
    if let Some(dinput) = dinput {
        gpu.linear(
            (n, inner, out),
            plain(dy, out),
            transposed(w, out),
            Added::default(),
            dinput,
        )?;
    }
    Ok((dw, db))
}

/// The MLP's first layer and its activation: (h, act(h)), h = input·w + bias kept for the
/// backward pass and act(h) as the next product's operand. With bf16 products and GELU both
/// bf16, from one product whose epilogue applies the GELU ([`Gpu::linear_gelu`]) where it
/// runs; else h in f32 and the activation by its kernel.
fn mlp_up(
    gpu: &Gpu,
    gelu: bool,
    input: Data,
    (w, bias): (Data, Dev<f32>),
    (n, hid, c): (usize, usize, usize),
) -> Result<(Stored, Stored)> {
    if gelu && gpu.bf16 {
        let (g, pre) = (gpu.uninit_bf16(n * hid)?, gpu.uninit_bf16(n * hid)?);
        let operands = (plain(input, c), plain(w, hid));
        if gpu.linear_gelu((n, hid, c), operands, bias, (g.dev(), pre.dev()))? {
            return Ok((Stored::Bf16(pre), Stored::Bf16(g)));
        }
    }
    let h = conv1d(gpu, None, input, (w, bias), (n, hid, c))?;
    let g = gpu.operand_buf(n * hid)?;
    gpu.act_fwd(gelu, g.data(), h.dev(), n * hid)?;
    Ok((Stored::F32(h), g))
}

/// The MLP's backward pass (`xo = xm + act(h)·w_proj + b_proj`, `h = a2·w_fc + b_fc`) from
/// the residual stream's gradient dx (f32, and the products' operand with bf16 products):
/// [(w_proj's, b_proj's gradients), (w_fc's, b_fc's)], and a2's gradient into `da2`. h's
/// gradient comes from the GELU's epilogue (bf16; b_fc's gradient its column sums, or summed by
/// the product with LMKIT_CUDA_BGRAD=epilogue) where the forward pass kept h there and the
/// epilogue runs; else in f32 from the product, then the activation's kernel, which writes its
/// bf16 copy beside it with bf16 products.
fn mlp_bwd(
    gpu: &Gpu,
    gelu: bool,
    ((dx, dx_op), da2): ((Dev<f32>, Option<Data>), Data),
    s: &Saved,
    (w_fc, w_proj): (Data, Data),
    (n, c, hid): (usize, usize, usize),
) -> Result<[(Buf<f32>, Buf<f32>); 2]> {
    let (proj_dims, fc_dims) = ((n, c, hid), (n, hid, c));
    if let (Stored::Bf16(pre), Some(dx16)) = (&s.h, dx_op) {
        let dh16 = gpu.uninit_bf16(n * hid)?;
        let db16 = match lmkit_kernels::cuda::bias_grad_in_epilogue() {
            true => Some(gpu.uninit_bf16(hid)?),
            false => None,
        };
        let operands = (plain(dx16, c), transposed(w_proj, c));
        let outputs = (dh16.dev(), db16.as_ref().map(|b| b.dev()));
        if gpu.linear_gelu_grad(fc_dims, operands, pre.dev(), outputs)? {
            let db = gpu.uninit(hid)?;
            match &db16 {
                Some(db16) => gpu.from_bf16(db.dev(), db16.dev(), hid)?,
                None => gpu.column_sums(db.dev(), dh16.dev(), (n, hid))?,
            }
            let proj = conv1d_bwd(gpu, Dy::F32(dx, dx_op), s.g.data(), w_proj, proj_dims, None)?;
            let dy = Dy::Summed(dh16.dev().into(), db);
            let fc = conv1d_bwd(gpu, dy, s.a2.data(), w_fc, fc_dims, Some(da2))?;
            return Ok([proj, fc]);
        }
    }
    let dh = gpu.uninit(n * hid)?;
    let into = Some(dh.dev().into());
    let proj = conv1d_bwd(gpu, Dy::F32(dx, dx_op), s.g.data(), w_proj, proj_dims, into)?;
    let dh16 = gpu.operand_copy_buf(n * hid)?;
    let d16 = dh16.as_ref().map(|b| b.dev());
    gpu.act_bwd(gelu, (dh.dev(), d16), s.h.data(), dh.dev(), n * hid)?;
    let dy = Dy::F32(dh.dev(), d16.map(Data::from));
    let fc = conv1d_bwd(gpu, dy, s.a2.data(), w_fc, fc_dims, Some(da2))?;
    Ok([proj, fc])
}

/// LayerNorm's backward from dy: the input's gradient into `dx` (added with `accumulate`; and
/// rounded into `dx16`, if given) and (dw, db); `(x, w, stats)`: the norm's input, its weight,
/// and the mean and 1/std its forward pass kept.
fn norm_bwd(
    gpu: &Gpu,
    grads: (Dev<f32>, Option<Dev<Bf16>>),
    dy: Dev<f32>,
    (x, w, stats): (Dev<f32>, Dev<f32>, Dev<f32>),
    (n, c): (usize, usize),
    accumulate: bool,
) -> Result<(Buf<f32>, Buf<f32>)> {
    gpu.layer_norm_bwd(grads, dy, x, w, stats, (n, c), accumulate)?;
    let (dw, db) = (gpu.uninit(c)?, gpu.uninit(c)?);
    let kept = (Some(stats), stats.at(n)?);
    gpu.norm_weight_grads((dw.dev(), Some(db.dev())), dy, x, kept, (n, c))?;
    Ok((dw, db))
}

/// LMKIT_CUDA_TIMING=1: a pass's phases and, within them, attention's forward and backward time
/// (the GPU synchronised at each end), printed on stderr; without it, nothing is synchronised.
/// LMKIT_CUDA_TIMING=ops: also each kernel's and each product shape's time within the pass
/// (`cuda op:` lines, the longest first: the GPU's time between events recorded around each).
pub(super) struct PassTimer {
    on: bool,
    clock: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
    attention: [f64; 2],
}

impl PassTimer {
    pub(super) fn new() -> Result<PassTimer> {
        if lmkit_kernels::cuda::op_timing() {
            // The op times of this pass only.
            lmkit_kernels::cuda::take_op_times()?;
        }
        Ok(PassTimer {
            on: std::env::var_os("LMKIT_CUDA_TIMING").is_some(),
            clock: std::time::Instant::now(),
            phases: Vec::new(),
            attention: [0.0; 2],
        })
    }

    /// Ends phase `what`.
    pub(super) fn mark(&mut self, gpu: &Gpu, what: &'static str) -> Result<()> {
        if self.on {
            gpu.synchronize()?;
            let ms = self.clock.elapsed().as_secs_f64() * 1e3;
            self.phases.push((what, ms));
            self.clock = std::time::Instant::now();
        }
        Ok(())
    }

    /// Runs attention's forward (or backward) pass `f`, timed.
    pub(super) fn attention(
        &mut self,
        gpu: &Gpu,
        backward: bool,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if !self.on {
            return f();
        }
        gpu.synchronize()?;
        let clock = std::time::Instant::now();
        f()?;
        gpu.synchronize()?;
        self.attention[usize::from(backward)] += clock.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Prints the phases and attention's share (`kind`: which attention ran).
    pub(super) fn report(&self, kind: &str) {
        if !self.on {
            return;
        }
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(w, ms)| format!("{w} {ms:.2} ms"))
            .collect();
        let [fwd, bwd] = self.attention;
        eprintln!(
            "cuda pass: {} (attention, {kind}: forward {fwd:.2} ms, backward {bwd:.2} ms)",
            parts.join(", ")
        );
        let ops = match lmkit_kernels::cuda::take_op_times() {
            Ok(ops) => ops,
            Err(e) => return eprintln!("cuda op times: {e}"),
        };
        let total: f64 = ops.iter().map(|o| o.secs).sum();
        for o in &ops {
            let mut rate = String::new();
            if o.flops > 0.0 {
                rate += &format!(" {:>7.1} TFLOP/s", o.tflops());
            }
            if o.bytes > 0.0 {
                rate += &format!(" {:>7.0} GB/s", o.gbps());
            }
            eprintln!(
                "cuda op: {:<44} {:>5} calls {:>9.3} ms {:>5.1}%{rate}",
                o.name,
                o.calls,
                o.secs * 1e3,
                100.0 * o.secs / total.max(1e-12)
            );
        }
    }
}

/// `a · b` into a new [rows, cols] buffer.
pub(super) fn product(
    gpu: &Gpu,
    (rows, cols, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
) -> Result<Buf<f32>> {
    let out = gpu.uninit(rows * cols)?;
    gpu.set_product((rows, cols, k), a, b, (out.dev(), cols), Batched::ONE)?;
    Ok(out)
}

/// The kept probabilities' f32 operand.
fn f32_rows(x: Data, what: &str) -> Result<Dev<f32>> {
    match x {
        Data::F32(d) => Ok(d),
        Data::Bf16(_) => candle_core::bail!("GPT-2 attention: f32 {what} needed"),
    }
}

/// Causal self-attention of the packed q|k|v [b·t, 3c] (f32, or bf16 for the flash kernels with
/// bf16 products) into y [b·t, c] (of q|k|v's type); `att` gets each head's probabilities [b,
/// heads, t, t], or with the flash kernels each row's log-sum-exp.
fn attention_fwd(gpu: &Gpu, qkv: Data, att: Dev<f32>, y: Data, s: Heads) -> Result<()> {
    let (t, hd, c) = (s.t, s.hd, s.c());
    if s.flash {
        let qkv_rows = (
            rows(qkv, 3 * c),
            rows(qkv.at(c)?, 3 * c),
            rows(qkv.at(2 * c)?, 3 * c),
        );
        return gpu.flash_attention(s.shape(), qkv_rows, rows(y, c), att, s.scale());
    }
    let (qkv, y) = (f32_rows(qkv, "q|k|v")?, f32_rows(y, "y")?);
    let tt = t * t;
    for bi in 0..s.b {
        let q = qkv.at(bi * t * 3 * c)?;
        let k = q.at(c)?;
        let p = att.at(bi * s.heads * tt)?;
        // Scores Q·Kᵀ per head (scaled in the softmax).
        gpu.set_product(
            (t, t, hd),
            plain(q, 3 * c),
            transposed(k, 3 * c),
            (p, t),
            s.per_head(hd, hd, tt),
        )?;
    }
    gpu.softmax_causal(att, s.b * s.heads * t, t, s.scale())?;
    for bi in 0..s.b {
        let v = qkv.at(bi * t * 3 * c + 2 * c)?;
        let p = att.at(bi * s.heads * tt)?;
        gpu.set_product(
            (t, hd, t),
            plain(p, t),
            plain(v, 3 * c),
            (y.at(bi * t * c)?, c),
            s.per_head(tt, hd, hd),
        )?;
    }
    Ok(())
}

/// Gradient of the packed q|k|v from dy [b·t, c]: dV = Pᵀ·dY, dP = dY·Vᵀ,
/// dS = scale·P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS·K, dK = dSᵀ·Q; `y` is the forward output
/// (q|k|v and dy as [`attention_fwd`]'s q|k|v).
fn attention_bwd(
    gpu: &Gpu,
    (qkv, att, y): (Data, Dev<f32>, Data),
    dy: Data,
    dqkv: Dev<f32>,
    s: Heads,
) -> Result<()> {
    let (t, hd, c) = (s.t, s.hd, s.c());
    if s.flash {
        let packed = |p: Data| -> Result<_> {
            Ok((
                rows(p, 3 * c),
                rows(p.at(c)?, 3 * c),
                rows(p.at(2 * c)?, 3 * c),
            ))
        };
        let dots = gpu.uninit(s.b * s.heads * t)?;
        return gpu.flash_attention_bwd(
            s.shape(),
            packed(qkv)?,
            (rows(y, c), att),
            rows(dy, c),
            packed(dqkv.into())?,
            dots.dev(),
            s.scale(),
        );
    }
    let (qkv, dy) = (f32_rows(qkv, "q|k|v")?, f32_rows(dy, "dy")?);
    let tt = t * t;
    let dp = gpu.uninit(s.heads * tt)?;
    let dp = dp.dev();
    for bi in 0..s.b {
        let q = qkv.at(bi * t * 3 * c)?;
        let (k, v) = (q.at(c)?, q.at(2 * c)?);
        let dq = dqkv.at(bi * t * 3 * c)?;
        let (dk, dv) = (dq.at(c)?, dq.at(2 * c)?);
        let p = att.at(bi * s.heads * tt)?;
        let dyb = dy.at(bi * t * c)?;
        gpu.set_product(
            (t, t, hd),
            plain(dyb, c),
            transposed(v, 3 * c),
            (dp, t),
            s.per_head(hd, hd, tt),
        )?;
        gpu.set_product(
            (t, hd, t),
            transposed(p, t),
            plain(dyb, c),
            (dv, 3 * c),
            s.per_head(tt, hd, hd),
        )?;
        gpu.softmax_causal_bwd(dp, p, s.heads * t, t, s.scale())?;
        gpu.set_product(
            (t, hd, t),
            plain(dp, t),
            plain(k, 3 * c),
            (dq, 3 * c),
            s.per_head(tt, hd, hd),
        )?;
        gpu.set_product(
            (t, hd, t),
            transposed(dp, t),
            plain(q, 3 * c),
            (dk, 3 * c),
            s.per_head(tt, hd, hd),
        )?;
    }
    Ok(())
}

fn backprop(
    gpu: &Gpu,
    p: &Gpt2Params<Dev<f32>>,
    d: Dims,
    gelu: bool,
    ids: &[u32],
    targets: &[u32],
    scale: f64,
) -> Result<(f64, Gpt2Params<Buf<f32>>)> {
    let Dims {
        b,
        t,
        c,
        hid,
        v,
        eps,
        ..
    } = d;
    let n = b * t;
    let mut heads = Heads {
        b,
        t,
        heads: d.heads,
        hd: c / d.heads,
        flash: false,
    };
    // The flash kernels use TF32 or bf16 products: with exact f32 products the probabilities are
    // kept.
    let reduced = gpu.tf32 || gpu.bf16;
    heads.flash = reduced
        && flash_attention_chosen()
        && heads.shape().flash_fits(gpu.compute_major()?)
        && flash_trusted(gpu, heads.hd)?;
    let mut timer = PassTimer::new()?;
    let ids_d = gpu.upload_u32(ids)?;
    let targets_d = gpu.upload_u32(targets)?;
    let lm = gpu.operand(p.lm_head.unwrap_or(p.wte))?;
    let weights = p
        .blocks
        .iter()
        .map(|w| {
            Ok(BlockWeights {
                c_attn: gpu.operand(w.c_attn_w)?,
                attn_proj: gpu.operand(w.attn_proj_w)?,
                c_fc: gpu.operand(w.c_fc_w)?,
                mlp_proj: gpu.operand(w.mlp_proj_w)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // Forward.
    let mut x = gpu.uninit(n * c)?;
    gpu.embed_fwd(x.dev(), p.wte, p.wpe, ids_d.dev(), (n, t, c), v)?;
    let mut saved = Vec::with_capacity(p.blocks.len());
    for (w, ws) in p.blocks.iter().zip(&weights) {
        let ln1 = gpu.uninit(2 * n)?;
        let a1 = gpu.operand_buf(n * c)?;
        gpu.layer_norm(
            a1.data(),
            ln1.dev(),
            x.dev(),
            w.ln_1_w,
            w.ln_1_b,
            (n, c),
            eps,
        )?;
        let c_attn = (ws.c_attn.data(), w.c_attn_b);
        // With the flash kernels and bf16 products, the kernels' bf16 q|k|v straight from the
        // product.
        let qkv = gpu.stored(heads.flash && gpu.bf16, n * 3 * c)?;
        gpu.linear(
            (n, 3 * c, c),
            plain(a1.data(), c),
            plain(c_attn.0, 3 * c),
            Added::bias(c_attn.1),
            qkv.data(),
        )?;
        let att = gpu.uninit(heads.kept())?;
        // Of q|k|v's type: bf16 from the flash kernels on bf16 inputs, the projection's operand
        // as it is.
        let y = gpu.stored(qkv.data().is_bf16(), n * c)?;
        timer.attention(gpu, false, || {
            attention_fwd(gpu, qkv.data(), att.dev(), y.data(), heads)
        })?;
        let y_op = gpu.operand_data(y.data())?;
        let attn_proj = (ws.attn_proj.data(), w.attn_proj_b);
        let xm = conv1d(gpu, Some(x.dev()), y_op.data(), attn_proj, (n, c, c))?;
        let ln2 = gpu.uninit(2 * n)?;
        let a2 = gpu.operand_buf(n * c)?;
        gpu.layer_norm(
            a2.data(),
            ln2.dev(),
            xm.dev(),
            w.ln_2_w,
            w.ln_2_b,
            (n, c),
            eps,
        )?;
        let c_fc = (ws.c_fc.data(), w.c_fc_b);
        let (h, g) = mlp_up(gpu, gelu, a2.data(), c_fc, (n, hid, c))?;
        let mlp_proj = (ws.mlp_proj.data(), w.mlp_proj_b);
        let xo = conv1d(gpu, Some(xm.dev()), g.data(), mlp_proj, (n, c, hid))?;
        saved.push(Saved {
            x: std::mem::replace(&mut x, xo),
            ln1,
            a1,
            qkv,
            att,
            y,
            y_op,
            xm,
            ln2,
            a2,
            h,
            g,
        });
    }
    timer.mark(gpu, "blocks forward")?;
    let lnf = gpu.uninit(2 * n)?;
    let hf = gpu.operand_buf(n * c)?;
    gpu.layer_norm(
        hf.data(),
        lnf.dev(),
        x.dev(),
        p.ln_f_w,
        p.ln_f_b,
        (n, c),
        eps,
    )?;

    let (loss, dhf, dlm) =
        output_loss(gpu, hf.data(), lm.data(), targets_d.dev(), (n, c, v), scale)?;
    drop((hf, lm));

    timer.mark(gpu, "output layer + loss")?;

    // Backward.
    // The residual stream's gradient and, with bf16 products, its bf16 copy (the products'
    // operand), both written by the norms' backward.
    let dx = gpu.uninit(n * c)?;
    let dx16 = gpu.operand_copy_buf(n * c)?;
    let dx16d = dx16.as_ref().map(|b| b.dev());
    let grads = (dx.dev(), dx16d);
    let dx_op = dx16d.map(Data::from);
    let lnf = (x.dev(), p.ln_f_w, lnf.dev());
    let (ln_f_w, ln_f_b) = norm_bwd(gpu, grads, dhf.dev(), lnf, (n, c), false)?;
    drop(dhf);
    let mut blocks = Vec::with_capacity(p.blocks.len());
    for (w, ws) in p.blocks.iter().zip(&weights).rev() {
        let s = saved.pop().expect("one saved entry per block");
        let dxd = dx.dev();
        // xo = xm + act(h)·W_proj + b_proj, h = LN2(xm)·W_fc + b_fc
        let da2 = gpu.uninit(n * c)?;
        let mlp_w = (ws.c_fc.data(), ws.mlp_proj.data());
        let grads_of = ((dxd, dx_op), da2.dev().into());
        let [(mlp_proj_w, mlp_proj_b), (c_fc_w, c_fc_b)] =
            mlp_bwd(gpu, gelu, grads_of, &s, mlp_w, (n, c, hid))?;
        let ln2 = (s.xm.dev(), w.ln_2_w, s.ln2.dev());
        let (ln_2_w, ln_2_b) = norm_bwd(gpu, grads, da2.dev(), ln2, (n, c), true)?;
        drop(da2);
        // xm = x + attention(qkv)·W_o + b_o
        let attn_proj = ws.attn_proj.data();
        // The attention output's gradient: with the flash kernels and bf16 products, bf16 from
        // its product, as the kernels read it.
        let dy = gpu.stored(heads.flash && gpu.bf16, n * c)?;
        let (attn_proj_w, attn_proj_b) = conv1d_bwd(
            gpu,
            Dy::F32(dxd, dx_op),
            s.y_op.data(),
            attn_proj,
            (n, c, c),
            Some(dy.data()),
        )?;
        let dqkv = gpu.uninit(n * 3 * c)?;
        let kept = (s.qkv.data(), s.att.dev(), s.y.data());
        timer.attention(gpu, true, || {
            attention_bwd(gpu, kept, dy.data(), dqkv.dev(), heads)
        })?;
        drop(dy);
        // qkv = LN1(x)·W_attn + b_attn
        let c_attn = ws.c_attn.data();
        let da1 = gpu.uninit(n * c)?;
        let (c_attn_w, c_attn_b) = conv1d_bwd(
            gpu,
            Dy::F32(dqkv.dev(), None),
            s.a1.data(),
            c_attn,
            (n, 3 * c, c),
            Some(da1.dev().into()),
        )?;
        drop(dqkv);
        let ln1 = (s.x.dev(), w.ln_1_w, s.ln1.dev());
        let (ln_1_w, ln_1_b) = norm_bwd(gpu, grads, da1.dev(), ln1, (n, c), true)?;
        blocks.push(Gpt2BlockParams {
            ln_1_w,
            ln_1_b,
            c_attn_w,
            c_attn_b,
            attn_proj_w,
            attn_proj_b,
            ln_2_w,
            ln_2_b,
            c_fc_w,
            c_fc_b,
            mlp_proj_w,
            mlp_proj_b,
        });
    }
    blocks.reverse();
    timer.mark(gpu, "blocks backward")?;

    // Embeddings: rows of dx back to their token's and position's rows.
    let tied = p.lm_head.is_none();
    let (wte, lm_head) = if tied {
        (dlm, None)
    } else {
        (gpu.zeros(v * c)?, Some(dlm))
    };
    let wpe = gpu.zeros(d.positions * c)?;
    gpu.embed_bwd(wte.dev(), wpe.dev(), dx.dev(), ids_d.dev(), (b, t, c), v)?;
    timer.mark(gpu, "embeddings backward")?;
    timer.report(if heads.flash {
        "flash"
    } else {
        "kept probabilities"
    });
    Ok((
        loss,
        Gpt2Params {
            wte,
            wpe,
            blocks,
            ln_f_w,
            ln_f_b,
            lm_head,
        },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::passes::gpt2::tests::{assert_gradient_close, autograd_reference};
    use crate::passes::gpt2::Gpt2Pass;
    use crate::passes::testing::gpu;
    use crate::passes::{LossAndGrads, TrainPass};
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::gpt2::Gpt2;
    use lmkit_models::Gpt2Config;

    /// Sets every variable of `vm` (on the CPU) to random values with deviation `std` and gives
    /// the variables of the same names in `on_gpu` the same values.
    pub(crate) fn randomize_both(vm: &VarMap, on_gpu: &VarMap, std: f64, cuda: &Device) {
        let dst = on_gpu.data().lock().unwrap();
        let src = lmkit_kernels::testing::vars_by_name(vm);
        assert_eq!(src.len(), dst.len());
        for (name, var) in &src {
            let r = lmkit_kernels::testing::randn(0.0f32, std, var.shape(), &Device::Cpu).unwrap();
            var.set(&r).unwrap();
            dst[name].set(&r.to_device(cuda).unwrap()).unwrap();
        }
    }

    /// A GPU pass's loss and gradients for ids, targets and a scale.
    pub(crate) type GpuPass<'a> =
        dyn Fn(&Tensor, &Tensor, f64) -> candle_core::Result<Option<LossAndGrads>> + 'a;

    /// The GPU pass's loss and gradients for ids `x` → targets `y` (on the CPU) moved to `cuda`,
    /// its products in TF32 when `tf32` (the switch is reset after).
    pub(crate) fn run_on_gpu(
        pass: &GpuPass,
        (x, y): (&Tensor, &Tensor),
        scale: f64,
        tf32: bool,
        cuda: &Device,
    ) -> LossAndGrads {
        lmkit_kernels::cuda::set_tf32_products(tf32);
        let ours = pass(
            &x.to_device(cuda).unwrap(),
            &y.to_device(cuda).unwrap(),
            scale,
        )
        .unwrap()
        .expect("the GPU pass applies");
        lmkit_kernels::cuda::set_tf32_products(false);
        ours
    }

    /// The GPU pass's loss and gradients against the reference's (`want_loss`, `g`: the
    /// autograd graph of the CPU model of `vm`), each gradient matched to the CPU parameter of
    /// its name in `vm_gpu`.
    pub(crate) fn assert_matches(
        ours: &LossAndGrads,
        (want_loss, g): (f64, &GradStore),
        (vm, vm_gpu): (&VarMap, &VarMap),
        tol: f64,
    ) {
        assert!(
            (ours.loss - want_loss).abs() < tol * want_loss.abs().max(1.0),
            "loss {} vs {want_loss}",
            ours.loss
        );
        let by_id: std::collections::HashMap<_, _> = {
            let dst = vm_gpu.data().lock().unwrap();
            let src = vm.data().lock().unwrap();
            src.iter()
                .map(|(name, var)| {
                    (
                        dst[name].as_tensor().id(),
                        (name.clone(), var.as_tensor().clone()),
                    )
                })
                .collect()
        };
        assert_eq!(ours.grads.len(), by_id.len());
        for (p, ours_g) in &ours.grads {
            let (name, var) = &by_id[&p.id()];
            let want = g.get(var).expect("every parameter has a gradient");
            let got = ours_g.to_device(&Device::Cpu).unwrap();
            assert!(got.is_contiguous());
            // Shown with a failure's message: which parameter.
            eprintln!("gradient of {name} (tolerance {tol})");
            assert_gradient_close(&got, want, tol);
            // And within a fifth of its own size: `tol` alone bounds small gradients by an
            // absolute `tol` (a lost bias gradient of size 3e-2 would pass 8e-2). The largest
            // share seen is 8e-2 (the untied embedding's gradient through TF32 products).
            let rel = 0.2;
            let (diff, size) = (
                lmkit_kernels::testing::max_diff(&got, want),
                lmkit_kernels::testing::max_diff(want, &want.zeros_like().unwrap()),
            );
            assert!(
                diff <= rel * size,
                "gradient of {name}: max diff {diff}, over {rel} of its max {size}"
            );
        }
    }

    /// The kernels and products `f` runs (LMKIT_CUDA_TIMING=ops's entries: kernels by name,
    /// products by shape, batch and precision, "bf16" for bf16 operands): (kernels, products).
    pub(crate) fn op_names(f: impl FnOnce()) -> (Vec<String>, Vec<String>) {
        use lmkit_kernels::cuda::{set_op_timing, take_op_times};
        set_op_timing(true);
        take_op_times().expect("op times");
        f();
        let names = take_op_times()
            .expect("op times")
            .into_iter()
            .map(|o| o.name)
            .partition(|n| !n.starts_with("product"));
        set_op_timing(false);
        names
    }

    /// With bf16 products the passes' attention runs the flash kernels on bf16 inputs (head
    /// size 32 in these tests; those of 128 rows or keys with LMKIT_CUDA_FLASH_ROWS=128) and
    /// every product has bf16 operands.
    pub(crate) fn assert_bf16_throughout((kernels, products): (Vec<String>, Vec<String>)) {
        let kinds = match lmkit_kernels::cuda::flash_block_rows() {
            128 => ["fwd2", "bwd_dq2", "bwd_dkdv2"],
            _ => ["fwd", "bwd_dq", "bwd_dkdv"],
        };
        let flash = kinds.map(|k| format!("flash_bf16in_{k}_32"));
        for k in flash
            .iter()
            .map(String::as_str)
            .chain(["attn_row_dots_h16"])
        {
            assert!(kernels.iter().any(|n| n == k), "{k} not run: {kernels:?}");
        }
        assert!(!products.is_empty(), "no products timed");
        assert!(
            products.iter().all(|n| n.ends_with(" bf16")),
            "{products:?}"
        );
    }

    fn config(tied: bool, act: &str, heads: usize) -> Gpt2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 301, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": heads,
            "n_inner": 96, "activation_function": act, "tie_word_embeddings": tied,
        }))
        .unwrap()
    }

    /// The GPU pass against candle's autograd on the CPU, on the same random weights and a batch
    /// of 3 × t tokens (45: rows longer than a warp in the attention kernels; 100: two tiles of
    /// the flash kernels) with `heads` heads of the 64 dimensions.
    fn compare(tied: bool, act: &str, tf32: bool, tol: f64, (heads, t): (usize, usize)) {
        let Some(cuda) = gpu() else { return };
        // Shown with a failure's message: which comparison.
        eprintln!(
            "GPT-2 pass: tied {tied}, {act}, TF32 {tf32}, flash {}, t {t}",
            super::flash_attention_chosen()
        );
        let cpu = Device::Cpu;
        let cfg = config(tied, act, heads);
        let vm = VarMap::new();
        let model = Gpt2::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &cpu)).unwrap();
        let vm_gpu = VarMap::new();
        let on_gpu = Gpt2::new(&cfg, VarBuilder::from_varmap(&vm_gpu, DType::F32, &cuda)).unwrap();
        randomize_both(&vm, &vm_gpu, 0.5, &cuda);
        let b = 3;
        let ids = crate::passes::testing::tokens(b * t, 301, 11);
        let tg = crate::passes::testing::tokens(b * t, 301, 12);
        let x = Tensor::from_vec(ids, (b, t), &cpu).unwrap();
        let y = Tensor::from_vec(tg, (b, t), &cpu).unwrap();
        let scale = 0.5;

        // Through the model's `TrainPass` on a GPU; the emulated GPU's tensors are on the CPU,
        // where that would choose the CPU pass, so the GPU pass is called directly.
        let gelu = act != "relu";
        let gpu_pass = |x: &Tensor, y: &Tensor, scale| {
            if cfg!(feature = "cuda") {
                return Gpt2Pass(&on_gpu).loss_and_grads(x, y, scale);
            }
            let (ids, tg, bt) = crate::passes::ids_and_targets("GPT-2", x, y)?;
            super::pass(&on_gpu, &on_gpu.params(), gelu, &ids, &tg, bt, scale)
        };
        let ours = run_on_gpu(&gpu_pass, (&x, &y), scale, tf32, &cuda);

        let (want_loss, g) = autograd_reference(&model, &x, &y, scale);
        assert_matches(&ours, (want_loss, &g), (&vm, &vm_gpu), tol);
    }

    /// One test: the TF32 and attention switches are process-wide.
    #[test]
    fn gpu_pass_equals_autograd_on_the_cpu() {
        let _switches = crate::passes::testing::gpu_switches();
        super::set_flash_attention(false);
        compare(true, "gelu_new", false, 1e-4, (4, 45));
        compare(false, "gelu_new", false, 1e-4, (4, 45));
        compare(true, "relu", false, 1e-4, (4, 45));
        // TF32 products (10-bit mantissas): close, not equal.
        compare(true, "gelu_new", true, 2e-2, (4, 45));
        // The flash attention kernels (TF32 tiles; head size 32: two heads of the 64 dimensions).
        let shape = lmkit_kernels::cuda::AttnShape {
            b: 3,
            t: 100,
            heads: 2,
            kv_heads: 2,
            hd: 32,
        };
        assert!(shape.flash_fits(8));
        super::set_flash_attention(true);
        compare(true, "gelu_new", true, 2e-2, (2, 100));
        compare(false, "relu", true, 2e-2, (2, 100));
        // Products on the bf16 tensor cores (8-bit mantissas), with flash attention on bf16
        // operands and with the kept probabilities: every product's operands in bf16 but the
        // kept probabilities' per-head products (f32 q|k|v and probabilities, rounded by cuBLAS).
        lmkit_kernels::cuda::set_bf16_products(true);
        let names = op_names(|| compare(true, "gelu_new", true, 8e-2, (2, 100)));
        // The biases and residuals added by the products' epilogue, q|k|v and the logits written
        // in bf16 by their products, the GELU and its gradient applied by the epilogue (no
        // activation kernels), the gradient's column sums the bias's.
        for fused in [
            "[bias, bf16 out] bf16",
            "[bias, residual] bf16",
            "[bias] bf16",
            "[bf16 out] bf16",
            "[bias, gelu, bf16 out] bf16",
            "[gelu grad, bf16 out] bf16",
        ] {
            assert!(names.1.iter().any(|n| n.ends_with(fused)), "{names:?}");
        }
        assert!(
            names.0.iter().any(|n| n.starts_with("column_sums_h16")),
            "{names:?}"
        );
        assert!(!names.0.iter().any(|n| n.starts_with("gelu")), "{names:?}");
        assert_bf16_throughout(names);
        // The bias's gradient summed by the GELU gradient's epilogue (LMKIT_CUDA_BGRAD=epilogue).
        lmkit_kernels::cuda::set_bias_grad_in_epilogue(true);
        let names = op_names(|| compare(true, "gelu_new", true, 8e-2, (2, 100)));
        lmkit_kernels::cuda::set_bias_grad_in_epilogue(false);
        let bgrad = "[gelu grad, bias grad, bf16 out] bf16";
        assert!(names.1.iter().any(|n| n.ends_with(bgrad)), "{names:?}");
        assert!(
            !names.0.iter().any(|n| n.starts_with("column_sums_h16")),
            "{names:?}"
        );
        // The GELU's epilogue on one side only: the backward's kernel then reads the bf16 sum the
        // forward's epilogue kept; or the forward's kernel, and its f32 sum, with the epilogue's
        // gradient not run (it needs the bf16 sum).
        lmkit_kernels::cuda::set_gelu_epilogues(true, false);
        let (kernels, products) = op_names(|| compare(true, "gelu_new", true, 8e-2, (2, 100)));
        assert!(kernels.iter().any(|n| n == "gelu_bwd_h16"), "{kernels:?}");
        assert!(
            products.iter().any(|n| n.contains("gelu, ")),
            "{products:?}"
        );
        assert!(
            !products.iter().any(|n| n.contains("gelu grad")),
            "{products:?}"
        );
        lmkit_kernels::cuda::set_gelu_epilogues(false, true);
        let (kernels, products) = op_names(|| compare(true, "gelu_new", true, 8e-2, (2, 100)));
        for k in ["gelu_fwd_bf16", "gelu_bwd"] {
            assert!(kernels.iter().any(|n| n == k), "{k} not run: {kernels:?}");
        }
        assert!(!products.iter().any(|n| n.contains("gelu")), "{products:?}");
        lmkit_kernels::cuda::set_gelu_epilogues(true, true);
        // Unfused (flash, then the kept probabilities): the bias and residual written first, q|k|v
        // and the logits rounded from f32 scratch.
        lmkit_kernels::cuda::set_fused_epilogues(false);
        let (_, products) = op_names(|| compare(true, "gelu_new", true, 8e-2, (2, 100)));
        assert!(products.iter().all(|n| !n.contains('[')), "{products:?}");
        super::set_flash_attention(false);
        compare(false, "gelu_new", true, 8e-2, (4, 45));
        lmkit_kernels::cuda::set_fused_epilogues(true);
        let (_, names) = op_names(|| compare(false, "gelu_new", true, 8e-2, (4, 45)));
        let (bf16, other): (Vec<_>, Vec<_>) = names.iter().partition(|n| n.ends_with(" bf16"));
        assert!(bf16.len() >= 8, "{names:?}");
        assert!(
            other.iter().all(|n| n.ends_with(" x4 bf16 (f32 operands)")),
            "{names:?}"
        );
        lmkit_kernels::cuda::set_bf16_products(false);
    }
}
