//! GFLOP/s of single-threaded f32 products, the built-in one next to a BLAS library's:
//! `cargo run --release -p lmkit-kernels --example gemm_speed [-- /path/to/libopenblas.so.0]`.
//! Shapes are a GPT-2 6L/384d training step's (16 × 128 rows) and a LoRA step's; the two
//! implementations alternate, medians of 9 calls each.

use lmkit_kernels::blas::Gemm;
use std::time::Instant;

fn main() {
    let lib_path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "libopenblas.so.0".into());
    let builtin = lmkit_kernels::gemm::functions()
        .expect("no built-in kernel for this CPU")
        .sgemm;
    lmkit_kernels::blas::choose_openblas_core();
    // SAFETY: a CBLAS library's initialisers and its cblas_sgemm, with the CBLAS signature.
    let lib = unsafe { libloading::Library::new(&lib_path) };
    let other: Option<Gemm<f32>> = lib.as_ref().ok().map(|l| {
        // SAFETY: as above.
        unsafe {
            if let Ok(f) = l.get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0") {
                f(1)
            }
            *l.get::<Gemm<f32>>(b"cblas_sgemm\0").expect("cblas_sgemm")
        }
    });
    println!(
        "{:>5} {:>5} {:>5} {:>3} {:>3} {:>10} {:>10}",
        "m", "n", "k", "ta", "tb", "built-in", &lib_path
    );
    let shapes = [
        (2048, 1536, 384, false, false),
        (2048, 384, 1536, false, false),
        (2048, 1152, 384, false, true),
        (384, 1536, 2048, true, false),
        (2048, 384, 384, false, true),
        (1024, 8192, 384, false, true),
        (1024, 576, 576, false, true),
        (128, 128, 64, false, true),
        (16, 1536, 384, false, false),
    ];
    for (m, n, k, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0)
            .collect();
        let mut c = vec![0f32; m * n];
        let lda = if ta { m } else { k };
        let ldb = if tb { k } else { n };
        let run = |g: Gemm<f32>, c: &mut [f32]| {
            let t = Instant::now();
            // SAFETY: a is op(A) m×k, b op(B) k×n with the leading dimensions given, c m×n.
            unsafe {
                g(
                    101,
                    if ta { 112 } else { 111 },
                    if tb { 112 } else { 111 },
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    a.as_ptr(),
                    lda as i32,
                    b.as_ptr(),
                    ldb as i32,
                    0.0,
                    c.as_mut_ptr(),
                    n as i32,
                )
            };
            t.elapsed().as_secs_f64()
        };
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            t1.push(run(builtin, &mut c));
            if let Some(g) = other {
                t2.push(run(g, &mut c));
            }
        }
        let gf = |t: &mut Vec<f64>| {
            if t.is_empty() {
                return f64::NAN;
            }
            t.sort_by(f64::total_cmp);
            2.0 * (m * n * k) as f64 / t[t.len() / 2] / 1e9
        };
        println!(
            "{m:>5} {n:>5} {k:>5} {:>3} {:>3} {:>10.1} {:>10.1}",
            ta as u8,
            tb as u8,
            gf(&mut t1),
            gf(&mut t2)
        );
    }
}
