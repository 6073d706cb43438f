"""KenLM parity: KenLM's own query code loads the ARPA files lmkit writes, and its sentence and
per-word log10 scores and perplexities equal lmkit's (from the ARPA and from the binary model)."""
import math
import os
import pathlib
import subprocess

import kenlm
import pytest

from conftest import ROOT

TOL = 1e-4


def split(path, every=10, held_max=400):
    """Deterministic split: every `every`-th non-blank line is held out."""
    lines = [l.strip() for l in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    train = [l for i, l in enumerate(lines) if i % every]
    held = [l for i, l in enumerate(lines) if i % every == 0][:held_max]
    return train, held


def char_tokens(line):
    """lmkit's --chars tokenization: one token per character, a whitespace run becomes ▁."""
    return " ".join("\u2581" if c.isspace() else c for c in " ".join(line.split()))


def kenlm_ppl(model, sents):
    total = oov_total = 0.0
    tokens = oovs = 0
    for s in sents:
        for prob, _, oov in model.full_scores(s, bos=True, eos=True):
            total += prob
            tokens += 1
            if oov:
                oovs += 1
                oov_total += prob
    return 10 ** (-total / tokens), 10 ** (-(total - oov_total) / (tokens - oovs)), oovs, tokens


def parse_ppl(text):
    fields = dict(line.split("\t") for line in text.strip().splitlines())
    return (float(fields["Perplexity including OOVs:"]), float(fields["Perplexity excluding OOVs:"]),
            int(fields["OOVs:"]), int(fields["Tokens:"]))


def check(lmkit, tmp_path, order, train, held, chars):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(train) + "\n", encoding="utf-8")
    heldf = tmp_path / "held.txt"
    heldf.write_text("\n".join(held) + "\n", encoding="utf-8")
    arpa, binary, trie = tmp_path / "m.arpa", tmp_path / "m.lmkb", tmp_path / "m.trie.lmkb"
    flag = ["--chars"] if chars else []
    lmkit("ngram", "train", "--order", order, "--input", corpus, "--output", arpa, *flag)
    lmkit("ngram", "convert", arpa, binary, *flag)
    lmkit("ngram", "convert", arpa, trie, "--trie", *flag)
    packed = tmp_path / "m.trie-a.lmkb"  # compressed pointers
    lmkit("ngram", "convert", arpa, packed, "--trie", "--pointer-bits", 22, *flag)
    assert packed.stat().st_size < trie.stat().st_size

    model = kenlm.Model(str(arpa))
    assert model.order == order
    queries = [char_tokens(s) if chars else s for s in held]
    want = [model.score(q, bos=True, eos=True) for q in queries]
    for m in (arpa, binary, trie, packed):
        out = lmkit("ngram", "score", "-m", m, *flag, stdin="\n".join(held) + "\n").splitlines()
        got = [float(l.split("\t")[0]) for l in out]
        assert len(got) == len(want)
        worst = max(abs(a - b) for a, b in zip(got, want))
        assert worst < TOL, f"{m.name}: max |lmkit - kenlm| = {worst}"

    # Per-word scores, n-gram lengths and OOV flags on a sample of sentences.
    for s, q in list(zip(held, queries))[:40]:
        out = lmkit("ngram", "score", "-m", binary, "--verbose", stdin=s + "\n").splitlines()[1:]
        ref = list(model.full_scores(q, bos=True, eos=True))
        assert len(out) == len(ref)
        for line, (prob, ngram_len, oov) in zip(out, ref):
            _, word, lp, n, *rest = line.split("\t")
            assert abs(float(lp) - prob) < TOL, (s, word)
            assert int(n.split("-")[0]) == ngram_len, (s, word)
            assert bool(rest) == oov, (s, word)

    got = parse_ppl(lmkit("ngram", "ppl", "-m", binary, "--input", heldf))
    ref = kenlm_ppl(model, queries)
    assert got[2:] == ref[2:]
    for g, r in zip(got[:2], ref[:2]):
        assert math.isclose(g, r, rel_tol=1e-4), (got, ref)
    # 8-bit quantization moves the perplexity a little, not a lot.
    q8 = tmp_path / "m.q8.lmkb"
    lmkit("ngram", "convert", arpa, q8, "--quantize", 8, *flag)
    got_q8 = parse_ppl(lmkit("ngram", "ppl", "-m", q8, "--input", heldf))
    assert got_q8[0] != got[0] and math.isclose(got_q8[0], got[0], rel_tol=0.02), (got_q8, got)
    q8a = tmp_path / "m.q8a.lmkb"
    lmkit("ngram", "convert", arpa, q8a, "--quantize", 8, "--pointer-bits", 22, *flag)
    assert parse_ppl(lmkit("ngram", "ppl", "-m", q8a, "--input", heldf)) == got_q8


EN_TRAIN, EN_HELD = split(ROOT / "data/en/web_bible.txt")


# KenLM's query code refuses unigram-only models; order 1 is covered by the hand-computed tests.
@pytest.mark.parametrize("order", [2, 3, 4, 5, 6])
def test_english_words(lmkit, tmp_path, order):
    # Orders above 3 on a third of the corpus keep the suite fast.
    train = EN_TRAIN if order <= 3 else EN_TRAIN[: len(EN_TRAIN) // 3]
    check(lmkit, tmp_path, order, train, EN_HELD, chars=False)


@pytest.mark.parametrize("order", [3, 5])
def test_korean_characters(lmkit, tmp_path, order):
    train, held = split(ROOT / "data/ko/law_and_bills.txt", every=8)
    check(lmkit, tmp_path, order, train, held, chars=True)


def test_korean_words(lmkit, tmp_path):
    train, held = split(ROOT / "data/ko/tax_rulings.txt")
    check(lmkit, tmp_path, 3, train, held, chars=False)


# --- Estimation parity: lmplz's own ARPA against lmkit's, on the same text. -------------------

def read_arpa(path):
    """{(order, ngram): (log10 prob, log10 back-off)} — a back-off lmplz writes as 0 and one lmkit
    leaves out are the same thing."""
    out, order = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("\\") and line.endswith("-grams:"):
                order = int(line[1:line.index("-")])
            elif order and line and not line.startswith("\\"):
                parts = line.split("\t")
                out[(order, parts[1])] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    return out


def assert_same_model(ours, theirs, tol=1e-6):
    a, b = read_arpa(ours), read_arpa(theirs)
    assert a.keys() == b.keys(), (f"n-gram sets differ: {len(a.keys() - b.keys())} only in lmkit "
                                  f"(e.g. {sorted(a.keys() - b.keys())[:3]}), {len(b.keys() - a.keys())} only in lmplz "
                                  f"(e.g. {sorted(b.keys() - a.keys())[:3]})")
    worst_p = worst_b = 0.0
    for k, (p, bo) in a.items():
        q, bo2 = b[k]
        if k != (1, "<s>"):  # never predicted: lmkit writes -99 (SRILM's convention), lmplz 0
            worst_p = max(worst_p, abs(p - q))
        worst_b = max(worst_b, abs(bo - bo2))
    assert worst_p < tol and worst_b < tol, (worst_p, worst_b)
    return len(a)


def estimate_both(lmkit, lmplz, tmp_path, text, order, lmkit_flags=(), lmplz_flags=(), lmplz_text=None):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(text.encode("utf-8"))
    ref_in = corpus
    if lmplz_text is not None:
        ref_in = tmp_path / "corpus.lmplz.txt"
        ref_in.write_bytes(lmplz_text.encode("utf-8"))
    ours, theirs = tmp_path / "lmkit.arpa", tmp_path / "lmplz.arpa"
    lmkit("ngram", "train", "--order", order, "--input", corpus, "--output", ours, *lmkit_flags)
    lmplz(ref_in, theirs, order, *lmplz_flags)
    return ours, theirs


@pytest.mark.parametrize("order", [2, 3, 4, 5, 6])
def test_estimation_equals_lmplz_english_words(lmkit, lmplz, tmp_path, order):
    train = EN_TRAIN if order <= 3 else EN_TRAIN[: len(EN_TRAIN) // 3]
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, "\n".join(train) + "\n", order)
    assert assert_same_model(ours, theirs) > 1000


@pytest.mark.parametrize("order", [3, 5])
def test_estimation_equals_lmplz_korean_characters(lmkit, lmplz, tmp_path, order):
    train, _ = split(ROOT / "data/ko/law_and_bills.txt", every=8)
    # lmplz sees the same characters as lmkit --chars: one token each, whitespace runs as ▁.
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, "\n".join(train) + "\n", order, ["--chars"],
                                 lmplz_text="\n".join(char_tokens(s) for s in train) + "\n")
    assert assert_same_model(ours, theirs) > 1000


def test_estimation_equals_lmplz_korean_words(lmkit, lmplz, tmp_path):
    train, _ = split(ROOT / "data/ko/tax_rulings.txt")
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, "\n".join(train) + "\n", 4)
    assert assert_same_model(ours, theirs) > 1000


@pytest.mark.parametrize("prune", [["0", "1"], ["0", "1", "2"], ["0", "0", "1"]])
def test_pruned_estimation_equals_lmplz(lmkit, lmplz, tmp_path, prune):
    text = "\n".join(EN_TRAIN[:8000]) + "\n"
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, text, 4, ["--prune", *prune], ["--prune", *prune])
    n = assert_same_model(ours, theirs)
    # Pruning did remove n-grams (a test of nothing otherwise).
    lmkit("ngram", "train", "--order", 4, "--input", tmp_path / "corpus.txt", "--output", tmp_path / "full.arpa")
    assert n < len(read_arpa(tmp_path / "full.arpa")) * 0.8


@pytest.mark.parametrize("prune", [[], ["0", "1", "1"]])
def test_estimation_on_disk_equals_lmplz(lmplz, tmp_path, prune):
    """A build whose counting does not fit in --memory-mb estimates through sorted files on disk
    (hundreds of sorted runs per order under a 1 MiB budget); the model is still lmplz's."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(EN_TRAIN) + "\n", encoding="utf-8")
    ours, theirs = tmp_path / "lmkit.arpa", tmp_path / "lmplz.arpa"
    flags = ["--prune", *prune] if prune else []
    bin_ = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    p = subprocess.run([bin_, "ngram", "train", "--order", "5", "--input", corpus, "--output", ours,
                        "--memory-mb", "1", "--temp-dir", tmp_path, *flags], capture_output=True, text=True)
    assert p.returncode == 0 and "estimated through sorted files on disk" in p.stderr, p.stderr
    lmplz(corpus, theirs, 5, *flags)
    assert assert_same_model(ours, theirs) > 100_000
    assert sorted(x.name for x in tmp_path.iterdir()) == ["corpus.txt", "lmkit.arpa", "lmplz.arpa"]


def test_limited_vocabulary_equals_lmplz(lmkit, lmplz, tmp_path):
    train = EN_TRAIN[:8000]
    counts = {}
    for s in train:
        for w in s.split():
            counts[w] = counts.get(w, 0) + 1
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sorted(counts, key=lambda w: -counts[w])[:1500]) + "\n", encoding="utf-8")
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, "\n".join(train) + "\n", 3,
                                 ["--limit-vocab", vocab], ["--limit_vocab_file", vocab])
    assert assert_same_model(ours, theirs) > 1000
    assert sum(1 for k in read_arpa(ours) if k[0] == 1) == 1503  # the words given + <s> </s> <unk>


def test_blank_lines_odd_spaces_and_symbols_count_as_in_lmplz(lmkit, lmplz, tmp_path):
    lines = EN_TRAIN[:3000]
    lines[5] = ""
    lines[10] = "   \t  "
    lines[20] = "a\x0bb c\x0cd e\u00a0f g\u3000h"  # only spaces, tabs and \r separate words in lmplz
    lines[30] = "tab\tsep\rcr"
    lines[40] = "the <unk> and </s> dropped"
    text = "\n".join(lines) + "\n"
    # The model's own symbols are refused by both unless they are to be dropped.
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    assert lmplz(tmp_path / "corpus.txt", tmp_path / "x.arpa", 3, ok=False).returncode != 0
    bin_ = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    p = subprocess.run([bin_, "ngram", "train", "--order", "3", "--input", tmp_path / "corpus.txt",
                        "--output", tmp_path / "refused.arpa"], capture_output=True, text=True)
    assert p.returncode != 0 and "corpus.txt:41" in p.stderr and "--skip-symbols" in p.stderr, p.stderr
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, text, 3, ["--skip-symbols"], ["--skip_symbols"])
    assert assert_same_model(ours, theirs) > 1000
    assert (2, "<s> </s>") in read_arpa(ours)  # the blank lines are empty sentences


def test_discounts_refused_or_fallen_back_as_in_lmplz(lmkit, lmplz, tmp_path):
    # Every sentence twice: no n-gram is seen once, so the discounts cannot be estimated.
    text = "".join(s + "\n" + s + "\n" for s in EN_TRAIN[:500])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    assert lmplz(corpus, tmp_path / "x.arpa", 3, ok=False).returncode != 0
    bin_ = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    p = subprocess.run([bin_, "ngram", "train", "--order", "3", "--input", corpus, "--output", tmp_path / "y.arpa"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "--discount-fallback" in p.stderr, p.stderr
    assert not (tmp_path / "y.arpa").exists()
    for given in ([], ["0.4", "0.9", "1.2"]):
        ours, theirs = estimate_both(lmkit, lmplz, tmp_path, text, 3, ["--discount-fallback", *given],
                                     ["--discount_fallback", *given])
        assert_same_model(ours, theirs)


def test_compressed_and_standard_input_give_the_same_model(lmkit, tmp_path):
    import gzip
    text = "\n".join(EN_TRAIN[:2000]) + "\n"
    plain, gz = tmp_path / "c.txt", tmp_path / "c.txt.gz"
    plain.write_text(text, encoding="utf-8")
    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    lmkit("ngram", "train", "--order", 3, "--input", plain, "--output", tmp_path / "a.arpa")
    lmkit("ngram", "train", "--order", 3, "--input", gz, "--output", tmp_path / "b.arpa")
    lmkit("ngram", "train", "--order", 3, "--input", "-", "--output", tmp_path / "c.arpa", stdin=text)
    a = (tmp_path / "a.arpa").read_bytes()
    assert a == (tmp_path / "b.arpa").read_bytes() == (tmp_path / "c.arpa").read_bytes()


def test_lmplz_arpa_with_odd_spaces_in_words_loads(lmkit, lmplz, tmp_path):
    """lmplz keeps a vertical tab, a form feed or a Unicode space inside a word and writes it so
    into its ARPA file; lmkit reads such a file with those words whole and scores the text it was
    built from as its own model of that text does."""
    lines = EN_TRAIN[:3000]
    odd = ["a\x0bb c\x0cd e\u00a0f g\u3000h", "x\u2009y z\x0bw"]
    lines[20], lines[30] = odd
    text = "\n".join(lines) + "\n"
    ours, theirs = estimate_both(lmkit, lmplz, tmp_path, text, 3)
    assert assert_same_model(ours, theirs) > 1000
    probe = "\n".join(odd + lines[:50]) + "\n"
    scores = {}
    for name, arpa in (("lmkit", ours), ("lmplz", theirs)):
        for layout in ([], ["--trie"]):
            b = tmp_path / f"{name}{len(layout)}.lmkb"
            lmkit("ngram", "convert", arpa, b, *layout)
            out = lmkit("ngram", "score", "-m", b, "--verbose", stdin=probe)
            scores[(name, len(layout))] = out
    # (str.splitlines would also split at the vertical tab and the form feed.)
    words = [l.split("\t") for l in scores[("lmplz", 0)].split("\n")[1:6]]
    assert [w[1] for w in words] == ["a\x0bb", "c\x0cd", "e\u00a0f", "g\u3000h", "</s>"]
    assert all(w[3] == "3-gram" for w in words[1:]), words  # seen as the trained sentence
    base = scores[("lmkit", 0)]
    for out in scores.values():
        for a, b in zip(out.split("\n")[:-1], base.split("\n")[:-1]):
            fa, fb = a.split("\t"), b.split("\t")
            num = 0 if a[0] != "\t" else 2
            assert fa[:num] + fa[num + 1:] == fb[:num] + fb[num + 1:] and abs(float(fa[num]) - float(fb[num])) < 1e-5, (a, b)


def test_perplexity_equals_kenlm_query_program(lmkit, lmplz, tmp_path):
    """`lmkit ngram ppl` against KenLM's own `query` program on the same ARPA file and text, blank
    lines (empty sentences in both) and unknown words included."""
    train, held = EN_TRAIN[:6000], EN_HELD[:200]
    held = held[:50] + ["", "   ", "zzqx unknownword the"] + held[50:]
    corpus, text = tmp_path / "train.txt", tmp_path / "held.txt"
    corpus.write_text("\n".join(train) + "\n", encoding="utf-8")
    text.write_text("\n".join(held) + "\n", encoding="utf-8")
    arpa = tmp_path / "m.arpa"
    lmkit("ngram", "train", "--order", 4, "--input", corpus, "--output", arpa)
    q = subprocess.run([str(lmplz.bindir / "query"), "-v", "summary", str(arpa)], stdin=open(text, "rb"),
                       capture_output=True, text=True, check=True).stdout
    want = {l.split(":")[0]: float(l.split("\t")[-1]) for l in q.splitlines() if ":" in l and "\t" in l}
    for model in (arpa,):
        got = parse_ppl(lmkit("ngram", "ppl", "-m", model, "--input", text))
        assert got[2] == want["OOVs"] and got[3] == want["Tokens"], (got, want)
        assert math.isclose(got[0], want["Perplexity including OOVs"], rel_tol=1e-5), (got, want)
        assert math.isclose(got[1], want["Perplexity excluding OOVs"], rel_tol=1e-5), (got, want)
