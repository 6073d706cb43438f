//! Run-time SIMD dispatch: the build targets baseline x86-64, and [`simd_versions!`] compiles a
//! kernel body again for AVX-512 and AVX2 + FMA and runs the widest this CPU has.

/// Which vector instructions the kernels may use: 2 = AVX-512, 1 = AVX2 with FMA, 0 = the
/// build's baseline (SSE2 on x86-64: 4 floats per instruction). Levels 1 and 2 also mean F16C
/// (every CPU with AVX2 has it), with which kernels widen f16 values as they load them. The widest the CPU has, unless
/// `LMKIT_SIMD` (`avx512`, `avx2` or `baseline`) caps it — to run as on an older CPU.
#[cfg(target_arch = "x86_64")]
pub fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        let f16c = has!("f16c");
        let detected = if f16c
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
        {
            2
        } else if f16c && has!("avx2") && has!("fma") {
            1
        } else {
            0
        };
        match std::env::var("LMKIT_SIMD") {
            Err(_) => detected,
            Ok(v) if v.trim().is_empty() => detected,
            Ok(v) => match simd_cap(&v) {
                Some(cap) => detected.min(cap),
                None => {
                    eprintln!(
                        "warning: LMKIT_SIMD={v:?} is not one of avx512, avx2, baseline: ignored"
                    );
                    detected
                }
            },
        }
    })
}

/// The level an `LMKIT_SIMD` value names.
pub fn simd_cap(value: &str) -> Option<u8> {
    match value.trim().to_ascii_lowercase().as_str() {
        "avx512" | "avx-512" => Some(2),
        "avx2" => Some(1),
        "baseline" | "sse2" | "none" => Some(0),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn simd_caps_are_named_as_documented() {
        use super::simd_cap;
        assert_eq!(simd_cap("avx512"), Some(2));
        assert_eq!(simd_cap(" AVX2 "), Some(1));
        assert_eq!(simd_cap("baseline"), Some(0));
        assert_eq!(simd_cap("avx3"), None);
        assert_eq!(simd_cap(""), None);
    }
}
