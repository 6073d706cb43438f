//! Prompt-sized products with bf16 weights (`half_weights::product`) next to the same products
//! with f32 weights (`blas::matmul`): SmolLM2-135M's layer shapes at 128 and 512 rows, each
//! shape's median of 9 calls in GFLOP/s.
//!
//! usage: `cargo run --release -p lmkit-kernels --example half_speed`

use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn median(mut f: impl FnMut()) -> f64 {
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> candle_core::Result<()> {
    println!("{} threads", rayon::current_num_threads());
    let dev = Device::Cpu;
    for m in [128usize, 512] {
        for (n, k) in [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
            let (xh, wh) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
            let flop = 2.0 * (m * n * k) as f64 / 1e9;
            let f32_s = median(|| {
                lmkit_kernels::blas::matmul(&x, &w.t().unwrap()).unwrap();
            });
            let bf16_s = median(|| {
                lmkit_kernels::half_weights::product(&xh, &wh.t().unwrap())
                    .unwrap()
                    .unwrap();
            });
            println!(
                "m {m:3} n {n:4} k {k:4}: f32 {:6.1} GFLOP/s, bf16 {:6.1} GFLOP/s ({:.2}x)",
                flop / f32_s,
                flop / bf16_s,
                f32_s / bf16_s
            );
        }
    }
    Ok(())
}
