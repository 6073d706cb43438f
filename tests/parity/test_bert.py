"""BERT parity with transformers: a random-initialised BertForMaskedLM saved with save_pretrained
loads in lmkit and gives the same masked-LM logits; mean-pooled sentence embeddings equal the
ones computed from transformers' hidden states; a broken checkpoint is refused by name."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertForMaskedLM

ATOL = 1e-4


@pytest.fixture(scope="module")
def bert(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert")
    ckpt = tiny_model["dir"] / (tiny_model["dir"] / "latest").read_text().strip()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=tok.token_to_id("<|pad|>"))
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
    model.eval().save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, out / f)
    return {"dir": out, "model": model, "tok": tok, "run": tiny_model["run"], "bin": tiny_model["bin"]}


def test_mlm_logits_match(bert):
    ids = [int(x) for x in torch.randint(0, bert["model"].config.vocab_size, (19,), generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        want = bert["model"](torch.tensor([ids])).logits[0].numpy()
    got = np.array(json.loads(bert["run"]("model", "logits", "--model", bert["dir"], "--ids", ",".join(map(str, ids)))),
                   dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()


def test_embeddings_are_mean_pooled_hidden_states(bert, tmp_path):
    texts = ["the cat sat on the mat", "a dog", "고양이가 매트 위에 앉았다 and the log"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = bert["run"]("embed", "--model", bert["dir"], "--input", tmp_path / "in.txt")
    got = [json.loads(l) for l in out.splitlines()]
    assert [g["text"] for g in got] == texts
    # `--output` holds the same lines, written whole over an earlier file (nothing left beside it).
    (tmp_path / "e.jsonl").write_text("earlier\n")
    bert["run"]("embed", "--model", bert["dir"], "--input", tmp_path / "in.txt", "--output", tmp_path / "e.jsonl")
    assert (tmp_path / "e.jsonl").read_text() == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "in.txt"]
    # An output that cannot be made is an error naming where.
    r = subprocess.run([bert["bin"], "embed", "--model", bert["dir"], "--input", tmp_path / "in.txt", "--output",
                        tmp_path / "no" / "e.jsonl"], capture_output=True, text=True)
    assert r.returncode == 1 and str(tmp_path / "no") in r.stderr, r.stderr
    for g, t in zip(got, texts):
        ids = bert["tok"].encode(t).ids
        with torch.no_grad():
            h = bert["model"].bert(torch.tensor([ids])).last_hidden_state[0]
        want = h.mean(0).numpy()
        assert np.abs(np.array(g["embedding"]) - want).max() < ATOL


def test_fill_mask_and_broken_checkpoints(bert, tmp_path):
    text = "the cat <|mask|> on the mat"
    out = bert["run"]("fill-mask", "--model", bert["dir"], text, "--top-k", "3")
    assert out.startswith("position ") and out.count("\"") >= 6
    # The same predictions as transformers: tokens and probabilities at the masked position.
    import re
    ids = bert["tok"].encode(text).ids
    pos = ids.index(bert["tok"].token_to_id("<|mask|>"))
    with torch.no_grad():
        p = torch.softmax(bert["model"](torch.tensor([ids])).logits[0, pos], -1)
    top = torch.topk(p, 3)
    want = [(bert["tok"].decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
    line = out.splitlines()[0]
    assert line.startswith(f"position {pos}: "), line
    got = [(json.loads(t), float(v)) for t, v in re.findall(r'("(?:[^"\\]|\\.)*") ([0-9.]+)', line)]
    assert [g[0] for g in got] == [w[0] for w in want], (got, want)
    assert all(abs(g[1] - w[1]) < 1e-3 for g, w in zip(got, want)), (got, want)
    import subprocess
    bad = tmp_path / "bad"
    shutil.copytree(bert["dir"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    p = subprocess.run([bert["bin"], "model", "logits", "--model", bad, "--ids", "1,2"], capture_output=True, text=True)
    assert p.returncode == 1 and "hidden_size (32) must be a multiple of num_attention_heads (5)" in p.stderr, p.stderr


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_lmkit_trained_bert_loads_in_transformers(bert, tiny_model, tmp_path, family):
    from transformers import AutoModelForMaskedLM
    tmp = tiny_model["tmp"]
    (tmp_path / "run.toml").write_text(
        f'[model]\nmodel_type = "{family}"\nhidden_size = 32\nnum_hidden_layers = 2\nnum_attention_heads = 4\n'
        'intermediate_size = 48\nmax_position_embeddings = 64\n'
        f'[data]\ntrain = "{tmp}/shards"\ntokenizer = "{tmp}/tok"\nval_fraction = 0.0\n'
        f'[train]\nout_dir = "{tmp_path}/out"\nseq_len = 16\nbatch_size = 4\nmax_steps = 3\nwarmup_steps = 1\n'
        'eval_every = 0\nsave_every = 3\nlr = 0.01\n')
    bert["run"]("train", "--config", tmp_path / "run.toml")
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    hf = AutoModelForMaskedLM.from_pretrained(ckpt).eval()
    assert type(hf).__name__ == {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}[family]
    ids = [3, 17, 42, 99, 7, 250, 12, 5]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.array(json.loads(bert["run"]("model", "logits", "--model", tmp_path / "out", "--ids", ",".join(map(str, ids)))),
                   dtype=np.float32)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()


def test_server_embeddings_through_the_openai_client(bert, tiny_model, tmp_path):
    import subprocess
    import openai
    proc = subprocess.Popen([tiny_model["bin"], "serve", tiny_model["dir"], "--port", "0", "--db", tmp_path / "db.sqlite",
                             "--embedding-model", bert["dir"]], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line
        c = openai.OpenAI(base_url="http://" + line.split("on http://")[1].split()[0] + "/v1", api_key="x", max_retries=0)
        name = bert["dir"].name
        assert name in [m.id for m in c.models.list().data]
        texts = ["the cat sat on the mat", "a dog"]
        r = c.embeddings.create(model=name, input=texts)
        (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
        want = [json.loads(l)["embedding"] for l in bert["run"]("embed", "--model", bert["dir"], "--input",
                                                               tmp_path / "in.txt").splitlines()]
        assert [d.index for d in r.data] == [0, 1]
        for d, w in zip(r.data, want):
            assert np.abs(np.array(d.embedding) - np.array(w)).max() < 1e-5
        assert r.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=name, input="cat " * 200)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_pseudo_perplexity_matches_transformers(bert, tmp_path):
    lines = ["the cat sat on the mat", "a dog sat"]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    got = json.loads(bert["run"]("eval", "ppl", "--model", bert["dir"], "--input", tmp_path / "t.txt", "--json"))
    mask = bert["tok"].token_to_id("<|mask|>")
    nll, n = 0.0, 0
    for l in lines:
        ids = bert["tok"].encode(l).ids
        for i in range(len(ids)):
            x = list(ids)
            x[i] = mask
            with torch.no_grad():
                lp = torch.log_softmax(bert["model"](torch.tensor([x])).logits[0, i].double(), -1)
            nll -= lp[ids[i]].item()
            n += 1
    assert got["tokens"] == n
    assert abs(got["nll"] - nll) < 1e-3
