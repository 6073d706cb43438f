"""Hugging Face tokenizers parity: a tokenizer.json trained by lmkit loads unchanged in Python
`tokenizers`, encodes held-out English and Korean to the same ids as lmkit, decodes back exactly,
and lmkit's token shards hold exactly those ids."""
import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT


def held_out(path, every=10, limit=300):
    lines = [l for l in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    return [l for i, l in enumerate(lines) if i % every], [l for i, l in enumerate(lines) if i % every == 0][:limit]


@pytest.fixture(scope="module")
def trained(lmkit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    en_train, en_held = held_out(ROOT / "data/en/web_bible.txt")
    ko_train, ko_held = held_out(ROOT / "data/ko/tax_rulings.txt")
    (tmp / "train.txt").write_text("\n".join(en_train[:8000] + ko_train) + "\n", encoding="utf-8")
    lmkit("tokenizer", "train", "--input", tmp / "train.txt", "--vocab-size", "4096", "--output", tmp / "tok")
    return tmp, en_held, ko_held


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_same_ids_and_exact_round_trip(lmkit, trained, lang):
    tmp, en_held, ko_held = trained
    held = en_held if lang == "en" else ko_held
    held = held + ["  spaces   and\ttabs ", "이모지 🙂 와 ① 기호", "<|endoftext|>mixed<|user|>"]
    ref = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
    assert ref.get_vocab_size() == 4096
    got = lmkit("tokenizer", "encode", "--tokenizer", tmp / "tok", stdin="\n".join(held) + "\n").splitlines()
    assert len(got) == len(held)
    for text, line in zip(held, got):
        ids = [int(x) for x in line.split()]
        want = ref.encode(text, add_special_tokens=False).ids
        assert ids == want, text
        assert ref.decode(ids, skip_special_tokens=False) == text


def test_shards_hold_the_reference_ids(lmkit, trained):
    tmp, en_held, ko_held = trained
    docs = en_held[:50] + ko_held[:50]
    (tmp / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    lmkit("tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", tmp / "docs.txt", "--shards", tmp / "shards")
    header = json.loads((tmp / "shards" / "tokens-00000.json").read_text())
    assert header["dtype"] == "u16" and header["vocab_size"] == 4096 and header["documents"] == len(docs)
    stream = np.fromfile(tmp / "shards" / "tokens-00000.bin", dtype="<u2")
    ref = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
    eot = ref.token_to_id("<|endoftext|>")
    want = [i for d in docs for i in ref.encode(d, add_special_tokens=False).ids + [eot]]
    assert header["count"] == len(want)
    assert stream.tolist() == want
