#!/usr/bin/env python3
"""Requests that share one long system prompt (an assistant's instructions, a document asked
about), arriving one after another while the earlier ones still decode: `lmkit serve` with its
prefix cache (the default: a prompt is kept once read, so the requests that come while its
sequence decodes read only their own messages) next to `lmkit serve --prefix-cache none`
(every prompt read whole) and transformers' `generate` reading each request's ids whole (one
token, the model idle: what a server that keeps nothing between requests takes at best).

usage: ~/.cache/lmkit/venv/bin/python bench/shared_prompt_bench.py [--model DIR | --smollm2]
           [--requests 6] [--gap 0.5] [--system-words N] [--max-tokens 48] [--repeats 3]
           [--device cpu|cuda]

Without --model, a configs/gpt-small.toml model (random weights after one step) is made from the
bundled English corpus, as bench/serve_bench.py does; --smollm2 takes SmolLM2-135M-Instruct in
f32 (as bench/long_window_bench.py makes it). A round: --requests chat requests, a system
message of --system-words words of the corpus (default 300; 50 for the made model) (the same for all) and a user message of 20 words
(each its own), sent --gap seconds apart, each streaming --max-tokens tokens (end of sequence
ignored, so that the earlier ones are still decoding); every repeat takes another part of the
corpus for the system prompt. The two servers take the rounds in turn. Per server: the medians
over the rounds of the time to the first token (the first request's, which nothing can help,
and the median of the others'), of a round's time to the last token, and the tokens
`usage.prompt_tokens_details.cached_tokens` says each of the later requests did not read.
"""
import argparse
import atexit
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from chat_turns_bench import peer, render  # noqa: E402
from prefill_bench import bench_model, start_server  # noqa: E402
from serve_bench import ROOT  # noqa: E402


def requests_of(words, at, n, system_words):
    """n conversations: one system message from `words[at:]`, then each its own user message."""
    system = " ".join(words[at:at + system_words])
    at += system_words
    out = []
    for _ in range(n):
        out.append([{"role": "system", "content": system},
                    {"role": "user", "content": " ".join(words[at:at + 20])}])
        at += 20
    return out


def one(client, msgs, delay, max_tokens, t0):
    """Sends `msgs` at `t0 + delay`, streaming: (seconds to the first token, the time of the
    last one from t0, cached prompt tokens)."""
    time.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    first, cached = None, 0
    stream = client.chat.completions.create(
        model="bench", messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - sent
        if chunk.usage is not None:
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens if details else 0) or 0
    return first, time.perf_counter() - t0, cached


def round_of(client, reqs, gap, max_tokens):
    """One round: (first request's time to its first token, the others' times, the round's time
    to the last token, the others' cached tokens)."""
    t0 = time.perf_counter() + 0.05
    with ThreadPoolExecutor(len(reqs)) as ex:
        out = list(ex.map(lambda i: one(client, reqs[i], i * gap, max_tokens, t0), range(len(reqs))))
    return out[0][0], [o[0] for o in out[1:]], max(o[1] for o in out), [o[2] for o in out[1:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct in f32 (see above)")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between two requests")
    ap.add_argument("--system-words", type=int,
                    help="words of the shared system prompt (default 300; 50 for the made model, whose context is 128)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the servers' --device, and the peer's)")
    a = ap.parse_args()
    if a.requests < 2:
        raise SystemExit("--requests must be at least 2")
    if a.system_words is None:
        a.system_words = 300 if a.model or a.smollm2 else 50
    import torch
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-shared-prompt-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    model, hf = bench_model(a, lm, tmp)
    n = a.requests
    servers = {"cached": start_server(lm, model, tmp, "cached", n, a.device, []),
               "none": start_server(lm, model, tmp, "none", n, a.device, ["--prefix-cache", "none"])}
    words = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").split()
    warm = requests_of(words, 0, 2, 40)
    for c in servers.values():
        round_of(c, warm, 0.0, 2)
    peer(hf, torch, render(lm, model, warm[0], tmp / "warm.json"), a.device)
    got = {k: {"first": [], "later": [], "round": [], "cached": []} for k in servers}
    peer_times, tokens = [], []
    for r in range(a.repeats):
        reqs = requests_of(words, 8000 + r * 2000, n, a.system_words)
        for name, c in servers.items():
            first, later, whole, cached = round_of(c, reqs, a.gap, a.max_tokens)
            g = got[name]
            g["first"].append(first)
            g["later"].append(statistics.median(later))
            g["round"].append(whole)
            g["cached"].append(statistics.median(cached))
        ids = [render(lm, model, m, tmp / "req.json") for m in reqs]
        tokens.append(statistics.median(len(i) for i in ids))
        peer_times.append(statistics.median(peer(hf, torch, i, a.device) for i in ids[1:]))
    med = {k: {m: statistics.median(v) for m, v in g.items()} for k, g in got.items()}
    p = statistics.median(peer_times)
    print(f"model {model}; device {a.device}; {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {n} requests {a.gap} s apart, prompts of "
          f"{statistics.median(tokens):.0f} tokens ({a.system_words} words shared), {a.max_tokens} tokens each; "
          f"medians of {a.repeats} rounds")
    print()
    print("| server | first request's first token s | later requests' first token s | round s | "
          "later requests' cached tokens |")
    print("|---|---|---|---|---|")
    for k, m in med.items():
        label = "lmkit serve" if k == "cached" else "lmkit serve --prefix-cache none"
        print(f"| {label} | {m['first']:.3f} | {m['later']:.3f} | {m['round']:.3f} | {m['cached']:.0f} |")
    print(f"| transformers generate (prompt read whole, idle) | | {p:.3f} | | 0 |")
    c, w = med["cached"], med["none"]
    print()
    print(f"later requests' first token: the prefix cache {w['later'] / c['later']:.2f}x faster than without it, "
          f"{p / c['later']:.2f}x transformers reading the prompt alone; round {w['round'] / c['round']:.2f}x")
    print(json.dumps({"cached": c, "none": w, "transformers_later": p}))


if __name__ == "__main__":
    main()
