"""`train.dtype = "bf16"` on the CPU: the linear layers' and output layer's products on AMX tiles from
operands rounded to bf16, with f32 sums, while weights, optimizer state, activations and gradients stay
f32 (as PyTorch's bf16 autocast keeps f32 master weights). The loss curve follows the f32 run's from the
same seed within 0.5% a step (0.06% measured). Where the CPU has no AMX tiles, the setting is refused with a clear error."""
import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 30

MODELS = {
    "gpt2": 'model_type = "gpt2"\nn_positions = 64\nn_embd = 64\nn_layer = 2\nn_head = 2\n',
    "llama": 'model_type = "llama"\nhidden_size = 64\nintermediate_size = 160\nnum_hidden_layers = 2\n'
             'num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 64\n',
}


@pytest.fixture(scope="module")
def data(lmkit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    corpus = tmp / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log. a bird flew over the tree.\n" * 80,
                      encoding="utf-8")
    lmkit("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", tmp / "tok")
    lmkit("tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", corpus, "--shards", tmp / "shards")
    return tmp


def train(data, kind, dtype, out, env=None):
    """Trains `kind` for STEPS steps with train.dtype = `dtype`: the process, and each step's loss."""
    (data / f"{kind}.toml").write_text(
        f'[model]\n{MODELS[kind]}'
        f'[data]\ntrain = "{data}/shards"\ntokenizer = "{data}/tok"\nval_fraction = 0.0\n'
        f'[train]\nseq_len = 32\nbatch_size = 4\nmax_steps = {STEPS}\nwarmup_steps = 2\nlr = 3e-3\n'
        f'eval_every = 0\nsave_every = 0\nlog_every = 1\n')
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    p = subprocess.run([binary, "train", "--config", data / f"{kind}.toml", "--set", f'train.out_dir="{out}"',
                        "--set", f'train.dtype="{dtype}"'], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if p.returncode != 0:
        return p, []
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return p, [r["loss"] for r in recs if "loss" in r and "step" in r]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_products_follow_the_f32_loss_curve(data, tmp_path, kind):
    p, f32 = train(data, kind, "f32", tmp_path / "f32")
    assert p.returncode == 0, p.stderr
    p, bf16 = train(data, kind, "bf16", tmp_path / "bf16")
    if p.returncode != 0:
        # No AMX here: refused before training, naming the setting and what it needs.
        assert "train.dtype" in p.stderr and "AMX" in p.stderr, p.stderr
        assert not (tmp_path / "bf16" / "metrics.jsonl").exists()
        pytest.skip("this CPU has no AMX tiles: train.dtype = \"bf16\" is refused with a clear error")
    assert "bf16 products on AMX tiles" in p.stderr, p.stderr
    assert len(bf16) == len(f32) == STEPS
    gaps = [abs(a - b) / b for a, b in zip(bf16, f32)]
    assert max(gaps) < 0.005, list(zip(bf16, f32))
    # The products were rounded (the curves are not the same one), and the model learns as in f32.
    assert bf16 != f32
    assert bf16[-1] < 0.5 * bf16[0], bf16


def test_bf16_without_amx_tiles_is_refused_before_training(data, tmp_path):
    """With the vector instructions capped below AVX-512 (as on a CPU without AMX), the setting is
    an error naming it and what it needs, given before the run writes anything."""
    p, _ = train(data, "gpt2", "bf16", tmp_path / "out", env={"LMKIT_SIMD": "avx2"})
    assert p.returncode != 0
    assert "train.dtype" in p.stderr and "AMX" in p.stderr and "remove train.dtype" in p.stderr, p.stderr
    assert "panicked" not in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_fine_tuning_takes_bf16_products_too(lmkit, tmp_path):
    """`lmkit finetune` (as DPO, RL and reward training, which share its set-up) honours train.dtype
    on the CPU: full fine-tuning of a random Llama follows its f32 losses within 0.5% a step."""
    import test_finetune as ft

    _, base = ft.make_base(lmkit, tmp_path)
    ft.write_rows(tmp_path / "rows.jsonl", [{"messages": c} for c in ft.CONVERSATIONS])
    cfg = ft.finetune(lmkit, tmp_path, base, steps=4, lr=1e-3, min_lr=1e-3)
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    losses = {}
    for dtype in ["f32", "bf16"]:
        p = subprocess.run([binary, "finetune", "--config", cfg, "--overwrite", "--set", f'train.dtype="{dtype}"'],
                           capture_output=True, text=True)
        if p.returncode != 0 and dtype == "bf16":
            assert "train.dtype" in p.stderr and "AMX" in p.stderr, p.stderr
            pytest.skip("this CPU has no AMX tiles: train.dtype = \"bf16\" is refused with a clear error")
        assert p.returncode == 0, p.stderr
        losses[dtype] = [r["loss"] for r in ft.metrics(tmp_path / "out") if "loss" in r and "step" in r]
    assert "bf16 products on AMX tiles" in p.stderr, p.stderr
    f32, bf16 = losses["f32"], losses["bf16"]
    assert len(bf16) == len(f32) == 4
    assert max(abs(a - b) / b for a, b in zip(bf16, f32)) < 0.005, (bf16, f32)
    assert bf16 != f32
