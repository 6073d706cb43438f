#!/usr/bin/env bash
# Creates (once) the virtualenv with the parity tests' reference implementations and prints its path.
# The venv lives at a fixed path ($LMKIT_VENV, default ~/.cache/lmkit/venv) and is reused while
# tests/parity/requirements.txt is unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LMKIT_VENV:-$HOME/.cache/lmkit/venv}"
req="$root/tests/parity/requirements.txt"
stamp="$venv/.lmkit-requirements.sha256"
# llama-cpp-python builds llama.cpp from source. Its default native build compiles ggml's AMX
# kernels on CPUs that report AMX, and those crash in llama_decode on some virtual machines (seen on
# a Xeon with amx_int8 under a hypervisor): build for the vector extensions the CPU has, AMX off.
llama_flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case "$cpu_flags" in *" ${f%%:*} "*) llama_flags="$llama_flags -DGGML_${f##*:}=ON" ;; esac
  done
fi
want="$( (cat "$req"; echo "$llama_flags") | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$venv"
  exit 0
fi
echo "setting up Python reference environment in $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --upgrade pip >&2
# llama-cpp-python first, built with those flags (not a wheel cached from another build).
llama_req="$(grep -m1 '^llama-cpp-python==' "$req")"
CMAKE_ARGS="$llama_flags" "$venv/bin/python" -m pip install -q --no-cache-dir --force-reinstall \
  --no-deps "$llama_req" >&2
"$venv/bin/python" -m pip install -q -r "$req" >&2
echo "$want" > "$stamp"
echo "$venv"
