"""Online RL (GRPO) parity: on the completions `lmkit rl` sampled and logged, its group-relative
advantages, first-step loss and gradient norm equal TRL's GRPO formulas computed in PyTorch
(ratio, clipped objective, k3 KL estimate against a separate reference); rewards from a reward
model equal transformers' scores; with LoRA the KL reference is the base with adapters off; and on
a toy task with a verifiable reward the mean reward rises over a few dozen CPU steps while the KL
to the reference stays bounded."""
import json
import math
import re

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from test_dpo import make_reference, run_config
from test_finetune import make_base, metrics, write_rows
from test_reward import make_reward_base

PROMPTS = [{"prompt": "where is the cat?"}, {"prompt": "what is one plus two?"}, {"prompt": "where is the dog?"},
           {"prompt": "the cat sat on"}]


def rl_config(tmp_path, base, extra="", rl="", reward='regex = "a"', steps=1, **train):
    train = {"batch_size": 2, **train}
    return run_config(tmp_path, "rl", f'base = "{base}"\n{extra}',
                      {"data": f'prompts = "{tmp_path}/prompts.jsonl"', "rl": rl, "reward": reward}, steps, **train)


def completions(out):
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def trl_advantages(rewards, group):
    """TRL's GRPO advantages (scale_rewards="group")."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    return ((r - mean) / (std + 1e-4)).view(-1)


def token_logps(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0][len(prompt_ids) - 1:]


def test_grpo_loss_and_gradient_equal_trl_formulas(lmkit, tmp_path):
    _, base = make_base(lmkit, tmp_path)
    reference = make_reference(base, tmp_path / "reference")
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    beta, group = 0.1, 3
    lmkit("rl", "--config", rl_config(tmp_path, base, extra=f'reference = "{reference}"',
                                      rl=f"group_size = {group}\nmax_new_tokens = 6\nbeta = {beta}"))
    got = metrics(tmp_path / "out")[0]
    rows = completions(tmp_path / "out")
    assert len(rows) == 2 * group and {r["step"] for r in rows} == {1}
    rewards = [r["reward"] for r in rows]
    assert rewards == [float(bool(re.search("a", r["completion"]))) for r in rows]
    assert 0 < sum(rewards) < len(rewards), "all rewards equal: the advantages would be zero"
    adv = trl_advantages(rewards, group)
    assert max(abs(a - r["advantage"]) for a, r in zip(adv.tolist(), rows)) < 1e-6
    policy = AutoModelForCausalLM.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    total, count, kls = 0.0, 0, []
    for r, a in zip(rows, adv.float()):
        lp = token_logps(policy, r["prompt_ids"], r["completion_ids"])
        with torch.no_grad():
            ref_lp = token_logps(ref, r["prompt_ids"], r["completion_ids"])
        # TRL's _compute_loss with one iteration per generation batch (old = current, detached).
        coef_1 = torch.exp(lp - lp.detach())
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
        per_token_kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
        per_token_loss = -torch.min(coef_1 * a, coef_2 * a) + beta * per_token_kl
        total = total + per_token_loss.sum()
        count += len(r["completion_ids"])
        kls.append(per_token_kl.detach())
    loss = total / count
    loss.backward()
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in policy.parameters() if p.grad is not None))
    assert abs(got["loss"] - loss.item()) < 1e-4, (got["loss"], loss.item())
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    assert abs(got["kl"] - torch.cat(kls).mean().item()) < 1e-4
    assert got["kl"] > 1e-3, "the reference differs from the policy: the KL term must show"
    assert got["time/generation"] > 0 and got["time/optimization"] > 0


def test_rewards_from_a_reward_model_and_lora_reference(lmkit, tmp_path):
    rm0, base = make_reward_base(lmkit, tmp_path)
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    lmkit("rl", "--config", rl_config(tmp_path, base, extra='[lora]\nr = 4\nalpha = 8\ntarget_modules = "all-linear"',
                                      rl="group_size = 2\nmax_new_tokens = 5\nbeta = 0.1", reward=f'model = "{rm0}"',
                                      steps=2, lr=1e-2, min_lr=1e-2))
    m = metrics(tmp_path / "out")
    # Step 1: the adapters are fresh (no change), so the policy is its reference.
    assert abs(m[0]["kl"]) < 1e-6 and m[1]["kl"] > 0, m
    rm = AutoModelForSequenceClassification.from_pretrained(rm0).eval()
    rows = completions(tmp_path / "out")
    with torch.no_grad():
        for r in rows:
            want = rm(torch.tensor([r["prompt_ids"] + r["completion_ids"]])).logits[0, 0].item()
            assert abs(r["reward"] - want) < 1e-4, (r, want)


def test_grpo_raises_a_verifiable_reward(lmkit, tmp_path):
    """Reward: the share of the completion's characters that are "t" (a command reading JSON lines)."""
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "score.py").write_text(
        "import json, sys\nfor line in sys.stdin:\n    c = json.loads(line)['completion']\n"
        "    print(c.count('t') / max(1, len(c)))\n")
    import sys
    lmkit("rl", "--config", rl_config(tmp_path, base, rl="group_size = 4\nmax_new_tokens = 8\nbeta = 0.04",
                                      reward=f'command = "{sys.executable} {tmp_path}/score.py"', steps=30,
                                      batch_size=4, lr=1e-2, min_lr=1e-2))
    m = metrics(tmp_path / "out")
    reward = [r["reward"] for r in m]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.15, reward
    assert max(r["kl"] for r in m) < 10, [r["kl"] for r in m]
    assert len(completions(tmp_path / "out")) == 30 * 4 * 4
    # A command that prints the wrong number of lines is named in the error.
    (tmp_path / "bad.py").write_text("print(1)\n")
    cfg = rl_config(tmp_path, base, rl="group_size = 2\nmax_new_tokens = 3",
                    reward=f'command = "{sys.executable} {tmp_path}/bad.py"')
    import subprocess
    from test_dpo import lmkit_command
    p = subprocess.run([*lmkit_command(), "rl", "--config", str(cfg), "--overwrite"], capture_output=True, text=True)
    assert p.returncode != 0 and "bad.py" in p.stderr and "printed 1 numbers for 4 completions" in p.stderr, p.stderr
    # One that hangs is stopped after reward.timeout_s.
    cfg = rl_config(tmp_path, base, rl="group_size = 2\nmax_new_tokens = 3",
                    reward='command = "exec sleep 30"\ntimeout_s = 1')
    p = subprocess.run([*lmkit_command(), "rl", "--config", str(cfg), "--overwrite"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "did not finish within 1 s" in p.stderr, p.stderr


def values_at(vm, prompt_ids, completion_ids):
    """A value model's value of each completion token (its score head on the hidden state before
    the token), as TRL's PPO reads it (get_reward's full_value[:, context_length - 1:-1])."""
    ids = torch.tensor([prompt_ids + completion_ids])
    h = getattr(vm, vm.base_model_prefix)(ids).last_hidden_state
    return vm.score(h)[0, len(prompt_ids) - 1:-1, 0]


def trl_ppo_batch(rows, policy, ref, vm, beta, gamma=1.0, lam=0.95):
    """TRL PPOTrainer's rollout quantities: old log-probabilities, per-token rewards (−β·k1 KL,
    the score at the last token), values, GAE advantages (whitened over the batch) and returns."""
    old, kl, values, adv, returns = [], [], [], [], []
    with torch.no_grad():
        for r in rows:
            lp = token_logps(policy, r["prompt_ids"], r["completion_ids"])
            ref_lp = token_logps(ref, r["prompt_ids"], r["completion_ids"])
            v = values_at(vm, r["prompt_ids"], r["completion_ids"])
            rew = -beta * (lp - ref_lp)
            rew[-1] += r["reward"]
            a, last = torch.zeros_like(v), 0.0
            for t in reversed(range(len(v))):
                nxt = v[t + 1] if t + 1 < len(v) else 0.0
                last = rew[t] + gamma * nxt - v[t] + gamma * lam * last
                a[t] = last
            old.append(lp)
            kl.append(lp - ref_lp)
            values.append(v)
            adv.append(a)
            returns.append(a + v)
    flat = torch.cat(adv)
    mean, var = flat.mean(), flat.var(unbiased=True)
    adv = [(a - mean) * torch.rsqrt(var + 1e-8) for a in adv]
    return old, kl, values, adv, returns


def ppo_policy_loss(policy, rows, old, adv, eps=0.2):
    """TRL's clipped surrogate (masked mean over every completion token), its gradient norm and
    the share of tokens where the clipped term was larger."""
    policy.zero_grad()
    losses, clipped = [], []
    for r, o, a in zip(rows, old, adv):
        lp = token_logps(policy, r["prompt_ids"], r["completion_ids"])
        ratio = torch.exp(lp - o)
        pg1, pg2 = -a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps)
        losses.append(torch.max(pg1, pg2))
        clipped.append((pg2 > pg1).float())
    loss = torch.cat(losses).mean()
    loss.backward()
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in policy.parameters() if p.grad is not None))
    return loss.item(), norm, torch.cat(clipped).mean().item()


def test_ppo_loss_and_gradient_equal_trl_formulas(lmkit, tmp_path):
    """Two PPO epochs over one rollout: the first step's policy loss, gradient, value loss and KL,
    and the second step's (the policy moved: ratios away from 1, some clipped) equal TRL's PPO
    formulas recomputed in PyTorch from the logged completions and the saved checkpoint."""
    rm0, base = make_reward_base(lmkit, tmp_path)
    reference = make_reference(base, tmp_path / "reference")
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    beta = 0.1
    lmkit("rl", "--config", rl_config(tmp_path, base, extra=f'reference = "{reference}"',
                                      rl=f'algorithm = "ppo"\ngroup_size = 2\nmax_new_tokens = 6\nbeta = {beta}\n'
                                         'ppo_epochs = 2',
                                      reward=f'model = "{rm0}"', steps=2, lr=3e-2, min_lr=3e-2, save_every=1))
    m = metrics(tmp_path / "out")
    rows = completions(tmp_path / "out")
    assert len(rows) == 4 and {r["step"] for r in rows} == {1}, "one rollout for both steps"
    policy = AutoModelForCausalLM.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    vm = AutoModelForSequenceClassification.from_pretrained(rm0).eval()
    old, kl, values, adv, returns = trl_ppo_batch(rows, policy, ref, vm, beta)
    # Step 1: the policy is the sampling one (ratio 1).
    pg, norm, _ = ppo_policy_loss(policy, rows, old, adv)
    vf = 0.5 * torch.cat([(v - r) ** 2 for v, r in zip(values, returns)]).mean().item()
    assert abs(m[0]["loss/policy"] - pg) < 1e-4, (m[0]["loss/policy"], pg)
    assert abs(m[0]["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (m[0]["grad_norm"], norm)
    assert abs(m[0]["loss/value"] - vf) < 1e-4 * max(1.0, vf), (m[0]["loss/value"], vf)
    assert abs(m[0]["loss"] - (pg + 0.1 * vf)) < 1e-4 * max(1.0, vf)
    assert abs(m[0]["kl"] - torch.cat(kl).mean().item()) < 1e-4
    assert m[0]["policy/clipfrac"] == 0.0 and m[0]["time/generation"] > 0
    # Step 2: the policy after step 1 against the rollout's log-probabilities and advantages.
    step1 = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ckpt-000001")
    pg2, norm2, clipfrac = ppo_policy_loss(step1, rows, old, adv)
    assert clipfrac > 0, "the step moved the policy past the clipping range for some tokens"
    assert abs(m[1]["policy/clipfrac"] - clipfrac) < 1e-6, (m[1]["policy/clipfrac"], clipfrac)
    assert abs(m[1]["loss/policy"] - pg2) < 1e-4, (m[1]["loss/policy"], pg2)
    assert abs(m[1]["grad_norm"] - norm2) < 1e-4 * max(1.0, norm2), (m[1]["grad_norm"], norm2)
    assert m[1]["time/generation"] == 0.0, "no generation on the rollout's second epoch"


def test_ppo_raises_a_verifiable_reward_and_resumes_exactly(lmkit, tmp_path):
    """Reward: the share of "t" among the completion's characters; the value model starts from
    the base with a new head. A run stopped after 2 steps and resumed gives the same metrics
    as one that was not stopped (the value model and its optimizer are in the checkpoint)."""
    import sys
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "score.py").write_text(
        "import json, sys\nfor line in sys.stdin:\n    c = json.loads(line)['completion']\n"
        "    print(c.count('t') / max(1, len(c)))\n")
    reward = f'command = "{sys.executable} {tmp_path}/score.py"'
    ppo = 'algorithm = "ppo"\ngroup_size = 4\nmax_new_tokens = 8\nbeta = 0.01\nppo_epochs = 4'
    lmkit("rl", "--config", rl_config(tmp_path, base, rl=ppo, reward=reward, steps=40, batch_size=4, lr=1e-2,
                                      min_lr=1e-2))
    m = metrics(tmp_path / "out")
    reward_ = [r["reward"] for r in m]
    first, last = sum(reward_[:8]) / 8, sum(reward_[-8:]) / 8
    assert last > first + 0.15, reward_
    assert max(r["kl"] for r in m) < 10, [r["kl"] for r in m]
    assert len(completions(tmp_path / "out")) == 10 * 4 * 4, "a rollout every ppo_epochs steps"
    ppo = 'algorithm = "ppo"\ngroup_size = 2\nmax_new_tokens = 8\nbeta = 0.04\nppo_epochs = 2'
    # Resume: 2 steps, then on to 4, against 4 straight.
    for name, runs in [("straight", [4]), ("resumed", [2, 4])]:
        for i, steps in enumerate(runs):
            cfg = rl_config(tmp_path, base, rl=ppo, reward=reward, steps=steps, batch_size=2, lr=1e-2, min_lr=1e-2,
                            save_every=2, out_dir=f'"{tmp_path}/{name}"')
            lmkit("rl", "--config", cfg, *(["--resume"] if i else []))
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ["loss", "loss/value", "grad_norm", "reward"]:
            assert abs(x[key] - y[key]) < 1e-5 * max(1.0, abs(x[key])), (key, x, y)


def test_ppo_with_lora_gives_the_value_model_its_own_adapters(lmkit, tmp_path):
    """With [lora] and the value model started from the base, the value model trains LoRA
    adapters and its head (the checkpoint's optimizer file holds only those), and a run resumed
    after its first step logs what an uninterrupted one does."""
    from safetensors import safe_open
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    ppo = 'algorithm = "ppo"\ngroup_size = 2\nmax_new_tokens = 6\nbeta = 0.05\nppo_epochs = 1'
    lora = '[lora]\nr = 4\nalpha = 8\ntarget_modules = "all-linear"'
    for name, runs in [("straight", [2]), ("resumed", [1, 2])]:
        for i, steps in enumerate(runs):
            cfg = rl_config(tmp_path, base, extra=lora, rl=ppo, reward='regex = "a"', steps=steps, lr=1e-2,
                            min_lr=1e-2, save_every=1, out_dir=f'"{tmp_path}/{name}"')
            lmkit("rl", "--config", cfg, *(["--resume"] if i else []))
    ckpt = tmp_path / "straight" / "ckpt-000002"
    assert (ckpt / "adapter_config.json").is_file(), "the policy is an adapter"
    with safe_open(str(ckpt / "trainer_state" / "optimizer.safetensors"), "pt") as f:
        value = [k for k in f.keys() if k.startswith("value_model.")]
    assert value and all("lora_" in k or "score" in k for k in value), value
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert a[0]["loss/value"] != a[1]["loss/value"]
    for x, y in zip(a, b):
        for key in ["loss", "loss/value", "grad_norm", "reward"]:
            assert abs(x[key] - y[key]) < 1e-5 * max(1.0, abs(x[key])), (key, x, y)
