#!/usr/bin/env bash
# Installs the system packages lmkit's two README commands need and a fresh machine lacks, and
# says what it installs. Debian/Ubuntu (apt); as root, or through sudo when that is available.
#
#   bash scripts/setup-system.sh           # what building and running lmkit needs
#   bash scripts/setup-system.sh --tests   # and what the test suite needs (a browser for the web pages' test)
#
# What each package is for:
#   g++                    C/C++ compiler for crates that build C code (SQLite, oniguruma) and
#                          the tests' CUDA emulation (C++20)
#   python3-venv           the virtualenv of the parity tests' reference implementations
#   libopenblas0-pthread   CPU matrix products (opened at run time; without it lmkit runs its own
#                          product, 5-10% slower on training steps)
#   chromium, chromium-driver (--tests)   the browser test of the chat and review pages
#   cmake, libboost-{program-options,system,thread,test}-dev, zlib1g-dev (--tests)
#                          to build KenLM's lmplz/query from source (scripts/setup-kenlm.sh), the
#                          n-gram estimator the parity tests compare lmkit's models with
set -euo pipefail
tests=0
[ "${1:-}" = "--tests" ] && tests=1

need=()
command -v c++ >/dev/null || need+=(g++)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
libs="$(ldconfig -p 2>/dev/null || true)"   # (not piped into grep -q: pipefail would see SIGPIPE)
grep -q 'libopenblas\.so\.0' <<<"$libs" || need+=(libopenblas0-pthread)
if [ "$tests" = 1 ]; then
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  command -v cmake >/dev/null || need+=(cmake)
  # Debian package names; a package counts as present when dpkg says it is installed.
  for p in libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || need+=("$p")
  done
fi
[ ${#need[@]} -eq 0 ] && exit 0

echo "lmkit setup: installing ${need[*]} (apt)" >&2
if ! command -v apt-get >/dev/null; then
  echo "lmkit setup: no apt-get here; install the equivalents of: ${need[*]}" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo)
elif command -v sudo >/dev/null && [ -t 0 ]; then
  echo "lmkit setup: sudo asks for your password to run apt-get" >&2
  as_root=(sudo)
else
  echo "lmkit setup: installing needs root; run as root: apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >&2
"${as_root[@]}" apt-get install -y -q "${need[@]}" >&2
echo "lmkit setup: installed ${need[*]}" >&2
