#!/usr/bin/env bash
# Creates (once) the virtualenv with the parity tests' reference implementations and prints its path.
# The venv lives at a fixed path ($LMKIT_VENV, default ~/.cache/lmkit/venv) and is reused while
# tests/parity/requirements.txt is unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LMKIT_VENV:-$HOME/.cache/lmkit/venv}"
req="$root/tests/parity/requirements.txt"
stamp="$venv/.lmkit-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$venv"
  exit 0
fi
echo "setting up Python reference environment in $venv" >&2
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q -r "$req" >&2
echo "$want" > "$stamp"
echo "$venv"
