//! The Q4_1 products of one serving round of SmolLM2-135M (its GGUF's block type) through
//! `quant::quant_product` at 1, 4, 8 and 32 rows, each weight read from memory as a round reads
//! it: each shape's median of 21 calls, the round's total, and its time per row.
//!
//! usage: `cargo run --release -p lmkit-kernels --example quant_rows_speed [-- ROWS,ROWS,..]`

use lmkit_kernels::quant::{quant_product, QType, Q4_1_BYTES, QK};
use std::time::Instant;

fn main() {
    let rows: Vec<usize> = std::env::args()
        .nth(1)
        .map(|a| {
            a.split(',')
                .map(|r| r.parse().expect("row counts"))
                .collect()
        })
        .unwrap_or_else(|| vec![1, 4, 8, 32]);
    println!("{} threads; Q4_1 weights", rayon::current_num_threads());
    // (n, k, per layer): q, k, v, o, gate, up, down (SmolLM2-135M's 30 layers).
    let shapes = [
        (576usize, 576usize, 60usize),
        (192, 576, 60),
        (1536, 576, 60),
        (576, 1536, 30),
    ];
    for m in rows {
        let mut round = 0.0;
        for &(n, k, per) in &shapes {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
                .collect();
            let bytes = n * k / QK * Q4_1_BYTES;
            // Copies enough that each call reads its weight from memory (see few_rows_speed).
            let copies = (64usize << 20).div_ceil(bytes);
            let ws: Vec<Vec<u8>> = (0..copies)
                .map(|c| {
                    let mut w: Vec<u8> =
                        (0..bytes).map(|i| ((i * 104729 + c) % 251) as u8).collect();
                    for b in w.chunks_exact_mut(Q4_1_BYTES) {
                        // f16 scale 0.01 and minimum -0.08.
                        b[..4].copy_from_slice(&[0x1f, 0x21, 0x1f, 0xad]);
                    }
                    w
                })
                .collect();
            let mut times = Vec::new();
            for call in 0..21 {
                let t = Instant::now();
                let y = quant_product(&x, &ws[call % copies], QType::Q4_1, n, k);
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(y.len(), m * n);
            }
            times.sort_by(f64::total_cmp);
            round += times[times.len() / 2] * per as f64;
        }
        println!(
            "m {m:2}: a round's products {:.2} ms, {:.2} ms a row",
            round * 1e3,
            round * 1e3 / m as f64
        );
    }
}
