"""RoBERTa and XLM-RoBERTa, and encoders with classification heads: random-initialised models
saved by transformers load in lmkit with the same logits (masked-LM, sequence and token
classification heads of BERT and RoBERTa), positions counted as RoBERTa counts them (after the
padding id, padding keeping it), and `lmkit classify` prints transformers' probabilities."""
import json
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

ATOL = 1e-4


def randomize(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def build(tmp_path, family, head, vocab=120, pad=1, tokenizer_dir=None):
    import transformers as tf
    torch.manual_seed(0)
    cls = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[family]
    config = getattr(tf, f"{cls}Config")(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48, max_position_embeddings=64, pad_token_id=pad,
                                          hidden_act="gelu_new" if family == "bert" else "gelu",
                                          layer_norm_eps=1e-5, id2label={0: "neg", 1: "neu", 2: "pos"},
                                          label2id={"neg": 0, "neu": 1, "pos": 2})
    model = getattr(tf, f"{cls}For{head}")(config)
    randomize(model)
    model.eval()
    out = tmp_path / f"{family}-{head}"
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, out / f)
    return model, out


def logits(lmkit, path, ids):
    return np.array(json.loads(lmkit("model", "logits", "--model", path, "--ids", ",".join(map(str, ids)))),
                    dtype=np.float32)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_masked_lm_matches(lmkit, tmp_path, family):
    model, path = build(tmp_path, family, "MaskedLM")
    # A padding id inside the text: it keeps position `pad`, the tokens after it count on.
    ids = [0, 17, 42, 5, 1, 99, 7, 63, 2]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = logits(lmkit, path, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    info = lmkit("model", "info", path)
    assert f"model_type:\t{family}" in info and "masked LM" in info and "tokens:\t62" in info


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("head", ["SequenceClassification", "TokenClassification"])
def test_classification_heads_match(lmkit, tmp_path, family, head):
    model, path = build(tmp_path, family, head)
    ids = [0, 17, 42, 5, 99, 7, 63, 2]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = logits(lmkit, path, ids)
    want = want.reshape(got.shape)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    assert "classification (3 labels: neg, neu, pos)" in lmkit("model", "info", path)


def test_classify_prints_transformers_probabilities(lmkit, tiny_model, tmp_path):
    ckpt = tiny_model["dir"] / (tiny_model["dir"] / "latest").read_text().strip()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    pad = tok.token_to_id("<|pad|>")
    texts = ["the cat sat on the mat", "고양이가 매트 위에 앉았다"]
    for head in ["SequenceClassification", "TokenClassification"]:
        model, path = build(tmp_path, "roberta", head, vocab=tok.get_vocab_size(), pad=pad, tokenizer_dir=ckpt)
        out = [json.loads(l) for l in lmkit("classify", "--model", path, *texts).splitlines()]
        assert [o["text"] for o in out] == texts
        for o, t in zip(out, texts):
            ids = tok.encode(t).ids
            with torch.no_grad():
                p = torch.softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
            if head == "SequenceClassification":
                assert o["label"] == ["neg", "neu", "pos"][int(p.argmax())]
                assert np.abs(np.array([o["scores"][k] for k in ["neg", "neu", "pos"]]) - p).max() < 1e-4
            else:
                assert [x["token"] for x in o["tokens"]] == [tok.id_to_token(i) for i in ids]
                assert [x["label"] for x in o["tokens"]] == [["neg", "neu", "pos"][i] for i in p.argmax(-1)]
                assert np.abs(np.array([x["score"] for x in o["tokens"]]) - p.max(-1)).max() < 1e-4


def test_encoder_without_a_classification_head_is_refused_by_classify(tiny_model, tmp_path):
    import subprocess
    _, path = build(tmp_path, "roberta", "MaskedLM")
    p = subprocess.run([tiny_model["bin"], "classify", "--model", str(path), "x"], capture_output=True, text=True)
    assert p.returncode == 1 and "no classification head" in p.stderr, p.stderr
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, position_embedding_type="relative_key")))
    p = subprocess.run([tiny_model["bin"], "model", "logits", "--model", str(path), "--ids", "0,5"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "position_embedding_type" in p.stderr, p.stderr
