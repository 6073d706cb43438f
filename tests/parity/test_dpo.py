"""Preference-tuning parity: `lmkit dpo`'s first-step loss, gradient norm and logged rewards equal
TRL's DPOTrainer (sigmoid, robust, hinge, IPO) with a separate reference model on the same pairs;
SimPO and ORPO equal TRL's own loss functions (CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss)
on log-probabilities transformers computes; with LoRA the reference is the base (adapters off)
and its log-probabilities come from the cache on a second run; and DPO on synthetic preferences
moves the held-out reward margin and accuracy."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_finetune import make_base, metrics, write_rows

PAIRS = [
    {"prompt": "what is one plus two?", "chosen": " it is three.", "rejected": " on the log."},
    {"prompt": "where is the dog?", "chosen": " on the log.", "rejected": " the cat sat on the mat."},
    {"prompt": "where is the cat?", "chosen": " the cat sat on the mat.", "rejected": " it is three."},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE", str(tmp_path / "cache"))


SUBJECTS = ["the cat", "the dog", "the mat", "the log", "one", "two", "three", "the cat and the dog",
            "the log on the mat", "one plus two", "what is three", "where is the cat", "the dog sat",
            "the cat sat", "it is one", "on the log"]
# Answers ending in "yes" are preferred to the same answers ending in "no".
SYNTHETIC = [{"prompt": f"is it {s}?", "chosen": f" {s} yes", "rejected": f" {s} no"} for s in SUBJECTS]


def write_synthetic_preferences(tmp_path):
    """12 training pairs (pairs.jsonl) and 4 held-out ones with other prompts (val.jsonl)."""
    write_rows(tmp_path / "pairs.jsonl", SYNTHETIC[:12])
    write_rows(tmp_path / "val.jsonl", SYNTHETIC[12:])


def make_reference(base, out, seed=7):
    """The base with every weight perturbed: a reference that differs from the policy."""
    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (out / name).write_bytes((base / name).read_bytes())
    return out


def run_config(tmp_path, name, head, sections, steps=1, **train):
    """Writes a tiny run config `name`.toml: `head` lines, then TOML `sections` ({name: body}), then
    [train] (one step of 3 rows at a constant tiny learning rate unless told)."""
    t = {"out_dir": f'"{tmp_path}/out"', "max_steps": steps, "batch_size": 3, "seq_len": 64, "lr": 1e-6,
         "min_lr": 1e-6, "warmup_steps": 0, "eval_every": 0, "log_every": 1, "save_every": steps, "grad_clip": 0.0}
    t.update(train)
    path = tmp_path / f"{name}.toml"
    path.write_text(head + "\n" + "".join(f"[{k}]\n{v}\n" for k, v in sections.items())
                    + "[train]\n" + "".join(f"{k} = {v}\n" for k, v in t.items()))
    return path


def dpo_config(tmp_path, base, extra="", dpo="", steps=1, **train):
    data = f'train = "{tmp_path}/pairs.jsonl"\nval_fraction = 0.0'
    return run_config(tmp_path, "dpo", f'base = "{base}"\n{extra}', {"data": data, "dpo": dpo}, steps, **train)


def first_step(trainer):
    """A TRL trainer's loss on its first batch, its gradient norm, and the metrics it logged."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in trainer.model.parameters() if p.grad is not None))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if isinstance(v, list) and v}
    return loss.item(), norm, logged


def trl_dpo_step(base, reference, rows, tmp_path, **dpo_args):
    """TRL's DPOTrainer on one batch of all `rows`: loss, gradient norm and its logged metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    policy = AutoModelForCausalLM.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(reference)
    tok = AutoTokenizer.from_pretrained(base)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, **dpo_args)
    return first_step(DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok))


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("robust", 0.3, 0.2),
                                                      ("hinge", 0.5, 0.0), ("ipo", 0.2, 0.0)])
def test_dpo_losses_and_gradients_equal_trl(lmkit, tmp_path, loss_type, beta, smoothing):
    _, base = make_base(lmkit, tmp_path)
    reference = make_reference(base, tmp_path / "reference")
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    lmkit("dpo", "--config", dpo_config(tmp_path, base, extra=f'reference = "{reference}"',
                                        dpo=f'loss = "{loss_type}"\nbeta = {beta}\nlabel_smoothing = {smoothing}'))
    got = metrics(tmp_path / "out")[0]
    loss, norm, logged = trl_dpo_step(base, reference, PAIRS, tmp_path, loss_type=[loss_type], beta=beta,
                                      label_smoothing=smoothing)
    assert loss > 1e-3, "a zero loss would not test the formula"
    assert abs(got["loss"] - loss) < 1e-4, (got["loss"], loss)
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        assert abs(got[k] - logged[k]) < 1e-4, (k, got[k], logged[k])
    for k in ["logps/chosen", "logps/rejected"]:
        assert abs(got[k] - logged[k]) < 1e-3, (k, got[k], logged[k])
    # The cached reference scores are the reference's own (a plain transformers forward).
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        c, r, nc, nr = completion_logps(AutoModelForCausalLM.from_pretrained(reference), tok, PAIRS, tok.eos_token)
    cached = json.loads(next((tmp_path / "cache" / "reference-logps").glob("*.json")).read_text())["scores"]
    for i, s in enumerate(cached):
        assert abs(s["chosen"] - c[i].item()) < 1e-4 and abs(s["rejected"] - r[i].item()) < 1e-4, (s, c, r)
        assert (s["n_chosen"], s["n_rejected"]) == (nc[i].item(), nr[i].item())


def test_dpo_steps_follow_trl_over_several_updates(lmkit, tmp_path):
    """Three optimizer steps of full-parameter DPO on one batch of all pairs (so the order the
    trainers draw pairs in cannot matter): each step's loss and margin equal TRL's. Every step
    sums six passes' gradients (two sides of three pairs), so the step's gradient sum and the
    AdamW update are checked, not only the first loss."""
    _, base = make_base(lmkit, tmp_path)
    reference = make_reference(base, tmp_path / "reference")
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    steps, lr = 3, 1e-3
    lmkit("dpo", "--config", dpo_config(tmp_path, base, extra=f'reference = "{reference}"', dpo="beta = 0.1",
                                        steps=steps, lr=lr, min_lr=lr))
    got = metrics(tmp_path / "out")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), max_steps=steps,
                     learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=0.0, beta=0.1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                     logging_steps=1)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base),
                         ref_model=AutoModelForCausalLM.from_pretrained(reference), args=args,
                         train_dataset=Dataset.from_list(PAIRS), processing_class=AutoTokenizer.from_pretrained(base))
    trainer.train()
    want = [h for h in trainer.state.log_history if "loss" in h]
    assert len(got) == len(want) == steps
    assert abs(want[-1]["loss"] - want[0]["loss"]) > 1e-2, "the updates must move the loss for this to test them"
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) < 1e-3, (g["loss"], w["loss"])
        assert abs(g["rewards/margins"] - w["rewards/margins"]) < 1e-3, (g["rewards/margins"], w["rewards/margins"])


def completion_logps(model, tok, rows, eos):
    """Summed completion log-probabilities (chosen, rejected) and completion token counts, with
    gradients, each sequence being prompt + completion + eos as lmkit and TRL build it."""
    sums, counts = {"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            ids = tok(r["prompt"] + r[side] + eos)["input_ids"]
            assert ids[:len(prompt)] == prompt
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1], dim=-1)
            picked = logp.gather(1, x[0, 1:, None])[:, 0][len(prompt) - 1:]
            sums[side].append(picked.sum())
            counts[side].append(len(ids) - len(prompt))
    return (torch.stack(sums["chosen"]), torch.stack(sums["rejected"]), torch.tensor(counts["chosen"], dtype=torch.float32),
            torch.tensor(counts["rejected"], dtype=torch.float32))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_equal_trl_formulas(lmkit, tmp_path, loss_type):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    model, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    beta, gamma, alpha = 0.7, 0.3, 0.5
    lmkit("dpo", "--config", dpo_config(tmp_path, base, dpo=f'loss = "{loss_type}"\nbeta = {beta}\n'
                                                            f'simpo_gamma = {gamma}\nsft_weight = {alpha}'))
    got = metrics(tmp_path / "out")[0]
    tok = AutoTokenizer.from_pretrained(base)
    model.train()
    c, r, nc, nr = completion_logps(model, tok, PAIRS, tok.eos_token)
    nll = -c.sum() / nc.sum()
    me = SimpleNamespace(beta=beta, label_smoothing=0.0, loss_type="simpo", simpo_gamma=gamma, alpha=0.0,
                         accelerator=SimpleNamespace(device="cpu"))
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(me, c / nc, r / nr)
        loss = losses.mean() + alpha * nll
    else:
        losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(me, c / nc, r / nr)
        loss = nll - losses.mean()
    loss.backward()
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters() if p.grad is not None))
    assert abs(got["loss"] - loss.item()) < 1e-4, (got["loss"], loss.item())
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    assert abs(got["rewards/chosen"] - chosen_rewards.mean().item()) < 1e-4
    assert abs(got["rewards/rejected"] - rejected_rewards.mean().item()) < 1e-4
    assert abs(got["nll_loss"] - nll.item()) < 1e-4


def test_lora_reference_is_the_base_and_is_cached(lmkit, tmp_path):
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    cfg = dpo_config(tmp_path, base, extra='[lora]\nr = 4\nalpha = 8\ntarget_modules = "all-linear"', steps=3,
                     lr=1e-2, min_lr=1e-2)
    lmkit("dpo", "--config", cfg)
    rows = [r for r in metrics(tmp_path / "out") if "loss" in r]
    # Step 1: the policy is the base, so DPO's loss is log 2 and the rewards are zero.
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5, rows[0]
    assert abs(rows[0]["rewards/margins"]) < 1e-5
    assert abs(rows[-1]["rewards/margins"]) > 1e-3, "three steps at lr 1e-2 moved nothing"
    cached = list((tmp_path / "cache" / "reference-logps").glob("*.json"))
    assert len(cached) == 1
    # A second run over the same data and base reads the cache (a changed cache file would show).
    scores = json.loads(cached[0].read_text())
    scores["scores"][0]["chosen"] -= 1.0
    cached[0].write_text(json.dumps(scores))
    lmkit("dpo", "--config", cfg, "--overwrite")
    first = metrics(tmp_path / "out")[0]
    assert abs(first["rewards/chosen"] - 0.1 * 1.0 / 3) < 1e-5, first


def test_dpo_learns_synthetic_preferences(lmkit, tmp_path):
    """Chosen answers end with "yes", rejected ones with "no": after a few dozen LoRA steps the held-out
    pairs (other prompts) are ranked correctly."""
    _, base = make_base(lmkit, tmp_path)
    write_synthetic_preferences(tmp_path)
    cfg = dpo_config(tmp_path, base, extra='[lora]\nr = 8\nalpha = 16\ntarget_modules = "all-linear"',
                     dpo="beta = 0.1", steps=30, lr=3e-3, min_lr=3e-3, batch_size=4, eval_every=30)
    text = cfg.read_text().replace("val_fraction = 0.0", f'val = "{tmp_path}/val.jsonl"')
    cfg.write_text(text)
    lmkit("dpo", "--config", cfg)
    evals = [r for r in metrics(tmp_path / "out") if "val_loss" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == 30
    assert abs(before["eval_rewards/margins"]) < 1e-5
    assert after["eval_rewards/accuracies"] == 1.0, after
    assert after["eval_rewards/margins"] > 0.5, after
    assert after["val_loss"] < 0.5 * math.log(2), after


def test_bad_pairs_are_named(lmkit, tmp_path):
    import subprocess
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "pairs.jsonl", PAIRS + [{"prompt": "x", "chosen": "y"}])
    cfg = dpo_config(tmp_path, base)
    p = subprocess.run([*lmkit_command(), "dpo", "--config", str(cfg)], capture_output=True, text=True)
    assert p.returncode != 0 and "pairs.jsonl:line 4" in p.stderr and "rejected" in p.stderr, p.stderr
    lmkit("dpo", "--config", cfg, "--skip-bad")
    assert metrics(tmp_path / "out")[0]["step"] == 1


def lmkit_command():
    import os
    from conftest import ROOT
    return [os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))]


RATED = [
    {"prompt": "what is one plus two?", "completion": " it is three.", "label": True},
    {"prompt": "where is the dog?", "completion": " the cat sat on the mat.", "label": False},
    {"prompt": "where is the cat?", "completion": " the cat sat on the mat.", "label": True},
    {"prompt": "what is one plus two?", "completion": " on the log.", "label": False},
]


def test_kto_step_equals_trl(lmkit, tmp_path):
    """KTO on unpaired thumbs-up/down rows: the first step's loss, gradient norm, KL estimate (from
    mismatched prompt/completion pairs, rotated within the batch as TRL pairs them) and rewards equal
    TRL's KTOTrainer with a separate reference model."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    _, base = make_base(lmkit, tmp_path)
    reference = make_reference(base, tmp_path / "reference")
    write_rows(tmp_path / "pairs.jsonl", RATED)
    lmkit("dpo", "--config", dpo_config(tmp_path, base, extra=f'reference = "{reference}"', batch_size=4,
                                        dpo='loss = "kto"\nbeta = 0.3\ndesirable_weight = 1.0\nundesirable_weight = 1.5'))
    got = metrics(tmp_path / "out")[0]
    policy = AutoModelForCausalLM.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(reference)
    tok = AutoTokenizer.from_pretrained(base)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, beta=0.3, desirable_weight=1.0,
                     undesirable_weight=1.5)
    loss, norm, logged = first_step(KTOTrainer(model=policy, ref_model=ref, args=args,
                                               train_dataset=Dataset.from_list(RATED), processing_class=tok))
    assert abs(got["loss"] - loss) < 1e-4, (got["loss"], loss, got, logged)
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    assert abs(got["kl"] - logged["kl"]) < 1e-4, (got, logged)
    assert got["kl"] > 0, "a zero KL estimate would not test it"
