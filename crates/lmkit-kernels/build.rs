//! With the `cuda` feature, compiles the CUDA kernels of `src/cuda/` (one PTX module per file)
//! with nvcc (found as
//! candle's build finds it: `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME` or the PATH) for the compute
//! capability in `CUDA_COMPUTE_CAP` (default 80); newer GPUs compile the PTX when it is loaded.
//! With `cuda-emu` (and not `cuda`), compiles the same kernels against the CPU emulation
//! (`src/cuda/emulated.cpp`, `src/cuda/emu.h`) with the system's C++20 compiler instead.

use std::path::PathBuf;
use std::process::Command;

/// The kernel files: src/cuda/NAME.cu becomes NAME.ptx in OUT_DIR.
const SOURCES: [&str; 2] = ["train", "attention"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for file in SOURCES {
        println!("cargo::rerun-if-changed=src/cuda/{file}.cu");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        #[cfg(feature = "cuda-emu")]
        emulation();
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().replace('.', ""))
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
        .unwrap_or_else(|| "80".into());
    for file in SOURCES {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(out.join(format!("{file}.ptx")))
            .arg(format!("src/cuda/{file}.cu"))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (the cuda feature needs the CUDA toolkit)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on src/cuda/{file}.cu");
    }
}

/// The kernels on the CPU for the `cuda-emu` feature: a static library of `emulated.cpp`.
#[cfg(feature = "cuda-emu")]
fn emulation() {
    for file in ["emulated.cpp", "emu.h"] {
        println!("cargo::rerun-if-changed=src/cuda/{file}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("src/cuda/emulated.cpp")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .compile("lmkit_cuda_emu");
}
