//! The recurrence of an Elman RNN (tanh) or LSTM layer over a whole window as one op: the input
//! projections of every step come in precomputed (one product for all steps, in the graph), the
//! recurrent product of each step is one BLAS call accumulating into that step's projections, and
//! the gates are applied in one loop — no per-step tensors or graph nodes. The backward pass
//! recomputes the gates' inputs of every step with one product, walks the steps backwards with one
//! product each, and forms the recurrent weight's gradient with one product at the end.

use crate::blas::{available, gemm_par, plain, require, transposed, BlasFloat};
use crate::fused::FastMath;
use crate::gemm::{pack_b, product_packed, PackedB};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

/// The cell of a recurrent layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// h' = tanh(z)
    Tanh,
    /// PyTorch's LSTM: z = (i | f | g | o), c' = σ(f)·c + σ(i)·tanh(g), h' = σ(o)·tanh(c')
    Lstm,
}

impl Cell {
    fn gates(self) -> usize {
        match self {
            Cell::Tanh => 1,
            Cell::Lstm => 4,
        }
    }
    /// Values per step and row in the output (h, or h | c).
    pub fn width(self, h: usize) -> usize {
        match self {
            Cell::Tanh => h,
            Cell::Lstm => 2 * h,
        }
    }
}

/// The states of every step of a recurrent layer: `pre` [b, t, gates·h] holds each step's input
/// projection with both biases added, `w_hh` [gates·h, h] is the recurrent weight (PyTorch's
/// layout), `state0` [b, h] (tanh) or [b, 2h] (LSTM: h | c) the starting state (not
/// differentiated: the carried state is detached). Returns [b, t, h] (tanh) or [b, t, 2h] (LSTM,
/// h | c of each step); gradients flow to `pre` and `w_hh`. `None` where the op does not apply
/// (not CPU f32/f64, no BLAS library, or an empty window): the caller runs the steps as composed
/// ops.
pub fn sequence(
    cell: Cell,
    pre: &Tensor,
    w_hh: &Tensor,
    state0: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !(pre.device().is_cpu() && matches!(pre.dtype(), DType::F32 | DType::F64) && available()) {
        return Ok(None);
    }
    let (b, t, gh) = pre.dims3()?;
    if b == 0 || t == 0 {
        return Ok(None);
    }
    let (rows, h) = w_hh.dims2()?;
    if rows != gh || gh != cell.gates() * h {
        candle_core::bail!(
            "recurrence: projections of width {gh} and a recurrent weight of {rows}×{h} do not fit a {cell:?} cell"
        );
    }
    pre.contiguous()?
        .apply_op3(
            &w_hh.contiguous()?,
            &state0.contiguous()?,
            Recurrence { cell },
        )
        .map(Some)
}

/// [`sequence`] over plain slices (for hand-written training passes): `pre` [b, t, gates·h],
/// `w_hh` [gates·h, h], `state0` [b, width]; returns every step's state [b, t, width].
pub fn forward_slices<T: BlasFloat>(
    cell: Cell,
    pre: &[T],
    w_hh: &[T],
    state0: &[T],
    (b, t, h): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    check_slices(cell, pre.len(), w_hh.len(), state0.len(), (b, t, h))?;
    forward(cell, pre, w_hh, state0, Dims { b, t, h })
}

/// The backward of [`forward_slices`]: from `out` (its result) and `dout` (the gradient of
/// every step's state), the gradients of `pre` and of `w_hh`.
pub fn backward_slices<T: BlasFloat>(
    cell: Cell,
    (pre, w_hh, state0): (&[T], &[T], &[T]),
    out: &[T],
    dout: &[T],
    (b, t, h): (usize, usize, usize),
) -> candle_core::Result<(Vec<T>, Vec<T>)> {
    check_slices(cell, pre.len(), w_hh.len(), state0.len(), (b, t, h))?;
    let n = b * t * cell.width(h);
    if out.len() != n || dout.len() != n {
        candle_core::bail!(
            "recurrence backward: states or their gradient do not fit [{b}, {t}, {}]",
            cell.width(h)
        );
    }
    backward(cell, (pre, w_hh, state0), out, dout, Dims { b, t, h })
}

fn check_slices(
    cell: Cell,
    pre: usize,
    w: usize,
    s0: usize,
    (b, t, h): (usize, usize, usize),
) -> candle_core::Result<()> {
    let gh = cell.gates() * h;
    if pre != b * t * gh || w != gh * h || s0 != b * cell.width(h) {
        candle_core::bail!(
            "recurrence: projections ({pre}), recurrent weight ({w}) or state ({s0}) do not fit \
             {b} rows × {t} steps of a {cell:?} cell of {h}"
        );
    }
    Ok(())
}

struct Recurrence {
    cell: Cell,
}

/// Sizes of one call: batch, steps, hidden width.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
}

fn sigmoid<T: FastMath>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
}

/// The gate activations (i, f, g, o) of an LSTM from their inputs `z` at offset `j` of a row.
#[inline(always)]
fn lstm_gates<T: FastMath>(z: &[T], h: usize, j: usize) -> (T, T, T, T) {
    (
        sigmoid(z[j]),
        sigmoid(z[h + j]),
        z[2 * h + j].tanh_fast(),
        sigmoid(z[3 * h + j]),
    )
}

/// Batch rows per thread: the rows of a window are independent of each other, so each thread
/// runs the whole recurrence for its own rows (no synchronisation per step).
fn rows_per_block(b: usize) -> usize {
    b.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// z [m, gates·h] += states [m, h] · W_hhᵀ (W_hh [gates·h, h]); through `packed` (W_hhᵀ packed
/// once for every step) when given, on the calling thread.
fn add_recurrent_product<T: BlasFloat>(
    blas: &crate::blas::Blas,
    (states, packed): (&[T], Option<&PackedB<T>>),
    w: &[T],
    z: &mut [T],
    h: usize,
) -> candle_core::Result<()> {
    let (m, gh) = (states.len() / h, w.len() / h);
    if let Some(pb) = packed {
        return product_packed(m, (states, h, false), pb, (z, gh), true);
    }
    gemm_par(
        blas,
        (m, gh, h),
        plain(states, h),
        transposed(w, h),
        z,
        true,
    )
}

fn forward<T: BlasFloat>(
    cell: Cell,
    pre: &[T],
    w: &[T],
    s0: &[T],
    Dims { b, t, h }: Dims,
) -> candle_core::Result<Vec<T>> {
    use rayon::prelude::*;
    let blas = require("recurrence")?;
    let gh = cell.gates() * h;
    let width = cell.width(h);
    let mut out = vec![T::zero(); b * t * width];
    let rows = rows_per_block(b);
    // Every step multiplies by W_hhᵀ: packed once here, not by each step's product.
    let packed = pack_b((h, gh), w, h, true)?;
    out.par_chunks_mut(rows * t * width)
        .zip(pre.par_chunks(rows * t * gh))
        .zip(s0.par_chunks(rows * width))
        .try_for_each(|((out, pre), s0)| {
            crate::few_rows::outside_pass(|| {
                forward_rows(
                    (blas, packed.as_ref()),
                    cell,
                    (pre, w, s0),
                    out,
                    Dims {
                        b: s0.len() / width,
                        t,
                        h,
                    },
                )
            })
        })?;
    Ok(out)
}

/// [`forward`] for a block of `b` rows (`pre`, `s0`, `out` hold those rows only).
fn forward_rows<T: BlasFloat>(
    (blas, packed): (&crate::blas::Blas, Option<&PackedB<T>>),
    cell: Cell,
    (pre, w, s0): (&[T], &[T], &[T]),
    out: &mut [T],
    Dims { b, t, h }: Dims,
) -> candle_core::Result<()> {
    let gh = cell.gates() * h;
    let width = cell.width(h);
    let mut hprev: Vec<T> = (0..b)
        .flat_map(|r| s0[r * width..r * width + h].iter().copied())
        .collect();
    let mut cprev: Vec<T> = match cell {
        Cell::Lstm => (0..b)
            .flat_map(|r| s0[r * width + h..(r + 1) * width].iter().copied())
            .collect(),
        Cell::Tanh => Vec::new(),
    };
    let mut z = vec![T::zero(); b * gh];
    for s in 0..t {
        for r in 0..b {
            z[r * gh..(r + 1) * gh].copy_from_slice(&pre[(r * t + s) * gh..][..gh]);
        }
        add_recurrent_product(blas, (&hprev, packed), w, &mut z, h)?;
        for r in 0..b {
            let zr = &z[r * gh..(r + 1) * gh];
            let o = &mut out[(r * t + s) * width..][..width];
            match cell {
                Cell::Tanh => {
                    for j in 0..h {
                        let v = zr[j].tanh_fast();
                        o[j] = v;
                        hprev[r * h + j] = v;
                    }
                }
                Cell::Lstm => {
                    for j in 0..h {
                        let (i, f, g, og) = lstm_gates(zr, h, j);
                        let c = f * cprev[r * h + j] + i * g;
                        let v = og * c.tanh_fast();
                        o[j] = v;
                        o[h + j] = c;
                        hprev[r * h + j] = v;
                        cprev[r * h + j] = c;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Gradients of `pre` ([b, t, gh], same layout) and of `w` ([gh, h]) from `dout` (the gradient
/// of the output, [b, t, width]).
fn backward<T: BlasFloat>(
    cell: Cell,
    (pre, w, s0): (&[T], &[T], &[T]),
    out: &[T],
    dout: &[T],
    Dims { b, t, h }: Dims,
) -> candle_core::Result<(Vec<T>, Vec<T>)> {
    use rayon::prelude::*;
    let blas = require("recurrence")?;
    let gh = cell.gates() * h;
    let width = cell.width(h);
    let n = b * t;
    // The state each step started from: h_{s-1} of every row and step.
    let hprev: Vec<T> = (0..n)
        .flat_map(|i| {
            let (r, s) = (i / t, i % t);
            let from = match s {
                0 => &s0[r * width..],
                _ => &out[(r * t + s - 1) * width..],
            };
            from[..h].iter().copied()
        })
        .collect();
    // The gates' inputs of every step at once: Z = pre + H_prev · W_hhᵀ.
    let mut z = pre.to_vec();
    add_recurrent_product(blas, (&hprev, None), w, &mut z, h)?;
    let mut dz = vec![T::zero(); n * gh];
    let rows = rows_per_block(b);
    // Every step's dh multiplies by W_hh: packed once here.
    let packed = pack_b((gh, h), w, h, false)?;
    dz.par_chunks_mut(rows * t * gh)
        .zip(z.par_chunks(rows * t * gh))
        .zip(out.par_chunks(rows * t * width))
        .zip(dout.par_chunks(rows * t * width))
        .zip(s0.par_chunks(rows * width))
        .try_for_each(|((((dz, z), out), dout), s0)| {
            let d = Dims {
                b: s0.len() / width,
                t,
                h,
            };
            crate::few_rows::outside_pass(|| {
                backward_rows(
                    (blas, packed.as_ref()),
                    cell,
                    (z, w, s0),
                    (out, dout),
                    dz,
                    d,
                )
            })
        })?;
    // dW_hh = Σ_s dz_sᵀ · h_{s-1}
    let mut dw = vec![T::zero(); gh * h];
    gemm_par(
        blas,
        (gh, h, n),
        transposed(&dz, gh),
        plain(&hprev, h),
        &mut dw,
        false,
    )?;
    Ok((dz, dw))
}

/// The backward walk over the steps for a block of `b` rows: the gradient of each step's gate
/// inputs into `dz`, from the gate inputs `z`, the outputs and their gradient.
fn backward_rows<T: BlasFloat>(
    (blas, packed): (&crate::blas::Blas, Option<&PackedB<T>>),
    cell: Cell,
    (z, w, s0): (&[T], &[T], &[T]),
    (out, dout): (&[T], &[T]),
    dz: &mut [T],
    Dims { b, t, h }: Dims,
) -> candle_core::Result<()> {
    let gh = cell.gates() * h;
    let width = cell.width(h);
    let mut dh_next = vec![T::zero(); b * h];
    let mut dc_next = vec![T::zero(); if cell == Cell::Lstm { b * h } else { 0 }];
    let one = T::one();
    for s in (0..t).rev() {
        for r in 0..b {
            let i0 = r * t + s;
            let zr = &z[i0 * gh..(i0 + 1) * gh];
            let dzr = &mut dz[i0 * gh..(i0 + 1) * gh];
            let o = &out[i0 * width..(i0 + 1) * width];
            let d = &dout[i0 * width..(i0 + 1) * width];
            match cell {
                Cell::Tanh => {
                    for j in 0..h {
                        let dh = d[j] + dh_next[r * h + j];
                        dzr[j] = dh * (one - o[j] * o[j]);
                    }
                }
                Cell::Lstm => {
                    // c_{s-1}: the starting state's, or the previous step's.
                    let c_prev = match s {
                        0 => &s0[r * width + h..(r + 1) * width],
                        _ => &out[(i0 - 1) * width + h..i0 * width],
                    };
                    for j in 0..h {
                        let dh = d[j] + dh_next[r * h + j];
                        let (ig, fg, gg, og) = lstm_gates(zr, h, j);
                        let c = o[h + j];
                        let tc = c.tanh_fast();
                        let dc = dh * og * (one - tc * tc) + dc_next[r * h + j] + d[h + j];
                        dzr[j] = dc * gg * ig * (one - ig);
                        dzr[h + j] = dc * c_prev[j] * fg * (one - fg);
                        dzr[2 * h + j] = dc * ig * (one - gg * gg);
                        dzr[3 * h + j] = dh * tc * og * (one - og);
                        dc_next[r * h + j] = dc * fg;
                    }
                }
            }
        }
        // dh_{s-1} = dz_s · W_hh (dz_s: rows r·t + s, leading dimension t·gh).
        if let Some(pb) = packed {
            product_packed(
                b,
                (&dz[s * gh..], t * gh, false),
                pb,
                (&mut dh_next, h),
                false,
            )?;
            continue;
        }
        gemm_par(
            blas,
            (b, h, gh),
            plain(&dz[s * gh..], t * gh),
            plain(w, h),
            &mut dh_next,
            false,
        )?;
    }
    Ok(())
}

fn slice<'a, T: WithDType>(st: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::blas::contiguous(st.as_slice::<T>()?, l)
}

impl Recurrence {
    fn dims(&self, pre: &Layout, state0: &Layout) -> candle_core::Result<Dims> {
        let &[b, t, gh] = pre.dims() else {
            candle_core::bail!("recurrence: the projections must be [batch, steps, gates·hidden]")
        };
        let h = gh / self.cell.gates();
        if state0.dims() != [b, self.cell.width(h)] {
            candle_core::bail!(
                "recurrence: the starting state is {:?}, not [{b}, {}]",
                state0.dims(),
                self.cell.width(h)
            );
        }
        Ok(Dims { b, t, h })
    }

    fn run<T: BlasFloat>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<Vec<T>> {
        let d = self.dims(l1, l3)?;
        forward(
            self.cell,
            slice::<T>(s1, l1)?,
            slice::<T>(s2, l2)?,
            slice::<T>(s3, l3)?,
            d,
        )
    }

    fn grads<T: BlasFloat>(
        &self,
        pre: &Tensor,
        w: &Tensor,
        s0: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t, gh) = pre.dims3()?;
        let d = Dims {
            b,
            t,
            h: gh / self.cell.gates(),
        };
        let v = |x: &Tensor| x.contiguous()?.flatten_all()?.to_vec1::<T>();
        let (dpre, dw) = backward(
            self.cell,
            (&v(pre)?, &v(w)?, &v(s0)?),
            &v(out)?,
            &v(dout)?,
            d,
        )?;
        Ok((
            Tensor::from_vec(dpre, pre.shape(), pre.device())?,
            Tensor::from_vec(dw, w.shape(), w.device())?,
        ))
    }
}

impl CustomOp3 for Recurrence {
    fn name(&self) -> &'static str {
        "lmkit-recurrence"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l1, l3)?;
        let shape: Shape = (d.b, d.t, self.cell.width(d.h)).into();
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.run::<f32>(args.0, args.1, args.2)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.run::<f64>(args.0, args.1, args.2)?),
            _ => candle_core::bail!("recurrence: f32 or f64 only"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        pre: &Tensor,
        w: &Tensor,
        s0: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dpre, dw) = match pre.dtype() {
            DType::F32 => self.grads::<f32>(pre, w, s0, out, dout)?,
            DType::F64 => self.grads::<f64>(pre, w, s0, out, dout)?,
            dt => candle_core::bail!("recurrence: f32 or f64 only, not {dt:?}"),
        };
        Ok((Some(dpre), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_same, randn};
    use candle_core::{Device, Var, D};

    /// The steps as composed candle ops (the model's fallback path), returning every step's h
    /// (and c) as `sequence` lays them out.
    fn composed(cell: Cell, pre: &Tensor, w: &Tensor, s0: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t, _) = pre.dims3()?;
        let h = w.dim(1)?;
        let mut hs = s0.narrow(1, 0, h)?;
        let mut cs = if cell == Cell::Lstm {
            s0.narrow(1, h, h)?
        } else {
            hs.clone()
        };
        let mut outs = Vec::new();
        for s in 0..t {
            let g = (pre.narrow(1, s, 1)?.squeeze(1)? + hs.matmul(&w.t()?)?)?;
            match cell {
                Cell::Tanh => {
                    hs = g.tanh()?;
                    outs.push(hs.clone());
                }
                Cell::Lstm => {
                    let gate = |i: usize| g.narrow(D::Minus1, i * h, h);
                    let i = candle_nn_sigmoid(&gate(0)?)?;
                    let f = candle_nn_sigmoid(&gate(1)?)?;
                    let gg = gate(2)?.tanh()?;
                    let o = candle_nn_sigmoid(&gate(3)?)?;
                    cs = ((f * &cs)? + (i * gg)?)?;
                    hs = (o * cs.tanh()?)?;
                    outs.push(Tensor::cat(&[&hs, &cs], 1)?);
                }
            }
        }
        Tensor::stack(&outs, 1)
    }

    fn candle_nn_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
        (x.neg()?.exp()? + 1.0)?.recip()
    }

    /// Value and gradients (of pre and W_hh, through a random weighting of every output) equal
    /// the composed ops' in f64, and in f32 within f32 rounding.
    #[test]
    fn the_recurrence_matches_composed_ops() {
        if !available() {
            assert!(
                std::env::var_os("LMKIT_REQUIRE_BLAS").is_none(),
                "LMKIT_REQUIRE_BLAS is set but no BLAS was loaded"
            );
            eprintln!("skipped: no BLAS library");
            return;
        }
        let dev = Device::Cpu;
        for cell in [Cell::Tanh, Cell::Lstm] {
            for dtype in [DType::F64, DType::F32] {
                let (b, t, h) = (3, 7, 5);
                let gh = cell.gates() * h;
                let mk = |shape: &[usize], std: f64| {
                    randn(0f64, std, shape, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let pre = Var::from_tensor(&mk(&[b, t, gh], 1.0)).unwrap();
                let w = Var::from_tensor(&mk(&[gh, h], 0.5)).unwrap();
                let s0 = mk(&[b, cell.width(h)], 0.5);
                let fused = sequence(cell, pre.as_tensor(), w.as_tensor(), &s0)
                    .unwrap()
                    .expect("applies on the CPU with BLAS");
                let reference = composed(cell, pre.as_tensor(), w.as_tensor(), &s0).unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert_same(
                    fused,
                    reference,
                    &[&pre, &w],
                    tol,
                    &format!("{cell:?} {dtype:?}"),
                );
            }
        }
    }
}
