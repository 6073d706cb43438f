#!/usr/bin/env python3
"""Load test of `lmkit serve` on loopback: N concurrent streaming clients vs one client at a time,
and with --peer, transformers' batched `generate` on the same model and device as the peer.

usage: ~/.cache/lmkit/venv/bin/python bench/serve_bench.py [--model DIR] [--clients 8] [--requests 32]
           [--max-tokens 48] [--device cpu|cuda] [--dtype f32|bf16|f16] [--peer] [--client-procs N]

Without --model, a configs/gpt-small.toml model (random weights after one step; speed does not
depend on the weights) is made from the bundled English corpus. Each request streams a chat
completion; latency is the time to the last chunk, TTFT the time to the first content chunk.
After the run every request must have a row in the server's SQLite log. The concurrent clients
run as threads of --client-procs processes (default: half the machine's cores, at most 8): the
official client parses each chunk in Python, and one process's GIL caps the chunks a second it
can take (≈ 3,000 on a 2-core machine, where one process is all there is room for).

--peer: transformers decodes the same prompts (their chat-formatted token ids, as the server
tokenized them) as one batch of 1 and one batch of --clients rows, sampling --max-tokens new
tokens each (no early stop), alternating with the server's phases; completion tokens/s side by
side. The server decodes its streams by continuous batching over HTTP; transformers gets the
batch at once without a server, so the ratio includes lmkit's HTTP, JSON and scheduling costs.
--dtype loads the model in that type in both (the server's --dtype; transformers' `dtype`).
"""
import argparse
import atexit
import json
import os
import pathlib
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import openai

from measure import run_checked, served_url, tokenized_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["In the beginning", "And God said", "The word of the LORD", "Blessed are", "And it came to pass",
           "Now the serpent", "Hear, O Israel", "The LORD is my shepherd"]


def make_model(lm, tmp):
    tokenized_corpus(lm, tmp, 8192)
    run_checked([lm, "train", "--config", ROOT / "configs/gpt-small.toml", "--set", f'data.train="{tmp}/shards"',
                 "--set", f'data.tokenizer="{tmp}/tok"', "--set", f'train.out_dir="{tmp}/gpt"', "--max-steps", "1"])
    return tmp / "gpt"


def chat_ids(lm, model, i, tmp):
    """The prompt ids the server decodes for request i (its chat template applied)."""
    return render_ids(lm, model, PROMPTS[i % len(PROMPTS)], tmp / f"chat-{i}.json")


def render_ids(lm, model, text, conv):
    """The prompt ids the server decodes for one user message `text` (its chat template
    applied; the conversation written to `conv`)."""
    conv.write_text(json.dumps([{"role": "user", "content": text}]))
    p = subprocess.run([lm, "prompt", "render", "--model", model, "--messages", conv, "--ids"],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"lmkit prompt render failed: {p.stderr}")
    return [int(x) for x in p.stdout.split()]


def peer_phase(hf, torch, prompts, max_tokens, device):
    """transformers' generate over `prompts` (lists of ids) as one left-padded batch: completion
    tokens/s."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / wall


def one(c, i, max_tokens):
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = c.chat.completions.create(model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, ttft or 0.0, tokens


def client(url):
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)


def client_share(url, threads, ids, max_tokens):
    """One client process's share of a phase: requests `ids`, `threads` at a time."""
    c = client(url)
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(lambda i: one(c, i, max_tokens), ids))


def client_pool(procs):
    """`procs` client processes, started now (forked before PyTorch is loaded, outside the timed
    phases), or None for one."""
    if procs <= 1:
        return None
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork"))
    list(pool.map(time.sleep, [0.1] * procs))
    return pool


def phase(url, clients, requests, max_tokens, offset, pool=None, procs=1):
    """`requests` streamed requests, `clients` at a time, from the `procs` client processes of
    `pool` (each running its share of the clients as threads: one Python process parsing every
    stream's chunks under its GIL would be what limits the throughput of many streams), or from
    this one."""
    ids = list(range(offset, offset + requests))
    t0 = time.perf_counter()
    if procs == 1:
        res = client_share(url, clients, ids, max_tokens)
    else:
        shares = [ids[k::procs] for k in range(procs)]
        threads = [clients // procs + (k < clients % procs) for k in range(procs)]
        futures = [pool.submit(client_share, url, threads[k], shares[k], max_tokens) for k in range(procs)]
        res = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in res)
    ttft = sorted(r[1] for r in res)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    toks = sum(r[2] for r in res)
    return {"requests": requests, "p50": statistics.median(lat), "p99": q(lat, 0.99), "ttft50": statistics.median(ttft),
            "tokens": toks, "tps": toks / wall, "wall": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the server's --device, and the peer's)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
                    help="the model's type in the server (--dtype) and the peer")
    ap.add_argument("--peer", action="store_true", help="also decode with transformers' generate (see above)")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 1) // 2)),
                    help="processes the concurrent clients are spread over (default: half the cores, at most 8)")
    a = ap.parse_args()
    procs = max(1, min(a.client_procs, a.clients))
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-serve-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    model = pathlib.Path(a.model) if a.model else make_model(lm, tmp)
    db = tmp / "db.sqlite"
    proc = subprocess.Popen([lm, "serve", model, "--port", "0", "--model-name", "bench", "--db", db,
                             "--max-active", str(a.max_active), "--max-queue", "256", "--device", a.device,
                             "--dtype", a.dtype],
                            stderr=subprocess.PIPE, text=True)
    peer = {}
    try:
        url = served_url(proc) + "/v1"
        pool = client_pool(procs)
        one(client(url), 0, 4)  # warm-up
        if a.peer:
            import torch
            import transformers
            ckpt = model / (model / "latest").read_text().strip() if (model / "latest").exists() else model
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, dtype={"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]).to(a.device).eval()
            prompts = [chat_ids(lm, model, i, tmp) for i in range(a.clients)]
            peer_phase(hf, torch, prompts[:1], 4, a.device)  # warm-up
        seq = phase(url, 1, max(4, a.requests // 4), a.max_tokens, 1000)
        if a.peer:
            peer["seq"] = peer_phase(hf, torch, prompts[:1], a.max_tokens, a.device)
        par = phase(url, a.clients, a.requests, a.max_tokens, 2000, pool, procs)
        if pool:
            pool.shutdown()
        if a.peer:
            peer["par"] = peer_phase(hf, torch, prompts, a.max_tokens, a.device)
        rows = sqlite3.connect(db).execute("SELECT COUNT(*), SUM(finish_reason = 'cancelled') FROM completions").fetchone()
        sent = 1 + seq["requests"] + par["requests"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"model {model} ({a.dtype}); device {a.device}; {os.cpu_count()} cores; {a.max_tokens} max tokens per reply; "
          f"server --max-active {a.max_active}; clients in {procs} processes")
    print()
    print("| clients | requests | p50 latency s | p99 latency s | p50 time to first token s | completion tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("1 (one at a time)", seq), (str(a.clients), par)):
        print(f"| {name} | {r['requests']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['ttft50']:.3f} | {r['tps']:.1f} |")
    print()
    print(f"throughput ratio {a.clients} clients / 1: {par['tps'] / seq['tps']:.2f}x; "
          f"log rows {rows[0]} for {sent} requests sent ({rows[1] or 0} cancelled); errors: 0")
    if peer:
        print()
        print("| streams | lmkit serve completion tokens/s | transformers generate tokens/s (one batch) | ratio |")
        print("|---|---|---|---|")
        for name, ours, theirs in (("1", seq["tps"], peer["seq"]), (str(a.clients), par["tps"], peer["par"])):
            print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    if rows[0] != sent:
        raise SystemExit("log rows lost")


if __name__ == "__main__":
    main()
