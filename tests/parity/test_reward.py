"""Reward-model parity: a transformers LlamaForSequenceClassification loads in lmkit and its first
training step (Bradley-Terry loss with per-pair margins, gradient norm, accuracy, margin) equals
TRL's RewardTrainer on the same pairs; the reward model lmkit writes loads in transformers with
the same scores; and on synthetic preferences it learns to rank held-out pairs."""
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from test_dpo import PAIRS, SYNTHETIC, first_step, run_config, write_synthetic_preferences
from test_finetune import make_base, metrics, write_rows


def reward_config(tmp_path, base, steps=1, reward="", **train):
    data = f'train = "{tmp_path}/pairs.jsonl"\nval_fraction = 0.0'
    return run_config(tmp_path, "reward", f'base = "{base}"', {"data": data, "reward": reward}, steps, **train)


def make_reward_base(lmkit, tmp_path):
    """A LlamaForSequenceClassification (one label) made by transformers from the tiny base."""
    _, base = make_base(lmkit, tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    out = tmp_path / "rm0"
    rm.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (out / name).write_bytes((base / name).read_bytes())
    return out, base


def trl_reward_step(model_dir, rows, tmp_path, **reward_args):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=1,
                        report_to=[], use_cpu=True, save_strategy="no", bf16=False, **reward_args)
    return first_step(RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tok))


@pytest.mark.parametrize("center", [None, 0.1])
def test_reward_step_equals_trl(lmkit, tmp_path, center):
    rm0, _ = make_reward_base(lmkit, tmp_path)
    rows = [dict(r, margin=m) for r, m in zip(PAIRS, [0.5, 0.0, 1.5])]
    write_rows(tmp_path / "pairs.jsonl", rows)
    extra = f"center_rewards_coefficient = {center}" if center else ""
    lmkit("reward", "train", "--config", reward_config(tmp_path, rm0, reward=extra))
    got = metrics(tmp_path / "out")[0]
    kw = {"center_rewards_coefficient": center} if center else {}
    loss, norm, logged = trl_reward_step(rm0, rows, tmp_path, **kw)
    assert abs(got["loss"] - loss) < 1e-4, (got["loss"], loss)
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    for k in ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"]:
        assert abs(got[k] - logged[k]) < 1e-4, (k, got[k], logged[k])


def test_trained_reward_model_loads_in_transformers_and_ranks(lmkit, tmp_path):
    """From a causal LM: lmkit adds the head, trains on synthetic preferences (answers ending in
    "yes" beat those ending in "no"), ranks held-out pairs, and transformers scores its checkpoint
    as lmkit does."""
    _, base = make_base(lmkit, tmp_path)
    write_synthetic_preferences(tmp_path)
    rows = SYNTHETIC
    cfg = reward_config(tmp_path, base, steps=30, lr=3e-3, min_lr=3e-3, batch_size=4, eval_every=30)
    cfg.write_text(cfg.read_text().replace("val_fraction = 0.0", f'val = "{tmp_path}/val.jsonl"'))
    lmkit("reward", "train", "--config", cfg)
    evals = [r for r in metrics(tmp_path / "out") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_accuracy"] == 1.0, evals
    assert evals[-1]["val_loss"] < 0.5 * math.log(2), evals
    out = lmkit("reward", "score", "--model", tmp_path / "out", "--input", tmp_path / "val.jsonl")
    scores = [json.loads(line) for line in out.splitlines()]
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] is not None
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    texts = [r["prompt"] + r[side] + tok.eos_token for r in rows[12:] for side in ("chosen", "rejected")]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**batch).logits[:, 0].tolist()
    got = [s[side] for s in scores for side in ("chosen", "rejected")]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
    # Plain rows get one reward each.
    write_rows(tmp_path / "one.jsonl", [{"prompt": "is it two?", "completion": " two yes"}])
    one = json.loads(lmkit("reward", "score", "--model", ckpt, "--input", tmp_path / "one.jsonl"))
    with torch.no_grad():
        want = model(**tok(["is it two? two yes" + tok.eos_token], return_tensors="pt")).logits[0, 0].item()
    assert abs(one["reward"] - want) < 1e-4


def test_lora_reward_model_is_a_peft_seq_cls_adapter(lmkit, tmp_path):
    """With [lora]: the adapters and the head train (on synthetic preferences, ranking held-out
    pairs); the checkpoint is a PEFT SEQ_CLS adapter with the head saved as a module, and PEFT
    loads it on transformers' LlamaForSequenceClassification with the scores lmkit gives."""
    from peft import PeftModel
    _, base = make_base(lmkit, tmp_path)
    write_synthetic_preferences(tmp_path)
    rows = SYNTHETIC
    cfg = reward_config(tmp_path, base, steps=30, lr=3e-3, min_lr=3e-3, batch_size=4, eval_every=30)
    text = cfg.read_text().replace("val_fraction = 0.0", f'val = "{tmp_path}/val.jsonl"')
    cfg.write_text(text.replace("[train]", '[lora]\nr = 8\nalpha = 16\ntarget_modules = "all-linear"\n[train]'))
    lmkit("reward", "train", "--config", cfg)
    evals = [r for r in metrics(tmp_path / "out") if "val_loss" in r]
    assert evals[-1]["eval_accuracy"] == 1.0, evals
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"], evals
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    ac = json.loads((ckpt / "adapter_config.json").read_text())
    assert ac["task_type"] == "SEQ_CLS" and ac["modules_to_save"] == ["score"], ac
    assert not (ckpt / "model.safetensors").exists()
    out = lmkit("reward", "score", "--model", tmp_path / "out", "--input", tmp_path / "val.jsonl")
    scores = [json.loads(line) for line in out.splitlines()]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id)
    peft = PeftModel.from_pretrained(model, ckpt).eval()
    texts = [r["prompt"] + r[side] + tok.eos_token for r in rows[12:] for side in ("chosen", "rejected")]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = peft(**batch).logits[:, 0].tolist()
    got = [s[side] for s in scores for side in ("chosen", "rejected")]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
