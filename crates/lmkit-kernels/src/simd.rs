//! Run-time SIMD dispatch: the build targets baseline x86-64, and [`simd_versions!`] compiles a
//! kernel body again for AVX-512 and AVX2 + FMA and runs the widest this CPU has.

/// Which vector instructions the elementwise kernels may use: 2 = AVX-512, 1 = AVX2 with FMA,
/// 0 = the build's baseline (SSE2 on x86-64: 4 floats per instruction).
#[cfg(target_arch = "x86_64")]
pub fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            2
        } else if has!("avx2") && has!("fma") {
            1
        } else {
            0
        }
    })
}

/// Asks the CPU to bring the cache line at `p` into cache: a hint that never faults, so `p` may
/// point anywhere (past the end of a buffer included).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch accesses no memory as far as the program is concerned: any address is
    // allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Defines `fn name<T: Bound>(args)` (or `fn name(args)`) whose body is compiled three times —
/// for AVX-512, for AVX2 with FMA, and for the baseline — and picks the widest this CPU runs. The build targets
/// baseline x86-64, where these loops vectorise 4 floats wide; compiled inside the wider
/// versions, the same loops run 8 or 16 wide.
macro_rules! simd_versions {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$t:ident: $b:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$t: $b>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner $(<$t: $b>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v512 $(<$t: $b>)? ($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v256 $(<$t: $b>)? ($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                match $crate::simd::simd_level() {
                    // SAFETY: simd_level checked that the CPU has these features.
                    2 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    1 => return unsafe { v256($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use simd_versions;
