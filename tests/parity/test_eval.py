"""`lmkit eval` against references: perplexity/bits per byte of a text and the log-likelihoods of
multiple-choice tasks equal those computed with transformers on the same HF model (strided windows
and lm-evaluation-harness conventions), and an n-gram model's equal KenLM's."""
import json
import math
import shutil

import kenlm
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

CTX = 32
LINES = ["the cat sat on the mat and looked at the dog on the log", "a dog", "the log sat on the cat.",
         "mat mat mat the the", "고양이가 매트 위에 앉았다", "and the dog sat on the mat and the cat sat on the log too"]


@pytest.fixture(scope="module")
def hf(tiny_model, tmp_path_factory):
    """A random GPT-2 (weights large enough that context matters) with the tiny model's tokenizer."""
    out = tmp_path_factory.mktemp("hf")
    ckpt = tiny_model["dir"] / (tiny_model["dir"] / "latest").read_text().strip()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=CTX, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eot, eos_token_id=eot, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    model.eval().save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, out / f)
    return {"dir": out, "model": model, "tok": tok, "eot": eot, "run": tiny_model["run"]}


def logprobs(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return lp


def strided_nll(model, ids, stride):
    """The negative log-likelihood of ids[1:] over lmkit's strided windows, scored by transformers."""
    nll, done, begin = 0.0, 0, 0
    while done + 1 < len(ids):
        end = min(begin + CTX, len(ids))
        lp = logprobs(model, ids[begin:end])
        for pos in range(done + 1, end):
            nll -= lp[pos - begin - 1, ids[pos]].item()
        done = end - 1
        if end == len(ids):
            break
        begin = min(begin + stride, done)
    return nll


def test_ppl_and_bits_per_byte_match_transformers(hf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ids = [hf["eot"]]
    for l in LINES:
        ids += hf["tok"].encode(l).ids + [hf["eot"]]
    assert len(ids) > 2 * CTX, "the text must need several windows"
    for stride in (8, CTX):
        got = json.loads(hf["run"]("eval", "ppl", "--model", hf["dir"], "--input", text, "--stride", stride, "--json"))
        nll = strided_nll(hf["model"], ids, stride)
        n_bytes = sum(len(l.encode()) + 1 for l in LINES)
        assert got["tokens"] == len(ids) - 1
        assert got["bytes"] == n_bytes
        assert abs(got["nll"] - nll) < 1e-3 * len(ids), (stride, got["nll"], nll)
        assert abs(got["bits_per_byte"] - nll / math.log(2) / n_bytes) < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ppl_in_half_precision_matches_transformers(hf, tmp_path, dtype):
    """`eval ppl --dtype bf16|f16`: the model is read into and computes in the half type (its
    negative log-likelihood moves away from the f32 one) as transformers' model loaded in that
    type does: lmkit's per-token log-likelihoods, summed over the same windows, lie within twice
    transformers' own half-precision difference of transformers' half-precision ones."""
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ids = [hf["eot"]]
    for l in LINES:
        ids += hf["tok"].encode(l).ids + [hf["eot"]]
    f32 = strided_nll(hf["model"], ids, 8)
    half = GPT2LMHeadModel.from_pretrained(hf["dir"], dtype=getattr(torch, dtype)).eval()
    want = strided_nll(half, ids, 8)
    theirs = abs(want - f32)
    flag = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    args = ("eval", "ppl", "--model", hf["dir"], "--input", text, "--stride", 8, "--json")
    got = json.loads(hf["run"](*args, "--dtype", flag))["nll"]
    same = json.loads(hf["run"](*args))["nll"]
    assert abs(same - f32) < 1e-3 * len(ids)
    assert got != same, "the half type made no difference"
    assert abs(got - want) <= 2 * theirs, (got, want, f32)


def harness_loglikelihood(hf, context, continuation, prefix=None):
    # lm-evaluation-harness: trailing spaces of the context go to the continuation, both are
    # encoded separately, an empty context is the prefix token (the tokenizer's BOS, else its
    # end-of-text), the input is cut from the left to max_length + 1 tokens.
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = hf["tok"].encode(context).ids if context else [hf["eot"] if prefix is None else prefix]
    cont = hf["tok"].encode(continuation).ids
    whole = (ctx + cont)[-(CTX + 1):]
    lp = logprobs(hf["model"], whole[:-1])
    k = len(cont)
    return sum(lp[len(whole) - 1 - k + i, whole[len(whole) - k + i]].item() for i in range(k))


def test_task_loglikelihoods_match_transformers(hf, tmp_path):
    examples = [
        {"context": "the cat sat on the", "choices": [" mat", " log", " dog"], "answer": 0},
        {"context": "the dog sat on the ", "choices": ["log", "mat"], "answer": 0},
        {"context": "", "choices": ["the cat", "cat the"], "answer": 0},
        {"context": "mat " * 40, "choices": [" the cat sat", " on"], "answer": 1},
        {"premise": "the cat sat on the mat", "hypothesis": "a cat sat", "label": "entailment"},
        {"sentence1": "the cat sat", "sentence2": "a cat sat", "label": 1},
        {"text": "the dog sat on the log", "labels": ["cat", "dog"], "label": "dog"},
    ]
    f = tmp_path / "mini.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    out = hf["run"]("eval", "tasks", "--model", hf["dir"], "--tasks", f, "--details", tmp_path / "d.jsonl",
                    "--output", tmp_path / "r.json")
    assert "| mini | 7 |" in out
    details = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    prompts = {
        4: (["the cat sat on the mat\nQuestion: a cat sat True, False or Neither?\nAnswer:"], [" True", " Neither", " False"]),
        5: (["Sentence 1: the cat sat\nSentence 2: a cat sat\nQuestion: Do both sentences mean the same thing?\nAnswer:",
             "Sentence 1: a cat sat\nSentence 2: the cat sat\nQuestion: Do both sentences mean the same thing?\nAnswer:"],
            [" no", " yes"]),
        6: (["the dog sat on the log\nLabel:"], [" cat", " dog"]),
    }
    for i, (e, d) in enumerate(zip(examples, details)):
        contexts, choices = prompts.get(i, ([e.get("context")], e.get("choices")))
        want = [sum(harness_loglikelihood(hf, c, ch) for c in contexts) for ch in choices]
        np.testing.assert_allclose(d["loglikelihoods"], want, atol=1e-3, err_msg=str(e))
        assert d["pick"] == int(np.argmax(want))
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert res["examples"] == 7
    assert res["acc"] == sum(d["pick"] == d["answer"] for d in details) / 7
    # --limit takes the first examples of a JSONL task too (it was read for YAML tasks only).
    out = hf["run"]("eval", "tasks", "--model", hf["dir"], "--tasks", f, "--details", tmp_path / "d3.jsonl",
                    "--limit", 3)
    assert "| mini | 3 |" in out, out
    assert [json.loads(l) for l in (tmp_path / "d3.jsonl").read_text().splitlines()] == details[:3]


def test_texts_start_after_the_tokenizer_s_bos_as_in_the_harness(hf, tmp_path):
    """A tokenizer whose BOS is not its end-of-text (SmolLM2's <|im_start|>, Llama's <s>): the
    perplexity stream and an empty task context start with the BOS, as lm-evaluation-harness's
    `prefix_token_id` (transformers' `tokenizer.bos_token_id`)."""
    from transformers import AutoTokenizer
    d = tmp_path / "bos"
    shutil.copytree(hf["dir"], d)
    bos = next(t.content for t in hf["tok"].get_added_tokens_decoder().values() if t.content != "<|endoftext|>")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = bos
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    prefix = AutoTokenizer.from_pretrained(d).bos_token_id
    assert prefix == hf["tok"].token_to_id(bos) != hf["eot"]
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ids = [prefix]
    for l in LINES:
        ids += hf["tok"].encode(l).ids + [hf["eot"]]
    got = json.loads(hf["run"]("eval", "ppl", "--model", d, "--input", text, "--stride", 8, "--json"))
    want = strided_nll(hf["model"], ids, 8)
    assert abs(got["nll"] - want) < 1e-3 * len(ids), (got["nll"], want)
    # The first token's log-probability differs with the prefix: the check can fail.
    assert abs(want - strided_nll(hf["model"], [hf["eot"]] + ids[1:], 8)) > 1e-3
    f = tmp_path / "empty.jsonl"
    f.write_text(json.dumps({"context": "", "choices": ["the cat", "cat the"], "answer": 0}) + "\n", encoding="utf-8")
    hf["run"]("eval", "tasks", "--model", d, "--tasks", f, "--details", tmp_path / "d.jsonl",
              "--output", tmp_path / "r.json")
    detail = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    want = [harness_loglikelihood(hf, "", c, prefix) for c in ("the cat", "cat the")]
    np.testing.assert_allclose(detail["loglikelihoods"], want, atol=1e-3)


def test_ngram_bits_per_byte_match_kenlm(tiny_model, tmp_path):
    run = tiny_model["run"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(LINES[:4] * 20) + "\n", encoding="utf-8")
    run("ngram", "train", "--order", "3", "--input", corpus, "--output", tmp_path / "m.arpa", "--discount-fallback")
    held = tmp_path / "h.txt"
    held.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    got = json.loads(run("eval", "ppl", "--model", tmp_path / "m.arpa", "--input", held, "--json"))
    m = kenlm.Model(str(tmp_path / "m.arpa"))
    nll = -sum(m.score(l, bos=True, eos=True) for l in LINES) * math.log(10)
    assert abs(got["nll"] - nll) < 1e-3
    assert got["tokens"] == sum(len(l.split()) + 1 for l in LINES)
    assert abs(got["bits_per_byte"] - nll / math.log(2) / sum(len(l.encode()) + 1 for l in LINES)) < 1e-5
    # n-gram models have no half precision: said, not ignored.
    import subprocess
    p = subprocess.run([tiny_model["bin"], "eval", "ppl", "--model", tmp_path / "m.arpa", "--input", held,
                        "--dtype", "bf16"], capture_output=True, text=True)
    assert p.returncode != 0 and "n-gram models are scored in f32" in p.stderr, p.stderr
