//! Products whose epilogue applies GPT-2's GELU (tanh approximation) or its gradient, for bf16
//! products: the MLP's first product writes GELU(x·w + b) and keeps x·w + b for the backward
//! pass in one pass over its output (cuBLASLt's `GELU_AUX_BIAS`), and the backward's product
//! dg·wᵀ is multiplied by GELU′ by its epilogue (`DGELU`), its bf16 result's column sums then
//! the bias's gradient ([`Gpu::column_sums`]; or summed by the epilogue too, `DGELU_BGRAD`,
//! with LMKIT_CUDA_BGRAD=epilogue: on an H200 that product ran at 155 TFLOP/s where its
//! forward twin ran at 396) — instead of an f32 product, an activation kernel reading it back,
//! and the gradient's f32 copy read again for its column sums. Outputs and the kept sum are
//! bf16, as autocast's bf16 linear layers keep them. Where the run-time check
//! fails on a GPU, cuBLASLt has no algorithm, or LMKIT_CUDA_EPILOGUE=0, nothing is run and the
//! callers take the unfused kernels.

use super::linear::{fused_epilogues, Act};
use super::{plain, transposed, Added, Bf16, Dev, Gpu, Mat, Switch};
use candle_core::Result;
use std::sync::atomic::{AtomicU8, Ordering};

/// Which of the two epilogues may run: bit 0 the forward's, bit 1 the backward's.
static SIDES: AtomicU8 = AtomicU8::new(3);

/// The bias's gradient in the epilogue (LMKIT_CUDA_BGRAD unless [`set_bias_grad_in_epilogue`]
/// came first).
static BGRAD: Switch = Switch::new();

/// Whether the GELU's backward product sums the bias's gradient in its epilogue (`DGELU_BGRAD`,
/// LMKIT_CUDA_BGRAD=epilogue) rather than leaving it to [`Gpu::column_sums`] of its output.
pub fn bias_grad_in_epilogue() -> bool {
    BGRAD.get(|| std::env::var("LMKIT_CUDA_BGRAD").is_ok_and(|v| v == "epilogue"))
}

/// Chooses [`bias_grad_in_epilogue`] from now on.
#[doc(hidden)]
pub fn set_bias_grad_in_epilogue(on: bool) {
    BGRAD.set(on);
}

/// Lets the GELU epilogues run (where checked) or not, each side apart: for tests of the paths
/// where one runs and the other does not.
#[doc(hidden)]
pub fn set_gelu_epilogues(forward: bool, backward: bool) {
    SIDES.store(
        u8::from(forward) | u8::from(backward) << 1,
        Ordering::Relaxed,
    );
}

/// Largest difference the run-time check allows, relative to the largest value (at least 1):
/// bf16 outputs (a rounding, 2⁻⁸), the bias rounded to bf16 besides, and cuBLASLt's own tanh
/// (the emulation, with the kernels' tanhf, differs by 2.6e-3).
const TOLERANCE: f64 = 1e-2;

impl Gpu {
    /// g = GELU(a·w + bias) and pre = a·w + bias (the sum before its rounding to bf16, as the
    /// backward's input), a: [rows, k] and w: [k, cols] bf16, g and pre [rows, cols] bf16 (row
    /// stride cols), the bias rounded to bf16 first. `false` where it is not run (nothing
    /// written): products not in bf16, LMKIT_CUDA_EPILOGUE=0, the run-time check failed on
    /// this GPU, cols not a multiple of 8 (cuBLASLt's aux matrix), or no cuBLASLt algorithm.
    pub fn linear_gelu(
        &self,
        dims: (usize, usize, usize),
        (a, w): (Mat, Mat),
        bias: Dev<f32>,
        (g, pre): (Dev<Bf16>, Dev<Bf16>),
    ) -> Result<bool> {
        if !self.gelu_usable(dims, (a, w), 1)? {
            return Ok(false);
        }
        self.gelu_product(dims, (a, w), bias, (g, pre))
    }

    /// dh = (dg·w) ⊙ GELU′(pre) and, where `dbias` is given, the column sums of dh into it
    /// (summed in f32 by the epilogue, then rounded), dg: [rows, k] and w: [k, cols] bf16 (w
    /// typically the next layer's weight transposed), pre [rows, cols] as [`Gpu::linear_gelu`]
    /// kept it, dh [rows, cols] and dbias [cols] bf16. `false` where it is not run, as for
    /// [`Gpu::linear_gelu`].
    pub fn linear_gelu_grad(
        &self,
        dims: (usize, usize, usize),
        (dg, w): (Mat, Mat),
        pre: Dev<Bf16>,
        (dh, dbias): (Dev<Bf16>, Option<Dev<Bf16>>),
    ) -> Result<bool> {
        if !self.gelu_usable(dims, (dg, w), 2)? {
            return Ok(false);
        }
        self.gelu_grad_product(dims, (dg, w), pre, (dh, dbias))
    }

    /// Whether an epilogue (`side`: 1 forward, 2 backward) may run for these operands.
    fn gelu_usable(
        &self,
        (rows, cols, _): (usize, usize, usize),
        (a, w): (Mat, Mat),
        side: u8,
    ) -> Result<bool> {
        let bf16 = a.ptr.is_bf16() && w.ptr.is_bf16();
        if !bf16 || !self.bf16 || rows == 0 || cols % 8 != 0 {
            return Ok(false);
        }
        if SIDES.load(Ordering::Relaxed) & side == 0 {
            return Ok(false);
        }
        self.gelu_trusted()
    }

    fn gelu_product(
        &self,
        (rows, cols, k): (usize, usize, usize),
        (a, w): (Mat, Mat),
        bias: Dev<f32>,
        (g, pre): (Dev<Bf16>, Dev<Bf16>),
    ) -> Result<bool> {
        let aux = pre.need(rows * cols, "linear_gelu pre")?;
        let act = Act::Gelu { aux };
        self.linear_fused((rows, cols, k), a, w, Added::bias(bias), g.into(), act)
    }

    fn gelu_grad_product(
        &self,
        (rows, cols, k): (usize, usize, usize),
        (dg, w): (Mat, Mat),
        pre: Dev<Bf16>,
        (dh, dbias): (Dev<Bf16>, Option<Dev<Bf16>>),
    ) -> Result<bool> {
        let act = Act::GeluGrad {
            aux: pre.need(rows * cols, "linear_gelu_grad pre")?,
            dbias: dbias
                .map(|d| d.need(cols, "linear_gelu_grad dbias"))
                .transpose()?,
        };
        self.linear_fused((rows, cols, k), dg, w, Added::default(), dh.into(), act)
    }

    /// Whether the GELU epilogues passed their run-time check on this GPU (checked once per
    /// process, GPU and [`bias_grad_in_epilogue`]; a failure is reported once and they are not
    /// used there).
    fn gelu_trusted(&self) -> Result<bool> {
        type Checked = Vec<((usize, bool), bool)>;
        static CHECKED: std::sync::Mutex<Checked> = std::sync::Mutex::new(Vec::new());
        if !fused_epilogues() {
            return Ok(false);
        }
        let key = (self.ordinal(), bias_grad_in_epilogue());
        let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ok)) = checked.iter().find(|(k, _)| *k == key) {
            return Ok(*ok);
        }
        let err = self.gelu_check()?;
        let ok = err.is_some_and(|e| e < TOLERANCE);
        if !ok {
            let what = match err {
                Some(e) => format!(
                    "differ from the unfused kernels by {e:.1e} (tolerance {TOLERANCE:.0e})"
                ),
                None => "have no cuBLASLt algorithm".to_string(),
            };
            eprintln!(
                "warning: products with the GELU or its gradient in their epilogue {what} on GPU \
                 {}; the activation runs in its own kernels (LMKIT_CUDA_EPILOGUE=0 chooses that \
                 and skips this check)",
                self.ordinal()
            );
        }
        checked.push((key, ok));
        Ok(ok)
    }

    /// The largest difference, relative to the largest value (at least 1) of each output,
    /// between the GELU epilogues and the unfused product with the activation and its gradient
    /// computed in f64 on the host: g, pre, dh and dbias (the backward's epilogue's, or
    /// [`Gpu::column_sums`] of dh, as [`bias_grad_in_epilogue`] says) on a 37×48×40
    /// problem (bf16 operands, the next layer's weight transposed); `None` where cuBLASLt has no
    /// algorithm for one.
    pub fn gelu_check(&self) -> Result<Option<f64>> {
        let (rows, cols, k) = (37, 48, 40);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 22) as f32 - 2.0
                })
                .collect()
        };
        let up16 = |x: &[f32]| {
            let h: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
            self.upload(&h)
        };
        let a = up16(&random(rows * k))?;
        // w: [k, cols]; the backward's weight stored [cols, k] and read transposed.
        let w = up16(&random(k * cols))?;
        let wt = up16(&random(cols * k))?;
        let dg = up16(&random(rows * k))?;
        let bias = self.upload(&random(cols))?;
        let len = rows * cols;
        let (g, pre) = (self.uninit_bf16(len)?, self.uninit_bf16(len)?);
        let (dh, db16) = (self.uninit_bf16(len)?, self.uninit_bf16(cols)?);
        let in_epilogue = bias_grad_in_epilogue();
        let forward = (plain(a.dev(), k), plain(w.dev(), cols));
        let backward = (plain(dg.dev(), k), transposed(wt.dev(), k));
        let dims = (rows, cols, k);
        if !self.gelu_product(dims, forward, bias.dev(), (g.dev(), pre.dev()))?
            || !self.gelu_grad_product(
                dims,
                backward,
                pre.dev(),
                (dh.dev(), in_epilogue.then(|| db16.dev())),
            )?
        {
            return Ok(None);
        }
        let db: Vec<f64> = if in_epilogue {
            self.download(&db16, cols)?
                .iter()
                .map(|x| x.to_f32() as f64)
                .collect()
        } else {
            let db = self.uninit(cols)?;
            self.column_sums(db.dev(), dh.dev(), (rows, cols))?;
            self.download(&db, cols)?
                .iter()
                .map(|&x| x as f64)
                .collect()
        };
        let values = |b: &super::Buf<Bf16>, len: usize| -> Result<Vec<f64>> {
            Ok(self
                .download(b, len)?
                .iter()
                .map(|x| x.to_f32() as f64)
                .collect())
        };
        // The unfused products, in f32.
        let product = |(a, w): (Mat, Mat), added: Added| -> Result<Vec<f64>> {
            let y = self.uninit(len)?;
            self.linear(dims, a, w, added, y.dev().into())?;
            Ok(self.download(&y, len)?.iter().map(|&x| x as f64).collect())
        };
        let sum = product(forward, Added::bias(bias.dev()))?;
        let grad = product(backward, Added::default())?;
        let kept = values(&pre, len)?;
        let dh_want: Vec<f64> = grad
            .iter()
            .zip(&kept)
            .map(|(d, x)| d * gelu_grad(*x))
            .collect();
        let db_want: Vec<f64> = (0..cols)
            .map(|j| (0..rows).map(|r| dh_want[r * cols + j]).sum())
            .collect();
        let g_want: Vec<f64> = sum.iter().map(|&x| gelu(x)).collect();
        let mut worst = 0f64;
        for (got, want) in [
            (values(&g, len)?, g_want),
            (kept, sum),
            (values(&dh, len)?, dh_want),
            (db, db_want),
        ] {
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (x, y) in got.iter().zip(&want) {
                let e = (x - y).abs() / scale;
                // NaN counts as the largest error.
                worst = if e.is_nan() {
                    f64::INFINITY
                } else {
                    worst.max(e)
                };
            }
        }
        Ok(Some(worst))
    }
}

/// GELU, tanh approximation (GPT-2's gelu_new).
fn gelu(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU′ of the tanh approximation.
fn gelu_grad(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let th = (k * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epilogues pass their run-time check (on a GPU: cuBLASLt has algorithms for both, reads
    /// the aux matrix and writes the bias's gradient as described), with the bias's gradient
    /// from the epilogue and from the column sums.
    #[test]
    fn gpu_gelu_products_pass_their_check() {
        let Some(mut gpu) = crate::testing::gpu_device().and_then(|d| Gpu::of(&d)) else {
            return;
        };
        gpu.bf16 = true;
        let chosen = bias_grad_in_epilogue();
        for in_epilogue in [true, false] {
            set_bias_grad_in_epilogue(in_epilogue);
            let err = gpu.gelu_check().unwrap();
            assert!(err.is_some_and(|e| e < TOLERANCE), "{in_epilogue}: {err:?}");
        }
        set_bias_grad_in_epilogue(chosen);
    }
}
