"""Preference tuning (DPO, sigmoid loss) on the CPU: lmkit dpo vs TRL's DPOTrainer, same model
(SmolLM2-135M-Instruct as an f32 transformers directory), the same pairs, batch size, β and
learning rate; LoRA (r=16, all linear layers) and full fine-tuning. Runs alternate; prints the
medians of training tokens/s (steady state: steps after the first two; tokens are the
non-padding tokens of the chosen and rejected sequences), whole-run wall time (load, reference
log-probabilities, steps) and peak RSS, and the ratios.

TRL runs with its defaults for the reference: a separate reference model scored at every step
(full) or the policy with adapters off at every step (LoRA). lmkit scores the reference once
before training and caches the scores (a fresh cache directory per run here, so every lmkit run
pays for the scoring in its wall time).

    ~/.cache/lmkit/venv/bin/python bench/dpo_bench.py [--rounds 3] [--steps 8] [--batch 2] [--mode lora|full|both]
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
BASE = pathlib.Path.home() / ".cache" / "lmkit" / "bench" / "smollm2-f32"

TRL_CHILD = r'''
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
base, rows_path, steps, batch, threads, mode, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], float(sys.argv[7])
torch.set_num_threads(threads)
rows = [json.loads(l) for l in open(rows_path)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
peft_config = None
if mode == "lora":
    from peft import LoraConfig
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
stamps = []
class Stamp(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.perf_counter())
args = DPOConfig(output_dir=sys.argv[8], per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                 lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.1, report_to=[], use_cpu=True,
                 bf16=False, save_strategy="no", logging_steps=1, max_length=1024, dataloader_num_workers=0,
                 data_seed=0, seed=0)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     peft_config=peft_config, callbacks=[Stamp()])
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
tokens = [h["num_tokens"] for h in logs]
warm = 2
per_step = [tokens[i] - (tokens[i - 1] if i else 0) for i in range(len(tokens))]
steady = sum(per_step[warm:]) / (stamps[-1] - stamps[warm - 1])
print(json.dumps({"tokens_per_sec": steady, "loss": logs[-1]["loss"], "margin": logs[-1]["rewards/margins"]}))
'''


def make_pairs(tmp, n, part):
    """Pairs from the bundled corpus: a prompt of `part` tokens, its own continuation (chosen) and
    another passage's (rejected), each `part` tokens, as text."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BASE)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "data").glob("**/*.txt"))[:4])
    ids = tok(text)["input_ids"]
    chunk = 3 * part
    assert len(ids) >= (n + 1) * chunk, "not enough text in data/"
    rows = []
    for i in range(n):
        a = ids[i * chunk:(i + 1) * chunk]
        b = ids[(i + 1) * chunk:(i + 2) * chunk]
        rows.append({"prompt": tok.decode(a[:part]), "chosen": tok.decode(a[part:2 * part]),
                     "rejected": tok.decode(b[2 * part:])})
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_lmkit(tmp, steps, batch, threads, mode, lr):
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = tmp / "dpo.toml"
    lora = '[lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"\n' if mode == "lora" else ""
    cfg.write_text(f'base = "{BASE}"\n[data]\ntrain = "{tmp}/pairs.jsonl"\nval_fraction = 0.0\n[dpo]\nbeta = 0.1\n'
                   f'[train]\nout_dir = "{out}"\nmax_steps = {steps}\nbatch_size = {batch}\nseq_len = 1024\n'
                   f'log_every = 1\neval_every = 0\nsave_every = 0\nlr = {lr}\nmin_lr = {lr}\n{lora}')
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), LMKIT_CACHE=str(cache))
    t0 = time.perf_counter()
    _, _, rss, _ = run_measured([LMKIT, "dpo", "--config", cfg], env=env)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_sec"] for r in recs if "tokens_per_sec" in r and r["step"] > 2]
    return statistics.median(steady), wall, rss, recs[-1]["loss"], recs[-1]["rewards/margins"]


def run_trl(tmp, steps, batch, threads, mode, lr):
    child = tmp / "trl_child.py"
    child.write_text(TRL_CHILD)
    t0 = time.perf_counter()
    out, _, rss, _ = run_measured([sys.executable, child, BASE, tmp / "pairs.jsonl", steps, batch, threads, mode, lr,
                                   tmp / "trl-out"])
    wall = time.perf_counter() - t0
    r = json.loads(out.strip().splitlines()[-1])
    return r["tokens_per_sec"], wall, rss, r["loss"], r["margin"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--part", type=int, default=96, help="tokens in each prompt and completion")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    a = ap.parse_args()
    if not (BASE / "model.safetensors").exists():
        sys.exit(f"{BASE} missing: run bench/real_model_bench.py once (it writes SmolLM2 as an f32 directory)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    make_pairs(tmp, a.steps * a.batch, a.part)
    print(f"{a.steps * a.batch} pairs (prompt, chosen and rejected of ~{a.part} tokens each), batch {a.batch} pairs, "
          f"{a.steps} steps, beta 0.1, {a.threads} threads")
    for mode in (["lora", "full"] if a.mode == "both" else [a.mode]):
        lr = 5e-6 if mode == "lora" else 1e-6
        res = {"lmkit": [], "trl": []}
        order = [("lmkit", run_lmkit), ("trl", run_trl)]
        for r in range(a.rounds):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                tps, wall, rss, loss, margin = fn(tmp, a.steps, a.batch, a.threads, mode, lr)
                res[name].append((tps, wall, rss))
                print(f"  {mode} round {r + 1} {name:5s}: {tps:7.1f} tokens/s, run {wall:5.1f} s, peak RSS {rss:6.0f} MB, "
                      f"last loss {loss:.4f}, margin {margin:+.4f}", flush=True)
        med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in res.items()}
        for k, name in [("lmkit", "lmkit"), ("trl", "TRL  ")]:
            print(f"{mode} {name}: {med[k][0]:.1f} tokens/s, run {med[k][1]:.1f} s, {med[k][2]:.0f} MB")
        print(f"{mode} lmkit / TRL: tokens/s {med['lmkit'][0] / med['trl'][0]:.2f}x, run time "
              f"{med['trl'][1] / med['lmkit'][1]:.2f}x faster, memory {med['lmkit'][2] / med['trl'][2]:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
