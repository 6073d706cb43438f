#!/usr/bin/env bash
# Packs what a run on a lent GPU machine needs into .gpu-bundle/ (ignored by git: name it in the
# device tool's `carry`): the CUDA build of lmkit and the test executables with GPU tests
# (scripts/build-cuda.sh --tests), stripped and xz-compressed (Python's lzma unpacks them there),
# and libcudart. Checks that the bundle and the tracked tree fit in what a device run carries.
#   CUDA_COMPUTE_CAP=90 bash scripts/gpu-bundle.sh      # here, no GPU needed
#   bash bench/gpu_run.sh                               # there (the device tool: carry .gpu-bundle)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/build-cuda.sh --tests
target="${CARGO_TARGET_DIR:-$here/target-cuda}"
out="$here/.gpu-bundle"
rm -rf "$out"
mkdir -p "$out/tests"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pack() {
  strip -o "$tmp/bin" "$1"
  xz -6 -T0 -c "$tmp/bin" > "$2"
}
pack "$target/release/lmkit" "$out/lmkit.xz"
while read -r t; do
  name="$(basename "$t")"
  pack "$t" "$out/tests/${name%-*}.xz"
done < "$target/gpu-tests.txt"
cudart="$(ls "${LMKIT_CUDA_TOOLS:-$HOME/.cache/lmkit/cuda-tools}"/lib/python3*/site-packages/nvidia/cu13/lib/libcudart.so.13 2>/dev/null | head -1)"
[ -n "$cudart" ] && cp "$cudart" "$out/"
# The serving benches' OpenAI client and what it needs beyond the GPU machine's Python packages
# (it has PyTorch, transformers, httpx and pytest, not openai): wheels for its Python, 3.12
# (GPU_PYTHON=3.x for another), which gpu_run.sh installs there when `import openai` fails.
py="${PYTHON:-$HOME/.cache/lmkit/venv/bin/python}"
[ -x "$py" ] || py=python3
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out/wheels" \
  openai==3.54.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 anyio==4.16.0 \
  idna==3.20 sniffio==1.3.1 jiter==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
git rev-parse HEAD > "$out/commit"
bundle=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "bundle $((bundle >> 20)) MiB + tracked tree $((tree >> 20)) MiB (a device run carries 64 MiB)"
if [ $((bundle + tree)) -gt $((64 << 20)) ]; then
  echo "too large to carry: build fewer test executables or compress harder" >&2
  exit 1
fi
