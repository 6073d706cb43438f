#!/usr/bin/env python3
"""A chat's turns: each request sends the whole conversation again, as OpenAI's API has clients
do. `lmkit serve` with its prefix cache (the default: the keys and values of the conversation
so far kept from the last turn, so a turn reads only its new messages) next to `lmkit serve
--prefix-cache none` (every turn read whole) and transformers' `generate` over the turn's ids
(read whole, as a server that keeps nothing between requests does).

usage: ~/.cache/lmkit/venv/bin/python bench/chat_turns_bench.py [--model DIR | --smollm2] [--turns 6]
           [--repeats 3] [--device cpu|cuda]

Without --model, a configs/gpt-small.toml model (random weights after one step) is made from the
bundled English corpus, as bench/serve_bench.py does; --smollm2 takes SmolLM2-135M-Instruct in
f32 (as bench/long_window_bench.py makes it). A conversation: --turns user messages of 30 to 60
words of the corpus, each followed by an assistant reply of 40 words of it (fixed text, so that
every server sees the same conversation); each turn asks for one token, so its time is the time
to read the conversation and sample a first token. The three take each turn in turn; every
repeat is a new conversation (another part of the corpus). Per turn: the conversation's tokens
and the medians of the time to the answer (lmkit's include HTTP, JSON, the chat template,
tokenization and the request log; "model s" is the server's own time from
`lmkit_engine_busy_seconds_total`, the figure to set beside transformers') and, for the cached
server, the tokens its `usage.prompt_tokens_details.cached_tokens` says it did not read.
"""
import argparse
import atexit
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from prefill_bench import bench_model, busy_seconds, start_server  # noqa: E402
from serve_bench import ROOT  # noqa: E402


def conversation(words, at, turns):
    """Messages of `turns` user turns from `words[at:]`, each but the last followed by a reply."""
    msgs = []
    for i in range(turns):
        k = 30 + (i * 13) % 31
        msgs.append({"role": "user", "content": " ".join(words[at:at + k])})
        at += k
        msgs.append({"role": "assistant", "content": " ".join(words[at:at + 40])})
        at += 40
    return msgs[:-1]


def render(lm, model, msgs, path):
    """The ids the server reads for `msgs` (the chat template, a generation prompt)."""
    path.write_text(json.dumps(msgs))
    p = subprocess.run([lm, "prompt", "render", "--model", model, "--messages", path, "--ids"],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"lmkit prompt render failed: {p.stderr}")
    return [int(x) for x in p.stdout.split()]


def ask(client, msgs):
    """One token after `msgs`: (seconds, the model's seconds, cached prompt tokens)."""
    before = busy_seconds(client)
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="bench", messages=msgs, max_tokens=1, temperature=0)
    wall = time.perf_counter() - t0
    details = r.usage.prompt_tokens_details
    return wall, busy_seconds(client) - before, (details.cached_tokens if details else 0) or 0


def peer(hf, torch, ids, device):
    """transformers' generate of one token after `ids`: seconds."""
    x = torch.tensor([ids], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=1, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct in f32 (see above)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the servers' --device, and the peer's)")
    a = ap.parse_args()
    import torch
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-chat-turns-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    model, hf = bench_model(a, lm, tmp)
    cached = start_server(lm, model, tmp, "cached", 4, a.device, [])
    whole = start_server(lm, model, tmp, "whole", 4, a.device, ["--prefix-cache", "none"])
    words = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").split()
    warm = conversation(words, 0, 1)
    for c in (cached, whole):
        ask(c, warm)
    peer(hf, torch, render(lm, model, warm, tmp / "warm.json"), a.device)
    # times[turn][name] -> per repeat
    names = ["cached", "cached model", "whole", "whole model", "transformers"]
    times = [{n: [] for n in names} for _ in range(a.turns)]
    tokens, saved = [[] for _ in range(a.turns)], [[] for _ in range(a.turns)]
    for r in range(a.repeats):
        msgs = conversation(words, 5000 + r * 3000, a.turns)
        for t in range(a.turns):
            turn = msgs[:2 * t + 1]
            ids = render(lm, model, turn, tmp / "turn.json")
            tokens[t].append(len(ids))
            wall, busy, hit = ask(cached, turn)
            times[t]["cached"].append(wall)
            times[t]["cached model"].append(busy)
            saved[t].append(hit)
            wall, busy, _ = ask(whole, turn)
            times[t]["whole"].append(wall)
            times[t]["whole model"].append(busy)
            times[t]["transformers"].append(peer(hf, torch, ids, a.device))
    med = [{n: statistics.median(v) for n, v in row.items()} for row in times]
    print(f"model {model}; device {a.device}; {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); medians of {a.repeats} conversations")
    print()
    print("| turn | conversation tokens | cached (not read) | lmkit serve s (model s) | lmkit --prefix-cache none s "
          "(model s) | transformers generate s | cache's speed-up (model) | lmkit vs transformers (model) |")
    print("|---|---|---|---|---|---|---|---|")
    for t, m in enumerate(med):
        print(f"| {t + 1} | {statistics.median(tokens[t]):.0f} | {statistics.median(saved[t]):.0f} | {m['cached']:.3f} ({m['cached model']:.3f}) | "
              f"{m['whole']:.3f} ({m['whole model']:.3f}) | {m['transformers']:.3f} | "
              f"{m['whole'] / m['cached']:.2f}x ({m['whole model'] / m['cached model']:.2f}x) | "
              f"{m['transformers'] / m['cached']:.2f}x ({m['transformers'] / m['cached model']:.2f}x) |")
    total = {n: sum(m[n] for m in med) for n in names}
    print(f"| all {a.turns} | | | {total['cached']:.3f} ({total['cached model']:.3f}) | {total['whole']:.3f} "
          f"({total['whole model']:.3f}) | {total['transformers']:.3f} | {total['whole'] / total['cached']:.2f}x "
          f"({total['whole model'] / total['cached model']:.2f}x) | {total['transformers'] / total['cached']:.2f}x "
          f"({total['transformers'] / total['cached model']:.2f}x) |")


if __name__ == "__main__":
    main()
