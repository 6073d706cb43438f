#!/usr/bin/env python3
"""Data-parallel training: how lmkit's `train --procs N` (`--gpus N` with --device cuda) scales,
next to PyTorch's DistributedDataParallel (gloo on the CPU, NCCL on GPUs) in the same run.

Both sides train the same GPT-2 config (transformers' GPT2LMHeadModel for PyTorch) with AdamW
and gradient clipping, each process on --batch rows of --ctx tokens (a group of N processes
trains on N·batch rows a step), for each N of --procs. The sides alternate within every round;
medians over --rounds. Reported per N: the group's training tokens/s (steps after the first),
lmkit/PyTorch, and each side's speed-up over the first N (on GPUs each process adds a GPU; on
the CPU the processes share the same cores, so the speed-up shows what the exchange costs). On the CPU each process of a group of N gets cores/N threads on both sides (what
`lmkit train --procs` gives its processes where RAYON_NUM_THREADS is not set; torch.set_num_threads
for PyTorch).

usage: ~/.cache/lmkit/venv/bin/python bench/dp_bench.py [--procs 1,2] [--rounds 3] [--steps 4]
       [--layers 4 --heads 4 --dim 256 --ctx 128 --batch 4 --vocab 8192]
       [--device cuda]   # --gpus N and NCCL on both sides (an lmkit built with --features cuda; LMKIT_BIN)
       [--lmkit-env VAR=VALUE]   # an environment variable for lmkit's runs (repeatable)
       [--baseline OTHER_LMKIT [--baseline-env VAR=VALUE]]   # another lmkit binary (e.g. an earlier commit's),
                                 # alternating with the others in every round
"""
import argparse
import atexit
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap

from measure import run_checked as run, run_config, tokenized_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One PyTorch DDP member: torchrun's variables in the environment; rank 0 prints the group's
# tokens/s over the steps after the first.
TORCH_MEMBER = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    a = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = a["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        torch.set_num_threads(a["threads"])
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=a["vocab"], n_positions=a["ctx"], n_embd=a["dim"], n_layer=a["layers"],
                     n_head=a["heads"], resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(cfg).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, a["vocab"], (a["batch"], a["ctx"]), generator=g).to(dev)
    amp = cuda

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = ddp(data, labels=data)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    secs = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"tps": a["steps"] * world * a["batch"] * a["ctx"] / secs}))
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2", help="comma-separated group sizes (the first is the reference)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one untimed)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="rows per process and step")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lmkit-env", action="append", default=[], metavar="VAR=VALUE",
                    help="an environment variable for lmkit's runs (repeatable)")
    ap.add_argument("--baseline", help="another lmkit binary, trained with in the same rounds")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="VAR=VALUE",
                    help="an environment variable for the baseline's runs (repeatable)")
    ap.add_argument("--lmkit", default=os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit")))
    a = ap.parse_args()
    sizes = [int(n) for n in a.procs.split(",")]
    if not sizes or min(sizes) < 1:
        sys.exit("--procs: group sizes of at least 1, e.g. 1,2")
    cores = os.cpu_count() or 1
    if not os.path.exists(a.lmkit):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    def env_with(pairs, flag):
        env = dict(os.environ)
        for kv in pairs:
            var, eq, value = kv.partition("=")
            if not eq:
                sys.exit(f"{flag} {kv}: expected VAR=VALUE")
            env[var] = value
        if a.device == "cuda":
            # bf16 products and the flash attention kernels, as PyTorch's bf16 autocast with SDPA.
            env.setdefault("LMKIT_CUDA_ATTENTION", "flash")
        return env
    lm_env = env_with(a.lmkit_env, "--lmkit-env")
    base_env = env_with(a.baseline_env, "--baseline-env")

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-dp-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    tokenized_corpus(a.lmkit, tmp, a.vocab)
    model_toml = (f'model_type = "gpt2"\nn_positions = {a.ctx}\nn_embd = {a.dim}\nn_layer = {a.layers}\n'
                  f'n_head = {a.heads}\nvocab_size = {a.vocab}')
    (tmp / "run.toml").write_text(run_config(tmp, model_toml, a.ctx, a.batch, a.steps + 1, a.device,
                                             'dtype = "bf16"' if a.device == "cuda" else ""))

    def lmkit_side(n, binary=a.lmkit, env=lm_env, shares=None):
        out = tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        flag = "--gpus" if a.device == "cuda" else "--procs"
        run([binary, "train", "--config", tmp / "run.toml", flag, n], env=env)
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "tokens_per_sec" in r][1:]
        tps = len(steps) / sum(1 / r["tokens_per_sec"] for r in steps)
        # Rank 0's time in the gradient exchange, as a share of the steps' time.
        ex = sum(r.get("group_exchange_secs", 0.0) for r in steps)
        secs = sum(n * a.batch * a.ctx / r["tokens_per_sec"] for r in steps)
        if shares is not None:
            shares[n].append(ex / secs)
        return tps

    def torch_side(n):
        args = json.dumps({**vars(a), "threads": max(1, cores // n)})
        port = free_port()
        members = []
        for rank in range(n):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(max(1, cores // n)))
            members.append(subprocess.Popen([sys.executable, "-c", TORCH_MEMBER, args], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [m.communicate() for m in members]
        for rank, (m, (_, err)) in enumerate(zip(members, outs)):
            if m.returncode:
                sys.exit(f"PyTorch DDP rank {rank} of {n} failed: {err[-3000:]}")
        return json.loads(outs[0][0].strip().splitlines()[-1])["tps"]

    exchange = {n: [] for n in sizes}
    base_exchange = {n: [] for n in sizes}
    lm = {n: [] for n in sizes}
    pt = {n: [] for n in sizes}
    base = {n: [] for n in sizes}
    for r in range(a.rounds):
        for n in sizes:
            lm[n].append(lmkit_side(n, shares=exchange))
            pt[n].append(torch_side(n))
            if a.baseline:
                base[n].append(lmkit_side(n, a.baseline, base_env, shares=base_exchange))
            print(f"round {r + 1}, {n} process(es): lmkit {lm[n][-1]:,.0f} tokens/s, PyTorch DDP {pt[n][-1]:,.0f}"
                  + (f", baseline {base[n][-1]:,.0f}" if a.baseline else ""), file=sys.stderr)

    med = lambda xs: statistics.median(xs)
    ref = sizes[0]
    print(f"config: gpt2, {a.layers} layers, {a.heads} heads, {a.dim} dims, context {a.ctx}, {a.batch} rows a "
          f"process, vocab {a.vocab}; device {a.device}; {cores} cores"
          + ("" if a.device == "cuda" else "; cores/N threads a process on both sides")
          + (f"; lmkit env {' '.join(a.lmkit_env)}" if a.lmkit_env else ""))
    print()
    peer = "PyTorch DDP (NCCL, bf16 autocast)" if a.device == "cuda" else "PyTorch DDP (gloo, f32)"
    print(f"| processes | lmkit tokens/s (each round) | {peer} tokens/s (each round) | lmkit/PyTorch | "
          f"lmkit speed-up | PyTorch speed-up | lmkit's exchange, share of a step (rank 0) |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        eff = lambda runs: f"{med(runs[n]) / med(runs[ref]):.2f}"
        print(f"| {n} | {med(lm[n]):,.0f} ({' / '.join(f'{v:,.0f}' for v in lm[n])}) | "
              f"{med(pt[n]):,.0f} ({' / '.join(f'{v:,.0f}' for v in pt[n])}) | {med(lm[n]) / med(pt[n]):.2f}x | "
              f"{eff(lm)} | {eff(pt)} | {100 * med(exchange[n]):.1f}% |")
    if a.baseline:
        print()
        print(f"| processes | baseline `{a.baseline}` {' '.join(a.baseline_env)} tokens/s (each round) | "
              f"lmkit/baseline | the baseline's exchange, share of a step |")
        print("|---|---|---|---|")
        for n in sizes:
            print(f"| {n} | {med(base[n]):,.0f} ({' / '.join(f'{v:,.0f}' for v in base[n])}) | "
                  f"{med(lm[n]) / med(base[n]):.2f}x | {100 * med(base_exchange[n]):.1f}% |")
    print()
    if a.device == "cuda":
        print(f"speed-up: tokens/s at N over tokens/s at {ref}; each process has a GPU of its own "
              f"(perfect: N/{ref})")
    else:
        print(f"speed-up: tokens/s at N over tokens/s at {ref}; the processes share this machine's {cores} cores "
              f"(the same cores at every N: perfect is 1.00, less is the gradient exchange's cost)")


if __name__ == "__main__":
    main()
