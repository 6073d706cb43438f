#!/usr/bin/env python3
"""Corpus preparation and tokenization throughput on the bundled corpus (data/en + data/ko).

usage: ~/.cache/lmkit/venv/bin/python bench/data_bench.py

Prints MB/s for `lmkit data prepare` (normalize + filters + exact and MinHash dedup + split, and
without near-dedup to show its cost), BPE training time, and encoding into token shards next to
Python `tokenizers` (the same Rust core behind Python bindings, `encode_batch`) in the same run.
"""
import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
INPUTS = [ROOT / "data/en", ROOT / "data/ko"]


def timed(cmd):
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{cmd} failed: {p.stderr}")
    return time.perf_counter() - t0


def main():
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    if not os.path.exists(lm):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    mb = sum(f.stat().st_size for d in INPUTS for f in d.glob("*.txt")) / 1e6
    rows = []
    t = min(timed([lm, "data", "prepare", "--input", *INPUTS, "--output", tmp / "p1"]) for _ in range(3))
    rows.append(("lmkit data prepare (all steps, MinHash 128 perms)", t, mb / t))
    t = min(timed([lm, "data", "prepare", "--input", *INPUTS, "--output", tmp / "p2", "--no-near-dedup"]) for _ in range(3))
    rows.append(("lmkit data prepare --no-near-dedup", t, mb / t))
    t = timed([lm, "tokenizer", "train", "--input", *INPUTS, "--vocab-size", "8192", "--output", tmp / "tok"])
    rows.append(("lmkit tokenizer train (vocab 8192)", t, mb / t))
    t = min(timed([lm, "tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", *INPUTS, "--shards", tmp / f"s{i}"]) for i in range(3))
    rows.append(("lmkit tokenizer encode --shards (read+encode+write)", t, mb / t))

    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
    texts = [l for d in INPUTS for f in sorted(d.glob("*.txt")) for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(texts), 4096):
            tk.encode_batch(texts[i:i + 4096], add_special_tokens=False)
        best = min(best, time.perf_counter() - t0)
    rows.append(("Python tokenizers encode_batch (encode only, texts in memory)", best, mb / best))

    print(f"corpus: data/en + data/ko, {mb:.2f} MB; {os.cpu_count()} cores; best of 3 where repeated")
    print()
    print("| step | seconds | MB/s |")
    print("|---|---|---|")
    for name, t, rate in rows:
        print(f"| {name} | {t:.2f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
