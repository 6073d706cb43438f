#!/usr/bin/env bash
# Builds lmkit with `--features cuda` on a machine without a CUDA toolkit installed: nvcc, the
# CUDA headers and libcudart come from NVIDIA's PyPI packages into ~/.cache/lmkit/cuda-tools (no
# GPU is needed to build). With a system toolkit (nvcc on the PATH or CUDA_ROOT), that one is used.
#   bash scripts/build-cuda.sh                 # → target-cuda/release/lmkit
#   CUDA_COMPUTE_CAP=90 bash scripts/build-cuda.sh   # the GPU it will run on (90: H100/H200)
#   bash scripts/build-cuda.sh --tests         # also the test executables with the GPU tests
#                                              # (for bench/gpu_check.sh's LMKIT_GPU_TESTS)
# The binary links libcuda (the driver), libcublas(Lt), libcurand, libnvrtc and libcudart; where
# the toolkit's libraries are not installed, it links against generated stand-ins with the same
# names (the real ones are found at run time: the driver's libcuda, and the CUDA toolkit's or
# PyTorch's pip packages' lib directories on LD_LIBRARY_PATH).
set -euo pipefail
mode="${1:-}"
here="$(cd "$(dirname "$0")/.." && pwd)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
if [ -z "${CUDA_ROOT:-}" ] && ! command -v nvcc >/dev/null; then
  tools="${LMKIT_CUDA_TOOLS:-$HOME/.cache/lmkit/cuda-tools}"
  if [ ! -x "$tools/bin/pip" ]; then
    echo "setting up nvcc from PyPI in $tools"
    python3 -m venv "$tools"
  fi
  "$tools/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  root="$(echo "$tools"/lib/python3*/site-packages/nvidia/cu13)"
  ln -sf libcudart.so.13 "$root/lib/libcudart.so"
  export CUDA_ROOT="$root"
fi
cd "$here"
if ! ldconfig -p 2>/dev/null | grep -q "libcublas.so " && [ ! -e "${CUDA_ROOT:-/nonexistent}/lib64/libcublas.so" ]; then
  # Link-time stand-ins for the libraries cudarc links, one empty function per name it declares.
  stubs="${LMKIT_CUDA_TOOLS:-$HOME/.cache/lmkit/cuda-tools}/stubs"
  mkdir -p "$stubs"
  cargo fetch --locked >/dev/null
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)/src"
  for spec in "cuda 1 driver" "nvrtc 13 nvrtc" "curand 10 curand" "cublas 13 cublas" "cublasLt 13 cublaslt"; do
    set -- $spec
    grep -ohE "^\s+(pub )?fn (cu|nvrtc|curand|cublas)[A-Za-z0-9_]*\(" "$src/$3"/sys/*.rs |
      sed -E 's/.*fn ([A-Za-z0-9_]+)\(/\1/' | sort -u | awk '{print "void "$1"(void){}"}' > "$stubs/$1.c"
    cc -shared -fPIC -o "$stubs/lib$1.so" -Wl,-soname,"lib$1.so.$2" "$stubs/$1.c"
  done
  export LIBRARY_PATH="$stubs:${LIBRARY_PATH:-}"
fi
if [ -n "${CUDA_ROOT:-}" ]; then
  export PATH="$CUDA_ROOT/bin:$PATH" CUDA_PATH="$CUDA_ROOT"
  export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LIBRARY_PATH:-}"
fi
target="${CARGO_TARGET_DIR:-$here/target-cuda}"
cargo build --release --locked -p lmkit-cli --features cuda --target-dir "$target"
echo "built $target/release/lmkit (compute capability $CUDA_COMPUTE_CAP)"
if [ "$mode" = "--tests" ]; then
  # lmkit-kernels' and lmkit-train's unit tests, and lmkit-models' decoding steps on the GPU.
  cargo test --release --locked -p lmkit-train -p lmkit-kernels -p lmkit-models \
    --features lmkit-train/cuda,lmkit-kernels/cuda,lmkit-models/cuda \
    --target-dir "$target" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if (t["kind"] == ["lib"] and t["name"] != "lmkit_models") or t["name"] == "gpu_decode":
        print(m["executable"])' > "$target/gpu-tests.txt"
  echo "test executables with GPU tests (listed in $target/gpu-tests.txt):"
  cat "$target/gpu-tests.txt"
fi
