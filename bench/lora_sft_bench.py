"""LoRA supervised fine-tuning on the CPU: lmkit finetune vs transformers + PEFT, same model
(SmolLM2-135M-Instruct as an f32 transformers directory), r=16 on all linear layers, the same
rows, batch size and sequence length, AdamW at the same learning rate. Runs alternate; prints the
medians of training tokens/s (steady state: the steps after the first few) and peak RSS, and the
ratio.

    ~/.cache/lmkit/venv/bin/python bench/lora_sft_bench.py [--rounds 3] [--steps 8] [--batch 4] [--seq 256]
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
BASE = pathlib.Path.home() / ".cache" / "lmkit" / "bench" / "smollm2-f32"

PEFT_CHILD = r'''
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
base, rows_path, steps, batch, seq, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
ids = [json.loads(l)["ids"] for l in open(rows_path)]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
warm, t0, tokens = 2, None, 0
for step in range(steps):
    if step == warm:
        t0 = time.perf_counter()
    rows = [ids[(step * batch + i) % len(ids)] for i in range(batch)]
    x = torch.tensor(rows)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step >= warm:
        tokens += x.numel()
print(json.dumps({"tokens_per_sec": tokens / (time.perf_counter() - t0), "loss": loss.item()}))
'''


def make_rows(tmp, n, seq):
    """Text rows of exactly `seq` + 1 tokens of the bundled corpus, as lmkit text rows and ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BASE)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "data").glob("**/*.txt"))[:4])
    ids = tok(text)["input_ids"]
    rows = [ids[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(n)]
    assert len(rows[-1]) == seq + 1, "not enough text in data/"
    (tmp / "ids.jsonl").write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    # lmkit reads text; decoding and re-encoding must give the same ids for the comparison to hold.
    texts = [tok.decode(r) for r in rows]
    same = sum(tok(t)["input_ids"] == r for t, r in zip(texts, rows))
    (tmp / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return same


def run_lmkit(tmp, steps, batch, seq, threads):
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = tmp / "sft.toml"
    cfg.write_text(f'base = "{BASE}"\n[data]\ntrain = "{tmp}/rows.jsonl"\nval_fraction = 0.0\n'
                   f'[train]\nout_dir = "{out}"\nmax_steps = {steps}\nbatch_size = {batch}\nseq_len = {seq}\n'
                   f'log_every = 1\neval_every = 0\nsave_every = 0\nlr = 2e-4\n'
                   f'[lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"\n')
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    _, _, rss, _ = run_measured([LMKIT, "finetune", "--config", cfg], env=env)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_sec"] for r in recs if "tokens_per_sec" in r and r["step"] > 2]
    return statistics.median(steady), rss, recs[-1]["loss"]


def run_peft(tmp, steps, batch, seq, threads):
    child = tmp / "peft_child.py"
    child.write_text(PEFT_CHILD)
    out, _, rss, _ = run_measured([sys.executable, child, BASE, tmp / "ids.jsonl", steps, batch, seq, threads])
    r = json.loads(out.strip().splitlines()[-1])
    return r["tokens_per_sec"], rss, r["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if not (BASE / "model.safetensors").exists():
        sys.exit(f"{BASE} missing: run bench/real_model_bench.py once (it writes SmolLM2 as an f32 directory)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lora-bench-"))
    same = make_rows(tmp, a.steps * a.batch, a.seq)
    print(f"{a.steps * a.batch} rows of {a.seq + 1} tokens (lmkit reads them as text and cuts them to the same length; "
          f"{same} re-encode to exactly the same ids); "
          f"batch {a.batch}, {a.steps} steps, r=16 all-linear, {a.threads} threads")
    res = {"lmkit": [], "peft": []}
    for r in range(a.rounds):
        for name, fn in [("lmkit", run_lmkit), ("peft", run_peft)] if r % 2 == 0 else [("peft", run_peft), ("lmkit", run_lmkit)]:
            tps, rss, loss = fn(tmp, a.steps, a.batch, a.seq, a.threads)
            res[name].append((tps, rss))
            print(f"  round {r + 1} {name:5s}: {tps:7.1f} tokens/s, peak RSS {rss:6.0f} MB, last loss {loss:.3f}", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
    print(f"lmkit: {med['lmkit'][0]:.1f} tokens/s, {med['lmkit'][1]:.0f} MB")
    print(f"PEFT : {med['peft'][0]:.1f} tokens/s, {med['peft'][1]:.0f} MB")
    print(f"lmkit / PEFT tokens/s: {med['lmkit'][0] / med['peft'][0]:.2f}x; memory {med['lmkit'][1] / med['peft'][1]:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
