#!/usr/bin/env bash
# On a lent GPU machine (no Rust toolchain there): unpacks .gpu-bundle/ (made here by
# scripts/gpu-bundle.sh and carried along) and runs bench/gpu_check.sh with its binaries; logs go to
# $OUT (the device tool brings them back) or ./gpu-out.
#   bash bench/gpu_run.sh [--tests-only] [STEP...]
# STEPs (tests, parity, curves, attention, ops, llama, speed, serve, long, dp) choose gpu_check.sh's steps; none:
# all of them, which may not fit one 10-minute device command.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
b="$here/.gpu-bundle"
[ -d "$b" ] || { echo "no .gpu-bundle: run scripts/gpu-bundle.sh and carry .gpu-bundle" >&2; exit 2; }
py="${PYTHON:-python3}"
w="$(mktemp -d)"
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/tests"
"$py" - "$b" "$w" <<'PY' || exit 2
import lzma, os, pathlib, shutil, sys
b, w = map(pathlib.Path, sys.argv[1:])
for src in [b / "lmkit.xz", *sorted((b / "tests").glob("*.xz"))]:
    dst = w / src.relative_to(b).with_suffix("")
    with lzma.open(src) as f, open(dst, "wb") as o:
        shutil.copyfileobj(f, o)
    os.chmod(dst, 0o755)
PY
# The CUDA libraries: the bundle's libcudart, then PyTorch's pip packages (cuBLAS, NVRTC, cuRAND).
libs="$("$py" -c 'import glob, os, sys
paths = [p for s in sys.path if os.path.isdir(s) for p in glob.glob(os.path.join(s, "nvidia", "*", "lib"))]
print(":".join(paths))' 2>/dev/null)"
export LD_LIBRARY_PATH="$b:$libs:${LD_LIBRARY_PATH:-}"
# The serving benches' OpenAI client, from the bundle's wheels where the machine has none.
if ! "$py" -c "import openai" 2>/dev/null && ls "$b"/wheels/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$w/site" "$b"/wheels/*.whl \
    && export PYTHONPATH="$w/site${PYTHONPATH:+:$PYTHONPATH}" \
    && "$py" -c "import openai" || echo "the bundle's openai wheels did not install: the serve step will be skipped" >&2
fi
echo "bundle of commit $(cat "$b/commit" 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
out="${OUT:-$here/gpu-out}"
mkdir -p "$out"
if [ "${1:-}" = "--tests-only" ]; then
  rc=0
  for t in "$w"/tests/*; do
    LMKIT_REQUIRE_CUDA=1 "$t" gpu --test-threads 1 2>&1 | tee "$out/test-$(basename "$t").log" | tail -12
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
  exit $rc
fi
# All of the output is kept in $OUT/check.log too: a device command returns only its last lines.
GPU_CHECK_ONLY="$*" LMKIT_BIN="$w/lmkit" LMKIT_GPU_TESTS="$w/tests" bash "$here/bench/gpu_check.sh" "$out" 2>&1 \
  | tee "$out/check.log"
exit "${PIPESTATUS[0]}"
