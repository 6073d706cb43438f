//! The Q4_1 products of one serving round of SmolLM2-135M (its GGUF's block type) through
//! `quant::quant_product` at 1, 4, 8, 16, 32 and 512 rows (a prompt's), each weight read from
//! memory as a round reads it: each shape's median of 21 calls, the round's total, and its time
//! per row; beside it, in the same calls' turns, `quant::q8_product` (8-bit activations
//! whatever the rows: what `quant_product` runs below `TILE_MIN_ROWS` rows or without AMX tiles).
//!
//! usage: `cargo run --release -p lmkit-kernels --example quant_rows_speed [-- ROWS,ROWS,..]`

use lmkit_kernels::quant::{q8_product, quant_product, QType, Q4_1_BYTES, QK};
use std::time::Instant;

fn main() {
    let rows: Vec<usize> = std::env::args()
        .nth(1)
        .map(|a| {
            a.split(',')
                .map(|r| r.parse().expect("row counts"))
                .collect()
        })
        .unwrap_or_else(|| vec![1, 4, 8, 16, 32, 512]);
    println!(
        "{} threads; Q4_1 weights; AMX tiles: {} (from {} rows)",
        rayon::current_num_threads(),
        lmkit_kernels::amx::available(),
        lmkit_kernels::quant::TILE_MIN_ROWS
    );
    // (n, k, per layer): q, k, v, o, gate, up, down (SmolLM2-135M's 30 layers).
    let shapes = [
        (576usize, 576usize, 60usize),
        (192, 576, 60),
        (1536, 576, 60),
        (576, 1536, 30),
    ];
    for m in rows {
        let (mut round, mut round_q8) = (0.0, 0.0);
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
            let (mut times, mut times_q8) = (Vec::new(), Vec::new());
            for call in 0..21 {
                let w = &ws[call % copies];
                let t = Instant::now();
                let y = quant_product(&x, w, QType::Q4_1, n, k);
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(y.len(), m * n);
                let w = &ws[(call + copies / 2) % copies];
                let t = Instant::now();
                let y = q8_product(&x, w, QType::Q4_1, n, k);
                times_q8.push(t.elapsed().as_secs_f64());
                assert_eq!(y.len(), m * n);
            }
            times.sort_by(f64::total_cmp);
            times_q8.sort_by(f64::total_cmp);
            round += times[times.len() / 2] * per as f64;
            round_q8 += times_q8[times_q8.len() / 2] * per as f64;
        }
        println!(
            "m {m:3}: a round's products {:8.2} ms, {:6.3} ms a row; 8-bit activations {:8.2} ms, {:6.3} ms a row ({:.2}x)",
            round * 1e3,
            round * 1e3 / m as f64,
            round_q8 * 1e3,
            round_q8 * 1e3 / m as f64,
            round_q8 / round
        );
    }
}
