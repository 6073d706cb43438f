#!/usr/bin/env bash
# Runs the whole test suite: Rust unit + integration tests, then the parity tests against the
# reference implementations (KenLM, ...) in a Python virtualenv that this script sets up once,
# and the hostile-input suite (tests/hostile: bad input under a memory cap).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-system.sh --tests
# The system BLAS is installed now: its tests must run, not skip.
export LMKIT_REQUIRE_BLAS="${LMKIT_REQUIRE_BLAS:-1}"
venv="$(bash scripts/setup-python.sh)"
# NCCL as PyTorch's wheel ships it: its loading and communicator ids are tested without a GPU.
export LMKIT_NCCL="${LMKIT_NCCL:-$("$venv/bin/python" -c 'import glob, sysconfig
print(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/nccl/lib/libnccl.so.2")[0])')}"
export LMKIT_REQUIRE_NCCL="${LMKIT_REQUIRE_NCCL:-1}"
# KenLM's lmplz/build_binary/query, built once from the kenlm source package.
export LMKIT_KENLM_BIN="${LMKIT_KENLM_BIN:-$(bash scripts/setup-kenlm.sh)}"
# The tests include the GPU passes and the CUDA kernels on lmkit-kernels' emulated GPU (feature
# cuda-emu: the kernels' source compiled for the CPU, no GPU or CUDA toolkit needed; only tests
# use it), held to the autograd graph. One feature set for every build below, so the workspace
# is compiled once.
emu=(--features lmkit-kernels/cuda-emu,lmkit-models/cuda-emu,lmkit-train/cuda-emu,lmkit-infer/cuda-emu)
cargo build --release --locked --workspace "${emu[@]}"
cargo test --release --locked --workspace "${emu[@]}"
# The kernels and the hand-written training passes once more on lmkit's built-in matrix product
# (what runs where no BLAS library is installed); same test binaries, filtered.
LMKIT_BLAS=builtin cargo test --release --locked --workspace "${emu[@]}" -- gemm:: blas:: recurrent:: \
  padded_attention:: passes::
# The binary cargo just built (in $CARGO_TARGET_DIR when that is set).
LMKIT_BIN="${CARGO_TARGET_DIR:-$root/target}/release/lmkit" "$venv/bin/python" -m pytest -q tests/parity tests/hostile
