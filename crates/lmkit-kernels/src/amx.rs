//! bf16 · bf16 products on Intel's AMX tiles (Sapphire Rapids on): `tdpbf16ps` multiplies a
//! 16 × 32 bf16 tile by a 32 × 16 one (stored as 16 rows of pairs) into a 16 × 16 f32 tile, a
//! whole block of a product per instruction. A model loaded in bf16 multiplies its prompts' rows
//! by its weights this way: each task packs its columns of the weight once in the tiles' pair
//! layout and passes every block of 32 input rows by them, four f32 tiles (32 × 32 sums) held in
//! the tile registers over the whole depth.
//!
//! The sums are f32, as the widened product's; the instruction treats subnormal bf16 inputs as
//! zero and adds each pair's products in its own order, so a sum may differ from the widened
//! one's in its last bits (the one rounding to bf16 after hides nearly all of that).

use half::bf16;

/// Rows and columns of a block of sums (2 × 2 tiles of 16 × 16), and the depth of a tile.
const BLOCK: usize = 32;

/// Whether this CPU has AMX with bf16 and the kernel lets this process use its tile data
/// (asked once), and lmkit's vector instructions are not capped below AVX-512 (`LMKIT_SIMD`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        crate::simd::simd_level() >= 2 && *AMX.get_or_init(x86::enable)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The f32 sums x [m, k] · w [n, k]ᵀ in rows of `n.next_multiple_of(32)` (the sums of the
/// padding columns zero), for m rows; `None` where [`available`] is false. Tasks of `width`
/// weight rows (a multiple of 32) over rayon's threads.
pub fn product(
    x: &[bf16],
    w: &[bf16],
    (m, n, k): (usize, usize, usize),
    width: usize,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if !available()
        || x.len() < m * k
        || w.len() < n * k
        || !width.is_multiple_of(BLOCK)
        || m * n * k == 0
    {
        return None;
    }
    let (mp, np, kp) = (
        m.next_multiple_of(BLOCK),
        n.next_multiple_of(BLOCK),
        k.next_multiple_of(BLOCK),
    );
    // x's rows padded with zeros to whole tiles: mp rows of kp values.
    let mut xa = vec![bf16::ZERO; mp * kp];
    xa.par_chunks_mut(kp)
        .zip(x[..m * k].par_chunks(k))
        .for_each(|(d, s)| d[..k].copy_from_slice(s));
    let mut sums = vec![0f32; mp * np];
    let dst = crate::blas::SharedOut(sums.as_mut_ptr());
    let xa = &xa;
    (0..np.div_ceil(width))
        .into_par_iter()
        .for_each_init(Vec::new, |packed: &mut Vec<u32>, t| {
            let (j0, nb) = (t * width, width.min(np - t * width));
            pack(w, (n, k, kp), j0..j0 + nb, packed);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` checked the CPU and the permission; `xa` holds mp rows of kp
            // values, `packed` nb/16 groups of kp/2 rows of 64 bytes; the sums' rows of np
            // values hold columns j0 .. j0 + nb of every block of rows, which no other task
            // writes.
            unsafe {
                x86::blocks(
                    xa.as_ptr().cast(),
                    (mp, kp),
                    packed.as_ptr(),
                    nb,
                    dst.at(j0),
                    np,
                )
            };
        });
    Some(sums)
}

/// Packs columns `cols` of op(w) = wᵀ (rows of w, padded with zero rows past n and zero values
/// past k up to kp) in the tiles' pair layout: a group of 16 columns holds, for each pair p of
/// the depth, the 16 columns' values 2p and 2p + 1 (32 bits each, 64 bytes).
fn pack(
    w: &[bf16],
    (n, k, kp): (usize, usize, usize),
    cols: std::ops::Range<usize>,
    out: &mut Vec<u32>,
) {
    let pairs = kp / 2;
    out.clear();
    out.resize(cols.len() * pairs, 0);
    for (g, group) in out.chunks_exact_mut(16 * pairs).enumerate() {
        let j0 = cols.start + g * 16;
        for (c, j) in (j0..n.min(j0 + 16)).enumerate() {
            // Row by row: each read in order, the writes 64 bytes apart within the group.
            let row = &w[j * k..(j + 1) * k];
            let mut at = c;
            for two in row.chunks_exact(2) {
                group[at] = u32::from(two[0].to_bits()) | u32::from(two[1].to_bits()) << 16;
                at += 16;
            }
            if let [.., last] = row {
                if k % 2 == 1 {
                    group[at] = u32::from(last.to_bits());
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::asm;

    /// The tile configuration (palette 1): tiles 0–3 the sums (16 rows of 16 f32), 4–5 the
    /// input's rows (16 rows of 32 bf16), 6–7 the weight's pairs (16 rows of 16 pairs).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// AMX-TILE and AMX-BF16 in CPUID, and the kernel's permission for this process to use the
    /// tile data (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
    pub(super) fn enable() -> bool {
        if std::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; it changes nothing else.
        tile && bf16
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    }

    /// Sums[i, j0 + c] for every row block of the input and the task's `nb` columns (see
    /// [`super::product`]).
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and this process its permission; `xa` holds `mp` rows of `kp`
    /// values (both multiples of 32); `packed` nb / 16 groups of kp / 2 rows of 16 pairs;
    /// `sums` rows `ld` f32 apart, each with nb writable values from it, for mp rows.
    pub(super) unsafe fn blocks(
        xa: *const u16,
        (mp, kp): (usize, usize),
        packed: *const u32,
        nb: usize,
        sums: *mut f32,
        ld: usize,
    ) {
        let (a_stride, c_stride) = (kp * 2, ld * 4);
        // u32 pairs per group of 16 columns.
        let group = 8 * kp;
        // SAFETY: the configuration is valid (palette 1, rows of 64 bytes).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        for i0 in (0..mp).step_by(BLOCK) {
            for j in (0..nb).step_by(BLOCK) {
                let a = xa.wrapping_add(i0 * kp);
                let b = packed.wrapping_add((j / 16) * group);
                let c = sums.wrapping_add(i0 * ld + j);
                // SAFETY: each load reads 16 rows of 64 bytes within `xa` (rows i0 .. i0 + 32,
                // values kk .. kk + 32) or a group of `packed` (pair rows kk/2 .. kk/2 + 16, 16
                // pairs each); each store writes 16 rows of 16 f32 within the block's sums.
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for kk in (0..kp).step_by(BLOCK) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {sa}*1]",
                            "tileloadd tmm5, [{a1} + {sa}*1]",
                            "tileloadd tmm6, [{b0} + {sb}*1]",
                            "tileloadd tmm7, [{b1} + {sb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a.add(kk),
                            a1 = in(reg) a.add(16 * kp + kk),
                            b0 = in(reg) b.add(kk * 8),
                            b1 = in(reg) b.add(group + kk * 8),
                            sa = in(reg) a_stride,
                            sb = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                    asm!(
                        "tilestored [{c00} + {sc}*1], tmm0",
                        "tilestored [{c01} + {sc}*1], tmm1",
                        "tilestored [{c10} + {sc}*1], tmm2",
                        "tilestored [{c11} + {sc}*1], tmm3",
                        c00 = in(reg) c,
                        c01 = in(reg) c.add(16),
                        c10 = in(reg) c.add(16 * ld),
                        c11 = in(reg) c.add(16 * ld + 16),
                        sc = in(reg) c_stride,
                        options(nostack),
                    );
                }
            }
        }
        // SAFETY: releases the tile state this function configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile products equal the f64 product of the same values within f32 accumulation, for
    /// shapes with partial tiles in every dimension, several row blocks and several tasks.
    #[test]
    fn tile_products_equal_the_widened_product() {
        if !available() {
            eprintln!("skipped: this CPU (or kernel) gives no AMX-BF16");
            return;
        }
        let mut seed = 7u64;
        let mut draw = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0)
        };
        for (m, n, k, width) in [
            (1, 1, 1, 32),
            (13, 70, 45, 32),
            (70, 130, 388, 64),
            (40, 33, 6, 96),
        ] {
            let x: Vec<bf16> = (0..m * k).map(|_| draw()).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| draw()).collect();
            let got = product(&x, &w, (m, n, k), width).expect("taken");
            let ld = n.next_multiple_of(BLOCK);
            assert_eq!(got.len(), m.next_multiple_of(BLOCK) * ld);
            for i in 0..m {
                for j in 0..ld {
                    let (want, size) = (0..k).fold((0f64, 0f64), |(s, a), p| {
                        if j >= n {
                            return (s, a);
                        }
                        let v = f64::from(x[i * k + p].to_f32()) * f64::from(w[j * k + p].to_f32());
                        (s + v, a + v.abs())
                    });
                    let err = (f64::from(got[i * ld + j]) - want).abs();
                    assert!(err <= 1e-6 * size.max(1.0), "{m}x{n}x{k}: ({i}, {j}) {err}");
                }
            }
        }
    }
}
