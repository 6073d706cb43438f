#!/usr/bin/env python3
"""Training and decoding speed: lmkit vs PyTorch eager (transformers GPT2LMHeadModel, or
LlamaForCausalLM with --family llama) on one config, measured in the same run, next to this
machine's peak f32 GEMM. PyTorch runs with transformers' default attention (torch's
scaled_dot_product_attention) unless --torch-modes says otherwise.

usage: ~/.cache/lmkit/venv/bin/python bench/train_bench.py [--steps 6] [--rounds 3] [--layers 6 --heads 6 --dim 384 --ctx 256 --batch 8]
       [--device cuda]   # both sides on the GPU (lmkit built with --features cuda; LMKIT_BIN names it)
       [--family llama [--kv-heads 3] [--inter 1536]]   # a Llama (RMSNorm, rotary, SwiGLU, grouped-query heads, tied embeddings)
       [--lmkit-blas builtin|off|/path/to/libopenblas.so]   # LMKIT_BLAS for lmkit's runs (builtin: no system BLAS)
       [--baseline OTHER_LMKIT [--baseline-blas VALUE] [--baseline-env VAR=VALUE]]   # also train with another lmkit binary (e.g. built from an earlier commit),
                                  # alternating with the others in every round: is a change no slower?

Model FLOPs per token ≈ 6·N (N = non-embedding parameters + lm_head) + 6·layers·ctx·dim for attention
(Kaplan et al. 2020 / the PaLM appendix convention), so GFLOP/s = tokens/s · flops_per_token / 1e9.
A Llama's non-embedding parameters per layer: dim·(dim + 2·kv_dim) for q|k|v, dim² for the output
projection, 3·dim·inter for the SwiGLU MLP.
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
import time

import torch

from measure import run_checked as run, run_config, tokenized_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate lmkit and PyTorch training this many times; medians are reported")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--kv-heads", type=int, help="--family llama: key/value heads (default: --heads)")
    ap.add_argument("--inter", type=int, help="--family llama: the MLP's width (default: 8/3 of --dim, "
                    "a multiple of 64)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both lmkit and PyTorch)")
    ap.add_argument("--baseline", help="another lmkit binary to train with in the same rounds")
    ap.add_argument("--torch-modes", default=None,
                    help="comma-separated PyTorch sides: eager (f32 with transformers' default attention, "
                         "scaled_dot_product_attention), eager-attention (f32 with GPT-2's attention written as "
                         "separate ops: slower), bf16 (eager, bf16 autocast + SDPA attention), compile "
                         "(torch.compile of the bf16 side); default eager on the CPU, eager,bf16,compile on CUDA")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--baseline-set", action="append", default=[],
                    help="extra `--set KEY=VALUE` for the baseline's runs, e.g. 'train.backward=\"autograd\"' "
                         "(with --baseline naming the same binary: the autograd path beside the hand-written one)")
    ap.add_argument("--lmkit-blas", help="LMKIT_BLAS for lmkit's runs: `builtin` (the product lmkit has "
                    "without a system BLAS), `off` (candle's), or a library path; default: lmkit's own pick")
    ap.add_argument("--baseline-blas", help="LMKIT_BLAS for the baseline's runs (as --lmkit-blas)")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="VAR=VALUE",
                    help="an environment variable for the baseline's runs (repeatable), e.g. "
                         "LMKIT_CUDA_KEEP_FREED=0 with --baseline naming the same binary")
    ap.add_argument("--lmkit-set", action="append", default=[],
                    help="extra `--set KEY=VALUE` for lmkit's training run (repeatable)")
    a = ap.parse_args()
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-bench-"))
    # Its checkpoints, shards and tokenizers take hundreds of MB: removed when the bench ends.
    atexit.register(shutil.rmtree, tmp, True)
    threads = torch.get_num_threads()

    # Data for lmkit: tokenizer + shards from the bundled corpus.
    tokenized_corpus(lm, tmp, a.vocab)

    # Peak f32 GEMM.
    n = 2048 if dev.type == "cpu" else 8192
    x, y = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    x @ y
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        x @ y
    sync()
    gemm = 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9

    kv_heads = a.kv_heads or a.heads
    inter = a.inter or -(-8 * a.dim // 3 // 64) * 64
    if a.family == "llama":
        kv_dim = a.dim // a.heads * kv_heads
        non_emb = a.layers * (a.dim * (a.dim + 2 * kv_dim) + a.dim * a.dim + 3 * a.dim * inter)
    else:
        non_emb = a.layers * 12 * a.dim * a.dim
    flops_per_token = 6 * (non_emb + a.vocab * a.dim) + 6 * a.layers * a.ctx * a.dim
    tokens_per_step = a.batch * a.ctx

    # lmkit: `lmkit train` for warmup + steps; tokens/s from metrics.jsonl (steps after the first).
    if a.family == "llama":
        model_toml = f"""model_type = "llama"
hidden_size = {a.dim}
intermediate_size = {inter}
num_hidden_layers = {a.layers}
num_attention_heads = {a.heads}
num_key_value_heads = {kv_heads}
max_position_embeddings = {a.ctx}
tie_word_embeddings = true
vocab_size = {a.vocab}"""
    else:
        model_toml = f"""model_type = "gpt2"
n_positions = {a.ctx}
n_embd = {a.dim}
n_layer = {a.layers}
n_head = {a.heads}
vocab_size = {a.vocab}"""
    (tmp / "run.toml").write_text(run_config(tmp, model_toml, a.ctx, a.batch, a.steps + 1, a.device))
    matmul = {}

    def lmkit_train(binary=lm, out="out", extra=(), blas=a.lmkit_blas, extra_env=()):
        shutil.rmtree(tmp / out, ignore_errors=True)
        sets = [x for kv in [*a.lmkit_set, *extra] for x in ("--set", kv)]
        env = dict(os.environ)
        if blas is not None:
            env["LMKIT_BLAS"] = blas
        for kv in extra_env:
            var, eq, value = kv.partition("=")
            if not eq:
                sys.exit(f"--baseline-env {kv}: expected VAR=VALUE")
            env[var] = value
        p = run([binary, "train", "--config", tmp / "run.toml", "--set", f'train.out_dir="{tmp / out}"', *sets], env=env)
        used = re.search(r"matmul: ([^\n]*)", p.stdout + p.stderr)
        matmul[out] = used.group(1).strip() if used else "?"
        recs = [json.loads(l) for l in (tmp / out / "metrics.jsonl").read_text().splitlines()]
        step_tps = [r["tokens_per_sec"] for r in recs if "tokens_per_sec" in r][1:]
        return len(step_tps) / sum(1 / t for t in step_tps)

    # PyTorch: the same model in transformers, AdamW, cross-entropy, clipping; one fresh model per side.
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    modes = (a.torch_modes or ("eager,bf16,compile" if dev.type == "cuda" else "eager")).split(",")
    data = torch.randint(0, a.vocab, (a.batch, a.ctx + 1), device=dev)

    def torch_side(mode):
        torch.manual_seed(0)
        attn = "eager" if mode == "eager-attention" else "sdpa"
        if a.family == "llama":
            cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=inter,
                              num_hidden_layers=a.layers, num_attention_heads=a.heads,
                              num_key_value_heads=kv_heads, max_position_embeddings=a.ctx,
                              tie_word_embeddings=True, attn_implementation=attn)
            model = LlamaForCausalLM(cfg).to(dev)
        else:
            cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.ctx, n_embd=a.dim, n_layer=a.layers, n_head=a.heads,
                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, attn_implementation=attn)
            model = GPT2LMHeadModel(cfg).to(dev)
        amp = mode in ("bf16", "compile")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=dev.type == "cuda" and amp)
        fwd = torch.compile(model) if mode == "compile" else model

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = fwd(data[:, :-1], labels=data[:, :-1])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def train():
            step()
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            sync()
            return a.steps * tokens_per_step / (time.perf_counter() - t0)
        if mode == "compile":
            t0 = time.perf_counter()
            step()
            step()
            sync()
            print(f"torch.compile: first steps took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return train

    # A side that fails to build or run (torch.compile on a new stack, say) is reported and left
    # out, so that the other sides' figures still come; the first one is the reference.
    sides = {}
    for m in modes:
        try:
            sides[m] = torch_side(m)
        except Exception as e:  # noqa: BLE001 - any failure of the peer's side
            if m == modes[0]:
                raise
            print(f"PyTorch side {m!r} failed and is left out: {type(e).__name__}: {e}", file=sys.stderr)
    modes = list(sides)

    # The sides alternate, so that a machine whose speed drifts (shared cores) affects all.
    lm_runs, base_runs = [], []
    pt = {m: [] for m in modes}
    for _ in range(a.rounds):
        lm_runs.append(lmkit_train())
        for m in modes:
            pt[m].append(sides[m]())
        if a.baseline:
            base_runs.append(lmkit_train(a.baseline, "baseline", a.baseline_set, a.baseline_blas,
                                         a.baseline_env))
    pt_runs = pt[modes[0]]
    lm_tps, pt_tps = statistics.median(lm_runs), statistics.median(pt_runs)
    ratios = sorted(l / p for l, p in zip(lm_runs, pt_runs))

    # Decoding with a KV cache: greedy, prompt of 8 tokens, batch 1, on lmkit's checkpoint.
    ckpt = tmp / "out" / (tmp / "out" / "latest").read_text().strip()
    prompt = "1,2,3,4,5,6,7,8"
    t0 = time.perf_counter()
    # LMKIT_CUDA_TIMING: lmkit also says how a decoding step's time splits (below).
    gen = run([lm, "generate", "--model", ckpt, "--prompt-ids", prompt, "--greedy", "--ids", "--ignore-eos", "--max-tokens", a.decode_tokens, "--device", a.device],
              env=dict(os.environ, LMKIT_CUDA_TIMING="1"))
    lm_dec = a.decode_tokens / (time.perf_counter() - t0)
    # lmkit's own measure of the generation loop (prompt + decode, after loading), as for transformers below.
    m = re.search(r"prompt tokens in ([0-9.]+) s .*?(\d+) generated in ([0-9.]+) s", gen.stderr)
    lm_dec_loop = int(m.group(2)) / (float(m.group(1)) + float(m.group(3))) if m else float("nan")
    split = re.search(r"decoding steps: ([0-9.]+) ms a step running the pass on the host, ([0-9.]+) ms reading", gen.stderr)
    hf = AutoModelForCausalLM.from_pretrained(ckpt).to(dev).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=dev)
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4, min_new_tokens=4,
                    pad_token_id=0)
        sync()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=a.decode_tokens,
                    min_new_tokens=a.decode_tokens, pad_token_id=0)
        sync()
        hf_dec = a.decode_tokens / (time.perf_counter() - t0)

    family = f"llama ({kv_heads} key/value heads, MLP {inter})" if a.family == "llama" else "gpt2"
    print(f"config: {family}, {a.layers} layers, {a.heads} heads, {a.dim} dims, context {a.ctx}, batch {a.batch}, vocab {a.vocab}; "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; device {a.device}; {os.cpu_count()} cores, torch threads {threads}")
    print(f"lmkit's matrix products: {matmul.get('out')}" + (f"; the baseline's: {matmul.get('baseline')}" if base_runs else ""))
    print()
    label = {"eager": "PyTorch eager f32 (SDPA attention)", "eager-attention": "PyTorch eager f32, attention as separate ops",
             "bf16": "PyTorch eager bf16 autocast + SDPA", "compile": "torch.compile bf16"}
    print(f"| measure | lmkit | {label[modes[0]]} | lmkit/PyTorch |")
    print("|---|---|---|---|")
    print(f"| training tokens/s (median of {a.rounds} alternating rounds) | {lm_tps:,.0f} | {pt_tps:,.0f} | {lm_tps / pt_tps:.2f}x |")
    print(f"| training tokens/s, each round | {' / '.join(f'{v:,.0f}' for v in lm_runs)} | "
          f"{' / '.join(f'{v:,.0f}' for v in pt_runs)} | {' / '.join(f'{r:.2f}x' for r in ratios)} (sorted) |")
    for m in modes[1:]:
        med = statistics.median(pt[m])
        rs = sorted(l / p for l, p in zip(lm_runs, pt[m]))
        print(f"| training tokens/s vs {label[m]} (median; each round) | {lm_tps:,.0f} | {med:,.0f} "
              f"({' / '.join(f'{v:,.0f}' for v in pt[m])}) | {lm_tps / med:.2f}x ({' / '.join(f'{r:.2f}x' for r in rs)}) |")
    if dev.type == "cuda":
        mfu = lambda tps: f"{100 * tps * flops_per_token / (a.peak_tflops * 1e12):.1f}%"
        print(f"| MFU (of {a.peak_tflops:.0f} TFLOP/s bf16 dense) | {mfu(lm_tps)} | "
              + ", ".join(f"{m}: {mfu(statistics.median(pt[m]))}" for m in modes) + " | |")
    if base_runs:
        base_tps = statistics.median(base_runs)
        print(f"| training tokens/s, baseline lmkit `{a.baseline}` {' '.join(a.baseline_set + a.baseline_env)} (median; each round) | {base_tps:,.0f} "
              f"({' / '.join(f'{v:,.0f}' for v in base_runs)}) | | lmkit/baseline {lm_tps / base_tps:.2f}x |")
    print(f"| training GFLOP/s | {lm_tps * flops_per_token / 1e9:.1f} | {pt_tps * flops_per_token / 1e9:.1f} | |")
    print(f"| peak f32 GEMM GFLOP/s (torch, {n}x{n}, {a.device}) | | {gemm:.1f} | |")
    print(f"| greedy decode tokens/s (KV cache, batch 1; lmkit incl. process start+load) | {lm_dec:,.1f} | {hf_dec:,.1f} | {lm_dec / hf_dec:.2f}x |")
    print(f"| greedy decode tokens/s (KV cache, batch 1; generation loop only, both) | {lm_dec_loop:,.1f} | {hf_dec:,.1f} | {lm_dec_loop / hf_dec:.2f}x |")
    if split:
        print(f"| lmkit's decoding step: ms running the pass on the host / ms reading its logits | "
              f"{split.group(1)} / {split.group(2)} | | |")


if __name__ == "__main__":
    main()
