//! Causal self-attention and its gradients in f64 on the CPU, written out loop by loop: the
//! reference the GPU's flash kernels are checked against when a pass first uses them
//! (`cuda::Gpu::flash_check`), and in the GPU tests.

/// Causal attention over `(b, t, heads, kv_heads, hd)` with the output gradient `g`: q and g are
/// [b·t, heads·hd], k and v [b·t, kv_heads·hd] (query head h reads key/value head
/// h / (heads / kv_heads)); scores are scaled by `scale`. Returns o, lse [b, heads, t] (natural
/// log-sum-exp of each row's scaled scores), dq, dk and dv, each in its input's layout.
pub fn attention_f64(
    (b, t, heads, kv_heads, hd): (usize, usize, usize, usize, usize),
    [q, k, v, g]: [&[f32]; 4],
    scale: f64,
) -> [Vec<f64>; 5] {
    let group = heads / kv_heads;
    let (c, ckv) = (heads * hd, kv_heads * hd);
    let mut out = [
        vec![0.0; b * t * c],
        vec![0.0; b * heads * t],
        vec![0.0; b * t * c],
        vec![0.0; b * t * ckv],
        vec![0.0; b * t * ckv],
    ];
    // Row i of sequence bi, head `head` of a [b·t, ld] matrix.
    let row = |x: &[f32], ld: usize, bi: usize, i: usize, head: usize| -> Vec<f64> {
        let at = (bi * t + i) * ld + head * hd;
        x[at..at + hd].iter().map(|&e| e as f64).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for bi in 0..b {
        for h in 0..heads {
            let kv = h / group;
            let keys: Vec<Vec<f64>> = (0..t).map(|j| row(k, ckv, bi, j, kv)).collect();
            let values: Vec<Vec<f64>> = (0..t).map(|j| row(v, ckv, bi, j, kv)).collect();
            for i in 0..t {
                let (qi, gi) = (row(q, c, bi, i, h), row(g, c, bi, i, h));
                let scores: Vec<f64> = keys[..=i].iter().map(|kj| scale * dot(&qi, kj)).collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = scores.iter().map(|x| (x - mx).exp() / sum).collect();
                out[1][(bi * heads + h) * t + i] = mx + sum.ln();
                let mut oi = vec![0.0; hd];
                for (pj, vj) in p.iter().zip(&values) {
                    for (o, x) in oi.iter_mut().zip(vj) {
                        *o += pj * x;
                    }
                }
                // dS = P ⊙ (dP − rowsum(dO ⊙ O)), dP = dO·Vᵀ.
                let d = dot(&oi, &gi);
                for (j, pj) in p.iter().enumerate() {
                    let ds = pj * (dot(&gi, &values[j]) - d);
                    let (qr, kr) = ((bi * t + i) * c + h * hd, (bi * t + j) * ckv + kv * hd);
                    for e in 0..hd {
                        out[2][qr + e] += scale * ds * keys[j][e];
                        out[3][kr + e] += scale * ds * qi[e];
                        out[4][kr + e] += pj * gi[e];
                    }
                }
                let at = (bi * t + i) * c + h * hd;
                out[0][at..at + hd].copy_from_slice(&oi);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;
    use candle_core::{DType, Device, Tensor, Var, D};

    /// The loops against candle's autograd in f64 (softmax attention composed of tensor ops):
    /// two sequences, three query heads per key/value head.
    #[test]
    fn the_loops_equal_autograd() {
        let (b, t, heads, kv, hd) = (2, 9, 6, 2, 4);
        let (c, ckv) = (heads * hd, kv * hd);
        let cpu = Device::Cpu;
        let x = [c, ckv, ckv, c].map(|cols| randn(0f32, 1.0, (b * t, cols), &cpu).unwrap());
        let data = x
            .each_ref()
            .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let scale = 0.7;
        let got = attention_f64(
            (b, t, heads, kv, hd),
            [&data[0], &data[1], &data[2], &data[3]],
            scale,
        );

        let f64s = x.each_ref().map(|x| x.to_dtype(DType::F64).unwrap());
        let vars = [&f64s[0], &f64s[1], &f64s[2]].map(|x| Var::from_tensor(x).unwrap());
        let split =
            |x: &Tensor, h: usize| x.reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap();
        let grouped = |x: &Tensor| {
            let x = split(x, kv).unsqueeze(2).unwrap();
            let x = x.broadcast_as((b, kv, heads / kv, t, hd)).unwrap();
            x.contiguous().unwrap().reshape((b, heads, t, hd)).unwrap()
        };
        let q = split(vars[0].as_tensor(), heads).contiguous().unwrap();
        let (k, v) = (grouped(vars[1].as_tensor()), grouped(vars[2].as_tensor()));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let mask: Vec<f64> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let s = s
            .broadcast_add(&Tensor::from_vec(mask, (t, t), &cpu).unwrap())
            .unwrap();
        let mx = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&mx).unwrap().exp().unwrap();
        let sum = e.sum_keepdim(D::Minus1).unwrap();
        let lse = (sum.log().unwrap() + mx).unwrap();
        let p = e.broadcast_div(&sum).unwrap();
        let o = p.matmul(&v).unwrap().transpose(1, 2).unwrap();
        let o = o.contiguous().unwrap().reshape((b * t, c)).unwrap();
        let grads = (&o * &f64s[3])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = [
            o,
            lse,
            grads.get(vars[0].as_tensor()).unwrap().clone(),
            grads.get(vars[1].as_tensor()).unwrap().clone(),
            grads.get(vars[2].as_tensor()).unwrap().clone(),
        ];
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            let want = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(got.len(), want.len());
            let err = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-12, "output {i}: {err}");
        }
    }
}
