//! The Llama family's training pass on a CUDA GPU (Llama, Mistral without a window, SmolLM2:
//! RMSNorm, rotary embeddings, SwiGLU, grouped-query attention), for pretraining: every position
//! scored, every parameter trained. The CPU pass's steps (llama.rs) over device buffers, with
//! cuBLAS products (TF32) and the kernels of `lmkit_kernels::cuda`; attention is the flash
//! kernels (grouped-query heads read in place from the packed q|k|v rows). No autograd graph:
//! each activation is written once into a buffer kept for the backward pass, residuals are
//! folded into the products (beta = 1), and each gradient is written once. With bf16 products
//! the products' operands are bf16, as in the GPT-2 pass (gpt2_cuda.rs).
//!
//! It runs where the flash attention is chosen (LMKIT_CUDA_ATTENTION=flash, or
//! `set_flash_attention`) and the products are TF32 or bf16 (`train.dtype = "bf16"`, which also
//! runs attention on bf16 operands); elsewhere — and for biases (Qwen2), LoRA
//! adapters or a partial rotation — the caller differentiates the graph. Checked against candle's
//! autograd on the CPU in the tests below, which run where a GPU is present.

use super::gpt2_cuda::{flash_attention_chosen, flash_trusted, output_loss, product, PassTimer};
use super::LossAndGrads;
use candle_core::{Result, Tensor};
use lmkit_kernels::cuda::{
    plain, rows, transposed, Added, AttnShape, Buf, Data, Dev, Gpu, Operand, Stored,
};
use lmkit_models::layers::linear::Linear;
use lmkit_models::llama::Llama;

/// One layer's weights, in the order of [`params`].
const PER_LAYER: usize = 9;

/// The tensors the pass reads, in order: the embedding, then per layer the input norm, q, k, v,
/// o, the post-attention norm, gate, up, down; the final norm; the output layer unless it is
/// the embedding. `None` where a layer has a bias, an adapter or a weight not stored [out, in].
fn params(model: &Llama) -> Option<(Vec<&Tensor>, bool)> {
    let parts = model.parts()?;
    let mut out = vec![parts.embed_tokens];
    for l in &parts.layers {
        out.push(l.input_layernorm.weight());
        for lin in [&l.qkv[0], &l.qkv[1], &l.qkv[2], l.o_proj] {
            out.push(dense(lin)?);
        }
        out.push(l.post_attention_layernorm.weight());
        for lin in [&l.gate_up[0], &l.gate_up[1], l.down_proj] {
            out.push(dense(lin)?);
        }
    }
    out.push(parts.norm.weight());
    let lm = dense(parts.lm_head)?;
    let tied = lm.id() == parts.embed_tokens.id();
    if !tied {
        out.push(lm);
    }
    Some((out, tied))
}

/// A layer's weight [out, in]; `None` with a bias, an adapter or another storage.
fn dense(l: &Linear) -> Option<&Tensor> {
    if l.bias().is_some() || l.lora().is_some_and(|a| a.is_on()) {
        return None;
    }
    l.dense_weight()
}

/// Sizes of the pass.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    inter: usize,
    v: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    eps: f32,
    tied: bool,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.t
    }
    fn qd(&self) -> usize {
        self.heads * self.hd
    }
    fn kvd(&self) -> usize {
        self.kv * self.hd
    }
    /// Columns of the packed q|k|v rows.
    fn w(&self) -> usize {
        self.qd() + 2 * self.kvd()
    }
    fn attn(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            heads: self.heads,
            kv_heads: self.kv,
            hd: self.hd,
        }
    }
}

/// The loss and gradients of `model` on the GPU its parameters live on; `None` where the pass
/// does not apply (see the module's documentation). `ids`/`targets` were checked against the
/// vocabulary by the caller.
pub(super) fn pass(
    model: &Llama,
    ids: &[u32],
    targets: &[u32],
    (b, t): (usize, usize),
    scale: f64,
) -> Result<Option<LossAndGrads>> {
    let Some((tensors, tied)) = params(model) else {
        return Ok(None);
    };
    let Some(parts) = model.parts() else {
        return Ok(None);
    };
    let Some(mut gpu) = Gpu::of(tensors[0].device()) else {
        return Ok(None);
    };
    gpu.tf32 = lmkit_kernels::cuda::tf32_products();
    let reduced = gpu.tf32 || gpu.bf16;
    if !reduced || !flash_attention_chosen() {
        return Ok(None);
    }
    let (table, rotated) = parts.rope.table(t)?;
    let Some(first) = parts.layers.first() else {
        return Ok(None);
    };
    let cfg = &model.cfg;
    let d = Dims {
        b,
        t,
        c: cfg.hidden_size,
        inter: first.gate_up[0].dims()?.0,
        v: cfg.vocab_size,
        heads: first.n_head,
        kv: first.n_kv,
        hd: first.head_dim,
        eps: parts.norm.eps() as f32,
        tied,
    };
    let uniform = parts.layers.iter().all(|l| {
        (l.n_head, l.n_kv, l.head_dim) == (d.heads, d.kv, d.hd)
            && l.gate_up[0].dims().is_ok_and(|(o, _)| o == d.inter)
    });
    if rotated != d.hd
        || !uniform
        || !d.attn().flash_fits(gpu.compute_major()?)
        || table.dtype() != candle_core::DType::F32
        || !flash_trusted(&gpu, d.hd)?
    {
        return Ok(None);
    }
    let positions = table.dim(0)?;
    if t > positions {
        candle_core::bail!(
            "Llama: a sequence of {t} tokens is longer than max_position_embeddings ({positions})"
        );
    }
    let mut all = tensors.clone();
    all.push(&table);
    let guards: Vec<_> = all.iter().map(|p| p.storage_and_layout()).collect();
    let Some(data) = guards
        .iter()
        .map(|(st, l)| Gpu::view(st, l))
        .collect::<Option<Vec<Dev<f32>>>>()
    else {
        return Ok(None);
    };
    let (loss, grads) = backprop(&gpu, &data, d, ids, targets, scale)?;
    drop(guards);
    let grads = tensors
        .iter()
        .zip(grads)
        .map(|(p, g)| Ok(((*p).clone(), gpu.into_tensor(g, p.shape())?)))
        .collect::<Result<_>>()?;
    Ok(Some(LossAndGrads { loss, grads }))
}

/// One layer's activations kept for the backward pass (the norms' outputs, the gate and up
/// projections, silu(gate)·up and the attention output's `y_op`, in bf16 with bf16 products).
struct Saved {
    /// Layer input (residual stream), its norm and 1/rms; q|k|v after rotation (bf16 with bf16
    /// products); attention output (of q|k|v's type) and as the projection's operand (the output
    /// itself when bf16), and its rows' log-sum-exps.
    x: Buf<f32>,
    a1: Stored,
    r1: Buf<f32>,
    qkv: Stored,
    y: Stored,
    y_op: Operand,
    lse: Buf<f32>,
    /// Residual stream after attention, its norm and 1/rms, the gate and up projections (one
    /// product's [n, 2·inter] output: each row gate's, then up's), silu(gate)·up.
    xm: Buf<f32>,
    a2: Stored,
    r2: Buf<f32>,
    gate_up: Stored,
    g: Stored,
}

/// `residual + input · wᵀ` ([n, outs], for an [outs, inner] weight) in a new buffer
/// ([`Gpu::linear`]).
fn residual_linear(
    gpu: &Gpu,
    residual: Dev<f32>,
    input: Data,
    w: Data,
    (n, outs, inner): (usize, usize, usize),
) -> Result<Buf<f32>> {
    let out = gpu.uninit(n * outs)?;
    gpu.linear(
        (n, outs, inner),
        plain(input, inner),
        transposed(w, inner),
        Added::residual(residual),
        out.dev().into(),
    )?;
    Ok(out)
}

fn backprop(
    gpu: &Gpu,
    p: &[Dev<f32>],
    d: Dims,
    ids: &[u32],
    targets: &[u32],
    scale: f64,
) -> Result<(f64, Vec<Buf<f32>>)> {
    let (n, c, inter, v) = (d.n(), d.c, d.inter, d.v);
    let (qd, kvd, w) = (d.qd(), d.kvd(), d.w());
    let layers = (p.len() - 3 - usize::from(!d.tied)) / PER_LAYER;
    let embed = p[0];
    let layer = |i: usize| &p[1 + i * PER_LAYER..1 + (i + 1) * PER_LAYER];
    let norm = p[1 + layers * PER_LAYER];
    let lm = gpu.operand(if d.tied {
        embed
    } else {
        p[2 + layers * PER_LAYER]
    })?;
    // The layers' weight matrices as products' operands (copies, bf16 with bf16 products): q|k|v
    // stacked ([w, c]: one product writes q|k|v, one takes its gradient back), o, gate|up
    // stacked ([2·inter, c]) and down; `layer`'s order is in_norm, q, k, v, o, post_norm, gate,
    // up, down.
    let weights = (0..layers)
        .map(|i| {
            let l = layer(i);
            Ok([
                gpu.operand_stacked(&l[1..4])?,
                gpu.operand(l[4])?,
                gpu.operand_stacked(&l[6..8])?,
                gpu.operand(l[8])?,
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    // Layer i's q|k|v, o, gate|up and down weights as operands.
    let matrices = |i: usize| -> [Data; 4] { std::array::from_fn(|j| weights[i][j].data()) };
    let table = p[p.len() - 1];
    let attn = d.attn();
    let att_scale = 1.0 / (d.hd as f32).sqrt();
    let mut timer = PassTimer::new()?;
    let ids_d = gpu.upload_u32(ids)?;
    let targets_d = gpu.upload_u32(targets)?;

    // Forward.
    let mut x = gpu.uninit(n * c)?;
    gpu.gather_rows(x.dev(), embed, ids_d.dev(), (n, c), v)?;
    let mut saved = Vec::with_capacity(layers);
    for i in 0..layers {
        let [w_in, _, _, _, _, w_post, ..] = layer(i) else {
            unreachable!("PER_LAYER tensors a layer")
        };
        let [wqkv, wo, wgu, wd] = matrices(i);
        let (a1, r1) = (gpu.operand_buf(n * c)?, gpu.uninit(n)?);
        gpu.rms_norm((a1.data(), r1.dev()), x.dev(), *w_in, (n, c), d.eps)?;
        // q|k|v as its product writes it (bf16 with bf16 products, as autocast's linear
        // layers), q and k rotated in place.
        let qkv = gpu.operand_buf(n * w)?;
        gpu.linear(
            (n, w, c),
            plain(a1.data(), c),
            transposed(wqkv, c),
            Added::default(),
            qkv.data(),
        )?;
        gpu.rope(
            qkv.data(),
            w,
            table,
            (n, d.t),
            (d.heads + d.kv, d.hd),
            false,
        )?;
        let y = gpu.stored(qkv.data().is_bf16(), n * qd)?;
        let lse = gpu.uninit(d.b * d.heads * d.t)?;
        let packed = (
            rows(qkv.data(), w),
            rows(qkv.data().at(qd)?, w),
            rows(qkv.data().at(qd + kvd)?, w),
        );
        timer.attention(gpu, false, || {
            gpu.flash_attention(attn, packed, rows(y.data(), qd), lse.dev(), att_scale)
        })?;
        let y_op = gpu.operand_data(y.data())?;
        let xm = residual_linear(gpu, x.dev(), y_op.data(), wo, (n, c, qd))?;
        let (a2, r2) = (gpu.operand_buf(n * c)?, gpu.uninit(n)?);
        gpu.rms_norm((a2.data(), r2.dev()), xm.dev(), *w_post, (n, c), d.eps)?;
        // gate|up as their one product writes them: bf16 with bf16 products (as autocast's
        // linear layers), read in place and in bf16 by both SwiGLU kernels.
        let (gate_up, g) = (gpu.operand_buf(n * 2 * inter)?, gpu.operand_buf(n * inter)?);
        gpu.linear(
            (n, 2 * inter, c),
            plain(a2.data(), c),
            transposed(wgu, c),
            Added::default(),
            gate_up.data(),
        )?;
        let halves = (gate_up.data(), gate_up.data().at(inter)?);
        gpu.swiglu(g.data(), halves.0, halves.1, (n, inter, 2 * inter))?;
        let xo = residual_linear(gpu, xm.dev(), g.data(), wd, (n, c, inter))?;
        saved.push(Saved {
            x: std::mem::replace(&mut x, xo),
            a1,
            r1,
            qkv,
            y,
            y_op,
            lse,
            xm,
            a2,
            r2,
            gate_up,
            g,
        });
    }
    timer.mark(gpu, "layers forward")?;
    let (hf, rf) = (gpu.operand_buf(n * c)?, gpu.uninit(n)?);
    gpu.rms_norm((hf.data(), rf.dev()), x.dev(), norm, (n, c), d.eps)?;

    let dims = (n, c, v);
    let (loss, dhf, dlm) = output_loss(gpu, hf.data(), lm.data(), targets_d.dev(), dims, scale)?;
    drop((hf, lm));
    timer.mark(gpu, "output layer + loss")?;

    // Backward.
    // The residual stream's gradient and, with bf16 products, its bf16 copy (the products'
    // operand), both written by the norms' backward.
    let dx = gpu.uninit(n * c)?;
    let dxd = dx.dev();
    let dx16 = gpu.operand_copy_buf(n * c)?;
    let dx16d = dx16.as_ref().map(|b| b.dev());
    let dx_op: Data = match dx16d {
        Some(d) => d.into(),
        None => dxd.into(),
    };
    let norm_bwd = |dy: Dev<f32>, kept: (Dev<f32>, Dev<f32>, Dev<f32>), acc: bool| {
        gpu.rms_norm_bwd((dxd, dx16d), dy, kept, (n, c), acc)?;
        let dw = gpu.uninit(c)?;
        let (x, _, rstd) = kept;
        gpu.norm_weight_grads((dw.dev(), None), dy, x, (None, rstd), (n, c))?;
        Ok::<_, candle_core::Error>(dw)
    };
    let d_norm = norm_bwd(dhf.dev(), (x.dev(), norm, rf.dev()), false)?;
    drop(dhf);
    let mut grads: Vec<Vec<Buf<f32>>> = Vec::with_capacity(layers);
    for i in (0..layers).rev() {
        let [w_in, _, _, _, _, w_post, ..] = layer(i) else {
            unreachable!("PER_LAYER tensors a layer")
        };
        let [wqkv, wo, wgu, wd] = matrices(i);
        let s = saved.pop().expect("one saved entry per layer");
        // xo = xm + g·W_downᵀ
        let d_down = product(
            gpu,
            (c, inter, n),
            transposed(dx_op, c),
            plain(s.g.data(), inter),
        )?;
        // g's gradient, bf16 with bf16 products (a product's output, as autocast's).
        let dg = gpu.operand_buf(n * inter)?;
        gpu.linear(
            (n, inter, c),
            plain(dx_op, c),
            plain(wd, inter),
            Added::default(),
            dg.data(),
        )?;
        // The gate and up projections' gradients, only products' operands, in the saved
        // projections' place (of their type: bf16 with bf16 products).
        let dgu = s.gate_up.data();
        let (dgate, dup) = (dgu, dgu.at(inter)?);
        gpu.swiglu_bwd((dgate, dup), dgate, dup, dg.data(), (n, inter, 2 * inter))?;
        drop(dg);
        let d_gate = product(
            gpu,
            (inter, c, n),
            transposed(dgate, 2 * inter),
            plain(s.a2.data(), c),
        )?;
        let d_up = product(
            gpu,
            (inter, c, n),
            transposed(dup, 2 * inter),
            plain(s.a2.data(), c),
        )?;
        let da2 = product(gpu, (n, c, 2 * inter), plain(dgu, 2 * inter), plain(wgu, c))?;
        let d_post = norm_bwd(da2.dev(), (s.xm.dev(), *w_post, s.r2.dev()), true)?;
        drop(da2);
        // xm = x + y·W_oᵀ
        let d_o = product(
            gpu,
            (c, qd, n),
            transposed(dx_op, c),
            plain(s.y_op.data(), qd),
        )?;
        // The attention output's gradient, bf16 from its product with bf16 products (as the
        // flash kernels read it).
        let dy = gpu.operand_buf(n * qd)?;
        gpu.linear(
            (n, qd, c),
            plain(dx_op, c),
            plain(wo, qd),
            Added::default(),
            dy.data(),
        )?;
        let dqkv = gpu.uninit(n * w)?;
        let dots = gpu.uninit(d.b * d.heads * d.t)?;
        let packed = |m: Data| -> Result<_> {
            Ok((rows(m, w), rows(m.at(qd)?, w), rows(m.at(qd + kvd)?, w)))
        };
        let (kept, grads_at) = (packed(s.qkv.data())?, packed(dqkv.dev().into())?);
        timer.attention(gpu, true, || {
            gpu.flash_attention_bwd(
                attn,
                kept,
                (rows(s.y.data(), qd), s.lse.dev()),
                rows(dy.data(), qd),
                grads_at,
                dots.dev(),
                att_scale,
            )
        })?;
        drop(dy);
        // Gradients of q and k before their rotation (with bf16 products rotated and rounded
        // into a bf16 copy, the products' operand, in one pass).
        let (positions, heads) = ((n, d.t), (d.heads + d.kv, d.hd));
        let dqkv16 = gpu.operand_copy_buf(n * w)?;
        let dq: Data = match &dqkv16 {
            Some(b) => {
                gpu.rope_to_bf16(b.dev(), dqkv.dev(), w, table, positions, heads, true)?;
                b.dev().into()
            }
            None => {
                gpu.rope(dqkv.dev(), w, table, positions, heads, true)?;
                dqkv.dev().into()
            }
        };
        // q|k|v = norm(x)·W_{q,k,v}ᵀ
        let a1 = plain(s.a1.data(), c);
        let (dk, dv) = (dq.at(qd)?, dq.at(qd + kvd)?);
        let d_q = product(gpu, (qd, c, n), transposed(dq, w), a1)?;
        let d_k = product(gpu, (kvd, c, n), transposed(dk, w), a1)?;
        let d_v = product(gpu, (kvd, c, n), transposed(dv, w), a1)?;
        let da1 = product(gpu, (n, c, w), plain(dq, w), plain(wqkv, c))?;
        drop((dqkv16, dqkv));
        let d_in = norm_bwd(da1.dev(), (s.x.dev(), *w_in, s.r1.dev()), true)?;
        grads.push(vec![d_in, d_q, d_k, d_v, d_o, d_post, d_gate, d_up, d_down]);
    }
    grads.reverse();
    timer.mark(gpu, "layers backward")?;

    // Embeddings: rows of dx added to their token's row (into the output layer's gradient when
    // the two are one matrix).
    let (d_embed, d_lm) = if d.tied {
        (dlm, None)
    } else {
        (gpu.zeros(v * c)?, Some(dlm))
    };
    gpu.scatter_add_rows(d_embed.dev(), dxd, ids_d.dev(), (n, c), v)?;
    timer.mark(gpu, "embeddings backward")?;
    timer.report("flash");
    let mut out = vec![d_embed];
    out.extend(grads.into_iter().flatten());
    out.push(d_norm);
    out.extend(d_lm);
    Ok((loss, out))
}

#[cfg(test)]
mod tests {
    use crate::passes::gpt2_cuda::tests::{assert_matches, randomize_both, run_on_gpu};
    use crate::passes::llama::LlamaPass;
    use crate::passes::testing::{gpu, tokens};
    use crate::passes::TrainPass;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::llama::Llama;
    use lmkit_models::{KvCache, LlamaConfig};

    fn config(tied: bool, kv: usize) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 301, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": kv,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tied,
        }))
        .unwrap()
    }

    /// The GPU pass against candle's autograd on the CPU, on the same random weights and a batch
    /// of 3 × 100 tokens (two tiles of the attention kernels), head size 32.
    fn compare(tied: bool, kv: usize, tol: f64) {
        let Some(cuda) = gpu() else { return };
        let cpu = Device::Cpu;
        let cfg = config(tied, kv);
        let vm = VarMap::new();
        let model = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &cpu)).unwrap();
        let vm_gpu = VarMap::new();
        let on_gpu = Llama::new(&cfg, VarBuilder::from_varmap(&vm_gpu, DType::F32, &cuda)).unwrap();
        randomize_both(&vm, &vm_gpu, 0.3, &cuda);
        let (b, t) = (3, 100);
        let x = Tensor::from_vec(tokens(b * t, 301, 5), (b, t), &cpu).unwrap();
        let y = Tensor::from_vec(tokens(b * t, 301, 6), (b, t), &cpu).unwrap();
        let scale = 0.5;

        crate::passes::gpt2_cuda::set_flash_attention(true);
        // As the GPT-2 pass's test: directly on the emulated GPU.
        let gpu_pass = |x: &Tensor, y: &Tensor, scale| {
            if cfg!(feature = "cuda") {
                return LlamaPass(&on_gpu).loss_and_grads(x, y, scale);
            }
            let (ids, tg, bt) = crate::passes::ids_and_targets("Llama", x, y)?;
            super::pass(&on_gpu, &ids, &tg, bt, scale)
        };
        let ours = run_on_gpu(&gpu_pass, (&x, &y), scale, true, &cuda);

        // The reference: the autograd graph of the same model on the CPU.
        let mut cache = KvCache::single_pass(model.num_layers());
        let h = model.hidden(&x, &mut [&mut cache]).unwrap();
        let n = b * t;
        let h = h.reshape((n, cfg.hidden_size)).unwrap();
        let targets = y.flatten_all().unwrap();
        let loss = crate::objective::output_loss_sum(model.output(), &h, &targets).unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap() as f64 / n as f64;
        let g = (loss * (scale / n as f64)).unwrap().backward().unwrap();
        assert_matches(&ours, (want_loss, &g), (&vm, &vm_gpu), tol);
    }

    /// One test: the TF32 and attention switches are process-wide.
    #[test]
    fn gpu_llama_pass_equals_autograd_on_the_cpu() {
        let _switches = crate::passes::testing::gpu_switches();
        use crate::passes::gpt2_cuda::tests::{assert_bf16_throughout, op_names};
        // TF32 products (10-bit mantissas): close, not equal; the residual stream added by the
        // products (cuBLASLt's C), and without that (copied, then the product added).
        compare(true, 1, 2e-2);
        lmkit_kernels::cuda::set_fused_epilogues(false);
        let (_, products) = op_names(|| compare(false, 2, 2e-2));
        assert!(products.iter().all(|n| !n.contains('[')), "{products:?}");
        lmkit_kernels::cuda::set_fused_epilogues(true);
        // bf16 products and attention operands (8-bit mantissas): every product's operands in
        // bf16.
        lmkit_kernels::cuda::set_bf16_products(true);
        let names = op_names(|| compare(true, 1, 8e-2));
        assert!(
            names.1.iter().any(|n| n.ends_with("[residual] bf16")),
            "{names:?}"
        );
        // gate|up, q|k|v and g's gradient written in bf16 by their products and read so by
        // SwiGLU and the rotation (these kernels take bf16 inputs only), and q|k|v's gradient
        // rotated into its bf16 copy.
        for k in [
            "swiglu_fwd_h16",
            "swiglu_bwd_h16",
            "rope_rows_h16",
            "rope_rows_bf16",
        ] {
            assert!(names.0.iter().any(|n| n == k), "{k} not run: {names:?}");
        }
        assert_bf16_throughout(names);
        lmkit_kernels::cuda::set_bf16_products(false);
    }
}
