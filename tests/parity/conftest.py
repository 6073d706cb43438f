import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def lmkit():
    """Runs the lmkit binary (built by scripts/test.sh, or $LMKIT_BIN) and returns its stdout."""
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)

    def run(*args, stdin=None):
        p = subprocess.run([binary, *map(str, args)], input=stdin, capture_output=True, text=True)
        assert p.returncode == 0, f"lmkit {args} failed: {p.stderr}"
        return p.stdout

    return run
