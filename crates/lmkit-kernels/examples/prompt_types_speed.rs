//! A prompt's product (128 input rows by default) against a [2048, 2048] weight of each GGUF
//! block type lmkit interleaves (`lmkit_kernels::interleaved`, as GGUF layers are loaded on CPUs
//! with AVX2 or AVX-512 VNNI), through `Interleaved::product`: on the AMX tiles where the CPU has
//! them and `LMKIT_AMX` is not 0, otherwise on the interleaved kernels against 8-bit activations.
//! Prints each type's median of 15 calls and its multiply-adds per second.
//!
//! usage: `cargo run --release -p lmkit-kernels --example prompt_types_speed [-- ROWS [TYPE]]`
//! (TYPE as printed, e.g. Q4K: that type alone)
//! (`LMKIT_AMX=0` for the kernels a CPU without AMX runs; `LMKIT_SIMD=avx2` for the AVX2 ones,
//! with AVX-VNNI where the CPU has it, `LMKIT_AVX_VNNI=0` without)

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use lmkit_kernels::interleaved::Interleaved;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let m: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a row count"))
        .unwrap_or(128);
    let only = std::env::args().nth(2);
    let (n, k) = (2048usize, 2048usize);
    let dev = Device::Cpu;
    println!(
        "{} threads; {m} rows times a [{n}, {k}] weight; AMX tiles: {}",
        rayon::current_num_threads(),
        lmkit_kernels::amx::available()
    );
    let w = Tensor::arange(0u32, (n * k) as u32, &dev)?
        .to_dtype(candle_core::DType::F32)?
        .affine(0.7548776662466927, 0.0)?
        .sin()?
        .reshape((n, k))?;
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
        .collect();
    for dtype in lmkit_kernels::interleaved::TYPES {
        if only.as_ref().is_some_and(|t| *t != format!("{dtype:?}")) {
            continue;
        }
        let bytes = QTensor::quantize(&w, dtype)?.data()?.to_vec();
        let Some(packed) = Interleaved::new(&bytes, dtype, n, k) else {
            println!("{dtype:?}: not interleaved on this CPU");
            continue;
        };
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            let y = packed.product(&x).expect("whole rows");
            times.push(t.elapsed().as_secs_f64());
            assert_eq!(y.len(), m * n);
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        println!(
            "{:>5}: {:8.2} ms ({:6.1} G multiply-adds/s)",
            format!("{dtype:?}"),
            t * 1e3,
            (m * n * k) as f64 / t / 1e9
        );
    }
    Ok(())
}
