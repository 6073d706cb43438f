//! The matrix products of one GPT-2 training step at bench/train_bench.py's shapes (batch 8 ×
//! 256 tokens, 6 layers of 384 dims, vocabulary 8,192, the output layer in chunks of 512 rows),
//! split over rayon's threads as the training pass splits them: each shape's best of 15 calls,
//! and the step's total. With `LMKIT_BLAS=builtin` (the built-in product) or a library path;
//! with `--bf16`, the products of `train.dtype = "bf16"` (operands rounded to bf16, on AMX tiles
//! where the CPU has them).
//!
//! usage: `LMKIT_BLAS=builtin cargo run --release -p lmkit-kernels --example step_gemms [-- --bf16]`

use lmkit_kernels::blas::{self, plain, transposed};
use std::time::Instant;

fn main() {
    lmkit_kernels::system::tune_allocator();
    let lib = blas::require("step products").unwrap();
    let bf16 = std::env::args().any(|a| a == "--bf16");
    blas::set_bf16_products(bf16);
    let tiles = lmkit_kernels::amx::available();
    println!(
        "{}; {} threads{}",
        blas::backend(),
        rayon::current_num_threads(),
        match (bf16, tiles) {
            (true, true) => "; bf16 products on AMX tiles",
            (true, false) => "; no AMX tiles on this CPU: f32 products",
            _ => "",
        }
    );
    let (n, c, hid, v) = (2048usize, 384usize, 1536usize, 8192usize);
    // (m, n, k, A transposed, B transposed, calls per step)
    let shapes = [
        (n, 3 * c, c, false, false, 6),
        (n, c, c, false, false, 6),
        (n, hid, c, false, false, 6),
        (n, c, hid, false, false, 6),
        (hid, c, n, true, false, 6),
        (n, hid, c, false, true, 6),
        (c, hid, n, true, false, 6),
        (n, c, hid, false, true, 6),
        (c, c, n, true, false, 6),
        (n, c, c, false, true, 6),
        (c, 3 * c, n, true, false, 6),
        (n, c, 3 * c, false, true, 6),
        (512, v, c, false, true, 4),
        (512, c, v, false, false, 4),
        (v, c, 512, true, false, 4),
    ];
    println!("|    m |    n |    k | op(A) | op(B) |     ms | GFLOP/s |");
    println!("|---|---|---|---|---|---|---|");
    let (mut total, mut flops) = (0.0, 0.0);
    for (m, nn, k, ta, tb, calls) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let b: Vec<f32> = (0..k * nn)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3)
            .collect();
        let mut out = vec![0f32; m * nn];
        let mut best = f64::MAX;
        for _ in 0..16 {
            let op_a = if ta { transposed(&a, m) } else { plain(&a, k) };
            let op_b = if tb { transposed(&b, k) } else { plain(&b, nn) };
            let s = Instant::now();
            blas::gemm_par(lib, (m, nn, k), op_a, op_b, &mut out, false).unwrap();
            best = best.min(s.elapsed().as_secs_f64());
        }
        let f = 2.0 * (m * nn * k) as f64;
        total += best * calls as f64;
        flops += f * calls as f64;
        let op = |t: bool| if t { "ᵀ" } else { "" };
        println!(
            "| {m:4} | {nn:4} | {k:4} | A{} | B{} | {:6.2} | {:7.1} |",
            op(ta),
            op(tb),
            best * 1e3,
            f / best / 1e9
        );
    }
    println!(
        "step's products: {:.1} ms, {:.1} GFLOP/s",
        total * 1e3,
        flops / total / 1e9
    );
}
