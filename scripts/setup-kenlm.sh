#!/usr/bin/env bash
# Builds (once) KenLM's command-line tools — lmplz (the estimator), build_binary and query — from
# the source package of `kenlm` on PyPI (version and checksum pinned here; nothing is vendored) and
# prints the directory that holds them. The n-gram parity tests and bench/ngram_bench.py compare
# lmkit with these programs.
#
#   bash scripts/setup-kenlm.sh          # prints e.g. /root/.cache/lmkit/kenlm-0.3.0/bin
#
# Needs cmake, a C++ compiler and Boost (program_options, system, thread, test) + zlib headers:
# `bash scripts/setup-system.sh --tests` installs them. Built with KENLM_MAX_ORDER=8, lmkit's
# highest order. Takes about a minute on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=0.3.0
sha256=c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8
dest="${LMKIT_KENLM_DIR:-$HOME/.cache/lmkit/kenlm-$version}"
tools=(lmplz build_binary query)

have_all() {
  for t in "${tools[@]}"; do [ -x "$dest/bin/$t" ] || return 1; done
}
if have_all; then
  echo "$dest/bin"
  exit 0
fi
command -v cmake >/dev/null || {
  echo "setup-kenlm: cmake is missing; run: bash scripts/setup-system.sh --tests" >&2
  exit 1
}
venv="$(bash "$root/scripts/setup-python.sh")"
work="$(mktemp -d "${TMPDIR:-/tmp}/lmkit-kenlm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "setup-kenlm: building KenLM $version's lmplz, build_binary and query into $dest" >&2
# The source package through pip (its index and proxy settings apply); metadata only, no build.
"$venv/bin/python" -m pip download -q --no-deps --no-binary kenlm --no-build-isolation \
  "kenlm==$version" -d "$work" >&2
tarball="$work/kenlm-$version.tar.gz"
echo "$sha256  $tarball" | sha256sum -c --quiet - >&2 || {
  echo "setup-kenlm: $tarball does not have the pinned checksum $sha256" >&2
  exit 1
}
tar -xzf "$tarball" -C "$work"
cmake -S "$work/kenlm-$version" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=8 \
  > "$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j "$(nproc)" --target "${tools[@]}" > "$work/build.log" 2>&1 \
  || { tail -50 "$work/build.log" >&2; exit 1; }
# Installed whole or not at all: a half-copied directory would pass the check above next time.
mkdir -p "$(dirname "$dest")"
staging="$(mktemp -d "$(dirname "$dest")/.kenlm.XXXXXX")"
mkdir "$staging/bin"
for t in "${tools[@]}"; do cp "$work/build/bin/$t" "$staging/bin/"; done
rm -rf "$dest"
mv "$staging" "$dest"
echo "setup-kenlm: done" >&2
echo "$dest/bin"
