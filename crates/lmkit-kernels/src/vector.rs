//! Dot products of f32 vectors for nearest-neighbour search: one pair ([`dot`]) or one query
//! against many rows ([`dots`]), with AVX2 + FMA where the CPU has them.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use crate::few_rows::{load8, WeightValue};
    use std::arch::x86_64::*;

    /// Σ xᵢ·yᵢ, 16 values per step in two FMA chains; `y` f32, or a half type widened in
    /// registers (a bf16 or f16 KV cache's keys: [`crate::attend`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn dot<W: WeightValue>(x: &[f32], y: &[W]) -> f32 {
        let n = x.len().min(y.len());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 ≤ n, the length of both slices.
            unsafe {
                a0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    load8(y.as_ptr().add(i)),
                    a0,
                );
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                    load8(y.as_ptr().add(i + 8)),
                    a1,
                );
            }
            i += 16;
        }
        let a = _mm256_add_ps(a0, a1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let mut s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
        for j in i..n {
            s += x[j] * y[j].widen();
        }
        s
    }

    /// Σ xᵢ·yᵢ, 32 values per step in four FMA chains (for long rows, where two chains leave
    /// the adder waiting on its own latency).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot4(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in a.iter_mut().enumerate() {
                // SAFETY: i + 32 ≤ n, the length of both slices.
                *acc = unsafe {
                    _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(i + 8 * k)),
                        _mm256_loadu_ps(yp.add(i + 8 * k)),
                        *acc,
                    )
                };
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let head = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
        head + dot(&x[i..n], &y[i..n])
    }

    /// [`super::dots`] with AVX2 and FMA.
    /// q · each of four rows, the rows read side by side (four streams of loads in flight
    /// where one dot product after another waits on each row in turn), 16 values per step in
    /// two FMA chains per row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_rows4(q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
        let n = rows.iter().fold(q.len(), |n, r| n.min(r.len()));
        let qp = q.as_ptr();
        let rp = rows.map(|r| r.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= n {
            for h in 0..2 {
                // SAFETY: i + 16 ≤ n, within q and every row.
                let x = unsafe { _mm256_loadu_ps(qp.add(i + 8 * h)) };
                for (a, p) in acc.iter_mut().zip(rp) {
                    // SAFETY: as above.
                    a[h] = unsafe { _mm256_fmadd_ps(x, _mm256_loadu_ps(p.add(i + 8 * h)), a[h]) };
                }
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for ((o, a), r) in out.iter_mut().zip(acc).zip(rows) {
            let s = _mm256_add_ps(a[0], a[1]);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            *o = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
            for j in i..n {
                *o += q[j] * r[j];
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
        let d = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            crate::simd::prefetch(rows.as_ptr().wrapping_add((j + 4) * d));
            *o = dot(q, &rows[j * d..(j + 1) * d]);
        }
    }
}

/// Σ xᵢ·yᵢ over the shorter of the two.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 {
        // SAFETY: simd_level checked that the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::dot4(x, y) };
    }
    dot_scalar(x, y)
}

/// q · each of four rows (over the shortest length), the four read side by side.
#[inline]
pub fn dot_rows4(q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 {
        // SAFETY: simd_level checked that the CPU has AVX2 and FMA.
        return unsafe { avx2::dot_rows4(q, rows) };
    }
    rows.map(|r| dot_scalar(q, r))
}

/// Σ xᵢ·yᵢ in eight lanes (so that the baseline build vectorises it too).
fn dot_scalar(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [0f32; 8];
    let (xc, yc) = (x[..n].chunks_exact(8), y[..n].chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + xr.iter().zip(yr).map(|(a, b)| a * b).sum::<f32>()
}

/// `out[j]` ← q · row j, for rows of `q.len()` values laid end to end in `rows`.
/// Panics if `rows` holds fewer than `out.len()` rows.
pub fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = q.len();
    assert!(rows.len() >= out.len() * d, "dots: rows too short");
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_level() >= 1 {
        // SAFETY: simd_level checked that the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::dots(q, rows, out) };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_scalar(q, &rows[j * d..(j + 1) * d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_products_match_a_plain_sum() {
        for n in [0usize, 1, 7, 16, 33, 100, 384] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((dot(&x, &y) as f64 - want).abs() < 1e-4, "n={n}");
            // Four rows side by side: each its own product (rows of different lengths: the
            // shortest counts).
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| y.iter().map(|v| v * (r as f32 + 1.0) - r as f32).collect())
                .collect();
            let got = dot_rows4(&x, [&rows[0], &rows[1], &rows[2], &rows[3]]);
            for (r, g) in rows.iter().zip(got) {
                let want: f64 = x.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((g as f64 - want).abs() < 1e-3, "n={n}: {g} vs {want}");
            }
            assert!((dot_scalar(&x, &y) as f64 - want).abs() < 1e-4, "n={n}");
            let rows: Vec<f32> = x.iter().chain(&y).copied().collect();
            let mut out = [0f32; 2];
            if n > 0 {
                dots(&x, &rows, &mut out);
                assert!((out[1] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
