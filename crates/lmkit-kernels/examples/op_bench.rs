//! Forward and backward time of each operation a GPT-2 training step uses, at the shapes of
//! bench/train_bench.py (batch 8, context 256, 384 dims, 6 heads, vocab 8192), to find where
//! training time goes.
//!
//! usage: cargo run --release -p lmkit-kernels --example op_bench

use candle_core::{DType, Device, Tensor, Var, D};
use lmkit_kernels::blas;
use std::time::Instant;

fn time(
    name: &str,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    f()?; // warm up
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    let fwd = t0.elapsed().as_secs_f64() / reps as f64;
    let t0 = Instant::now();
    for _ in 0..reps {
        let y = f()?;
        y.sum_all()?.backward()?;
    }
    let both = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "| {name} | {:.2} | {:.2} |",
        fwd * 1e3,
        (both - fwd).max(0.0) * 1e3
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, c, h, v) = (8usize, 256usize, 384usize, 6usize, 8192usize);
    let n = b * t;
    let var = |shape: &[usize]| Var::randn(0f32, 0.02, shape, &dev);
    let x3 = var(&[b, t, c])?;
    let x2 = var(&[n, c])?;
    let w = var(&[c, 3 * c])?;
    let w_mlp = var(&[c, 4 * c])?;
    let bias = var(&[3 * c])?;
    let gain = var(&[c])?;
    let q = var(&[b, h, t, c / h])?;
    let k = var(&[b, h, t, c / h])?;
    let att = var(&[b, h, t, t])?;
    let lm = var(&[v, c])?;
    let targets = Tensor::zeros(n, DType::U32, &dev)?;
    let big = var(&[n, 4 * c])?;
    let reps = 3;
    println!(
        "shapes: batch {b}, context {t}, dim {c}, heads {h}, vocab {v}; {} threads",
        candle_core::utils::get_num_threads()
    );
    println!("CPU matmul for the lmkit BLAS rows: {}", blas::backend());
    println!();
    println!("| op | forward ms | backward ms |");
    println!("|---|---|---|");
    time("matmul 2-D [2048x384]·[384x1152]", reps, || {
        x2.as_tensor().matmul(w.as_tensor())
    })?;
    time(
        "matmul 2-D [2048x384]·[384x1152], lmkit BLAS",
        reps,
        || blas::matmul(x2.as_tensor(), w.as_tensor()),
    )?;
    time("broadcast_matmul [8,256,384]·[384x1152]", reps, || {
        x3.as_tensor().broadcast_matmul(w.as_tensor())
    })?;
    time(
        "matmul + broadcast_add bias [8,256,1152]+[1152]",
        reps,
        || {
            x3.as_tensor()
                .broadcast_matmul(w.as_tensor())?
                .broadcast_add(bias.as_tensor())
        },
    )?;
    time("matmul + bias, lmkit fused", reps, || {
        lmkit_kernels::fused::add_bias(
            &x3.as_tensor().broadcast_matmul(w.as_tensor())?,
            bias.as_tensor(),
        )
    })?;
    time("gelu (tanh), candle [2048,1536]", reps, || {
        big.as_tensor().gelu()
    })?;
    time("gelu (tanh), lmkit fused [2048,1536]", reps, || {
        lmkit_kernels::fused::gelu_tanh(big.as_tensor())
    })?;
    time("matmul MLP [2048x384]·[384x1536]", reps, || {
        x2.as_tensor().matmul(w_mlp.as_tensor())
    })?;
    time(
        "matmul MLP [2048x384]·[384x1536], lmkit BLAS",
        reps,
        || blas::matmul(x2.as_tensor(), w_mlp.as_tensor()),
    )?;
    time("layer norm (lmkit ops) [8,256,384]", reps, || {
        let x = x3.as_tensor();
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(gain.as_tensor())
    })?;
    let zero = Var::zeros(c, DType::F32, &dev)?;
    time("layer norm, lmkit fused [8,256,384]", reps, || {
        lmkit_kernels::fused::layer_norm(x3.as_tensor(), gain.as_tensor(), zero.as_tensor(), 1e-5)?
            .ok_or_else(|| candle_core::Error::Msg("not fused".into()))
    })?;
    time("attention scores q·kᵀ [8,6,256,64]", reps, || {
        q.as_tensor().matmul(&k.as_tensor().t()?)
    })?;
    time(
        "attention scores q·kᵀ [8,6,256,64], lmkit BLAS",
        reps,
        || blas::matmul(q.as_tensor(), &k.as_tensor().t()?),
    )?;
    time("softmax, candle ops [8,6,256,256]", reps, || {
        let x = att.as_tensor();
        let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    })?;
    time("softmax, lmkit fused [8,6,256,256]", reps, || {
        lmkit_kernels::fused::softmax_last_dim(att.as_tensor())
    })?;
    time("lm_head [2048x384]·[384x8192]", reps, || {
        x2.as_tensor().matmul(&lm.as_tensor().t()?)
    })?;
    time("lm_head [2048x384]·[384x8192], lmkit BLAS", reps, || {
        blas::matmul(x2.as_tensor(), &lm.as_tensor().t()?)
    })?;
    time("lm_head + cross-entropy", reps, || {
        let logits = x2.as_tensor().matmul(&lm.as_tensor().t()?)?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    })?;
    time("lm_head + cross-entropy, lmkit fused", reps, || {
        let logits = x2.as_tensor().matmul(&lm.as_tensor().t()?)?;
        lmkit_kernels::fused::cross_entropy_sum(&logits, &targets)? / 2048.0
    })?;
    time("transpose(1,2)+reshape [8,6,256,64]", reps, || {
        q.as_tensor().transpose(1, 2)?.reshape((b, t, c))
    })?;
    Ok(())
}
