//! The recurrent language models' training pass written out by hand (Elman RNN or LSTM layers
//! in PyTorch's layout, the state carried in from the previous window of the stream): each
//! layer's input projections of every step as one product, the recurrence as the kernel's one
//! op, the output layer and cross-entropy a chunk of rows at a time, and the backward pass over
//! plain buffers — no autograd graph. The tests below hold the loss, every gradient and the
//! carried state to the autograd path's in f64.

use super::params::{with_params, Params, Registry};
use super::LossAndGrads;
use candle_core::Tensor;
use lmkit_kernels::blas::{self, plain, transposed, BlasFloat};
use lmkit_kernels::buffers::rows_of;
use lmkit_kernels::fused;
use lmkit_kernels::recurrent::{backward_slices, forward_slices, Cell};
use lmkit_models::rnn::RnnLm;
use lmkit_models::KvCache;
use rayon::prelude::*;

/// Rows of the output layer's logits computed at a time (a few in tests, so that they cover the
/// accumulation over chunks).
const LOSS_ROWS: usize = if cfg!(test) { 5 } else { 512 };

/// The mean next-token cross-entropy of `ids` → `targets` ([b, t], u32) continuing from the
/// states in `cache` (zeros where it has none), every parameter's gradient times `scale`; the
/// cache takes the windows' last states (detached), as the graph path leaves them. `None`
/// where the pass does not apply — not on the CPU, not f32/f64, no BLAS library, dropout in
/// force — and the caller differentiates the graph instead (the cache untouched).
pub fn loss_and_grads(
    model: &RnnLm,
    ids: &Tensor,
    targets: &Tensor,
    cache: &mut KvCache,
    scale: f64,
) -> candle_core::Result<Option<LossAndGrads>> {
    let parts = model.parts();
    let dtype = parts.embedding.dtype();
    if !parts.embedding.device().is_cpu() || !blas::available() || parts.dropout > 0.0 {
        return Ok(None);
    }
    let (ids, targets, (b, t)) = super::ids_and_targets("recurrent model", ids, targets)?;
    let v = model.cfg.vocab_size;
    for (what, list) in [("token id", &ids), ("target", &targets)] {
        if let Some(bad) = list.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("recurrent model: {what} {bad} is outside the vocabulary of {v}");
        }
    }
    if b == 0 || t == 0 {
        return Ok(None);
    }
    let cell = if parts.lstm { Cell::Lstm } else { Cell::Tanh };
    let h = parts.hidden;
    let mut reg = Registry::default();
    let embedding = reg.add(parts.embedding);
    let layers: Vec<[usize; 4]> = parts
        .layers
        .iter()
        .map(|l| {
            [
                reg.add(l.w_ih),
                reg.add(l.w_hh),
                reg.add(l.b_ih),
                reg.add(l.b_hh),
            ]
        })
        .collect();
    let lm_head = reg.add(parts.lm_head);
    if reg.tensors.iter().any(|x| x.dtype() != dtype) {
        return Ok(None);
    }
    // Each layer's starting state [b, width] (h | c for an LSTM).
    let mut states = Vec::with_capacity(layers.len());
    for k in 0..layers.len() {
        let s = match cache.recurrent(k) {
            Some((hs, cs)) => {
                let s = match (cell, cs) {
                    (Cell::Tanh, _) => hs.clone(),
                    (Cell::Lstm, Some(c)) => Tensor::cat(&[hs, c], 1)?,
                    (Cell::Lstm, None) => Tensor::cat(&[hs, &hs.zeros_like()?], 1)?,
                };
                if s.dims() != [b, cell.width(h)] {
                    return Ok(None); // one cache per row, or another batch size
                }
                Some(s)
            }
            None => None,
        };
        states.push(s);
    }
    let m = ModelIdx {
        embedding,
        layers,
        lm_head,
        cell,
        h,
        vocab: v,
    };
    let blas = blas::require("recurrent training pass")?;
    let n = (b * t) as f64;
    let inputs = Inputs {
        reg: &reg,
        blas,
        m: &m,
        states: &states,
        ids: &ids,
        targets: &targets,
        dims: (b, t),
    };
    let r = match dtype {
        candle_core::DType::F32 => run::<f32>(&inputs, scale / n)?,
        candle_core::DType::F64 => run::<f64>(&inputs, scale / n)?,
        _ => return Ok(None),
    };
    let Some((loss, last, grads)) = r else {
        return Ok(None);
    };
    for (k, (hs, cs)) in last.into_iter().enumerate() {
        cache.set_recurrent(k, hs, cs);
    }
    cache.advance(t);
    Ok(Some(LossAndGrads {
        loss: loss / n,
        grads,
    }))
}

struct ModelIdx {
    embedding: usize,
    /// w_ih, w_hh, b_ih, b_hh of each layer.
    layers: Vec<[usize; 4]>,
    lm_head: usize,
    cell: Cell,
    h: usize,
    vocab: usize,
}

/// Each layer's last states (h [b, hidden], and c for an LSTM) as tensors.
type LastStates = Vec<(Tensor, Option<Tensor>)>;

/// What a run reads: the tensors, the model's layout, each layer's starting state, the batch.
struct Inputs<'a> {
    reg: &'a Registry<'a>,
    blas: &'a blas::Blas,
    m: &'a ModelIdx,
    states: &'a [Option<Tensor>],
    ids: &'a [u32],
    targets: &'a [u32],
    dims: (usize, usize),
}

/// Runs the pass as `T`: the summed loss, the last states and the gradients.
fn run<T: BlasFloat>(
    a: &Inputs,
    scale: f64,
) -> candle_core::Result<Option<(f64, LastStates, super::params::Gradients)>> {
    let (m, (b, t)) = (a.m, a.dims);
    let (states, ids, targets) = (a.states, a.ids, a.targets);
    let wants = vec![true; a.reg.tensors.len()];
    let width = m.cell.width(m.h);
    let s0: Vec<Vec<T>> = states
        .iter()
        .map(|s| match s {
            Some(s) => s.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>(),
            None => Ok(vec![T::zero(); b * width]),
        })
        .collect::<candle_core::Result<_>>()?;
    let r = with_params::<T, _>(a.reg, &wants, a.blas, |p| {
        backprop(p, m, &s0, ids, targets, (b, t), scale)
    })?;
    let Some(((loss, last), grads)) = r else {
        return Ok(None);
    };
    let dev = candle_core::Device::Cpu;
    let h = m.h;
    let last = last
        .into_iter()
        .map(|s| {
            let hs = Tensor::from_vec(
                s.chunks(width)
                    .flat_map(|r| r[..h].to_vec())
                    .collect::<Vec<T>>(),
                (b, h),
                &dev,
            )?;
            let cs = match m.cell {
                Cell::Lstm => Some(Tensor::from_vec(
                    s.chunks(width)
                        .flat_map(|r| r[h..].to_vec())
                        .collect::<Vec<T>>(),
                    (b, h),
                    &dev,
                )?),
                Cell::Tanh => None,
            };
            Ok((hs, cs))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Some((loss, last, grads)))
}

/// The pass itself: the summed loss and each layer's last state [b, width]; gradients (times
/// `scale`) into `p.grads`.
fn backprop<T: BlasFloat>(
    p: &mut Params<'_, T>,
    m: &ModelIdx,
    s0: &[Vec<T>],
    ids: &[u32],
    targets: &[u32],
    (b, t): (usize, usize),
    scale: f64,
) -> candle_core::Result<(f64, Vec<Vec<T>>)> {
    let blas = p.blas;
    let (h, cell) = (m.h, m.cell);
    let width = cell.width(h);
    let n = b * t;
    let (e, v) = (p.data[m.embedding], m.vocab);
    let emb = e.len() / v.max(1);

    // Forward: embeddings, then each layer's projections and recurrence.
    let mut x = vec![T::zero(); n * emb];
    x.par_chunks_mut(emb).zip(ids).for_each(|(row, &id)| {
        row.copy_from_slice(&e[id as usize * emb..(id as usize + 1) * emb]);
    });
    let mut saved = Vec::with_capacity(m.layers.len());
    let mut last = Vec::with_capacity(m.layers.len());
    for (l, s0) in m.layers.iter().zip(s0) {
        let [w_ih, w_hh, b_ih, b_hh] = *l;
        let gh = p.data[b_ih].len();
        let inp = p.data[w_ih].len() / gh;
        let bias: Vec<T> = p.data[b_ih]
            .iter()
            .zip(p.data[b_hh])
            .map(|(&a, &c)| a + c)
            .collect();
        let mut pre = rows_of(&bias, n);
        blas::gemm_par(
            blas,
            (n, gh, inp),
            plain(&x, inp),
            transposed(p.data[w_ih], inp),
            &mut pre,
            true,
        )?;
        let out = forward_slices(cell, &pre, p.data[w_hh], s0, (b, t, h))?;
        last.push(
            (0..b)
                .flat_map(|r| out[(r * t + t - 1) * width..(r * t + t) * width].to_vec())
                .collect(),
        );
        let hs: Vec<T> = match cell {
            Cell::Tanh => out.clone(),
            Cell::Lstm => out.chunks(width).flat_map(|r| r[..h].to_vec()).collect(),
        };
        saved.push((std::mem::replace(&mut x, hs), pre, out));
    }

    // Output layer and cross-entropy.
    let lm = p.data[m.lm_head];
    let sc = T::from(scale).unwrap_or_else(T::zero);
    let mut dx = vec![T::zero(); n * h];
    let mut dlm = vec![T::zero(); v * h];
    let losses = super::output_cross_entropy(
        blas,
        &x,
        (lm, None),
        targets,
        LOSS_ROWS,
        &|_, _| sc,
        &mut dx,
        (Some(&mut dlm[..]), None),
    )?;

    // Backward through the layers.
    for (l, s0) in m.layers.iter().zip(s0).rev() {
        let [w_ih, w_hh, b_ih, b_hh] = *l;
        let (input, pre, out) = saved.pop().expect("one saved entry per layer");
        let gh = p.data[b_ih].len();
        let inp = p.data[w_ih].len() / gh;
        let dout: Vec<T> = match cell {
            Cell::Tanh => dx,
            Cell::Lstm => dx
                .chunks(h)
                .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(T::zero(), h)))
                .collect(),
        };
        let (dpre, dw_hh) =
            backward_slices(cell, (&pre, p.data[w_hh], s0), &out, &dout, (b, t, h))?;
        drop(dout);
        p.add_grad(w_hh, dw_hh);
        let db = fused::column_sums(&dpre, gh);
        p.add_grad(b_ih, db.clone());
        p.add_grad(b_hh, db);
        let dw = blas::product(
            blas,
            (gh, inp, n),
            transposed(&dpre, gh),
            plain(&input, inp),
        )?;
        p.add_grad(w_ih, dw);
        dx = blas::product(
            blas,
            (n, inp, gh),
            plain(&dpre, gh),
            plain(p.data[w_ih], inp),
        )?;
    }

    // Embeddings: rows of dx back to their token's row (the output layer's gradient joins them
    // when tied).
    let tied = m.lm_head == m.embedding;
    let mut de = if tied {
        std::mem::take(&mut dlm)
    } else {
        vec![T::zero(); v * emb]
    };
    super::add_rows_by_id(&mut de, ids, &dx, emb);
    p.add_grad(m.embedding, de);
    if !tied {
        p.add_grad(m.lm_head, dlm);
    }
    Ok((losses.iter().sum(), last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{assert_matches_graph, randomize};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use lmkit_models::{CausalLm, RnnConfig};

    fn model(cell: &str, tied: bool, dtype: DType) -> (CausalLm, VarMap) {
        let cfg: RnnConfig = serde_json::from_value(serde_json::json!({
            "model_type": "lmkit_rnn", "vocab_size": 23, "cell": cell, "hidden_size": 6,
            "num_layers": 2,
            "tie_word_embeddings": tied,
        }))
        .unwrap();
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let m = RnnLm::new(&cfg, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
        randomize(&vm, dtype);
        (CausalLm::Rnn(m), vm)
    }

    fn batch(seed: u32) -> (Tensor, Tensor) {
        let ids: Vec<u32> = (0..15).map(|i| (i * 7 + seed) % 23).collect();
        let tg: Vec<u32> = (0..15).map(|i| (i * 5 + seed * 3) % 23).collect();
        let dev = Device::Cpu;
        (
            Tensor::from_vec(ids, (3, 5), &dev).unwrap(),
            Tensor::from_vec(tg, (3, 5), &dev).unwrap(),
        )
    }

    /// The loss, every gradient and the carried state equal the graph path's, starting from a
    /// state carried in from an earlier window (and from none).
    fn compare(cell: &str, tied: bool, dtype: DType, tol: f64) {
        if !blas::available() {
            return;
        }
        let (m, vm) = model(cell, tied, dtype);
        let CausalLm::Rnn(rnn) = &m else {
            unreachable!()
        };
        let mut carried = m.new_cache();
        for warm in [false, true] {
            if warm {
                let (x, y) = batch(1);
                crate::objective::loss_with(&m, &x, &y, &mut carried).unwrap();
            }
            let (x, y) = batch(2);
            let mut ours_cache = carried.fork().unwrap();
            let mut graph_cache = carried.fork().unwrap();
            let ours = loss_and_grads(rnn, &x, &y, &mut ours_cache, 0.5)
                .unwrap()
                .expect("the pass applies");
            let loss = crate::objective::loss_with(&m, &x, &y, &mut graph_cache).unwrap();
            assert_matches_graph(&ours, loss, 0.5, &vm, tol, cell);
            for k in 0..2 {
                let (a, b) = (
                    ours_cache.recurrent(k).unwrap(),
                    graph_cache.recurrent(k).unwrap(),
                );
                let d = lmkit_kernels::testing::max_diff(&a.0, &b.0);
                assert!(d < tol.max(1e-6), "{cell} layer {k} state: {d}");
                if let (Some(x), Some(y)) = (&a.1, &b.1) {
                    assert!(lmkit_kernels::testing::max_diff(x, y) < tol.max(1e-6));
                }
            }
            assert_eq!(ours_cache.len(), graph_cache.len());
        }
    }

    #[test]
    fn hand_written_pass_equals_autograd() {
        compare("lstm", true, DType::F64, 1e-10);
        compare("rnn", false, DType::F64, 1e-10);
        compare("lstm", false, DType::F32, 2e-4);
    }
}
