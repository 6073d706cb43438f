//! The vocabulary-wide loops of drawing a token (`lmkit_infer::sample`): the candidates' rank
//! keys and their weights exp((l − max)/T), compiled per SIMD level ([`crate::simd`]). The
//! arithmetic is the same at every level (no fused multiply-adds, sums over a fixed number of
//! lanes), so a seeded draw gives the same token on every CPU.

use crate::simd::simd_versions;

/// A logit's bits in descending order of `f32::total_cmp` (the largest logit the smallest).
#[inline(always)]
pub fn descending(x: f32) -> u32 {
    let b = x.to_bits() as i32;
    let ordered = (b ^ (((b >> 31) as u32) >> 1) as i32) as u32 ^ 0x8000_0000;
    !ordered
}

/// The token id of a rank key.
#[inline(always)]
pub fn id(key: u64) -> usize {
    (key & 0xffff_ffff) as usize
}

simd_versions! {
    /// `keys` ← one rank key per logit, `descending(l[i]) << 32 | i` (ascending key: descending
    /// logit, then ascending id); returns the smallest key (the best token's), `None` for no
    /// logits.
    pub fn rank_keys(keys: &mut Vec<u64>, l: &[f32]) -> Option<u64> {
        keys.clear();
        keys.resize(l.len(), 0);
        let mut best = u32::MAX;
        for (i, (k, &x)) in keys.iter_mut().zip(l).enumerate() {
            let d = descending(x);
            best = best.min(d);
            *k = (u64::from(d) << 32) | i as u64;
        }
        // The first token with the best logit: ties go to the smallest id.
        let first = l.iter().position(|&x| descending(x) == best)?;
        Some((u64::from(best) << 32) | first as u64)
    }
}

/// Lanes of the weights' sum: partial sums over every `LANES`-th weight, added at the end in a
/// fixed order (the same sum at every SIMD level).
const LANES: usize = 8;

simd_versions! {
    /// `w[i]` ← exp((l[i] − max)/t) for every i (`max` ≥ every logit, t > 0); returns their sum.
    pub fn exp_weights(w: &mut [f64], l: &[f32], max: f64, t: f64) -> f64 {
        for (w, &x) in w.iter_mut().zip(l) {
            *w = exp_nonpositive((x as f64 - max) / t);
        }
        let w = &w[..w.len().min(l.len())];
        let mut lanes = [0f64; LANES];
        let mut chunks = w.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                lanes[j] += c[j];
            }
        }
        for (j, &v) in chunks.remainder().iter().enumerate() {
            lanes[j] += v;
        }
        lanes.iter().fold(0.0, |sum, &v| sum + v)
    }
}

/// e^x for x ≤ 0 (a weight's exponent), within 2 ulp of libm's `exp`, without branches so that
/// a loop of them vectorises: x = k·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor series to
/// degree 13 (the remainder under 2⁻⁵³), 2^k written into the exponent's bits. 0 below −708
/// (where e^x is under f64's smallest normal), −∞ included; NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f64) -> f64 {
    // ln 2 split (fdlibm's): the high part's k·LN2_HI is exact for |k| < 2¹¹.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1.5·2⁵²: added and taken away, rounds to an integer, which its low bits then hold.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(-708.0, 0.0);
    let shifted = xc * std::f64::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut e = INV_FACTORIALS[13];
    for c in INV_FACTORIALS[..13].iter().rev() {
        e = e * r + c;
    }
    // (k + 1023) << 52, k ∈ [−1022, 0]: the exponent bits of 2^k.
    let scale = f64::from_bits(shifted.to_bits().wrapping_add(1023) << 52);
    let y = e * scale;
    // Two selects (not one if/else-if chain, which stays a branch: the loops would not vectorise).
    let y = if x >= -708.0 { y } else { 0.0 };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// 1/j! for j in 0..=13.
const INV_FACTORIALS: [f64; 14] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights' exp against libm's over its range, the edges and the values it maps to 0
    /// or keeps NaN.
    #[test]
    fn exp_of_nonpositive_values_is_libms() {
        let mut worst = 0f64;
        let mut x = 0f64;
        while x > -708.0 {
            for v in [x, x - 0.3466, x - 1e-9]
                .into_iter()
                .filter(|&v| v >= -708.0)
            {
                let (got, want) = (exp_nonpositive(v), v.exp());
                worst = worst.max((got - want).abs() / want);
            }
            x -= 0.0137;
        }
        assert!(worst < 5e-16, "relative error {worst:e}");
        for v in [-0.0, -1e-300, -707.99] {
            assert!(
                (exp_nonpositive(v) - v.exp()).abs() <= 4e-16 * v.exp(),
                "{v}"
            );
        }
        assert_eq!(exp_nonpositive(-708.5), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f64::NAN).is_nan());
    }

    /// Logits of every kind (ties, signed zeros, infinities), lengths around the lanes.
    fn logits(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 11 {
                0 => 3.5,
                1 => -0.0,
                2 => 0.0,
                3 => f32::NEG_INFINITY,
                _ => ((i * 7919 % 1000) as f32 / 100.0) - 6.0,
            })
            .collect()
    }

    /// Keys in logit order then id, the best key the first of the largest logit; weights each
    /// the exp of its logit, summed; the same bits at every SIMD level the CPU has.
    #[test]
    fn keys_and_weights_of_the_vocabulary() {
        for n in [0, 1, 7, 8, 9, 64, 1001] {
            let l = logits(n);
            let mut keys = Vec::new();
            let best = rank_keys(&mut keys, &l);
            assert_eq!(keys.len(), n);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            assert_eq!(sorted.iter().map(|&k| id(k)).collect::<Vec<_>>(), order);
            assert_eq!(best, sorted.first().copied());
            if n == 0 {
                continue;
            }
            let max = l[id(best.unwrap())] as f64;
            let mut w = vec![f64::NAN; n];
            let total = exp_weights(&mut w, &l, max, 0.7);
            for (i, (&w, &x)) in w.iter().zip(&l).enumerate() {
                let want = ((x as f64 - max) / 0.7).exp();
                assert!((w - want).abs() <= 4e-16 * want, "{i}: {w} vs {want}");
            }
            let sum: f64 = w.iter().sum();
            assert!((total - sum).abs() <= 1e-12 * sum, "{total} vs {sum}");
        }
        // The widest SIMD level this CPU runs gives the bits of the same arithmetic one value
        // at a time.
        let l = logits(1001);
        let mut keys = Vec::new();
        let max = l[id(rank_keys(&mut keys, &l).unwrap())] as f64;
        let mut w = vec![0.0; l.len()];
        let total = exp_weights(&mut w, &l, max, 0.7);
        let mut lanes = [0f64; LANES];
        for (i, (&w, &x)) in w.iter().zip(&l).enumerate() {
            let one = std::hint::black_box(exp_nonpositive((x as f64 - max) / 0.7));
            assert_eq!(w.to_bits(), one.to_bits(), "{i}");
            lanes[i % LANES] += one;
        }
        let sum = lanes.iter().fold(0.0, |sum, &v| sum + v);
        assert_eq!(total.to_bits(), sum.to_bits());
    }
}
