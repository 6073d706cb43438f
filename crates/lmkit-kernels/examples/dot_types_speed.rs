//! One decoding step's product (one input row) against a [1536, 1536] weight of each GGUF block
//! type lmkit multiplies against 8-bit activations (`quant::ggml_product`), each weight read
//! from memory as a decoding step reads it: the median of 3 turns of 41 calls, the weight bytes read per
//! second, and beside it, in turns between lmkit's, candle's quantized product of the same
//! weight; for the types lmkit interleaves on CPUs with AVX2 or AVX-512 VNNI
//! (`lmkit_kernels::interleaved`, as GGUF layers are loaded there), the interleaved product too.
//!
//! usage: `cargo run --release -p lmkit-kernels --example dot_types_speed`

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use std::borrow::Cow;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let (n, k) = (1536usize, 1536usize);
    let dev = Device::Cpu;
    println!(
        "{} threads; one row times a [{n}, {k}] weight",
        rayon::current_num_threads()
    );
    let w = Tensor::arange(0u32, (n * k) as u32, &dev)?
        .to_dtype(candle_core::DType::F32)?
        .affine(0.7548776662466927, 0.0)?
        .sin()?
        .reshape((n, k))?;
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
        .collect();
    let xt = Tensor::from_slice(&x, (1, k), &dev)?;
    for dtype in lmkit_kernels::interleaved::TYPES {
        let bytes = QTensor::quantize(&w, dtype)?.data()?.to_vec();
        // Copies enough that each call reads its weight from memory.
        let copies = (96usize << 20).div_ceil(bytes.len());
        let ws: Vec<Vec<u8>> = (0..copies).map(|_| bytes.clone()).collect();
        let candle: Vec<QMatMul> = ws
            .iter()
            .map(|b| {
                let s = QStorage::from_data(Cow::Borrowed(b), &dev, dtype)?;
                QMatMul::from_qtensor(QTensor::new(s, (n, k))?)
            })
            .collect::<candle_core::Result<_>>()?;
        let packed: Vec<_> = ws
            .iter()
            .map_while(|b| lmkit_kernels::interleaved::Interleaved::new(b, dtype, n, k))
            .collect();
        let (mut ours, mut theirs, mut inter) = (Vec::new(), Vec::new(), Vec::new());
        // Turns of 41 calls each: the two products' thread pools wait differently between calls
        // (lmkit's polls for a few milliseconds), so calls of one are not mixed with the other's.
        for turn in 0..3 {
            for call in 0..41 {
                let t = Instant::now();
                let y = lmkit_kernels::quant::ggml_product(&x, &ws[call % copies], dtype, n, k)
                    .expect("a type lmkit multiplies");
                ours.push(t.elapsed().as_secs_f64());
                assert_eq!(y.len(), n);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            for call in 0..41 {
                let t = Instant::now();
                let y = candle[(call + turn + copies / 2) % copies].forward(&xt)?;
                theirs.push(t.elapsed().as_secs_f64());
                assert_eq!(y.dims(), [1, n]);
            }
            if !packed.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(20));
                for call in 0..41 {
                    let t = Instant::now();
                    let y = packed[(call + turn) % copies]
                        .product(&x)
                        .expect("whole rows");
                    inter.push(t.elapsed().as_secs_f64());
                    assert_eq!(y.len(), n);
                }
            }
        }
        ours.sort_by(f64::total_cmp);
        theirs.sort_by(f64::total_cmp);
        let (a, b) = (ours[ours.len() / 2], theirs[theirs.len() / 2]);
        let interleaved = if inter.is_empty() {
            String::new()
        } else {
            inter.sort_by(f64::total_cmp);
            let c = inter[inter.len() / 2];
            format!(
                "; interleaved {:7.1} us ({:5.1} GB/s, {:4.2}x the per-row)",
                c * 1e6,
                bytes.len() as f64 / c / 1e9,
                a / c
            )
        };
        println!(
            "{:>5}: lmkit {:7.1} us ({:5.1} GB/s), candle {:7.1} us ({:5.2}x){interleaved}",
            format!("{dtype:?}"),
            a * 1e6,
            bytes.len() as f64 / a / 1e9,
            b * 1e6,
            b / a
        );
    }
    Ok(())
}
