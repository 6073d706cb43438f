"""Fine-tuning parity: `lmkit finetune`'s assistant-only loss equals transformers' loss with the
labels its own `return_assistant_tokens_mask` gives (from a template with generation markers,
while lmkit reads the same template without them); LoRA adapters written by lmkit load in PEFT
with the same logits, PEFT's adapters load in lmkit likewise (Llama and GPT-2's Conv1D layers),
LoRA gradients equal PEFT's on a fixed batch, `lmkit adapter merge` equals `merge_and_unload`,
and a LoRA run resumes exactly."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from test_transformers_decoders import lmkit_logits, randomize_norms

PLAIN = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The same rendering, with the assistant's answer and end-of-turn token marked for transformers.
MARKED = ("{% for message in messages %}<|{{ message['role'] }}|>{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}{% else %}{{ message['content'] }}<|end|>"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "what is one plus two?"},
     {"role": "assistant", "content": "it is three."}],
    [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": "the cat sat on the mat."},
     {"role": "user", "content": "and the dog?"}, {"role": "assistant", "content": "on the log."}],
    [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat"}],
]


def make_base(lmkit, tmp_path, kind="llama"):
    """A random-initialised model with an lmkit tokenizer and a chat template, as a HF directory."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. what is one plus two? it is three. where is the dog? on the log.\n" * 40)
    lmkit("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", tmp_path / "tok")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        cfg = GPTNeoXConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5)
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=320, n_positions=128, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0,
                         attn_pdrop=0)
        model = GPT2LMHeadModel(cfg)
    randomize_norms(model, torch.Generator().manual_seed(1))
    base = tmp_path / f"base-{kind}"
    model.eval().save_pretrained(base, safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (base / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    tc = json.loads((base / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == PLAIN, "the test's marked template must match the tokenizer's"
    return model, base


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def finetune(lmkit, tmp_path, base, extra="", steps=1, **train):
    t = {"out_dir": f'"{tmp_path}/out"', "max_steps": steps, "batch_size": 3, "seq_len": 64, "lr": 1e-2, "min_lr": 1e-2,
         "warmup_steps": 0, "eval_every": 0, "log_every": 1, "save_every": steps, "grad_clip": 0.0}
    t.update(train)
    (tmp_path / "sft.toml").write_text(
        f'base = "{base}"\n{extra}\n[data]\ntrain = "{tmp_path}/rows.jsonl"\nval_fraction = 0.0\n[train]\n'
        + "".join(f"{k} = {v}\n" for k, v in t.items()))
    return tmp_path / "sft.toml"


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hf_masked_loss(model, tok, conversations, chat_template=MARKED):
    """Summed cross-entropy over the assistant tokens transformers marks, and their count."""
    total, count = 0.0, 0
    for msgs in conversations:
        enc = tok.apply_chat_template(msgs, chat_template=chat_template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        mask = torch.tensor(enc["assistant_masks"], dtype=torch.bool)
        labels = torch.where(mask, ids[0], torch.tensor(-100))
        logits = model(ids).logits[0]
        ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        total += ce.item()
        count += int((labels[1:] != -100).sum())
    return total, count


def test_assistant_only_loss_matches_transformers_masks(lmkit, tmp_path):
    model, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    # Full fine-tuning: the first step's loss is the loss of the untouched base on all three rows.
    lmkit("finetune", "--config", finetune(lmkit, tmp_path, base, lr=1e-6, min_lr=1e-6))
    got = metrics(tmp_path / "out")[0]["loss"]
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        total, count = hf_masked_loss(model, tok, CONVERSATIONS)
    assert count > 10
    assert abs(got - total / count) < 1e-4, (got, total / count)
    # Turning masking off is the plain language-model loss over every token.
    lmkit("finetune", "--config", tmp_path / "sft.toml", "--overwrite", "--train-on", "prompt")
    got_all = metrics(tmp_path / "out")[0]["loss"]
    with torch.no_grad():
        total, count = 0.0, 0
        for msgs in CONVERSATIONS:
            ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]])
            logits = model(ids).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert abs(got_all - total / count) < 1e-4, (got_all, total / count)


@pytest.mark.parametrize("lora", ['r = 4\nalpha = 8\ntarget_modules = ["q_proj", "v_proj", "down_proj"]',
                                  'r = 4\nalpha = 16\ntarget_modules = "all-linear"\nuse_rslora = true',
                                  'r = 4\nalpha = 8\ntarget_modules = ["q_proj"]\nmodules_to_save = ["lm_head"]',
                                  'r = 4\nalpha = 8\ntarget_modules = ["embed_tokens", "v_proj"]'])
def test_lmkit_adapter_loads_in_peft_and_merges_as_peft(lmkit, tmp_path, lora):
    from peft import PeftModel
    model, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    lmkit("finetune", "--config", finetune(lmkit, tmp_path, base, extra=f"[lora]\n{lora}", steps=3))
    out = tmp_path / "out"
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    if "modules_to_save" in lora:
        # The output layer trained whole, stored under PEFT's key beside the adapters.
        from safetensors.torch import load_file
        saved = load_file(ckpt / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
        assert json.loads((ckpt / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
        assert (saved - model.lm_head.weight.detach()).abs().max() > 1e-4, "lm_head did not train"
    peft = PeftModel.from_pretrained(model, ckpt).eval()
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    with torch.no_grad():
        want = peft(torch.tensor([ids])).logits[0].numpy()
        plain = peft.get_base_model()
    got = lmkit_logits(lmkit, base, ids, adapter=out)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    without = lmkit_logits(lmkit, base, ids)
    assert np.abs(got - without).max() > 1e-3, "the adapter changed nothing: the test would pass without it"
    # Merging equals PEFT's merge_and_unload.
    lmkit("adapter", "merge", base, out, tmp_path / "merged")
    merged = peft.merge_and_unload()
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, tmp_path / "merged", ids)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    del plain


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_peft_adapter_loads_in_lmkit(lmkit, tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    model, base = make_base(lmkit, tmp_path, kind)
    targets = {"llama": ["q_proj", "o_proj", "gate_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"],
               "gpt_neox": ["query_key_value", "dense_4h_to_h"]}[kind]
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=kind == "gpt2")
    peft = get_peft_model(model, cfg).eval()
    saved_adapter_logits(lmkit, peft, base, tmp_path)


def saved_adapter_logits(lmkit, peft, base, tmp_path):
    """Saves the PEFT model's adapter, checks that lmkit's logits with it equal PEFT's on a fixed
    id sequence, and returns lmkit's logits and the ids."""
    peft.save_pretrained(tmp_path / "adapter")
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    with torch.no_grad():
        want = peft(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, base, ids, adapter=tmp_path / "adapter")
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    return got, ids


def test_peft_adapter_with_modules_to_save_loads_in_lmkit(lmkit, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, base = make_base(lmkit, tmp_path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                     init_lora_weights=False)
    peft = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        head = peft.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    got, ids = saved_adapter_logits(lmkit, peft, base, tmp_path)
    # Without the saved output layer (the adapters alone) lmkit would differ.
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight.copy_(model.lm_head.original_module.weight)
        alone = peft(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - alone).max() > 1e-2


def test_lora_gradients_equal_peft(lmkit, tmp_path):
    """Continuing a PEFT adapter for one step: lmkit's gradient norm (metrics.jsonl) equals PEFT's,
    and after the step the adapter weights agree (AdamW from the same state)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    model, base = make_base(lmkit, tmp_path)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    lr = 1e-3
    lmkit("finetune", "--config", finetune(lmkit, tmp_path, base, extra=f'adapter = "{tmp_path}/adapter"', lr=lr,
                                           min_lr=lr, weight_decay=0.0))
    got = metrics(tmp_path / "out")[0]
    tok = AutoTokenizer.from_pretrained(base)
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total, count = hf_masked_loss(peft, tok, CONVERSATIONS)
    loss = torch.tensor(0.0)
    # Rebuild the loss as a tensor for backward (hf_masked_loss returns floats).
    for msgs in CONVERSATIONS:
        enc = tok.apply_chat_template(msgs, chat_template=MARKED, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.where(torch.tensor(enc["assistant_masks"], dtype=torch.bool), ids[0], torch.tensor(-100))
        logits = peft(ids).logits[0]
        loss = loss + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
    loss = loss / count
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    assert abs(got["loss"] - loss.item()) < 1e-4, (got["loss"], loss.item())
    assert abs(got["grad_norm"] - norm) < 1e-4 * max(1.0, norm), (got["grad_norm"], norm)
    opt.step()
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    mine = load_file(ckpt / "adapter_model.safetensors")
    theirs = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    assert set(mine) == set(theirs), (sorted(mine)[:3], sorted(theirs)[:3])
    for k, v in theirs.items():
        assert torch.allclose(mine[k], v.detach(), atol=2e-6), k


def test_lora_run_resumes_exactly(lmkit, tmp_path):
    """A LoRA run (with adapter dropout) killed after step 3 and resumed gives the same losses
    and final adapter bytes as the uninterrupted run."""
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS] * 3)
    # With adapter dropout: its masks are drawn per step, so a resumed run draws the same ones.
    cfg = finetune(lmkit, tmp_path, base, extra="[lora]\nr = 4\ntarget_modules = \"all-linear\"\ndropout = 0.3",
                   steps=6, batch_size=2, save_every=3)
    lmkit("finetune", "--config", cfg)
    whole = metrics(tmp_path / "out")
    final = (tmp_path / "out" / "ckpt-000006" / "adapter_model.safetensors").read_bytes()
    lmkit("finetune", "--config", cfg, "--overwrite", "--set", "lora.dropout=0.0")
    assert [m["loss"] for m in metrics(tmp_path / "out")][2:] != [m["loss"] for m in whole][2:], "dropout did nothing"
    lmkit("finetune", "--config", cfg, "--overwrite", "--max-steps", "3")
    lmkit("finetune", "--config", cfg, "--resume")
    resumed = metrics(tmp_path / "out")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    assert (tmp_path / "out" / "ckpt-000006" / "adapter_model.safetensors").read_bytes() == final


def test_bad_rows_are_named_or_skipped(tmp_path, lmkit):
    import os
    import subprocess
    from conftest import ROOT
    _, base = make_base(lmkit, tmp_path)
    rows = [{"messages": c} for c in CONVERSATIONS] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    write_rows(tmp_path / "rows.jsonl", rows)
    cfg = finetune(lmkit, tmp_path, base, extra="[lora]\nr = 2")
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    p = subprocess.run([binary, "finetune", "--config", cfg], capture_output=True, text=True)
    assert p.returncode == 1 and "rows.jsonl:line 4" in p.stderr and "no assistant message" in p.stderr, p.stderr
    p = subprocess.run([binary, "finetune", "--config", cfg, "--skip-bad"], capture_output=True, text=True)
    assert p.returncode == 0 and "1 bad rows left out" in p.stderr, p.stderr


def test_lora_on_a_quantized_gguf_base_trains_every_adapter(lmkit, tmp_path):
    """QLoRA: the base stays Q8_0, and the first step's loss and gradient norm are the f32
    model's up to the quantization (gradients pass through the frozen quantized layers)."""
    _, base = make_base(lmkit, tmp_path)
    lmkit("quantize", base, tmp_path / "base.gguf", "--type", "q8_0")
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    lora = '[lora]\nr = 4\ntarget_modules = "all-linear"'
    got = {}
    for name, model in [("f32", base), ("q8_0", tmp_path / "base.gguf")]:
        cfg = finetune(lmkit, tmp_path, model, extra=lora, steps=2)
        lmkit("finetune", "--config", cfg, "--overwrite")
        got[name] = metrics(tmp_path / "out")
    for step in range(2):
        f, q = got["f32"][step], got["q8_0"][step]
        assert abs(f["loss"] - q["loss"]) < 0.02 * f["loss"], (f, q)
        assert f["grad_norm"] > 0 and abs(f["grad_norm"] - q["grad_norm"]) < 0.05 * f["grad_norm"], (f, q)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_server_routes_requests_to_adapters(lmkit, tmp_path, kind):
    """`lmkit serve BASE --adapter tuned=DIR`: /v1/models lists both; `model` picks the variant,
    and greedy completions equal transformers' (base) and PEFT's (adapter) greedy generation.
    GPT-2's variants share the [out, in] copies of its Conv1D weights."""
    import os
    import subprocess
    import urllib.request
    from peft import LoraConfig, get_peft_model
    from conftest import ROOT
    model, base = make_base(lmkit, tmp_path, kind)
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        ids = tok("the cat sat", return_tensors="pt")["input_ids"]
        plain = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                init_lora_weights=False, fan_in_fan_out=kind == "gpt2")).eval()
        for p in peft.parameters():
            if p.requires_grad:
                p.mul_(3.0)  # make the adapter change the greedy tokens
        peft.save_pretrained(tmp_path / "adapter")
        tuned = peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = {"base": tok.decode(plain[0, ids.shape[1]:]), "tuned": tok.decode(tuned[0, ids.shape[1]:])}
    assert want["base"] != want["tuned"], "the adapter must change the output for this test to mean anything"
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    proc = subprocess.Popen([binary, "serve", base, "--port", "0", "--model-name", "base", "--adapter",
                             f"tuned={tmp_path}/adapter", "--db", tmp_path / "db.sqlite"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while "warning:" in line:  # GPT-2's end-of-text id lies outside this small vocabulary
            line = proc.stderr.readline()
        if "serving" not in line:
            # Stopped first: reading the rest of its output waits for it to end.
            proc.terminate()
            pytest.fail(line + proc.communicate(timeout=10)[1])
        url = "http://" + line.split("on http://")[1].split()[0]
        models = json.load(urllib.request.urlopen(url + "/v1/models"))
        assert [m["id"] for m in models["data"]] == ["base", "tuned"]
        for name in ["base", "tuned"]:
            body = json.dumps({"model": name, "prompt": "the cat sat", "max_tokens": 8, "temperature": 0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            r = json.load(urllib.request.urlopen(req))
            assert r["model"] == name
            assert r["choices"][0]["text"] == want[name], (name, r["choices"][0]["text"], want[name])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_packed_loss_equals_unpacked_loss(lmkit, tmp_path, kind):
    """data.pack = true puts the three conversations into one row of 128 positions (no attention
    across them, positions restarting): the first step's loss and gradient norm equal those of the
    three rows apart, and transformers' loss on each conversation alone."""
    model, base = make_base(lmkit, tmp_path, kind)
    tok = AutoTokenizer.from_pretrained(base)
    lengths = [len(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) - 1 for c in CONVERSATIONS]
    assert sum(lengths) <= 128 and max(lengths) < 64, lengths
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    lora = "[lora]\nr = 4\ntarget_modules = \"all-linear\""
    got = {}
    for pack, batch in [(False, 3), (True, 1)]:
        cfg = finetune(lmkit, tmp_path, base, extra=lora, batch_size=batch, seq_len=128)
        lmkit("finetune", "--config", cfg, "--overwrite", "--set", f"data.pack={str(pack).lower()}")
        got[pack] = metrics(tmp_path / "out")[0]
    with torch.no_grad():
        total, count = hf_masked_loss(model, tok, CONVERSATIONS)
    assert abs(got[True]["loss"] - total / count) < 1e-4, (got, total / count)
    assert abs(got[True]["loss"] - got[False]["loss"]) < 1e-5, got
    assert abs(got[True]["grad_norm"] - got[False]["grad_norm"]) < 1e-4 * got[False]["grad_norm"], got
    assert got[True]["tokens"] == got[False]["tokens"]


def test_full_fine_tuning_writes_a_transformers_checkpoint(lmkit, tmp_path):
    """Without [lora] every parameter trains; the checkpoint is a model directory that
    transformers loads with lmkit's logits, tokenizer and chat template beside it."""
    from transformers import AutoModelForCausalLM
    _, base = make_base(lmkit, tmp_path)
    write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in CONVERSATIONS])
    lmkit("finetune", "--config", finetune(lmkit, tmp_path, base, steps=2, lr=1e-3, min_lr=1e-3))
    out = tmp_path / "out"
    ckpt = out / (out / "latest").read_text().strip()
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, out, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - lmkit_logits(lmkit, base, ids)).max() > 1e-3, "the weights did not change"
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == PLAIN


def test_prompt_completion_and_alpaca_rows(lmkit, tmp_path):
    """prompt/completion rows train on the completion and the end-of-sequence token (as TRL
    appends it); Alpaca rows go through the chat template as a user/assistant pair."""
    model, base = make_base(lmkit, tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    pairs = [("what is one plus two?", " it is three."), ("where is the cat?", " on the mat.")]
    write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    lmkit("finetune", "--config", finetune(lmkit, tmp_path, base, batch_size=2, lr=1e-6, min_lr=1e-6))
    got = metrics(tmp_path / "out")[0]["loss"]
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in pairs:
            text = p + c + tok.eos_token
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor([enc["input_ids"]])
            labels = torch.tensor([i if s >= len(p) else -100 for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])])
            logits = model(ids).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    assert abs(got - total / count) < 1e-4, (got, total / count)
    # Alpaca as a JSON array: the same loss as the equivalent chat rows.
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": p, "input": "", "output": c.strip()} for p, c in pairs]))
    cfg = finetune(lmkit, tmp_path, base, batch_size=2, lr=1e-6, min_lr=1e-6)
    lmkit("finetune", "--config", cfg, "--overwrite", "--set", f'data.train="{tmp_path}/rows.json"')
    alpaca = metrics(tmp_path / "out")[0]["loss"]
    with torch.no_grad():
        total, count = hf_masked_loss(model, tok, [[{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                                                   for p, c in pairs])
    assert abs(alpaca - total / count) < 1e-4, (alpaca, total / count)


def test_merge_into_a_gguf_base(lmkit, tmp_path):
    """A GGUF base merges too (dequantized, written as a transformers directory with its tokenizer
    and chat template): from an f32 GGUF the result equals merging into the original directory,
    and transformers loads it with the same logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model, base = make_base(lmkit, tmp_path)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    lmkit("quantize", base, tmp_path / "base.gguf", "--type", "f32")
    lmkit("adapter", "merge", base, tmp_path / "adapter", tmp_path / "from-hf")
    lmkit("adapter", "merge", tmp_path / "base.gguf", tmp_path / "adapter", tmp_path / "from-gguf")
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    want = lmkit_logits(lmkit, tmp_path / "from-hf", ids)
    got = lmkit_logits(lmkit, tmp_path / "from-gguf", ids)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "from-gguf").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - got).max() < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "from-gguf").chat_template == PLAIN
