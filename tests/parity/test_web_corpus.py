"""Web inputs of `lmkit data prepare`: WARC/WET written by warcio (the reference WARC library), HTML
main-text extraction compared with Python's trafilatura, and Parquet written by pyarrow."""

import gzip
import io
import json
import os
import subprocess

import pytest

warcio = pytest.importorskip("warcio")
trafilatura = pytest.importorskip("trafilatura")
from warcio.statusandheaders import StatusAndHeaders  # noqa: E402
from warcio.warcwriter import WARCWriter  # noqa: E402

EN = [
    "After an absence of almost forty years, river otters have been seen again along the lower "
    "reaches of the valley's main river, according to volunteers who have surveyed its banks every "
    "spring since 1998.",
    "The survey team found fresh tracks and droppings at eleven of the twenty sites they visit, and "
    "a night camera near the old mill recorded a female with two cubs in late April.",
    "Biologists credit cleaner water: the closure of two upstream tanneries and a new treatment "
    "plant cut the river's nitrate levels by more than half over the past decade.",
]
KO = [
    "국회는 어제 본회의를 열고 지방자치단체의 재정 자율성을 높이는 내용의 지방재정법 개정안을 재석 "
    "의원 다수의 찬성으로 통과시켰다.",
    "개정안은 지방자치단체가 자체 사업에 쓸 수 있는 예산의 범위를 넓히고, 중앙정부의 사전 승인 "
    "절차를 간소화하는 것을 주요 내용으로 한다.",
    "정부는 개정안이 공포되는 대로 시행령을 정비해 내년 상반기부터 새 제도를 적용할 계획이라고 밝혔다.",
]
LIST = [
    "Volunteers walked all twenty survey sites between March and May, two people to each site, "
    "recording tracks, droppings and feeding remains on a shared form.",
    "Each record names the site, the date, the observer and what was found, and photographs are "
    "kept with the form so that identifications can be checked later by the county recorder.",
    "Results are published each autumn in the society's bulletin and sent to the national "
    "mammal atlas, where they join records from more than three hundred other river surveys.",
]


def page(title, paras, lang="en", charset="utf-8"):
    """A news page: navigation, cookie banner, sidebar, share buttons and footer around an article."""
    body = "".join(f"<p>{p}</p>\n" for p in paras)
    return f"""<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="{charset}"><title>{title} | Valley News</title>
<style>body{{font-family:serif}}</style><script>var tracking = "do not keep";</script></head>
<body>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li>
<li><a href="/sport">Sport</a></li><li><a href="/contact">Contact us</a></li></ul></nav></header>
<div class="cookie-banner">We use cookies to improve your experience. <a href="/privacy">Accept all cookies</a></div>
<main><article><h1>{title}</h1>
{body}</article>
<aside class="sidebar"><h3>Most read</h3><ul><li><a href="/a">Council approves new bridge</a></li>
<li><a href="/b">Local bakery wins national prize</a></li></ul></aside>
</main>
<div class="share-buttons"><a href="#">Share on Facebook</a> <a href="#">Share on X</a></div>
<footer><p>Copyright 2026 Valley News. All rights reserved.</p>
<p><a href="/terms">Terms</a> | <a href="/privacy">Privacy</a></p></footer>
</body></html>"""


PAGES = [
    # (url, title, paragraphs, lang, charset, HTTP headers beyond Content-Type)
    ("http://news.example.com/otters", "River otters return to the valley", EN, "en", "utf-8", []),
    ("http://kr.example.org/law", "지방재정법 개정안 국회 통과", KO, "ko", "euc-kr", []),
    ("http://blocked.example.net/survey", "How the survey works", LIST, "en", "utf-8",
     [("Content-Encoding", "gzip")]),
]


def expected(title, paras):
    return "\n".join([title, *paras])


def write_warc(path):
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record("test.warc.gz", {"software": "warcio"}))
        for url, title, paras, lang, charset, extra in PAGES:
            html = page(title, paras, lang, charset).encode(charset)
            if ("Content-Encoding", "gzip") in extra:
                html = gzip.compress(html)
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", f"text/html; charset={charset}"), *extra],
                protocol="HTTP/1.1")
            req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.com")], is_http_request=True)
            w.write_record(w.create_warc_record(url, "request", http_headers=req))
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                http_headers=headers))
        gone = StatusAndHeaders("404 Not Found", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("http://news.example.com/gone", "response",
                                            payload=io.BytesIO(b"<p>gone</p>"), http_headers=gone))
        png = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record("http://news.example.com/a.png", "response",
                                            payload=io.BytesIO(b"\x89PNG\r\n"), http_headers=png))


def read_shards(out):
    docs = []
    for name in sorted(os.listdir(out)):
        if name.startswith("train-") and name.endswith(".jsonl"):
            with open(out / name, encoding="utf-8") as f:
                docs += [json.loads(l) for l in f]
    return docs


def test_warc_pages_give_their_main_text_as_trafilatura_does(lmkit, tmp_path):
    warc = tmp_path / "crawl.warc.gz"
    write_warc(warc)
    out = tmp_path / "out"
    lmkit("data", "prepare", "--input", warc, "--output", out, "--val-fraction", "0",
          "--no-filters")
    docs = read_shards(out)
    texts = [d["text"] for d in docs]
    want = [expected(t, p) for _, t, p, *_ in PAGES]
    assert texts == want
    # The reference extractor on the same pages gives the same text.
    for (_, title, paras, lang, charset, _), got in zip(PAGES, texts):
        ref = trafilatura.extract(page(title, paras, lang, charset))
        assert got == ref
    # Sources name the record; the report counts the pages that gave nothing, and why.
    assert [d["source"].rsplit("#", 1)[1] for d in docs] == ["3", "5", "7"]
    report = json.loads((out / "report.json").read_text())
    assert report["web_skipped"] == {"http-status": 1, "not-html": 1}


def test_warc_urls_meet_the_blocklist_and_wet_text_is_read(lmkit, tmp_path):
    warc = tmp_path / "crawl.warc.gz"
    write_warc(warc)
    block = tmp_path / "block.txt"
    block.write_text("# spam\nexample.net\n")
    wet = tmp_path / "crawl.warc.wet.gz"
    with open(wet, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i, text in enumerate([" ".join(EN), " ".join(KO)]):
            w.write_record(w.create_warc_record(
                f"http://wet.example.com/{i}", "conversion",
                payload=io.BytesIO(text.encode()), warc_content_type="text/plain"))
    out = tmp_path / "out"
    lmkit("data", "prepare", "--input", warc, wet, "--output", out, "--val-fraction", "0",
          "--no-filters", "--no-near-dedup", "--url-blocklist", block)
    texts = [d["text"] for d in read_shards(out)]
    assert texts == [expected(*PAGES[0][1:3]), expected(*PAGES[1][1:3]), " ".join(EN), " ".join(KO)]
    report = json.loads((out / "report.json").read_text())
    assert report["filtered"]["blocked_url"]["docs"] == 1


def test_a_truncated_warc_is_an_error_naming_the_file(tmp_path):
    from conftest import ROOT
    warc = tmp_path / "cut.warc"
    raw = io.BytesIO()
    w = WARCWriter(raw, gzip=False)
    w.write_record(w.create_warc_record("http://x.example/", "resource",
                                        payload=io.BytesIO(page("T", EN).encode()),
                                        warc_content_type="text/html"))
    warc.write_bytes(raw.getvalue()[:-200])
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    p = subprocess.run([binary, "data", "prepare", "--input", warc, "--output", tmp_path / "o"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "cut.warc" in p.stderr and "record 1" in p.stderr and "panick" not in p.stderr
    assert not (tmp_path / "o").exists()


def texts_of(out, suffix=".jsonl"):
    docs = []
    for name in sorted(os.listdir(out)):
        if name.startswith("train-") and name.endswith(suffix):
            if suffix == ".parquet":
                import pyarrow.parquet as pq
                t = pq.read_table(out / name)
                docs += list(zip(t.column("text").to_pylist(), t.column("source").to_pylist()))
            else:
                with open(out / name, encoding="utf-8") as f:
                    docs += [(d["text"], d["source"]) for d in map(json.loads, f)]
    return docs


def test_parquet_inputs_in_every_codec_and_parquet_shards(lmkit, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [f"Document {i} tells of the {['river', 'hill', 'road', '강', '산'][i % 5]} number "
            f"{i * 7919 % 10007} and nothing else at all." for i in range(3000)]
    urls = [f"http://{'spam.example.com' if i % 10 == 0 else 'ok.example.org'}/{i}"
            for i in range(3000)]
    src = tmp_path / "in"
    src.mkdir()
    codecs = ["snappy", "zstd", "gzip", "lz4", "none"]
    for k, codec in enumerate(codecs):
        part = slice(k * 600, (k + 1) * 600)
        table = pa.table({"id": list(range(600)), "content": rows[part], "url": urls[part]})
        pq.write_table(table, src / f"part-{k}.parquet", compression=codec, row_group_size=128)
    block = tmp_path / "block.txt"
    block.write_text("spam.example.com\n")
    common = ["--input", src, "--text-field", "content", "--val-fraction", "0", "--no-filters",
              "--no-near-dedup", "--url-blocklist", block, "--url-field", "url"]
    jsonl = tmp_path / "jsonl"
    lmkit("data", "prepare", *common, "--output", jsonl)
    got = texts_of(jsonl)
    want = [r for i, r in enumerate(rows) if i % 10 != 0]
    assert [t for t, _ in got] == want
    assert got[0][1].endswith("part-0.parquet:2")  # row 1 is blocked
    # Parquet shards hold the same documents, readable by pyarrow.
    pq_out = tmp_path / "pq"
    lmkit("data", "prepare", *common, "--output", pq_out, "--parquet", "--shard-docs", "1000")
    assert texts_of(pq_out, ".parquet") == got
    assert len([n for n in os.listdir(pq_out) if n.endswith(".parquet")]) == 3
    stats = json.loads(lmkit("data", "stats", pq_out, "--json", "--no-languages"))
    per_file = stats["sources"]["train"]
    assert sorted(os.path.basename(f) for f in per_file) == [f"part-{k}.parquet" for k in range(5)]
    assert sum(s["docs"] for s in per_file.values()) == len(got)


def test_bad_parquet_rows_name_the_file_and_row(lmkit, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["A first document of some length here.", None,
                                      "A third document of some length here."]}), path)
    from conftest import ROOT
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    p = subprocess.run([binary, "data", "prepare", "--input", path, "--output", tmp_path / "o"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "rows.parquet" in p.stderr and "row 2" in p.stderr
    assert "null" in p.stderr
    p = subprocess.run([binary, "data", "prepare", "--input", path, "--text-field", "body",
                        "--output", tmp_path / "o"], capture_output=True, text=True)
    assert p.returncode != 0 and "no column `body`" in p.stderr and "text" in p.stderr
    lmkit("data", "prepare", "--input", path, "--output", tmp_path / "o", "--skip-bad",
          "--val-fraction", "0", "--no-filters")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["skipped_bad"] == 1 and report["train"]["docs"] == 2


def test_arrow_inputs_as_datasets_saves_them_and_pyarrow_writes_them(lmkit, tmp_path):
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc

    rows = [f"Record {i} is about the {['valley', 'harbour', 'mill', '마을', '바다'][i % 5]} and the "
            f"number {i * 7919 % 10007}, which appears nowhere else." for i in range(2000)]
    urls = [f"http://{'spam.example.com' if i % 10 == 0 else 'ok.example.org'}/{i}"
            for i in range(2000)]
    src = tmp_path / "in"
    # A `datasets` directory as save_to_disk writes it (Arrow streams + JSON metadata), two shards.
    ds = datasets.Dataset.from_dict({"content": rows[:1000], "url": urls[:1000]})
    ds.save_to_disk(str(src / "hf"), num_shards=2)
    assert len([n for n in os.listdir(src / "hf") if n.endswith(".arrow")]) == 2
    # pyarrow's IPC file format (Feather v2) with zstd buffers, large_string text.
    table = pa.table({"content": pa.array(rows[1000:1500], pa.large_string()),
                      "url": urls[1000:1500]})
    feather.write_feather(table, src / "part-2.feather", compression="zstd", chunksize=64)
    # An IPC stream with lz4 buffers, string_view text, and gzip around it.
    table = pa.table({"content": pa.array(rows[1500:], pa.string_view()), "url": urls[1500:]})
    sink = io.BytesIO()
    opts = ipc.IpcWriteOptions(compression="lz4")
    with ipc.new_stream(sink, table.schema, options=opts) as w:
        for batch in table.to_batches(max_chunksize=100):
            w.write_batch(batch)
    (src / "part-3.arrows.gz").write_bytes(gzip.compress(sink.getvalue()))
    block = tmp_path / "block.txt"
    block.write_text("spam.example.com\n")
    out = tmp_path / "out"
    lmkit("data", "prepare", "--input", src, "--text-field", "content", "--val-fraction", "0",
          "--no-filters", "--no-near-dedup", "--url-blocklist", block, "--url-field", "url",
          "--output", out)
    got = texts_of(out)
    assert sorted(t for t, _ in got) == sorted(r for i, r in enumerate(rows) if i % 10 != 0)
    sources = {s.rsplit(":", 1)[0].split(os.sep)[-1] for _, s in got}
    assert "part-2.feather" in sources and "part-3.arrows.gz" in sources
    assert any(s.endswith("part-2.feather:2") for _, s in got)  # row 1 (global 1000) is blocked


def test_bad_arrow_inputs_name_the_file_and_row(lmkit, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc as ipc
    from conftest import ROOT
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))

    def prepare(path, *extra, out="o"):
        return subprocess.run([binary, "data", "prepare", "--input", path, "--output",
                               tmp_path / out, *extra], capture_output=True, text=True)

    table = pa.table({"text": ["A first document of some length here.", None,
                               "A third document of some length here."], "n": [1, 2, 3]})
    path = tmp_path / "rows.arrow"
    with ipc.new_file(path, table.schema) as w:
        w.write_table(table)
    p = prepare(path)
    assert p.returncode != 0 and "rows.arrow" in p.stderr and "row 2" in p.stderr
    assert "null" in p.stderr and "panick" not in p.stderr
    p = prepare(path, "--text-field", "n")
    assert p.returncode != 0 and "Int64" in p.stderr and "row 1" in p.stderr
    p = prepare(path, "--text-field", "body")
    assert p.returncode != 0 and "no column `body`" in p.stderr and "text, n" in p.stderr
    lmkit("data", "prepare", "--input", path, "--output", tmp_path / "o", "--skip-bad",
          "--val-fraction", "0", "--no-filters")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["skipped_bad"] == 1 and report["train"]["docs"] == 2
    # Cut streams and files, and something that is not Arrow at all: errors, no panic, no output.
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    data = sink.getvalue()
    for name, blob in [("cut.arrows", data[: len(data) // 2]),
                       ("cut.arrow", path.read_bytes()[:-40]),
                       ("text.arrow", b"just some text, not an Arrow stream\n" * 5),
                       ("empty.arrow", b"")]:
        bad = tmp_path / name
        bad.write_bytes(blob)
        p = prepare(bad, out="bad-out")
        assert p.returncode != 0 and name in p.stderr and "panick" not in p.stderr, (name, p.stderr)
        assert not (tmp_path / "bad-out").exists()
