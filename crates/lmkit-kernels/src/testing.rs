//! Comparison helpers for kernel tests here and in the crates that use the kernels.
use candle_core::{DType, Tensor, Var};

/// Max |a − b| over all elements, as f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A tensor's values in order, widened to f64 (exactly, from any of candle's float types).
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `ours` equals `reference` within `tol`, and so do the gradients of Σ (· ⊙ r) for `vars`
/// (r random, the same for both).
pub fn assert_same(ours: Tensor, reference: Tensor, vars: &[&Var], tol: f64, what: &str) {
    assert!(max_diff(&ours, &reference) < tol, "{what}: forward");
    let r = randn(0f32, 1.0, ours.dims(), ours.device())
        .unwrap()
        .to_dtype(ours.dtype())
        .unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in vars {
        let (x, y) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        assert!(max_diff(x, y) < tol * 10.0, "{what}: gradient");
    }
}

/// The variables of `vm` in their names' order: weights drawn in this order are the same every
/// run (a `VarMap`'s own order changes from run to run).
pub fn vars_by_name(vm: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

thread_local! {
    /// Draws so far on this thread: each test (a thread of its own) gets the same inputs every run.
    static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Like `Tensor::randn`, but seeded: candle's CPU generator cannot be seeded, and a failure seen
/// once must be seen again.
pub fn randn<T: candle_core::WithDType, S: Into<candle_core::Shape>>(
    mean: T,
    std: f64,
    shape: S,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    use lmkit_core::rng::{Random, SplitMix64};
    let shape = shape.into();
    let draw = DRAWS.with(|d| {
        let n = d.get();
        d.set(n + 1);
        n
    });
    let mut rng = SplitMix64::new(0x7e57 ^ lmkit_core::rng::mix(draw));
    let mean = mean.to_f64();
    let values: Vec<f64> = (0..shape.elem_count())
        .map(|_| mean + std * rng.normal())
        .collect();
    Tensor::from_vec(values, shape, device)?.to_dtype(T::DTYPE)
}

/// The GPU the GPU tests run on: CUDA device 0 with the `cuda` feature; with only `cuda-emu`, the
/// CPU, whose tensors the emulated GPU of [`crate::cuda`] works on. `None` where there is no GPU
/// (the test then passes without checking, unless LMKIT_REQUIRE_CUDA is set).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub fn gpu_device() -> Option<candle_core::Device> {
    if !cfg!(feature = "cuda") {
        return Some(candle_core::Device::Cpu);
    }
    match candle_core::Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var_os("LMKIT_REQUIRE_CUDA").is_none(),
                "LMKIT_REQUIRE_CUDA is set but no GPU: {e}"
            );
            None
        }
    }
}

/// Draws of `len` values in [-0.5, 0.5) from a linear congruential generator seeded with `seed`:
/// the same values every run.
pub fn uniform(seed: u64) -> impl FnMut(usize) -> Vec<f32> {
    let mut state = seed;
    move |len| {
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }
}

/// The relative size of one rounding step of a half type (to nearest: half a unit in the last
/// place) — bf16 2⁻⁸, f16 2⁻¹¹ — with f32's (2⁻²⁴) for any other type.
pub fn rounding_step(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
        _ => 1.0 / 16_777_216.0,
    }
}
