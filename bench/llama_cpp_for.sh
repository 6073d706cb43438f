#!/usr/bin/env bash
# llama.cpp built for a narrower CPU than this one, to compare lmkit's kernels for that CPU
# (LMKIT_SIMD, LMKIT_AVX_VNNI) with llama.cpp's on the same machine: the llama-cpp-python
# version the parity venv pins, built once into ~/.cache/lmkit/llama-cpp-<target> (a few
# minutes on 2 cores). Prints the directory of its libraries; llama-cpp-python loads those
# instead of its own where LLAMA_CPP_LIB_PATH names it.
#
# usage: bash bench/llama_cpp_for.sh avx2|avx-vnni
#   e.g. LMKIT_SIMD=avx2 LMKIT_AVX_VNNI=0 LLAMA_CPP_LIB_PATH=$(bash bench/llama_cpp_for.sh avx2) \
#          ~/.cache/lmkit/venv/bin/python bench/real_model_bench.py --k-quant --no-transformers
#   (avx2: AVX2, FMA, F16C, no AVX-512, as Zen 3 or Haswell; avx-vnni: and AVX-VNNI, as Alder
#   Lake; with LMKIT_SIMD=avx2 and without LMKIT_AVX_VNNI=0 for lmkit)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-}"
common="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
common="$common -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
common="$common -DGGML_AVX512=OFF"
case "$target" in
  avx2) flags="$common -DGGML_AVX_VNNI=OFF" ;;
  avx-vnni) flags="$common -DGGML_AVX_VNNI=ON" ;;
  *) echo "usage: bash bench/llama_cpp_for.sh avx2|avx-vnni" >&2; exit 2 ;;
esac
venv="$(bash "$root/scripts/setup-python.sh")"
version="$(grep -m1 '^llama-cpp-python==' "$root/tests/parity/requirements.txt")"
dir="$HOME/.cache/lmkit/llama-cpp-$target"
want="$(echo "$version $flags" | sha256sum | cut -d' ' -f1)"
lib="$dir/pkg/llama_cpp/lib"
if [ "$(cat "$dir/stamp" 2>/dev/null)" != "$want" ] || [ ! -d "$lib" ]; then
  echo "building $version for $target into $dir (a few minutes)" >&2
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  CMAKE_ARGS="$flags" "$venv/bin/python" -m pip install -q --no-cache-dir --no-deps \
    --target "$dir.tmp/pkg" "$version" >&2
  echo "$want" > "$dir.tmp/stamp"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
fi
echo "$lib"
