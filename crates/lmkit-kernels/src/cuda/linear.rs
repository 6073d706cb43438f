//! Products with a bias and a residual added (a linear layer's `y = x·w + b`, the residual
//! stream's `x + y·w`): in one pass over the output with cuBLASLt's bias epilogue and the residual
//! read as its C matrix, where the GPU passes the run-time check; else the bias and the residual
//! are written into the output first and the product added to it (β = 1).

use super::{plain, transposed, Batched, Buf, Data, Dev, Gpu, Mat, Switch, Work};
use candle_core::Result;

/// What [`Gpu::linear`] adds to its product.
#[derive(Clone, Copy, Debug, Default)]
pub struct Added {
    /// One value per output column: f32, or bf16 for a bf16 output.
    pub bias: Option<Data>,
    /// A matrix of the output's shape and type.
    pub residual: Option<Data>,
}

impl Added {
    pub fn bias(bias: impl Into<Data>) -> Added {
        Added {
            bias: Some(bias.into()),
            residual: None,
        }
    }

    pub fn residual(residual: impl Into<Data>) -> Added {
        Added {
            bias: None,
            residual: Some(residual.into()),
        }
    }

    /// Refuses addends of types that cannot be added to `y`.
    fn check(&self, y: Data) -> Result<()> {
        if self.residual.is_some_and(|r| r.is_bf16() != y.is_bf16()) {
            candle_core::bail!("cuda linear: a residual of another type than the output");
        }
        if self.bias.is_some_and(|b| b.is_bf16() && !y.is_bf16()) {
            candle_core::bail!("cuda linear: a bf16 bias is added to bf16 outputs only");
        }
        Ok(())
    }
}

/// The addresses of a fused product's output and addends, checked by the caller: `d` (row
/// stride: the product's columns), the residual `c` read as cuBLASLt's C (same shape and type as
/// `d`), the bias (of `d`'s type; with [`Act::GeluGrad`] its `dbias`, written), whether `d` is
/// bf16, and the activation the epilogue applies last.
#[derive(Clone, Copy, Debug)]
pub(super) struct Fused {
    pub d: u64,
    pub c: Option<u64>,
    pub bias: Option<u64>,
    pub bf16_out: bool,
    pub act: Act,
}

/// What a fused product's epilogue does after adding the bias and the residual. `aux`: a matrix
/// of d's shape and type (row stride: the product's columns).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) enum Act {
    #[default]
    None,
    /// d = GELU(x) (tanh approximation) of the sum x, and x itself written to `aux`
    /// (`CUBLASLT_EPILOGUE_GELU_AUX[_BIAS]`).
    Gelu { aux: u64 },
    /// d = x · GELU′(aux) of the product x, and d's column sums (the bias's gradient, of d's
    /// type) written to `dbias` where given (`CUBLASLT_EPILOGUE_DGELU[_BGRAD]`); nothing added.
    GeluGrad { aux: u64, dbias: Option<u64> },
}

/// An f32 addend of [`Gpu::linear_unfused`]: the caller's, or a bf16 one widened (into a new
/// buffer, or into the accumulator).
enum Widened {
    Own(Dev<f32>),
    /// The widened values (`_buf`: the new buffer holding them, if not the accumulator).
    Copy {
        _buf: Option<Buf<f32>>,
        dev: Dev<f32>,
    },
}

impl Widened {
    fn dev(&self) -> Dev<f32> {
        match self {
            Widened::Own(d) | Widened::Copy { dev: d, .. } => *d,
        }
    }
}

/// Fused where checked (LMKIT_CUDA_EPILOGUE unless [`set_fused_epilogues`] came first).
static FUSED: Switch = Switch::new();

/// Whether [`Gpu::linear`] may fuse its bias and residual into the product (cuBLASLt's
/// epilogue): yes unless LMKIT_CUDA_EPILOGUE=0 or [`set_fused_epilogues`] said no.
pub fn fused_epilogues() -> bool {
    FUSED.get(|| std::env::var("LMKIT_CUDA_EPILOGUE").map_or(true, |v| v != "0"))
}

/// Lets [`Gpu::linear`] fuse (`true`, where the run-time check passes) or not.
pub fn set_fused_epilogues(on: bool) {
    FUSED.set(on);
}

/// Largest difference the run-time check allows between the fused and the unfused product,
/// relative to the largest value (at least 1): f32 outputs differ by summation order only, bf16
/// outputs by a rounding (2⁻⁸) and the bias's rounding to bf16 besides.
fn tolerance(bf16_out: bool) -> f64 {
    if bf16_out {
        2e-2
    } else {
        1e-3
    }
}

impl Gpu {
    /// Row-major `y = a·w + bias + residual`, a: [rows, k], w: [k, cols], y and the residual
    /// [rows, cols] (row stride `cols`), the bias [cols], either or both of them absent; a and w
    /// both f32 or both bf16; y f32 or bf16, the residual of y's type, the bias f32 or (for a
    /// bf16 y) bf16. A bf16 y is the f32 result rounded once, with an f32 bias rounded to bf16
    /// first as autocast's bf16 linear layers do, where fused.
    pub fn linear(
        &self,
        (rows, cols, k): (usize, usize, usize),
        a: Mat,
        w: Mat,
        added: Added,
        y: Data,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        added.check(y)?;
        if self.fused_trusted(a.ptr.is_bf16(), y.is_bf16())?
            && self.linear_fused((rows, cols, k), a, w, added, y, Act::None)?
        {
            return Ok(());
        }
        self.linear_unfused((rows, cols, k), a, w, added, y)
    }

    /// The bias and residual written into y (or f32 scratch for a bf16 y), then the product added.
    fn linear_unfused(
        &self,
        (rows, cols, k): (usize, usize, usize),
        a: Mat,
        w: Mat,
        added: Added,
        y: Data,
    ) -> Result<()> {
        let scratch;
        let acc = match y {
            Data::F32(y) => y,
            Data::Bf16(_) => {
                scratch = self.uninit(rows * cols)?;
                scratch.dev()
            }
        };
        // bf16 addends widened to f32 (the residual into the accumulator itself).
        let widened = |x: Data, len: usize, into: Option<Dev<f32>>| -> Result<Widened> {
            Ok(match x {
                Data::F32(x) => Widened::Own(x),
                Data::Bf16(x) => {
                    let (buf, out) = match into {
                        Some(out) => (None, out),
                        None => {
                            let buf = self.uninit(len)?;
                            let out = buf.dev();
                            (Some(buf), out)
                        }
                    };
                    self.from_bf16(out, x, len)?;
                    Widened::Copy {
                        _buf: buf,
                        dev: out,
                    }
                }
            })
        };
        let residual = match added.residual {
            Some(r) => Some(widened(r, rows * cols, Some(acc))?),
            None => None,
        };
        let bias = match added.bias {
            Some(b) => Some(widened(b, cols, None)?),
            None => None,
        };
        let beta = match (bias, residual) {
            (Some(bias), residual) => {
                let r = residual.map(|r| r.dev());
                self.add_rows(acc, r, bias.dev(), (rows, cols))?;
                1.0
            }
            (None, Some(Widened::Own(r))) => {
                self.copy(acc, r, rows * cols)?;
                1.0
            }
            // Already widened into the accumulator.
            (None, Some(Widened::Copy { .. })) => 1.0,
            (None, None) => 0.0,
        };
        self.mm((rows, cols, k), a, w, (acc, cols), 1.0, beta, Batched::ONE)?;
        if let Data::Bf16(out) = y {
            self.to_bf16(out, acc, rows * cols)?;
        }
        Ok(())
    }

    /// The product with cuBLASLt's bias epilogue, the residual as its C and `act` applied last
    /// (its addresses checked by the caller; with [`Act::GeluGrad`] nothing is added); `false`
    /// where cuBLASLt has no algorithm for it (nothing written then).
    pub(super) fn linear_fused(
        &self,
        (rows, cols, k): (usize, usize, usize),
        a: Mat,
        w: Mat,
        added: Added,
        y: Data,
        act: Act,
    ) -> Result<bool> {
        if k == 0 {
            candle_core::bail!("cuda linear: empty inner dimension");
        }
        let bf16_operands = a.ptr.is_bf16();
        if w.ptr.is_bf16() != bf16_operands {
            candle_core::bail!("cuda linear: one operand in bf16 and the other in f32");
        }
        let span = |m: Mat, r: usize, c: usize| {
            let (r, c) = if m.t { (c, r) } else { (r, c) };
            (r - 1) * m.ld + c
        };
        let pa = a.ptr.need(span(a, rows, k), "linear a")?;
        let pw = w.ptr.need(span(w, k, cols), "linear w")?;
        added.check(y)?;
        let bf16_out = y.is_bf16();
        let d = y.need(rows * cols, "linear y")?;
        let c = match added.residual {
            Some(r) => Some(r.need(rows * cols, "linear residual")?),
            None => None,
        };
        // The bias in the output's type, as cuBLASLt reads it.
        let bias16: Option<Buf<super::Bf16>> = match added.bias {
            Some(Data::F32(b)) if bf16_out => {
                let copy = self.uninit_bf16(cols)?;
                self.to_bf16(copy.dev(), b, cols)?;
                Some(copy)
            }
            _ => None,
        };
        let grad = matches!(act, Act::GeluGrad { .. });
        if grad && (c.is_some() || added.bias.is_some()) {
            candle_core::bail!("cuda linear: nothing is added to a GELU's gradient");
        }
        let bias = match (act, added.bias, &bias16) {
            (Act::GeluGrad { dbias, .. }, _, _) => dbias,
            (_, _, Some(b16)) => Some(b16.dev().need(cols, "linear bias")?),
            (_, Some(b), None) => Some(b.need(cols, "linear bias")?),
            (_, None, None) => None,
        };
        let elem = if bf16_operands { 2 } else { 4 };
        let out = if bf16_out { 2 } else { 4 };
        // Matrices of d's shape read or written: d, and the residual or the GELU's aux.
        let matrices = 1 + usize::from(c.is_some() || act != Act::None);
        let work = Work {
            flops: 2.0 * (rows * cols * k) as f64,
            bytes: (elem * k * (rows + cols) + out * rows * cols * matrices) as f64,
        };
        let name = || {
            let precision = self.precision(bf16_operands).name();
            // What the product adds, before the operands' precision (the name ends with it).
            let added = [
                (added.bias.is_some(), "bias"),
                (c.is_some(), "residual"),
                (matches!(act, Act::Gelu { .. }), "gelu"),
                (grad, "gelu grad"),
                (grad && bias.is_some(), "bias grad"),
                (bf16_out, "bf16 out"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, what)| *what)
            .collect::<Vec<_>>()
            .join(", ");
            let s = format!("product {rows}x{cols}x{k} [{added}] {precision}");
            (s, work)
        };
        let fused = Fused {
            d,
            c,
            bias,
            bf16_out,
            act,
        };
        let mut done = false;
        self.timed(name, || {
            done = self.gemm_fused(
                (rows, cols, k),
                ((pa, a.ld, a.t), (pw, w.ld, w.t), bf16_operands),
                fused,
            )?;
            Ok(())
        })?;
        Ok(done)
    }

    /// Whether the fused products passed their run-time check on this GPU for these operand and
    /// output types in its precision (checked once per process, GPU, precision and types; a
    /// failed check is reported once and the products are not fused there).
    fn fused_trusted(&self, bf16_operands: bool, bf16_out: bool) -> Result<bool> {
        /// GPU, TF32, bf16 products, bf16 operands, bf16 output.
        type Checked = (usize, bool, bool, bool, bool);
        static CHECKED: std::sync::Mutex<Vec<(Checked, bool)>> = std::sync::Mutex::new(Vec::new());
        if !fused_epilogues() {
            return Ok(false);
        }
        let key = (
            self.ordinal(),
            self.tf32,
            self.bf16,
            bf16_operands,
            bf16_out,
        );
        let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ok)) = checked.iter().find(|(k, _)| *k == key) {
            return Ok(*ok);
        }
        let err = self.fused_check(bf16_operands, bf16_out)?;
        let tol = tolerance(bf16_out);
        let ok = err.is_some_and(|e| e < tol);
        if !ok {
            let what = match err {
                Some(e) => format!("differ from the unfused ones by {e:.1e} (tolerance {tol:.0e})"),
                None => "have no cuBLASLt algorithm".to_string(),
            };
            eprintln!(
                "warning: products with a fused bias and residual ({} operands, {} output) {what} \
                 on GPU {}; they run unfused (LMKIT_CUDA_EPILOGUE=0 chooses that and skips this \
                 check)",
                if bf16_operands { "bf16" } else { "f32" },
                if bf16_out { "bf16" } else { "f32" },
                self.ordinal()
            );
        }
        checked.push((key, ok));
        Ok(ok)
    }

    /// The largest difference, relative to the largest value (at least 1), between fused and
    /// unfused products on small problems with these operand and output types: the weight plain
    /// and with an f32 bias, then transposed and with a residual (a bf16 output: a bf16 residual
    /// and a bf16 bias);
    /// `None` where cuBLASLt has no algorithm for them.
    pub fn fused_check(&self, bf16_operands: bool, bf16_out: bool) -> Result<Option<f64>> {
        let (rows, cols, k) = (37, 48, 40);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let a = self.upload(&random(rows * k))?;
        let w = self.upload(&random(k * cols))?;
        let bias = self.upload(&random(cols))?;
        let residual = self.upload(&random(rows * cols))?;
        let operand = |x: &Buf<f32>| -> Result<(Data, Option<Buf<super::Bf16>>)> {
            Ok(if bf16_operands {
                let copy = self.bf16_copy(x.dev())?;
                (copy.dev().into(), Some(copy))
            } else {
                (x.dev().into(), None)
            })
        };
        let ((a_op, _a16), (w_op, _w16)) = (operand(&a)?, operand(&w)?);
        // A bf16 output adds a bf16 residual, and a bf16 bias besides (inference's layers).
        let (bias16, residual16) = (self.bf16_copy(bias.dev())?, self.bf16_copy(residual.dev())?);
        let cases = [
            (plain(a_op, k), plain(w_op, cols), Added::bias(bias.dev())),
            (
                plain(a_op, k),
                transposed(w_op, k),
                if bf16_out {
                    Added {
                        bias: Some(bias16.dev().into()),
                        residual: Some(residual16.dev().into()),
                    }
                } else {
                    Added::residual(residual.dev())
                },
            ),
        ];
        let mut worst = 0f64;
        for (a, w, added) in cases {
            let dims = (rows, cols, k);
            let (Some(f), Some(u)) = (
                self.linear_values(dims, (a, w), added, (bf16_out, true))?,
                self.linear_values(dims, (a, w), added, (bf16_out, false))?,
            ) else {
                return Ok(None);
            };
            let scale = u.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
            for (x, y) in f.iter().zip(&u) {
                let e = (*x as f64 - *y as f64).abs() / scale;
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

    /// [`Gpu::linear`], fused or not (`fused`), into a new output (bf16 or f32: `bf16_out`), as
    /// f32 values; `None` where the fused product has no cuBLASLt algorithm.
    fn linear_values(
        &self,
        (rows, cols, k): (usize, usize, usize),
        (a, w): (Mat, Mat),
        added: Added,
        (bf16_out, fused): (bool, bool),
    ) -> Result<Option<Vec<f32>>> {
        let len = rows * cols;
        let out = self.stored(bf16_out, len)?;
        let dims = (rows, cols, k);
        if fused {
            if !self.linear_fused(dims, a, w, added, out.data(), Act::None)? {
                return Ok(None);
            }
        } else {
            self.linear_unfused(dims, a, w, added, out.data())?;
        }
        self.values(&out, len).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::Bf16;

    /// With LMKIT_CUDA_AUTOTUNE the fused products (bias and residual; f32, and bf16 operands
    /// and output) take the fastest of the heuristic's algorithms, timed at their shape's first
    /// product: their results still equal the unfused products'. (On the emulated GPU, which
    /// has one way to run a product, nothing is tuned.)
    #[test]
    fn gpu_autotuned_products_equal_the_unfused() {
        let Some(mut gpu) = crate::testing::gpu_device().and_then(|d| Gpu::of(&d)) else {
            return;
        };
        gpu.tf32 = false;
        // A shape no other test uses, so that its algorithms are chosen here.
        let (rows, cols, k) = (37, 40, 24);
        let mut draw = crate::testing::uniform(12);
        let (a, w, bias, residual) = (
            draw(rows * k),
            draw(k * cols),
            draw(cols),
            draw(rows * cols),
        );
        let half = |x: &[f32]| -> Vec<Bf16> { x.iter().map(|&v| Bf16::from_f32(v)).collect() };
        let f32s = [&a, &w, &residual].map(|x| gpu.upload(x).unwrap());
        let bf16s = [&a, &w, &residual].map(|x| gpu.upload(&half(x)).unwrap());
        let db = gpu.upload(&bias).unwrap();
        crate::cuda::set_autotune(true);
        for bf16 in [false, true] {
            gpu.bf16 = bf16;
            let pick = |i: usize| -> Data {
                if bf16 {
                    bf16s[i].dev().into()
                } else {
                    f32s[i].dev().into()
                }
            };
            let added = Added {
                bias: Some(db.dev().into()),
                residual: Some(pick(2)),
            };
            let ops = (plain(pick(0), k), plain(pick(1), cols));
            let run = |fused| {
                gpu.linear_values((rows, cols, k), ops, added, (bf16, fused))
                    .unwrap()
            };
            let unfused = run(false).expect("the unfused product");
            let Some(fused) = run(true) else {
                eprintln!("no cuBLASLt algorithm for the fused product, bf16 {bf16}");
                continue;
            };
            let top = unfused.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (i, (f, u)) in fused.iter().zip(&unfused).enumerate() {
                let tol = tolerance(bf16) as f32 * top;
                assert!((f - u).abs() <= tol, "bf16 {bf16}, {i}: {f} vs {u}");
            }
        }
        crate::cuda::set_autotune(false);
    }

    /// `linear`, fused and unfused, with f32 and bf16 operands, the weight plain and transposed,
    /// every combination of bias and residual, f32 and bf16 outputs, against the loops in f64
    /// (on a GPU: cuBLASLt's epilogue and C ≠ D against the definition).
    #[test]
    fn gpu_linear_products_equal_the_loops() {
        let Some(mut gpu) = crate::testing::gpu_device().and_then(|d| Gpu::of(&d)) else {
            return;
        };
        gpu.tf32 = false;
        let (rows, cols, k) = (19, 24, 13);
        let mut draw = crate::testing::uniform(11);
        let rounded =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect() };
        let (a, w, bias, residual) = (
            rounded(&draw(rows * k)),
            rounded(&draw(k * cols)),
            draw(cols),
            draw(rows * cols),
        );
        // w stored transposed: [cols, k].
        let wt: Vec<f32> = (0..cols * k).map(|i| w[(i % k) * cols + i / k]).collect();
        let up = |x: &[f32]| gpu.upload(x).unwrap();
        let up16 = |x: &[f32]| {
            let h: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
            gpu.upload(&h).unwrap()
        };
        let (a32, w32, wt32) = (up(&a), up(&w), up(&wt));
        let (a16, w16, wt16) = (up16(&a), up16(&w), up16(&wt));
        let (db, dr) = (up(&bias), up(&residual));
        let (db16, dr16) = (up16(&bias), up16(&residual));
        let (bias16, residual16) = (rounded(&bias), rounded(&residual));
        let mut cases = 0;
        // Fused cases cuBLASLt has no algorithm for (the product then runs unfused).
        let mut refused = Vec::new();
        for bf16_operands in [false, true] {
            gpu.bf16 = bf16_operands;
            for transposed_w in [false, true] {
                // The bias: none, f32 or bf16; a residual of the output's type.
                for (bias_type, with_residual, bf16_out) in [
                    (1, false, false),
                    (0, true, false),
                    (1, true, false),
                    (0, false, false),
                    (1, false, true),
                    (0, false, true),
                    (2, false, true),
                    (0, true, true),
                    (2, true, true),
                    (1, true, true),
                ] {
                    let with_bias = bias_type > 0;
                    let bias_values = if bias_type == 2 { &bias16 } else { &bias };
                    let residual_values = if bf16_out { &residual16 } else { &residual };
                    for fused in [false, true] {
                        let pick = |f: &Buf<f32>, h: &Buf<Bf16>, bf16: bool| -> Data {
                            if bf16 {
                                h.dev().into()
                            } else {
                                f.dev().into()
                            }
                        };
                        let am = plain(pick(&a32, &a16, bf16_operands), k);
                        let wm = if transposed_w {
                            transposed(pick(&wt32, &wt16, bf16_operands), k)
                        } else {
                            plain(pick(&w32, &w16, bf16_operands), cols)
                        };
                        let added = Added {
                            bias: match bias_type {
                                1 => Some(db.dev().into()),
                                2 => Some(db16.dev().into()),
                                _ => None,
                            },
                            residual: with_residual.then(|| pick(&dr, &dr16, bf16_out)),
                        };
                        let dims = (rows, cols, k);
                        let case = format!(
                            "bf16 operands {bf16_operands}, wᵀ {transposed_w}, bias {bias_type}, \
                             residual {with_residual}, bf16 out {bf16_out}, fused {fused}"
                        );
                        let Some(got) = gpu
                            .linear_values(dims, (am, wm), added, (bf16_out, fused))
                            .unwrap()
                        else {
                            // The emulation has every algorithm, and cuBLASLt one for operands
                            // and output of one type (what the passes and models ask for).
                            assert!(
                                fused && bf16_operands != bf16_out && cfg!(feature = "cuda"),
                                "no algorithm: {case}"
                            );
                            eprintln!("no cuBLASLt algorithm: {case}");
                            refused.push(case);
                            cases += 1;
                            continue;
                        };
                        for r in 0..rows {
                            for j in 0..cols {
                                let mut want: f64 = (0..k)
                                    .map(|e| a[r * k + e] as f64 * w[e * cols + j] as f64)
                                    .sum();
                                let dot = want;
                                if with_bias {
                                    want += bias_values[j] as f64;
                                }
                                if with_residual {
                                    want += residual_values[r * cols + j] as f64;
                                }
                                let x = got[r * cols + j] as f64;
                                // bf16 outputs: one rounding of the sum, and the bias's; fused,
                                // cuBLASLt's epilogue may round each partial sum to the output's
                                // type (on an H200: the product plus the residual, then that plus
                                // the bias), each at most half a bf16 step of its value.
                                let partial = if with_residual {
                                    dot + residual_values[r * cols + j] as f64
                                } else {
                                    dot
                                };
                                let partials = if fused {
                                    dot.abs() + partial.abs()
                                } else {
                                    0.0
                                };
                                let tol = if bf16_out {
                                    (want.abs() + bias[j].abs() as f64 + partials) / 256.0 + 1e-6
                                } else {
                                    1e-5
                                };
                                assert!(
                                    (x - want).abs() <= tol,
                                    "{case} [{r}, {j}]: {x} vs {want}"
                                );
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 80);
        eprintln!("{} of 80 cases without a cuBLASLt algorithm", refused.len());
        // The same fused product again with another bias and residual (on a GPU: the algorithm
        // chosen for the first, the new addresses in a new description).
        gpu.bf16 = false;
        let (bias2, residual2): (Vec<f32>, Vec<f32>) = (draw(cols), draw(rows * cols));
        let got = gpu
            .linear_values(
                (rows, cols, k),
                (plain(a32.dev(), k), plain(w32.dev(), cols)),
                Added {
                    bias: Some(gpu.upload(&bias2).unwrap().dev().into()),
                    residual: Some(gpu.upload(&residual2).unwrap().dev().into()),
                },
                (false, true),
            )
            .unwrap()
            .unwrap();
        for r in 0..rows {
            for j in 0..cols {
                let dot: f64 = (0..k)
                    .map(|e| a[r * k + e] as f64 * w[e * cols + j] as f64)
                    .sum();
                let want = dot + bias2[j] as f64 + residual2[r * cols + j] as f64;
                let x = got[r * cols + j] as f64;
                assert!((x - want).abs() <= 1e-5, "again [{r}, {j}]: {x} vs {want}");
            }
        }
        // An f32 residual for a bf16 output, a bf16 one for an f32 output, a bf16 bias for an
        // f32 output.
        let (out32, out16) = (
            gpu.uninit(rows * cols).unwrap(),
            gpu.uninit_bf16(rows * cols).unwrap(),
        );
        for (added, out, says) in [
            (
                Added::residual(dr.dev()),
                out16.dev().into(),
                "residual of another type",
            ),
            (
                Added::residual(dr16.dev()),
                out32.dev().into(),
                "residual of another type",
            ),
            (
                Added::bias(db16.dev()),
                out32.dev().into(),
                "bf16 outputs only",
            ),
        ] {
            let err = gpu.linear(
                (rows, cols, k),
                plain(a32.dev(), k),
                plain(w32.dev(), cols),
                added,
                out,
            );
            assert!(err.unwrap_err().to_string().contains(says));
        }
    }

    /// The run-time check passes for every operand and output type, in each precision (on a GPU:
    /// cuBLASLt has an algorithm for each and gives the unfused products' values).
    #[test]
    fn gpu_fused_products_pass_their_check() {
        let Some(mut gpu) = crate::testing::gpu_device().and_then(|d| Gpu::of(&d)) else {
            return;
        };
        for (tf32, bf16) in [(false, false), (true, false), (false, true)] {
            (gpu.tf32, gpu.bf16) = (tf32, bf16);
            for (bf16_operands, bf16_out) in [(false, false), (true, false), (true, true)] {
                let err = gpu.fused_check(bf16_operands, bf16_out).unwrap();
                let tol = tolerance(bf16_out);
                assert!(
                    err.is_some_and(|e| e < tol),
                    "tf32 {tf32}, bf16 {bf16}, bf16 operands {bf16_operands}, bf16 out \
                     {bf16_out}: {err:?} (tolerance {tol})"
                );
            }
        }
    }
}
