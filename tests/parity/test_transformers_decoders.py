"""transformers parity for the decoders: random-initialised GPT2LMHeadModel and LlamaForCausalLM
built from small configs and saved with save_pretrained load in lmkit and give the same logits
(all at once and token by token through the KV cache), and broken checkpoints are refused with
the field or tensor named. LMKIT_TEST_DEVICE=cuda runs lmkit's side on the GPU (a build with
--features cuda, named by LMKIT_BIN)."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ATOL = 1e-4
DEVICE = os.environ.get("LMKIT_TEST_DEVICE", "cpu")


def randomize_norms(model, gen):
    # Default init makes norm weights 1 and biases 0, which would hide a missing or swapped tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def build(kind, tmp_path, **overrides):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        model = GPT2LMHeadModel(cfg)
    elif kind == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=103, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.5, rotary_emb_base=30000, hidden_act="gelu",
            use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0))
    else:
        # Through the constructor: transformers 5.x folds rope_theta and rope_scaling into
        # rope_parameters there (an attribute set afterwards is saved but not used by the model).
        cfg = LlamaConfig(**{**dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False), **overrides})
        model = LlamaForCausalLM(cfg)
    randomize_norms(model, gen)
    model.eval()
    out = tmp_path / kind
    model.save_pretrained(out, safe_serialization=True)
    return model, out


def assert_logits_and_generation_match(lmkit, model, path, ids):
    """lmkit's logits for `ids` (all at once and token by token through the KV cache) and its
    greedy continuation of their first 5 equal transformers'."""
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    for incremental in [False, True]:
        got = lmkit_logits(lmkit, path, ids, incremental=incremental)
        assert np.abs(got - want).max() < ATOL, (incremental, np.abs(got - want).max())
    prompt = ids[:5]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                             eos_token_id=None, pad_token_id=0)
    got = lmkit("generate", "--model", path, "--prompt-ids", ",".join(map(str, prompt)), "--greedy", "--ids",
                "--ignore-eos", "--max-tokens", "12")
    assert [int(x) for x in got.split()] == out[0, 5:].tolist()


def lmkit_logits(lmkit, path, ids, incremental=False, adapter=None):
    args = ["model", "logits", "--model", path, "--ids", ",".join(map(str, ids)), "--device", DEVICE]
    if incremental:
        args.append("--incremental")
    if adapter:
        args += ["--adapter", adapter]
    return np.array(json.loads(lmkit(*args)), dtype=np.float32)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_match(lmkit, tmp_path, kind):
    model, path = build(kind, tmp_path)
    ids = [int(x) for x in torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, path, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    got_inc = lmkit_logits(lmkit, path, ids, incremental=True)
    assert np.abs(got_inc - want).max() < ATOL, np.abs(got_inc - want).max()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING, {"rope_type": "linear", "factor": 2.0}])
def test_rope_variants_match(lmkit, tmp_path, layout, scaling):
    """Llama 3 and linear rope scaling, and transformers 5.x's config layout (`rope_parameters`
    holding rope_theta and the scaling; no top-level rope_theta) with the same weights: the same
    logits as transformers 4.x computes from its own layout. A theta far from the default makes a
    config that is not read show."""
    # (rope_scaling=None is left out: transformers 5.x then has no rope_parameters at all)
    model, path = build("llama", tmp_path, rope_theta=500000.0, **({"rope_scaling": scaling} if scaling else {}))
    cfg = json.loads((path / "config.json").read_text())
    # Whichever layout the installed transformers saved, the config is rewritten in the one tested.
    saved = cfg.pop("rope_parameters", None) or {}
    theta = cfg.pop("rope_theta", saved.get("rope_theta"))
    assert theta == 500000.0, cfg
    cfg.pop("rope_scaling", None)
    if layout == "5.x":
        cfg["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    else:
        cfg["rope_theta"] = theta
        if scaling:
            cfg["rope_scaling"] = scaling
    (path / "config.json").write_text(json.dumps(cfg))
    ids = [int(x) for x in torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, path, ids)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()


def test_config_keys_that_change_the_math_are_not_ignored(tmp_path):
    import os
    from conftest import ROOT
    lmkit_bin = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    model, path = build("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    for key, value, needle in [("sliding_window", 8, "sliding_window"),
                               ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
                               ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4}, "dynamic")]:
        (path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        expect_failure(lmkit_bin, path, "config.json", needle)


def expect_failure(lmkit_bin, path, *needles):
    import subprocess
    p = subprocess.run([lmkit_bin, "model", "logits", "--model", str(path), "--ids", "1,2"], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout
    for n in needles:
        assert n in p.stderr, p.stderr


def test_broken_checkpoints_are_refused(tmp_path):
    import os
    from conftest import ROOT
    lmkit_bin = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    model, path = build("gpt2", tmp_path)
    cfg = json.loads((path / "config.json").read_text())

    bad = dict(cfg, n_head=5)
    (path / "config.json").write_text(json.dumps(bad))
    expect_failure(lmkit_bin, path, "config.json", "n_embd (48) must be a multiple of n_head (5)")

    # Fewer layers in the config than in the weights: refused, not computed with a layer missing.
    (path / "config.json").write_text(json.dumps(dict(cfg, n_layer=1)))
    expect_failure(lmkit_bin, path, "config.json", "the weights hold 2 layers but the config says 1")

    # transformers' GPT-2 keeps eos 50256 whatever the vocabulary: generation says it cannot stop
    # on it, and runs to its token limit.
    (path / "config.json").write_text(json.dumps(cfg))
    import subprocess
    p = subprocess.run([lmkit_bin, "generate", "--model", str(path), "--prompt-ids", "1,2", "--ids", "--greedy",
                        "--max-tokens", "4"], capture_output=True, text=True)
    assert p.returncode == 0 and len(p.stdout.split()) == 4, p
    assert "end-of-text id [50256] is outside the vocabulary (97 tokens)" in p.stderr, p.stderr

    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(missing, path / "model.safetensors", metadata={"format": "pt"})
    expect_failure(lmkit_bin, path, "transformer.h.1.mlp.c_fc.weight")

    misshaped = dict(tensors)
    misshaped["transformer.wpe.weight"] = torch.zeros(10, 48)
    save_file(misshaped, path / "model.safetensors", metadata={"format": "pt"})
    expect_failure(lmkit_bin, path, "transformer.wpe.weight")

    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    expect_failure(lmkit_bin, path, str(path))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_matches(lmkit, tmp_path, kind, penalty):
    model, path = build(kind, tmp_path)
    prompt = [3, 14, 15, 9, 26]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                             repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    got = lmkit("generate", "--model", path, "--prompt-ids", ",".join(map(str, prompt)), "--greedy", "--ids",
                "--ignore-eos", "--max-tokens", "16", "--repetition-penalty", str(penalty), "--device", DEVICE)
    assert [int(x) for x in got.split()] == want


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
def test_lmkit_trained_checkpoint_loads_in_transformers(lmkit, tmp_path, kind):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. 고양이가 매트 위에 앉았다.\n" * 60, encoding="utf-8")
    lmkit("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", tmp_path / "tok")
    lmkit("tokenizer", "encode", "--tokenizer", tmp_path / "tok", "--input", corpus, "--shards", tmp_path / "shards")
    model = {"gpt2": 'model_type = "gpt2"\nn_positions = 32\nn_embd = 32\nn_layer = 2\nn_head = 4\n',
             "llama": 'model_type = "llama"\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\n'
                      'num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 32\n',
             "gpt_neox": 'model_type = "gpt_neox"\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\n'
                         'num_attention_heads = 4\nmax_position_embeddings = 32\nrotary_pct = 0.5\n'}[kind]
    (tmp_path / "run.toml").write_text(
        f'[model]\n{model}\n[data]\ntrain = "{tmp_path}/shards"\ntokenizer = "{tmp_path}/tok"\n\n'
        f'[train]\nout_dir = "{tmp_path}/out"\nseq_len = 16\nbatch_size = 4\nmax_steps = 5\nwarmup_steps = 2\n'
        f'eval_every = 5\neval_batches = 1\n')
    lmkit("train", "--config", tmp_path / "run.toml", "--set", f"train.device={DEVICE}")
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, tmp_path / "out", ids)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    # The tokenizer files in the checkpoint load in transformers too.
    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    assert tok.decode(tok("고양이가 매트")["input_ids"]) == "고양이가 매트"
    # The chat template renders the same prompt in transformers and in `lmkit chat`.
    import os, subprocess
    from conftest import ROOT
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "고양이는 어디에?"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p = subprocess.run([os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit")), "chat", "--model", str(tmp_path / "out"),
                        "--system", "Be brief.", "--max-tokens", "2", "--print-prompt"],
                       input="고양이는 어디에?\n", capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"[prompt] {want}" in p.stderr.splitlines()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_and_sharded_checkpoints_load(lmkit, tmp_path, dtype):
    """A checkpoint saved in f16 or bf16 and split into shards (model.safetensors.index.json):
    lmkit reads the half-precision weights into f32 and gives the logits transformers computes in
    f32 from the same (rounded) weights."""
    model, _ = build("llama", tmp_path)
    half = model.to(getattr(torch, dtype))
    path = tmp_path / dtype
    half.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists(), shards
    from transformers import LlamaForCausalLM
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [int(x) for x in torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(6))]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = lmkit_logits(lmkit, path, ids)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inference_matches(lmkit, tmp_path, kind, dtype):
    """`--dtype bf16` / `f16` (GPT-2, Llama, GPT-NeoX with part of each head rotated): lmkit
    computes in the half type as transformers does with the model loaded in it — its logits (all at once and through the KV cache) differ from the f32 ones
    (so the half type was used) by at most twice what transformers' half-precision logits do,
    and from transformers' by no more either; greedy decoding picks transformers' best tokens."""
    model, path = build(kind, tmp_path)
    # Larger weights than the default init, so that the half type's rounding shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    ids = [int(x) for x in torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        f32 = model(torch.tensor([ids])).logits[0].numpy()
        half = model.to(getattr(torch, dtype))
        want = half(torch.tensor([ids])).logits[0].float().numpy()
    theirs = np.abs(want - f32).max()
    flag = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    for incremental in [False, True]:
        args = ["model", "logits", "--model", path, "--ids", ",".join(map(str, ids)), "--device", DEVICE, "--dtype", flag]
        got = np.array(json.loads(lmkit(*args, *(["--incremental"] if incremental else []))), dtype=np.float32)
        ours = np.abs(got - f32).max()
        assert 0 < ours <= 2 * theirs, (incremental, ours, theirs)
        assert np.abs(got - want).max() <= 2 * theirs, (incremental, np.abs(got - want).max(), theirs)
    # Greedy decoding through the cache: every token lmkit picks is one transformers' half-precision
    # model rates best, up to the half type's noise (a near tie may go either way).
    prompt = ids[:5]
    got = lmkit("generate", "--model", path, "--prompt-ids", ",".join(map(str, prompt)), "--greedy", "--ids",
                "--ignore-eos", "--max-tokens", "12", "--device", DEVICE, "--dtype", flag)
    got = [int(x) for x in got.split()]
    assert len(got) == 12
    with torch.no_grad():
        rows = half(torch.tensor([prompt + got])).logits[0, len(prompt) - 1:-1].float().numpy()
    for step, (tok, row) in enumerate(zip(got, rows)):
        assert row[tok] >= row.max() - 2 * theirs, (step, tok, int(row.argmax()), row.max() - row[tok], theirs)


def test_half_precision_inference_refuses_what_it_cannot_do(lmkit, tmp_path):
    """--dtype is refused, with what to do instead, for an unknown type, a LoRA adapter (they run
    in f32) and an encoder-decoder."""
    import subprocess
    from conftest import ROOT
    _, path = build("llama", tmp_path)
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))

    def fails(*args):
        p = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
        assert p.returncode != 0, p.stdout
        return p.stderr

    assert "unknown dtype `fp8` (expected f32, bf16 or f16)" in fails("model", "logits", "--model", path, "--ids", "1,2", "--dtype", "fp8")
    from peft import LoraConfig, get_peft_model
    model, _ = build("llama", tmp_path / "base")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    e = fails("generate", "--model", path, "--adapter", tmp_path / "adapter", "--prompt-ids", "1,2", "--dtype", "bf16")
    assert "LoRA adapters run in f32" in e and "lmkit adapter merge" in e, e


def test_eos_lists_load_and_every_id_stops_generation(lmkit, tmp_path):
    """Llama 3 / Qwen2.5 write `eos_token_id` as a list (config.json and generation_config.json):
    the config loads, and generation stops at any listed id, as transformers' generate does."""
    model, path = build("llama", tmp_path)
    prompt = [3, 14, 15, 9, 26]
    free = lmkit("generate", "--model", path, "--prompt-ids", ",".join(map(str, prompt)), "--greedy", "--ids",
                 "--ignore-eos", "--max-tokens", "12")
    free = [int(x) for x in free.split()]
    stop = free[4]
    first = free.index(stop)
    unused = [i for i in range(101) if i not in free][:2]
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=unused)))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused[0], stop]}))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                             eos_token_id=[unused[0], stop], pad_token_id=0)
    want = out[0, len(prompt):].tolist()
    got = [int(x) for x in lmkit("generate", "--model", path, "--prompt-ids", ",".join(map(str, prompt)), "--greedy",
                                 "--ids", "--max-tokens", "12").split()]
    assert got == free[:first]
    assert want[:first + 1] == free[:first] + [stop]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_llama_like_families_match(lmkit, tmp_path, family):
    """Mistral, Qwen2 (query/key/value biases) and Qwen3 (RMS norms over query and key heads,
    head_dim apart from hidden_size / heads) saved by transformers: the same logits, all at once
    and token by token, and greedy generation."""
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    torch.manual_seed(0)
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0,
              tie_word_embeddings=False)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=64, **kw))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, sliding_window=32, **kw))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.eval()
    path = tmp_path / family
    model.save_pretrained(path, safe_serialization=True)
    ids = [int(x) for x in torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(5))]
    assert_logits_and_generation_match(lmkit, model, path, ids)
    info = lmkit("model", "info", path)
    assert model.config.architectures[0] in info


@pytest.mark.parametrize("variant", ["polyglot", "sequential", "5.x", "tied-full-rotary"])
def test_gpt_neox_matches(lmkit, tmp_path, variant):
    """GPT-NeoX (the architecture of Polyglot-ko and Pythia) saved by transformers: per-head
    interleaved fused q|k|v, rotation of part of each head, the parallel residual (and the
    sequential one), LayerNorm biases; the same logits all at once and through the KV cache, and
    greedy generation. "5.x" rewrites the config as transformers 5.x does (the rotary base and
    share inside `rope_parameters`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=103, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rotary_pct=0.5, rotary_emb_base=30000, hidden_act="gelu",
              use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0)
    if variant == "sequential":
        kw.update(use_parallel_residual=False, rotary_pct=0.25, hidden_act="gelu_new")
    if variant == "tied-full-rotary":
        kw.update(rotary_pct=1.0, tie_word_embeddings=True)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw))
    randomize_norms(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    model.eval()
    path = tmp_path / variant
    model.save_pretrained(path, safe_serialization=True)
    if variant == "5.x":
        cfg = json.loads((path / "config.json").read_text())
        for key in ["rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta", "rope_scaling"]:
            cfg.pop(key, None)
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 30000.0, "partial_rotary_factor": 0.5}
        (path / "config.json").write_text(json.dumps(cfg))
    ids = [int(x) for x in torch.randint(0, 103, (40,), generator=torch.Generator().manual_seed(5))]
    assert_logits_and_generation_match(lmkit, model, path, ids)
    assert "GPTNeoXForCausalLM" in lmkit("model", "info", path)


def test_mistral_beyond_its_window_is_refused(tmp_path):
    import os
    from conftest import ROOT
    from transformers import MistralConfig, MistralForCausalLM
    lmkit_bin = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    model = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                             sliding_window=8))
    model.save_pretrained(tmp_path / "m")
    import subprocess
    p = subprocess.run([lmkit_bin, "model", "logits", "--model", str(tmp_path / "m"), "--ids", ",".join(["1"] * 9)],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "sliding_window (8)" in p.stderr, p.stderr
