//! The products of one serving round of SmolLM2-135M (f32 weights stored [out, in], or with
//! `--in-out` [in, out] as GPT-2's are) through
//! `few_rows` at 8 and 32 rows, each weight read from memory as a round reads it: each shape's
//! median of 21 calls in GFLOP/s, and the round's total.
//!
//! usage: `cargo run --release -p lmkit-kernels --example few_rows_speed [-- --in-out]`

use lmkit_kernels::few_rows::{product, Weight};
use std::time::Instant;

fn main() {
    let trans = !std::env::args().any(|a| a == "--in-out");
    let layout = if trans { "[out, in]" } else { "[in, out]" };
    println!("{} threads; weights {layout}", rayon::current_num_threads());
    // (n, k, per layer): qkv, o, gate+up, down; the output layer once.
    let shapes = [
        (960usize, 576usize, 30usize),
        (576, 576, 30),
        (3072, 576, 30),
        (576, 1536, 30),
        (49152, 576, 1),
    ];
    for m in [8usize, 32] {
        let mut round = 0.0;
        for &(n, k, per) in &shapes {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
                .collect();
            // Copies enough that each call reads its weight from memory, not from the caches
            // the previous calls filled (a serving round reads every weight once).
            let copies = (64usize << 20).div_ceil(n * k * 4);
            let ws: Vec<Vec<f32>> = (0..copies)
                .map(|c| {
                    (0..n * k)
                        .map(|i| ((i * 104729 + c) % 127) as f32 / 127.0 - 0.5)
                        .collect()
                })
                .collect();
            let mut c = vec![0f32; m * n];
            let mut times = Vec::new();
            for call in 0..21 {
                let w = &ws[call % copies];
                let t = Instant::now();
                // SAFETY: `c` holds m rows of n values.
                let done = unsafe {
                    product(
                        (m, n, k),
                        (&a, k),
                        Weight {
                            data: w,
                            ld: if trans { k } else { n },
                            trans,
                        },
                        (c.as_mut_ptr(), n),
                        false,
                    )
                };
                assert!(done);
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let s = times[times.len() / 2];
            round += s * per as f64;
            println!(
                "m {m:2} n {n:5} k {k:4}: {:8.1} µs, {:6.1} GFLOP/s",
                s * 1e6,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
        println!("m {m:2}: a round's products {:.2} ms", round * 1e3);
    }
}
