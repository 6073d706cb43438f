//! Causal attention forward and backward time: the built-in kernel on operands packed once
//! (what lmkit runs where the CPU has the kernel) next to block products through the loaded
//! BLAS library's gemm and through the built-in gemm, alternating, minimum of 41 calls each.
//! Shapes: a GPT-2 training step of bench/train_bench.py (8 rows of 256 tokens, 6 heads of 64)
//! and a SmolLM2-135M fine-tuning step (4 rows of 256, 9 query heads over 3 key/value heads),
//! and one SmolLM2 sequence of 1,024 tokens (a long prompt's layer, forward).
//!
//! usage: `RAYON_NUM_THREADS=2 cargo run --release -p lmkit-kernels --example attn_speed`

use lmkit_kernels::blas::{self, Gemm, Gqa};
use std::time::Instant;

fn main() {
    lmkit_kernels::system::tune_allocator();
    let builtin = lmkit_kernels::gemm::functions()
        .expect("no built-in kernel for this CPU")
        .sgemm;
    let lib = blas::require("attention timing").unwrap();
    let lib_gemm: Gemm<f32> = <f32 as blas::BlasFloat>::gemm(lib);
    println!("library: {}", blas::backend());
    println!("| shape | pass | packed once | block products, built-in gemm | block products, library gemm |");
    println!("|---|---|---|---|---|");
    for (name, (b, t, heads, kv, hd)) in [
        (
            "GPT-2 8×256, 6 heads",
            (8usize, 256usize, 6usize, 6usize, 64usize),
        ),
        ("SmolLM2 4×256, 9/3 heads", (4, 256, 9, 3, 64)),
        ("SmolLM2 1×1024, 9/3 heads", (1, 1024, 9, 3, 64)),
    ] {
        let spans: Vec<(usize, usize)> = (0..b).map(|i| (i * t, t)).collect();
        let g = Gqa {
            spans: &spans,
            heads,
            kv_heads: kv,
            hd,
        };
        let qkv: Vec<f32> = (0..b * t * g.width())
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let dy: Vec<f32> = (0..b * t * heads * hd)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut best = [[f64::MAX; 3]; 2];
        for _ in 0..41 {
            for (i, gm) in [None, Some(builtin), Some(lib_gemm)]
                .into_iter()
                .enumerate()
            {
                let s = Instant::now();
                let y = match gm {
                    None => blas::gqa_attention_fwd(builtin, &qkv, g),
                    Some(gm) => blas::products_attention_fwd(gm, &qkv, g),
                };
                best[0][i] = best[0][i].min(s.elapsed().as_secs_f64());
                std::hint::black_box(y.unwrap());
                let s = Instant::now();
                let d = match gm {
                    None => blas::gqa_attention_bwd(builtin, &qkv, &dy, g),
                    Some(gm) => blas::products_attention_bwd(gm, &qkv, &dy, g),
                };
                best[1][i] = best[1][i].min(s.elapsed().as_secs_f64());
                std::hint::black_box(d.unwrap());
            }
        }
        for (pass, t) in ["forward", "backward"].iter().zip(best) {
            println!(
                "| {name} | {pass} | {:.2} ms | {:.2} ms | {:.2} ms |",
                t[0] * 1e3,
                t[1] * 1e3,
                t[2] * 1e3
            );
        }
    }
}
