//! Attention forward and backward time (grouped-query, causal) with the loaded BLAS library's
//! product next to the built-in one: `RAYON_NUM_THREADS=2 cargo run --release -p lmkit-kernels
//! --example attn_speed`. Shapes are a SmolLM2-135M fine-tuning step's (4 rows of 256 tokens, 9
//! query heads over 3 key/value heads of 64); the two alternate, medians of 9 calls each.

use lmkit_kernels::blas::{self, Gemm, Gqa};
use std::time::Instant;

fn main() {
    let builtin = lmkit_kernels::gemm::functions().unwrap().sgemm;
    let ob = blas::require("attention timing").unwrap();
    let obg: Gemm<f32> = <f32 as blas::BlasFloat>::gemm(ob);
    let (b, t, heads, kv, hd) = (4usize, 256usize, 9usize, 3usize, 64usize);
    let spans: Vec<(usize, usize)> = (0..b).map(|i| (i * t, t)).collect();
    let g = Gqa {
        spans: &spans,
        heads,
        kv_heads: kv,
        hd,
    };
    let w = g.width();
    let qkv: Vec<f32> = (0..b * t * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let dy: Vec<f32> = (0..b * t * heads * hd)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut tf = [vec![], vec![]];
    let mut tb = [vec![], vec![]];
    for _ in 0..9 {
        for (i, gm) in [obg, builtin].into_iter().enumerate() {
            let s = Instant::now();
            let y = blas::gqa_attention_fwd(gm, &qkv, g).unwrap();
            tf[i].push(s.elapsed().as_secs_f64());
            std::hint::black_box(&y);
            let s = Instant::now();
            let d = blas::gqa_attention_bwd(gm, &qkv, &dy, g).unwrap();
            tb[i].push(s.elapsed().as_secs_f64());
            std::hint::black_box(&d);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    println!(
        "fwd: openblas {:.2} ms builtin {:.2} ms",
        med(&mut tf[0]),
        med(&mut tf[1])
    );
    println!(
        "bwd: openblas {:.2} ms builtin {:.2} ms",
        med(&mut tb[0]),
        med(&mut tb[1])
    );
}
