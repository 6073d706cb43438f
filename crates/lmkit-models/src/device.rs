//! Choosing where tensors live: `cpu` (the default), `cuda` or `cuda:N`.

use crate::error::{ModelError, Result};
use candle_core::{DType, Device};

/// The number of GPUs this lmkit can use: `None` in a build without CUDA, 0 where the driver
/// finds none (or none loads).
pub fn cuda_device_count() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        Some(CudaContext::device_count().map_or(0, |n| n.max(0) as usize))
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Bytes `device` can still give to new allocations: the GPU's free memory, or on the CPU the
/// memory available without swapping; `None` where it cannot be read.
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => lmkit_core::memory::available(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, _total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        _ => None,
    }
}

/// Parses a device name as the command line and run configs write it.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        _ => match s.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                ModelError::Device(format!(
                    "`{spec}`: the GPU number after `cuda:` must be a whole number, e.g. cuda:0"
                ))
            })?,
            None => {
                return Err(ModelError::Device(format!(
                    "unknown device `{spec}` (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Device(format!(
            "`{spec}`: this lmkit was built without CUDA support; rebuild it with \
             `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use cpu"
        )));
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Device(format!(
            "`{spec}`: could not open the GPU: {}",
            e.to_string().lines().next().unwrap_or_default()
        ))
    })?;
    #[cfg(feature = "cuda")]
    lmkit_kernels::cuda::prepare_device(&device);
    Ok(device)
}

/// Parses the type a model's weights and activations are kept in for inference: `f32` (the
/// default), `bf16` or `f16` (half the memory; the norms and softmax compute in f32, as
/// transformers does with a model loaded in that type).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(ModelError::Device(format!(
            "unknown dtype `{spec}` (expected f32, bf16 or f16)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_bad_ones() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        let e = parse_dtype("fp8").unwrap_err().to_string();
        assert!(e.contains("unknown dtype `fp8`"), "{e}");
    }
}
