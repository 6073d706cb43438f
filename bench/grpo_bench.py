"""GRPO on the CPU: lmkit rl vs TRL's GRPOTrainer, same model (SmolLM2-135M-Instruct as an f32
transformers directory), LoRA r=16 on all linear layers, the same prompts, 4 prompts x 4
completions of up to 32 tokens per step, temperature 1, a regex reward (the completion has a
digit), β = 0 (TRL's default: no reference model). Runs alternate; prints per-step seconds split
into generation and optimisation (lmkit logs the split; TRL's generation time is measured by
wrapping its model's `generate`), medians of the steps after the first, and peak RSS.

    ~/.cache/lmkit/venv/bin/python bench/grpo_bench.py [--rounds 2] [--steps 4]
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile

from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
BASE = pathlib.Path.home() / ".cache" / "lmkit" / "bench" / "smollm2-f32"
PROMPTS = [f"Question: what is {a} plus {b}? Answer in words.\nAnswer:" for a, b in
           [(2, 3), (7, 5), (11, 4), (9, 9), (6, 1), (3, 8), (12, 2), (5, 5)]]

TRL_CHILD = r'''
import json, re, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer
base, prompts_path, steps, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
rows = [json.loads(l) for l in open(prompts_path)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
def digit(completions, **kw):
    return [float(bool(re.search(r"\d", c))) for c in completions]
stamps, gen = [], [0.0]
class Stamp(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append((time.perf_counter(), gen[0]))
args = GRPOConfig(output_dir=out, per_device_train_batch_size=16, num_generations=4, max_completion_length=32,
                  max_steps=steps, learning_rate=1e-5, beta=0.0, temperature=1.0, report_to=[], use_cpu=True,
                  bf16=False, save_strategy="no", logging_steps=1, seed=0)
trainer = GRPOTrainer(model=model, reward_funcs=[digit], args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                      callbacks=[Stamp()])
inner = trainer.model.generate
def timed(*a, **k):
    t0 = time.perf_counter()
    try:
        return inner(*a, **k)
    finally:
        gen[0] += time.perf_counter() - t0
trainer.model.generate = timed
trainer.train()
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
steps_out = []
for i in range(1, len(stamps)):
    total = stamps[i][0] - stamps[i - 1][0]
    g = stamps[i][1] - stamps[i - 1][1]
    steps_out.append({"total": total, "generation": g})
print(json.dumps({"steps": steps_out, "reward": rewards}))
'''


def run_lmkit(tmp, steps, threads):
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = tmp / "rl.toml"
    cfg.write_text(f'base = "{BASE}"\n[data]\nprompts = "{tmp}/prompts.jsonl"\n'
                   f'[rl]\ngroup_size = 4\nmax_new_tokens = 32\ntemperature = 1.0\nbeta = 0.0\n'
                   f'[reward]\nregex = "\\\\d"\n'
                   f'[train]\nout_dir = "{out}"\nmax_steps = {steps}\nbatch_size = 4\nseq_len = 256\n'
                   f'log_every = 1\nsave_every = 0\nlr = 1e-5\n'
                   f'[lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"\n')
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    _, _, rss, _ = run_measured([LMKIT, "rl", "--config", cfg], env=env)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_out = [{"generation": r["time/generation"], "total": r["time/generation"] + r["time/optimization"]}
                 for r in recs[1:]]
    return steps_out, rss, [r["reward"] for r in recs]


def run_trl(tmp, steps, threads):
    child = tmp / "trl_child.py"
    child.write_text(TRL_CHILD)
    out, _, rss, _ = run_measured([sys.executable, child, BASE, tmp / "prompts.jsonl", steps, threads, tmp / "trl-out"])
    r = json.loads(out.strip().splitlines()[-1])
    return r["steps"], rss, r["reward"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    if not (BASE / "model.safetensors").exists():
        sys.exit(f"{BASE} missing: run bench/real_model_bench.py once (it writes SmolLM2 as an f32 directory)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    print(f"GRPO, LoRA r=16 all-linear, 4 prompts x 4 completions of <= 32 tokens per step, {a.steps} steps, "
          f"{a.threads} threads")
    res = {"lmkit": [], "trl": []}
    order = [("lmkit", run_lmkit), ("trl", run_trl)]
    for r in range(a.rounds):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            steps, rss, rewards = fn(tmp, a.steps, a.threads)
            res[name].append((steps, rss))
            gen = statistics.median(s["generation"] for s in steps)
            tot = statistics.median(s["total"] for s in steps)
            print(f"  round {r + 1} {name:5s}: step {tot:6.2f} s (generation {gen:6.2f} s, optimisation {tot - gen:6.2f} s), "
                  f"peak RSS {rss:6.0f} MB, rewards {[round(x, 2) for x in rewards]}", flush=True)
    for name in ("lmkit", "trl"):
        steps = [s for run in res[name] for s in run[0]]
        gen = statistics.median(s["generation"] for s in steps)
        tot = statistics.median(s["total"] for s in steps)
        rss = statistics.median(run[1] for run in res[name])
        print(f"{name:5s}: step {tot:.2f} s = generation {gen:.2f} s ({100 * gen / tot:.0f}%) + optimisation "
              f"{tot - gen:.2f} s; peak RSS {rss:.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
