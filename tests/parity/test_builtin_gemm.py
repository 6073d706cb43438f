"""The built-in matrix product — what lmkit runs on a machine with no BLAS library installed
(LMKIT_BLAS=builtin selects it here, where OpenBLAS is installed) — through whole models: the
parity checks of the OpenBLAS runs hold on it too."""
import json
import os
import subprocess

import pytest

import test_finetune
import test_transformers_decoders


@pytest.fixture
def builtin(monkeypatch):
    monkeypatch.setenv("LMKIT_BLAS", "builtin")


def train_losses(tiny_model, out, blas):
    tmp = tiny_model["tmp"]
    env = dict(os.environ, LMKIT_BLAS=blas)
    p = subprocess.run([tiny_model["bin"], "train", "--config", tmp / "run.toml", "--set", f'train.out_dir="{out}"',
                        "--set", "train.log_every=1"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r and "step" in r], p.stderr


def test_training_on_the_builtin_product_equals_training_on_openblas(tiny_model, tmp_path):
    ours, err = train_losses(tiny_model, tmp_path / "builtin", "builtin")
    assert "CPU matmul: built-in gemm" in err, err
    theirs, err = train_losses(tiny_model, tmp_path / "library", os.environ.get("LMKIT_TEST_BLAS", "libopenblas.so.0"))
    assert "CPU matmul: BLAS" in err, err
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (ours, theirs)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_on_the_builtin_product(lmkit, builtin, tmp_path, kind):
    test_transformers_decoders.test_logits_match(lmkit, tmp_path, kind)


def test_lora_gradients_on_the_builtin_product(lmkit, builtin, tmp_path):
    test_finetune.test_lora_gradients_equal_peft(lmkit, tmp_path)
