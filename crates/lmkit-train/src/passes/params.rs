//! What the hand-written passes share: the tensors a pass reads, registered once each; their
//! data as slices and the gradients gathered for the trained ones; linear layers (weight
//! [out, in], bias, LoRA adapter with its dropout mask) forward and backward.

use candle_core::{Tensor, TensorId};
use lmkit_kernels::blas::{self, gemm_par_ld, plain, transposed, Blas, BlasFloat};
use lmkit_models::layers::linear::Linear;
use rayon::prelude::*;
use std::collections::HashMap;

/// The tensors the pass reads, by index, each once.
#[derive(Default)]
pub(crate) struct Registry<'a> {
    pub(crate) tensors: Vec<&'a Tensor>,
    pub(crate) index: HashMap<TensorId, usize>,
}

impl<'a> Registry<'a> {
    pub(crate) fn add(&mut self, t: &'a Tensor) -> usize {
        *self.index.entry(t.id()).or_insert_with(|| {
            self.tensors.push(t);
            self.tensors.len() - 1
        })
    }
}

/// A LoRA adapter's tensors: A [r, in], B [out, r], the scale, its dropout mask for this pass.
pub(crate) struct LoraIdx {
    pub(crate) a: usize,
    pub(crate) b: usize,
    pub(crate) r: usize,
    pub(crate) scale: f64,
    pub(crate) mask: Option<Vec<f32>>,
}

/// A linear layer: weight [out, in], optional bias and adapter.
pub(crate) struct LinIdx {
    pub(crate) w: usize,
    pub(crate) bias: Option<usize>,
    pub(crate) lora: Option<LoraIdx>,
    pub(crate) out: usize,
    pub(crate) inp: usize,
}

impl LinIdx {
    /// `None` for a layer the pass cannot run (quantized or transposed weights).
    pub(crate) fn new<'a>(reg: &mut Registry<'a>, l: &'a Linear, rows: usize) -> Option<LinIdx> {
        let w = l.dense_weight()?;
        let (out, inp) = w.dims2().ok()?;
        let w = reg.add(w);
        let bias = l.bias().map(|b| reg.add(b));
        let lora = match l.lora() {
            Some(lo) if lo.is_on() => Some(LoraIdx {
                a: reg.add(&lo.a),
                b: reg.add(&lo.b),
                r: lo.a.dim(0).ok()?,
                scale: lo.scale,
                mask: lo.dropout_mask(rows * inp),
            }),
            _ => None,
        };
        Some(LinIdx {
            w,
            bias,
            lora,
            out,
            inp,
        })
    }
}

/// The registry's tensors as slices of `T`, and the gradients being gathered.
pub(crate) struct Params<'a, T> {
    pub(crate) data: Vec<&'a [T]>,
    pub(crate) wants: &'a [bool],
    pub(crate) grads: Vec<Option<Vec<T>>>,
    pub(crate) blas: &'a Blas,
}

impl<T: BlasFloat> Params<'_, T> {
    /// Adds `g` to parameter `i`'s gradient (if it is trained).
    pub(crate) fn add_grad(&mut self, i: usize, g: Vec<T>) {
        match &mut self.grads[i] {
            Some(acc) => acc
                .par_chunks_mut(1 << 14)
                .zip(g.par_chunks(1 << 14))
                .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, &v)| *a += v)),
            slot @ None => *slot = Some(g),
        }
    }

    /// Adds op(A)·op(B) [m × n] to parameter `i`'s gradient: one accumulating product into it
    /// when it holds one already (a step of several passes: preference pairs, accumulation),
    /// a new buffer otherwise — no full-size temporary to allocate and add.
    pub(crate) fn add_product(
        &mut self,
        i: usize,
        mnk: (usize, usize, usize),
        a: blas::Operand<T>,
        b: blas::Operand<T>,
    ) -> candle_core::Result<()> {
        let blas = self.blas;
        match &mut self.grads[i] {
            Some(acc) => blas::gemm_par(blas, mnk, a, b, acc, true),
            slot @ None => {
                *slot = Some(blas::product(blas, mnk, a, b)?);
                Ok(())
            }
        }
    }

    /// Parameter `i`'s gradient so far (zeros of `len` when none), taken out to add more into
    /// in place; give it back with [`Params::add_grad`].
    pub(crate) fn take_grad(&mut self, i: usize, len: usize) -> Vec<T> {
        self.grads[i].take().unwrap_or_else(|| vec![T::zero(); len])
    }
}

/// What a linear layer's adapter keeps from the forward pass: its input after dropout (when a
/// mask applies) and scale·x·Aᵀ [rows, r].
pub(crate) struct LoraSaved<T> {
    pub(crate) dropped: Option<Vec<T>>,
    pub(crate) h: Vec<T>,
}

impl LinIdx {
    /// out (rows `ldo` apart) = x·Wᵀ (+ what it holds when `accumulate`) + scale·(x·Aᵀ)·Bᵀ
    /// (`h` as for [`LinIdx::lora_forward`]).
    pub(crate) fn forward<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        x: &[T],
        n: usize,
        out: (&mut [T], usize),
        accumulate: bool,
        h: Option<Vec<T>>,
    ) -> candle_core::Result<Option<LoraSaved<T>>> {
        let (w, k, o) = (p.data[self.w], self.inp, self.out);
        let (out, ldo) = out;
        gemm_par_ld(
            p.blas,
            (n, o, k),
            plain(x, k),
            transposed(w, k),
            (&mut *out, ldo),
            accumulate,
        )?;
        self.lora_forward(p, x, n, (out, ldo), h)
    }

    /// Adds the adapter's part scale·(x·Aᵀ)·Bᵀ to `out` (rows `ldo` apart); `h` is
    /// scale·x·Aᵀ when computed already (by [`shared_lora_inputs`]).
    pub(crate) fn lora_forward<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        x: &[T],
        n: usize,
        (out, ldo): (&mut [T], usize),
        h: Option<Vec<T>>,
    ) -> candle_core::Result<Option<LoraSaved<T>>> {
        let (k, o) = (self.inp, self.out);
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        let (dropped, h) = match h {
            Some(h) => (None, h),
            None => {
                let dropped: Option<Vec<T>> = l.mask.as_ref().map(|m| {
                    x.par_iter()
                        .zip(m.par_iter())
                        .map(|(&v, &mv)| v * T::from(mv).unwrap_or_else(T::zero))
                        .collect()
                });
                let xd = dropped.as_deref().unwrap_or(x);
                let mut h = blas::product(
                    p.blas,
                    (n, l.r, k),
                    plain(xd, k),
                    transposed(p.data[l.a], k),
                )?;
                let s = T::from(l.scale).unwrap_or_else(T::one);
                h.par_iter_mut().for_each(|v| *v *= s);
                (dropped, h)
            }
        };
        gemm_par_ld(
            p.blas,
            (n, o, l.r),
            plain(&h, l.r),
            transposed(p.data[l.b], l.r),
            (out, ldo),
            true,
        )?;
        Ok(Some(LoraSaved { dropped, h }))
    }

    /// x·Wᵀ + b + the adapter's part, as a new buffer [n, out] (`h` as for
    /// [`LinIdx::lora_forward`]).
    pub(crate) fn forward_new<T: BlasFloat>(
        &self,
        p: &Params<'_, T>,
        x: &[T],
        n: usize,
        h: Option<Vec<T>>,
    ) -> candle_core::Result<(Vec<T>, Option<LoraSaved<T>>)> {
        let Some(b) = self.bias else {
            let mut out = blas::product(
                p.blas,
                (n, self.out, self.inp),
                plain(x, self.inp),
                transposed(p.data[self.w], self.inp),
            )?;
            let saved = self.lora_forward(p, x, n, (&mut out, self.out), h)?;
            return Ok((out, saved));
        };
        let mut out = lmkit_kernels::buffers::rows_of(p.data[b], n);
        let saved = self.forward(p, x, n, (&mut out, self.out), true, h)?;
        Ok((out, saved))
    }

    /// From dy (rows `ldy` apart): the trained parameters' gradients (the bias's from `dbias`,
    /// the column sums of dy, computed by the caller), and dx = dy·W + the adapter's part: added
    /// to what `dx` holds, or written as a new buffer when `dx` is empty.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        dy: (&[T], usize),
        x: &[T],
        saved: Option<&LoraSaved<T>>,
        dbias: impl FnOnce() -> Vec<T>,
        dx: &mut Vec<T>,
    ) -> candle_core::Result<()> {
        let dh = self.backward_to_adapter(p, dy, x, saved, dbias, dx)?;
        match (dh, saved) {
            (Some(dh), Some(saved)) => self.lora_input_grads(p, &dh, x, saved, dx),
            _ => Ok(()),
        }
    }

    /// [`LinIdx::backward`] up to the adapter's input side: everything but A's gradient and
    /// A's part of dx, and the gradient of scale·x·Aᵀ [n, r] (`None` without an adapter),
    /// which [`LinIdx::lora_input_grads`] or [`shared_lora_input_grads`] take on from.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_to_adapter<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        (dy, ldy): (&[T], usize),
        x: &[T],
        saved: Option<&LoraSaved<T>>,
        dbias: impl FnOnce() -> Vec<T>,
        dx: &mut Vec<T>,
    ) -> candle_core::Result<Option<Vec<T>>> {
        let (k, o, blas) = (self.inp, self.out, p.blas);
        let n = x.len() / k.max(1);
        let dy_op = || plain(dy, ldy);
        if p.wants[self.w] {
            p.add_product(self.w, (o, k, n), transposed(dy, ldy), plain(x, k))?;
        }
        if let Some(b) = self.bias.filter(|&b| p.wants[b]) {
            p.add_grad(b, dbias());
        }
        if dx.is_empty() {
            *dx = blas::product(blas, (n, k, o), dy_op(), plain(p.data[self.w], k))?;
        } else {
            blas::gemm_par(blas, (n, k, o), dy_op(), plain(p.data[self.w], k), dx, true)?;
        }
        let (Some(l), Some(saved)) = (&self.lora, saved) else {
            return Ok(None);
        };
        let s = T::from(l.scale).unwrap_or_else(T::one);
        // d(scale·h·Bᵀ): dB = dyᵀ·(scale·h); d(x·Aᵀ) = scale·dy·B.
        if p.wants[l.b] {
            p.add_product(l.b, (o, l.r, n), transposed(dy, ldy), plain(&saved.h, l.r))?;
        }
        let mut dh = blas::product(blas, (n, l.r, o), dy_op(), plain(p.data[l.b], l.r))?;
        dh.par_iter_mut().for_each(|v| *v *= s);
        Ok(Some(dh))
    }

    /// A's gradient dhᵀ·x and A's part of dx, dh·A (through the dropout mask), from the
    /// gradient `dh` of scale·x·Aᵀ.
    pub(crate) fn lora_input_grads<T: BlasFloat>(
        &self,
        p: &mut Params<'_, T>,
        dh: &[T],
        x: &[T],
        saved: &LoraSaved<T>,
        dx: &mut [T],
    ) -> candle_core::Result<()> {
        let Some(l) = &self.lora else {
            return Ok(());
        };
        let (k, blas) = (self.inp, p.blas);
        let n = x.len() / k.max(1);
        let xd = saved.dropped.as_deref().unwrap_or(x);
        if p.wants[l.a] {
            p.add_product(l.a, (l.r, k, n), transposed(dh, l.r), plain(xd, k))?;
        }
        match &l.mask {
            None => blas::gemm_par(
                blas,
                (n, k, l.r),
                plain(dh, l.r),
                plain(p.data[l.a], k),
                dx,
                true,
            )?,
            Some(m) => {
                let d = blas::product(blas, (n, k, l.r), plain(dh, l.r), plain(p.data[l.a], k))?;
                dx.par_iter_mut()
                    .zip(d.par_iter().zip(m.par_iter()))
                    .for_each(|(o, (&v, &mv))| *o += v * T::from(mv).unwrap_or_else(T::zero));
            }
        }
        Ok(())
    }
}

/// The adapters among linear layers that read the same input which can run as one (no
/// dropout: they see the same input), when there are two or more of them.
struct Sharing<'a> {
    /// Which of the layers, in order.
    idx: Vec<usize>,
    adapters: Vec<&'a LoraIdx>,
    /// Σ r: columns of the stacked x·Aᵀ.
    width: usize,
    /// The layers' input width.
    k: usize,
}

impl<'a> Sharing<'a> {
    fn of(parts: &[&'a LinIdx]) -> Option<Sharing<'a>> {
        let (idx, adapters): (Vec<usize>, Vec<&LoraIdx>) = parts
            .iter()
            .enumerate()
            .filter_map(|(i, part)| part.lora.as_ref().map(|l| (i, l)))
            .filter(|(_, l)| l.mask.is_none())
            .unzip();
        if idx.len() < 2 {
            return None;
        }
        Some(Sharing {
            k: parts[idx[0]].inp,
            width: adapters.iter().map(|l| l.r).sum(),
            idx,
            adapters,
        })
    }

    /// [A₁; A₂; …] [width, k].
    fn stacked_a<T: BlasFloat>(&self, p: &Params<'_, T>) -> Vec<T> {
        self.adapters
            .iter()
            .flat_map(|l| p.data[l.a].iter().copied())
            .collect()
    }
}

/// For linear layers that read the same input x (q, k and v; gate and up): scale·x·Aᵀ of each
/// adapter without dropout, from one product x·[A₁; A₂; …]ᵀ — one pass over x instead of one
/// per adapter. `None` for a layer whose adapter computes its own (with dropout, or alone).
pub(crate) fn shared_lora_inputs<T: BlasFloat>(
    p: &Params<'_, T>,
    parts: &[&LinIdx],
    x: &[T],
    n: usize,
) -> candle_core::Result<Vec<Option<Vec<T>>>> {
    let mut hs: Vec<Option<Vec<T>>> = (0..parts.len()).map(|_| None).collect();
    let Some(sh) = Sharing::of(parts) else {
        return Ok(hs);
    };
    let (k, width) = (sh.k, sh.width);
    let a = sh.stacked_a(p);
    let h = blas::product(p.blas, (n, width, k), plain(x, k), transposed(&a, k))?;
    let mut col = 0;
    for (&i, l) in sh.idx.iter().zip(&sh.adapters) {
        let s = T::from(l.scale).unwrap_or_else(T::one);
        let mut hi = vec![T::zero(); n * l.r];
        hi.par_chunks_mut(l.r.max(1))
            .zip(h.par_chunks(width))
            .for_each(|(o, row)| {
                o.iter_mut()
                    .zip(&row[col..col + l.r])
                    .for_each(|(o, &v)| *o = v * s)
            });
        hs[i] = Some(hi);
        col += l.r;
    }
    Ok(hs)
}

/// The input side of the backward pass of linear layers that read the same input x, given each
/// one's gradient of scale·x·Aᵀ from [`LinIdx::backward_to_adapter`] (`None` without an
/// adapter): the adapters without dropout as one — [dh₁ dh₂ …]ᵀ·x for their A gradients and
/// one product [dh₁ dh₂ …]·[A₁; A₂; …] added to dx — the others each on its own.
pub(crate) fn shared_lora_input_grads<T: BlasFloat>(
    p: &mut Params<'_, T>,
    parts: &[&LinIdx],
    dhs: &[Option<Vec<T>>],
    saved: &[Option<&LoraSaved<T>>],
    x: &[T],
    dx: &mut [T],
) -> candle_core::Result<()> {
    let sh = Sharing::of(parts);
    for (i, part) in parts.iter().enumerate() {
        let shared = sh.as_ref().is_some_and(|sh| sh.idx.contains(&i));
        if let (false, Some(dh), Some(s)) = (shared, &dhs[i], saved[i]) {
            part.lora_input_grads(p, dh, x, s, dx)?;
        }
    }
    let Some(sh) = sh else {
        return Ok(());
    };
    let (k, width) = (sh.k, sh.width);
    let n = x.len() / k.max(1);
    let mut dh = vec![T::zero(); n * width];
    let mut col = 0;
    for (&i, l) in sh.idx.iter().zip(&sh.adapters) {
        let Some(d) = &dhs[i] else {
            candle_core::bail!("LoRA backward: no gradient for an adapter of a shared input");
        };
        dh.par_chunks_mut(width)
            .zip(d.par_chunks(l.r.max(1)))
            .for_each(|(o, d)| o[col..col + l.r].copy_from_slice(d));
        col += l.r;
    }
    let a = sh.stacked_a(p);
    if sh.adapters.iter().any(|l| p.wants[l.a]) {
        let da = blas::product(p.blas, (width, k, n), transposed(&dh, width), plain(x, k))?;
        let mut row = 0;
        for l in &sh.adapters {
            if p.wants[l.a] {
                p.add_grad(l.a, da[row * k..(row + l.r) * k].to_vec());
            }
            row += l.r;
        }
    }
    blas::gemm_par(
        p.blas,
        (n, k, width),
        plain(&dh, width),
        plain(&a, k),
        dx,
        true,
    )
}

/// (parameter, gradient) pairs.
pub(crate) type Gradients = Vec<(Tensor, Tensor)>;

/// Reads the registry's tensors as `T` and runs `pass` over them (gradients of the tensors
/// `wants` marks gathered in [`Params::grads`]); its result and the (tensor, gradient) pairs.
/// `None` when a tensor is not a contiguous CPU tensor of `T`.
pub(crate) fn with_params<T: BlasFloat, R>(
    reg: &Registry<'_>,
    wants: &[bool],
    blas: &Blas,
    pass: impl FnOnce(&mut Params<'_, T>) -> candle_core::Result<R>,
) -> candle_core::Result<Option<(R, Gradients)>> {
    let guards: Vec<_> = reg.tensors.iter().map(|t| t.storage_and_layout()).collect();
    let data: Option<Vec<&[T]>> = guards
        .iter()
        .map(|(st, l)| super::cpu_slice::<T>(st, l))
        .collect();
    let Some(data) = data else {
        return Ok(None);
    };
    let mut p = Params {
        data,
        wants,
        grads: vec![None; reg.tensors.len()],
        blas,
    };
    let out = pass(&mut p)?;
    let grads = std::mem::take(&mut p.grads);
    drop(p);
    drop(guards);
    let dev = candle_core::Device::Cpu;
    let grads = reg
        .tensors
        .iter()
        .zip(grads)
        .filter_map(|(t, g)| g.map(|g| (t, g)))
        .map(|(t, g)| Ok(((*t).clone(), Tensor::from_vec(g, t.shape(), &dev)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(Some((out, grads)))
}
