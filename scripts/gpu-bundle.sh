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
git rev-parse HEAD > "$out/commit"
bundle=$(du -sb "$out" | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "bundle $((bundle >> 20)) MiB + tracked tree $((tree >> 20)) MiB (a device run carries 64 MiB)"
if [ $((bundle + tree)) -gt $((64 << 20)) ]; then
  echo "too large to carry: build fewer test executables or compress harder" >&2
  exit 1
fi
