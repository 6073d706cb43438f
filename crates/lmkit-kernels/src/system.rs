//! Process-level set-up for tensor work, and memory-mapped checkpoint weights.

use candle_core::{DType, Device};
use std::path::PathBuf;

/// Tensor code allocates and frees large temporaries at every op. By default glibc hands freed
/// memory back to the kernel, so each reuse page-faults and the kernel zeroes it again (a third
/// of training time in profiles). Keeping freed memory in the process measured ~10-25% faster
/// training. Call once at start-up, before other threads exist.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs it before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Hands the allocator's free memory back to the kernel. [`tune_allocator`] keeps freed memory
/// in the process (tensor code reuses it at once); a pass that frees large tables and then
/// builds others calls this between the two, so the freed ones stop counting in its memory.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets the records `range` of `buf` to zeros and hands the memory pages lying wholly inside them
/// back to the kernel (read again, they come back zeroed): the part of a large buffer that has
/// been consumed stops counting in the process's memory before the buffer itself is freed.
// A Vec, not any slice: its memory is the global allocator's, which the SAFETY note relies on.
#[allow(clippy::ptr_arg)]
pub fn release<const N: usize>(buf: &mut Vec<[u32; N]>, range: std::ops::Range<usize>) {
    const PAGE: usize = 4096;
    let data = buf[range].as_flattened_mut();
    let start = data.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(data);
    let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
    if cfg!(not(target_os = "linux")) || first >= last {
        data.fill(0);
        return;
    }
    // The values before the first whole page and after the last one are zeroed by hand.
    let (len, head, tail) = (data.len(), (first - start) / 4, (end - last) / 4);
    data[..head].fill(0);
    data[len - tail..].fill(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: [first, last) lies inside the records borrowed mutably here, memory of a
        // Vec: the global allocator's (the system malloc), which backs it with its heap or an
        // anonymous private mapping. After MADV_DONTNEED such pages read as zero-filled, and
        // zeros are valid u32 values: the same state `fill(0)` gives.
        let done = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            )
        };
        if done != 0 {
            data[head..len - tail].fill(0);
        }
    }
}

/// Safetensors files mapped once: checked for non-finite values, then read by a `VarBuilder`.
pub struct MappedWeights(candle_core::safetensors::MmapedSafetensors);

impl MappedWeights {
    /// Maps `files` (a tensor in several files: the last one's).
    pub fn open(files: &[PathBuf]) -> candle_core::Result<MappedWeights> {
        // SAFETY: the files are mapped read-only; they must not change while the model is
        // loaded (lmkit replaces checkpoints by atomic rename, never rewriting them in place).
        Ok(MappedWeights(unsafe {
            candle_core::safetensors::MmapedSafetensors::multi(files)
        }?))
    }

    /// The first tensor (by name) holding a NaN or an infinity, if any: a model loaded from
    /// such weights would give NaN logits with no hint why. Float tensors are checked by their
    /// exponent bits, in parallel.
    pub fn non_finite_tensor(&self) -> Option<String> {
        use rayon::prelude::*;
        use safetensors::Dtype;
        let mut views = self.0.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        views.into_iter().find_map(|(name, view)| {
            // (bytes per value, exponent mask): all exponent bits set is NaN or ±infinity.
            let (width, mask): (usize, u64) = match view.dtype() {
                Dtype::F64 => (8, 0x7FF0_0000_0000_0000),
                Dtype::F32 => (4, 0x7F80_0000),
                Dtype::F16 => (2, 0x7C00),
                Dtype::BF16 => (2, 0x7F80),
                _ => return None,
            };
            // Blocks are scanned whole (no early exit inside one), which lets the compiler
            // compare many values at once.
            fn scan<const W: usize>(data: &[u8], mask: u64) -> bool {
                data.par_chunks(W * 4096).any(|block| {
                    block.chunks_exact(W).fold(false, |bad, b| {
                        let mut v = [0u8; 8];
                        v[..W].copy_from_slice(b);
                        bad | (u64::from_le_bytes(v) & mask == mask)
                    })
                })
            }
            let data = view.data();
            let bad = match width {
                8 => scan::<8>(data, mask),
                4 => scan::<4>(data, mask),
                _ => scan::<2>(data, mask),
            };
            bad.then_some(name)
        })
    }

    /// The names of the mapped tensors.
    pub fn tensor_names(&self) -> Vec<String> {
        self.0.tensors().into_iter().map(|(name, _)| name).collect()
    }

    /// A variable source over the mapped tensors, as `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The tensors as a variable source of candle-nn.
    pub fn into_backend(self) -> Box<dyn candle_nn::var_builder::SimpleBackend> {
        Box::new(self)
    }
}

/// As candle-nn's source over mapped safetensors, except that a tensor stored in f32 and read
/// in a half type on the CPU (or the other way: a bf16 checkpoint read in f32) is converted in
/// parallel tiles ([`crate::half_ops::convert`]) instead of by candle's one-thread loop (9% of
/// the CPU samples of `lmkit generate --dtype bf16` on a 512-token prompt of SmolLM2-135M; the
/// whole command's time moved within its noise, ≈ 0.55 s either way).
impl candle_nn::var_builder::SimpleBackend for MappedWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt())?
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = self.0.load(name, dev)?;
        if t.dtype() == dtype {
            return Ok(t);
        }
        match crate::half_ops::convert(&t, dtype)? {
            Some(converted) => Ok(converted),
            None => t.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn released_records_read_as_zeros_and_the_others_keep_their_values() {
        let mut buf: Vec<[u32; 5]> = (0..100_000u32)
            .map(|i| [i, i + 1, i + 2, i + 3, 7])
            .collect();
        super::release(&mut buf, 1_003..61_007);
        for (i, r) in buf.iter().enumerate() {
            let i = i as u32;
            if (1_003..61_007).contains(&i) {
                assert_eq!(*r, [0; 5], "record {i}");
            } else {
                assert_eq!(*r, [i, i + 1, i + 2, i + 3, 7], "record {i}");
            }
        }
        // The released pages can be written again.
        buf[2_000] = [1; 5];
        assert_eq!(buf[2_000], [1; 5]);
        super::release(&mut buf, 5..5);
    }

    /// Mapped tensors read in another type equal candle's conversion (f32 → bf16, f16; bf16 →
    /// f32), in the type stored as they are, and a wrong shape is refused naming the tensor.
    #[test]
    fn mapped_weights_convert_as_candle_does() {
        use candle_core::{DType, Device, Tensor};
        use candle_nn::var_builder::SimpleBackend;
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("lmkit-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        let a = Tensor::randn(0f32, 3.0, (70, 300), &dev).unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        let tensors = std::collections::HashMap::from([
            ("a".to_string(), a.clone()),
            ("b".into(), b.clone()),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let w = super::MappedWeights::open(std::slice::from_ref(&path)).unwrap();
        for (name, stored) in [("a", &a), ("b", &b)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let got = w
                    .get(
                        (70, 300).into(),
                        name,
                        candle_nn::Init::Const(0.0),
                        dtype,
                        &dev,
                    )
                    .unwrap();
                assert_eq!(got.dtype(), dtype);
                assert_eq!(
                    crate::testing::values(&got),
                    crate::testing::values(&stored.to_dtype(dtype).unwrap()),
                    "{name} as {dtype:?}"
                );
            }
        }
        let e = w
            .get(
                (300, 70).into(),
                "a",
                candle_nn::Init::Const(0.0),
                DType::BF16,
                &dev,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape mismatch for a"), "{e}");
        assert!(w.contains_tensor("b") && !w.contains_tensor("c"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
