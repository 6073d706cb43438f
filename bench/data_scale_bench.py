#!/usr/bin/env python3
"""Corpus building at scale: `lmkit data prepare` next to datatrove (Hugging Face's pipeline
library) on the same JSONL input, in the same run, alternating the two.

usage: ~/.cache/lmkit/venv/bin/python bench/data_scale_bench.py [--mb 500] [--rounds 1]

Rows (each tool's whole wall time and peak memory: the summed RSS of its process tree, sampled
every 50 ms):
  exact     exact-duplicate removal only (no filters): lmkit --no-near-dedup vs datatrove's
            ExactDedupSignature → ExactFindDedups → ExactDedupFilter
  minhash   MinHash near-duplicate removal only, matched settings (word 5-grams, 14 bands x 8 rows
            = 112 permutations): lmkit --shingle words --shingle-size 5 --num-perm 112 vs datatrove's
            four MinHash stages with its defaults
  filters   quality filters only: lmkit's Gopher-style filters + --c4-filters + --fineweb-filters
            vs datatrove's GopherRepetition + GopherQuality + C4Quality + FineWebQuality filters
Then lmkit alone at a tenth of the corpus and at all of it with --memory-mb 64: its peak memory
stays flat as the corpus grows 10x (datatrove writes its signatures to disk, lmkit spills beyond
the cap).

datatrove is installed into its own venv (~/.cache/lmkit/datatrove-venv, `datatrove[io,processing]` and spacy, its English word tokenizer)
so that its dependencies do not move the test venv's pins. The corpus (JSONL, 8 files) is built
once into ~/.cache/lmkit/bench/corpus-<MB>mb from the bundled data/en and data/ko: documents of
5-20 lines with words changed, 20% of them near copies of an earlier one, 5% exact copies.
"""
import argparse
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path.home() / ".cache/lmkit"
DT_VENV = CACHE / "datatrove-venv"
FILES = 8

DATATROVE = r"""
import sys
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter



def main():
    mode, src, work, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tasks = int(sys.argv[5])

    def run(pipeline, n=tasks, name="s"):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=workers,
                              logging_dir=f"{work}/logs-{name}").run()

    if mode == "exact":
        from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupSignature,
                                                          ExactFindDedups, ExactDedupFilter)
        cfg = ExactDedupConfig(content_getter=lambda d: d.text)
        run([JsonlReader(src), ExactDedupSignature(f"{work}/sigs", config=cfg)], name="sig")
        run([ExactFindDedups(f"{work}/sigs", f"{work}/dups", config=cfg)], n=1, name="find")
        run([JsonlReader(src), ExactDedupFilter(f"{work}/dups", config=cfg),
             JsonlWriter(f"{work}/out", compression=None)], name="filter")
    elif mode == "minhash":
        from datatrove.pipeline.dedup import MinhashDedupSignature
        from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                      MinhashDedupCluster, MinhashDedupFilter)
        cfg = MinhashConfig()
        run([JsonlReader(src), MinhashDedupSignature(f"{work}/sigs", config=cfg)], name="sig")
        run([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
            n=cfg.num_buckets, name="buckets")
        run([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)], n=1, name="cluster")
        run([JsonlReader(src), MinhashDedupFilter(f"{work}/remove"), JsonlWriter(f"{work}/out", compression=None)],
            name="filter")
    elif mode == "filters":
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
                                                GopherQualityFilter, GopherRepetitionFilter)
        run([JsonlReader(src), GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
             FineWebQualityFilter(), JsonlWriter(f"{work}/out", compression=None)])


if __name__ == "__main__":
    main()
"""


def ensure_datatrove():
    py = DT_VENV / "bin/python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DT_VENV)], check=True)
    if subprocess.run([str(py), "-c", "import datatrove, orjson, spacy"], capture_output=True).returncode:
        print("installing datatrove[io,processing] into", DT_VENV, file=sys.stderr)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "datatrove[io,processing]", "spacy"],
                       check=True)
    return py


def build_corpus(mb):
    out = CACHE / f"bench/corpus-{mb}mb"
    done = out / "DONE"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lines = [l for d in ("data/en", "data/ko") for f in sorted((ROOT / d).glob("*.txt"))
             for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
    rng = random.Random(1)
    vocab = [w for l in lines[:20000] for w in l.split()][:50000]
    target = mb * 1_000_000
    files = [open(out / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(FILES)]
    written, n, docs = 0, 0, []
    while written < target:
        r = rng.random()
        if docs and r < 0.05:
            text = rng.choice(docs)
        elif docs and r < 0.25:
            words = rng.choice(docs).split(" ")
            for _ in range(3):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)
        else:
            start = rng.randrange(len(lines) - 20)
            paragraph = lines[start:start + rng.randint(5, 20)]
            words = "\n".join(paragraph).split(" ")
            for _ in range(max(1, len(words) // 20)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)
            if len(docs) < 200_000:
                docs.append(text)
            else:
                docs[rng.randrange(len(docs))] = text
        line = json.dumps({"id": str(n), "text": text}, ensure_ascii=False) + "\n"
        files[n % FILES].write(line)
        written += len(line.encode())
        n += 1
    for f in files:
        f.close()
    done.write_text(f"{n} documents\n")
    return out


def measure(cmd, env=None, anon=None):
    """Wall seconds and peak summed RSS (MB) of the process tree; with `anon` (a list), its peak
    anonymous memory (RSS less file-backed pages such as memory-mapped files) goes there."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    peak = [0, 0]

    def poll():
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                infos = [proc.memory_info()] + [
                    c.memory_info() for c in proc.children(recursive=True)]
                peak[0] = max(peak[0], sum(i.rss for i in infos))
                peak[1] = max(peak[1], sum(i.rss - i.shared for i in infos))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=poll)
    th.start()
    _, err = p.communicate()
    th.join()
    if p.returncode:
        sys.exit(f"{cmd[:4]} failed: {err[-2000:]}")
    if anon is not None:
        anon.append(peak[1] / 1e6)
    return time.perf_counter() - t0, peak[0] / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rows", default="exact,minhash,filters,scaling")
    args = ap.parse_args()
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    if not os.path.exists(lm):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    dt = ensure_datatrove()
    corpus = build_corpus(args.mb)
    mb = sum(f.stat().st_size for f in corpus.glob("*.jsonl")) / 1e6
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-scale-"))
    script = tmp / "dt.py"
    script.write_text(DATATROVE)
    workers = os.cpu_count()
    lm_args = {
        "exact": ["--no-filters", "--no-near-dedup"],
        "minhash": ["--no-filters", "--no-exact-dedup", "--shingle", "words", "--shingle-size", "5",
                    "--num-perm", "112"],
        "filters": ["--no-exact-dedup", "--no-near-dedup", "--c4-filters", "--fineweb-filters"],
    }
    rows = [r for r in args.rows.split(",") if r in lm_args]
    results = {r: {"lmkit": [], "datatrove": []} for r in rows}
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for rnd in range(args.rounds):
        for row in rows:
            for tool in (["lmkit", "datatrove"] if rnd % 2 == 0 else ["datatrove", "lmkit"]):
                work = tmp / f"{row}-{tool}-{rnd}"
                if tool == "lmkit":
                    cmd = [lm, "data", "prepare", "--input", corpus, "--output", work,
                           "--val-fraction", "0", *lm_args[row]]
                else:
                    cmd = [dt, script, row, corpus, work, workers, FILES]
                results[row][tool].append(measure(cmd, env))
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {rnd + 1} {row} {tool}: {results[row][tool][-1][0]:.1f} s, "
                      f"{results[row][tool][-1][1]:.0f} MB", file=sys.stderr, flush=True)
    print(f"corpus: {mb:.0f} MB of JSONL in {FILES} files ({(corpus / 'DONE').read_text().strip()}); "
          f"{os.cpu_count()} cores; medians of {args.rounds} alternated round(s)")
    print()
    print("| step | lmkit s | lmkit MB/s | lmkit peak MB | datatrove s | datatrove MB/s | "
          "datatrove peak MB | speed ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ls = statistics.median(t for t, _ in results[row]["lmkit"])
        lp = statistics.median(m for _, m in results[row]["lmkit"])
        ds = statistics.median(t for t, _ in results[row]["datatrove"])
        dp = statistics.median(m for _, m in results[row]["datatrove"])
        print(f"| {row} | {ls:.1f} | {mb / ls:.1f} | {lp:.0f} | {ds:.1f} | {mb / ds:.1f} | "
              f"{dp:.0f} | {ds / ls:.1f}x |")
    if "scaling" in args.rows:
        print()
        print("lmkit peak memory as the corpus grows 10x (all steps, --memory-mb 64; RSS counts the")
        print("memory-mapped runs on disk, which the kernel can drop; anonymous memory does not):")
        print()
        print("| input | seconds | peak RSS MB | peak anonymous MB |")
        print("|---|---|---|---|")
        small = tmp / "tenth"
        small.mkdir()
        for f in sorted(corpus.glob("*.jsonl")):
            with open(f, encoding="utf-8") as src, open(small / f.name, "w", encoding="utf-8") as dst:
                size = f.stat().st_size // 10
                for line in src:
                    if size <= 0:
                        break
                    dst.write(line)
                    size -= len(line.encode())
        for name, src in [("a tenth", small), ("all", corpus)]:
            smb = sum(f.stat().st_size for f in src.glob("*.jsonl")) / 1e6
            anon = []
            t, peak = measure([lm, "data", "prepare", "--input", src, "--output", tmp / f"scale-{name}",
                               "--memory-mb", "64"], env, anon)
            print(f"| {name} ({smb:.0f} MB) | {t:.1f} | {peak:.0f} | {anon[0]:.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
