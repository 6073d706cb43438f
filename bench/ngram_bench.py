#!/usr/bin/env python3
"""n-gram benchmark: lmkit next to KenLM's own programs (lmplz, build_binary, query), same run.

usage: ~/.cache/lmkit/venv/bin/python bench/ngram_bench.py [--order 5] [--rounds 3] [--big-mb 50]

KenLM's programs are built from the kenlm source package by scripts/setup-kenlm.sh (cached).
Corpora: data/en (4.9 MB of English) and a larger one of --big-mb MB made from it: each copy of
the text has a different third of its word types renamed (`word~k`), so unique n-grams keep
growing with the size as they do in real text (a plain repetition would have no singletons and
no estimable discounts).

Rows (medians over --rounds, lmkit and KenLM alternated within each round, whole processes):
- build: `lmkit ngram train` vs `lmplz` (both writing ARPA), wall time and peak RSS, and the
  largest |difference| between the two ARPA files' log10 probabilities and back-offs;
- binary: `lmkit ngram convert` (→ .lmkb) vs `build_binary` (probing; trie -q 8 for its size);
- query: `lmkit ngram ppl` with 1 and 2 threads vs `query -v summary` (1 thread; KenLM's query has
  no threads) on the corpus itself, tokens (words + </s>) per second of the whole process.
"""
import argparse
import atexit
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "en" / "web_bible.txt"
sys.path.insert(0, str(ROOT / "tests" / "parity"))
from test_kenlm import read_arpa  # noqa: E402  (the parity tests' ARPA reader)


def run_rss(cmd, stdin=None, env=None):
    """(wall seconds, peak RSS MiB, stdout) of one run, RSS from the child's rusage."""
    out_r, out_w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        if stdin:
            fd = os.open(stdin, os.O_RDONLY)
            os.dup2(fd, 0)
        os.dup2(out_w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execvpe(cmd[0], cmd, {**os.environ, **(env or {})})
    os.close(out_w)
    chunks = []
    while True:
        b = os.read(out_r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(out_r)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if status:
        sys.exit(f"{cmd} failed with status {status}")
    return wall, usage.ru_maxrss / 1024, b"".join(chunks).decode()


def max_diff(a_path, b_path):
    a, b = read_arpa(a_path), read_arpa(b_path)
    if a.keys() != b.keys():
        return f"n-gram sets differ ({len(a.keys() ^ b.keys())})"
    worst = max(max(abs(a[k][0] - b[k][0]) if k != (1, "<s>") else 0.0, abs(a[k][1] - b[k][1])) for k in a)
    return f"{worst:.1e}"


def make_big(path, mb):
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    want, k = mb * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < want:
            out = []
            for line in lines:
                words = [w + f"~{k}" if k and zlib.crc32(f"{w}~{k}".encode()) % 3 == 0 else w for w in line.split(" ")]
                out.append(" ".join(words))
            text = "\n".join(out) + "\n"
            f.write(text)
            size += len(text.encode("utf-8"))
            k += 1


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=50, help="size of the larger corpus (0: skip it)")
    ap.add_argument("--lmplz-memory", default="1G",
                    help="lmplz -S (its sorting memory; lmkit's --memory-mb default is 1024 MiB); '' for lmplz's own default, 80%% of RAM")
    ap.add_argument("--small-memory-mb", type=int, default=64,
                    help="also build the larger corpus with lmkit --memory-mb M (estimation on disk) and lmplz -S M (0: skip)")
    ap.add_argument("--pointer-bits", type=int, default=22,
                    help="the tries with compressed pointers: lmkit --pointer-bits B, build_binary -a B")
    ap.add_argument("--lmkit", default=os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit")))
    args = ap.parse_args()
    if not os.path.exists(args.lmkit):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    kenlm = pathlib.Path(os.environ.get("LMKIT_KENLM_BIN") or subprocess.run(
        ["bash", str(ROOT / "scripts/setup-kenlm.sh")], capture_output=True, text=True, check=True).stdout.strip())
    lm, order = args.lmkit, str(args.order)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-ngram-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    corpora = [("data/en", CORPUS)]
    if args.big_mb:
        big = tmp / "big.txt"
        make_big(big, args.big_mb)
        corpora.append((f"data/en → {args.big_mb} MB", big))

    print(f"order {order}, {args.rounds} rounds, {os.cpu_count()} cores; KenLM from {kenlm}; lmkit {lm}")
    build_rows, query_rows, trie_rows, small_rows = [], [], [], []
    for name, corpus in corpora:
        mb = corpus.stat().st_size / 1e6
        ours, theirs = tmp / "lmkit.arpa", tmp / "lmplz.arpa"
        lk_bin, kl_bin, kl_trie = tmp / "m.lmkb", tmp / "m.probing", tmp / "m.trie"
        lk_q8, lk_q8a, kl_trie_a = tmp / "m.q8.lmkb", tmp / "m.q8a.lmkb", tmp / "m.a.trie"
        t = {k: [] for k in ("lmkit", "lmplz", "convert", "build_binary", "q1", "q2", "kq", "q8", "kq8", "q8a", "kq8a")}
        rss = {k: [] for k in t}
        tokens = None
        for _ in range(args.rounds):
            for key, cmd in (
                ("lmkit", [lm, "ngram", "train", "--order", order, "--input", str(corpus), "--output", str(ours)]),
                ("lmplz", [str(kenlm / "lmplz"), "-o", order, "-T", str(tmp), "--text", str(corpus), "--arpa", str(theirs),
                           *(["-S", args.lmplz_memory] if args.lmplz_memory else [])]),
                ("convert", [lm, "ngram", "convert", str(ours), str(lk_bin)]),
                ("build_binary", [str(kenlm / "build_binary"), str(theirs), str(kl_bin)]),
                ("convert_q8", [lm, "ngram", "convert", str(ours), str(lk_q8), "--quantize", "8"]),
                ("build_trie", [str(kenlm / "build_binary"), "trie", "-q", "8", str(theirs), str(kl_trie)]),
                # Compressed pointers (off by default in both).
                ("convert_q8a", [lm, "ngram", "convert", str(ours), str(lk_q8a), "--quantize", "8",
                                 "--pointer-bits", str(args.pointer_bits)]),
                ("build_trie_a", [str(kenlm / "build_binary"), "-a", str(args.pointer_bits), "trie", "-q", "8",
                                  str(theirs), str(kl_trie_a)]),
            ) + ((
                ("lmkit_small", [lm, "ngram", "train", "--order", order, "--input", str(corpus), "--output",
                                 str(tmp / "small.arpa"), "--memory-mb", str(args.small_memory_mb), "--temp-dir", str(tmp)]),
                ("lmplz_small", [str(kenlm / "lmplz"), "-o", order, "-T", str(tmp), "--text", str(corpus), "--arpa",
                                 str(tmp / "lmplz-small.arpa"), "-S", f"{args.small_memory_mb}M"]),
            ) if args.small_memory_mb and corpus != CORPUS else ()):
                if key not in t:
                    t[key], rss[key] = [], []
                w, r, _ = run_rss(cmd)
                t[key].append(w)
                rss[key].append(r)
            for key, cmd, env in (
                ("q1", [lm, "ngram", "ppl", "-m", str(lk_bin), "--input", str(corpus)], {"RAYON_NUM_THREADS": "1"}),
                ("kq", [str(kenlm / "query"), "-v", "summary", str(kl_bin)], None),
                ("q2", [lm, "ngram", "ppl", "-m", str(lk_bin), "--input", str(corpus)], {"RAYON_NUM_THREADS": "2"}),
                ("q8", [lm, "ngram", "ppl", "-m", str(lk_q8), "--input", str(corpus)], {"RAYON_NUM_THREADS": "1"}),
                ("kq8", [str(kenlm / "query"), "-v", "summary", str(kl_trie)], None),
                ("q8a", [lm, "ngram", "ppl", "-m", str(lk_q8a), "--input", str(corpus)], {"RAYON_NUM_THREADS": "1"}),
                ("kq8a", [str(kenlm / "query"), "-v", "summary", str(kl_trie_a)], None),
            ):
                w, r, out = run_rss(cmd, stdin=str(corpus) if key.startswith("kq") else None, env=env)
                t[key].append(w)
                rss[key].append(r)
                if key == "q1":
                    tokens = int(out.split("Tokens:\t")[1].split()[0])
                    ours_ppl = float(out.split("Perplexity including OOVs:\t")[1].split()[0])
                if key == "kq":
                    kenlm_ppl = float(out.split("Perplexity including OOVs:")[1].split()[0])
                if key == "q8":
                    ours_q8_ppl = float(out.split("Perplexity including OOVs:\t")[1].split()[0])
                if key == "kq8":
                    kenlm_q8_ppl = float(out.split("Perplexity including OOVs:")[1].split()[0])
                if key == "q8a":
                    ours_q8a_ppl = float(out.split("Perplexity including OOVs:\t")[1].split()[0])
                if key == "kq8a":
                    kenlm_q8a_ppl = float(out.split("Perplexity including OOVs:")[1].split()[0])
        n_grams = sum(int(l.split("=")[1]) for l in ours.read_text(encoding="utf-8", errors="replace")[:400].splitlines()
                      if l.startswith("ngram "))
        build_rows.append((name, mb, n_grams, med(t["lmkit"]), med(rss["lmkit"]), med(t["lmplz"]), med(rss["lmplz"]),
                           max_diff(ours, theirs), med(t["convert"]), med(t["build_binary"]),
                           lk_bin.stat().st_size / 1e6, kl_bin.stat().st_size / 1e6, kl_trie.stat().st_size / 1e6,
                           lk_q8.stat().st_size / 1e6, med(t["convert_q8"]), med(t["build_trie"])))
        if "lmkit_small" in t:
            same = (tmp / "small.arpa").read_bytes() == ours.read_bytes()
            # The same file as the in-memory build's: the same difference from lmplz's (whose file
            # does not depend on -S either) — not read again.
            same_lmplz = (tmp / "lmplz-small.arpa").read_bytes() == theirs.read_bytes()
            diff = build_rows[-1][7] if same and same_lmplz else max_diff(tmp / "small.arpa", tmp / "lmplz-small.arpa")
            small_rows.append((name, med(t["lmkit_small"]), med(rss["lmkit_small"]), med(t["lmplz_small"]),
                               med(rss["lmplz_small"]), same, diff))
        query_rows.append((name, tokens, tokens / med(t["q1"]), tokens / med(t["q2"]), tokens / med(t["kq"]),
                           med(rss["q1"]), med(rss["kq"]), ours_ppl, kenlm_ppl))
        trie_rows.append((name, lk_q8.stat().st_size / 1e6, kl_trie.stat().st_size / 1e6, tokens / med(t["q8"]),
                          tokens / med(t["kq8"]), ours_ppl, ours_q8_ppl, kenlm_ppl, kenlm_q8_ppl))
        trie_rows.append((f"{name}, -a {args.pointer_bits}", lk_q8a.stat().st_size / 1e6, kl_trie_a.stat().st_size / 1e6,
                          tokens / med(t["q8a"]), tokens / med(t["kq8a"]), ours_ppl, ours_q8a_ppl, kenlm_ppl,
                          kenlm_q8a_ppl))

    print()
    print("| corpus | MB | n-grams | lmkit build s | lmplz s | lmkit/lmplz speed | RSS MiB lmkit / lmplz | max ARPA diff | "
          "convert s / build_binary s | .lmkb / probing / trie-q8 MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in build_rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:,} | {r[3]:.2f} | {r[5]:.2f} | {r[5] / r[3]:.2f}x | {r[4]:.0f} / {r[6]:.0f} | "
              f"{r[7]} | {r[8]:.2f} / {r[9]:.2f} | {r[10]:.0f} / {r[11]:.0f} / {r[12]:.0f} |")
    if small_rows:
        print()
        print(f"Within a {args.small_memory_mb} MiB budget (lmkit --memory-mb {args.small_memory_mb}: counting and estimation "
              f"through sorted files on disk; lmplz -S {args.small_memory_mb}M):")
        print()
        print("| corpus | lmkit s | lmplz s | lmkit/lmplz speed | RSS MiB lmkit / lmplz | same file as in memory | max ARPA diff |")
        print("|---|---|---|---|---|---|---|")
        for r in small_rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[3]:.2f} | {r[3] / r[1]:.2f}x | {r[2]:.0f} / {r[4]:.0f} | "
                  f"{'yes' if r[5] else 'NO'} | {r[6]} |")
    print()
    print("| corpus | tokens | lmkit 1 thread tok/s | lmkit 2 threads tok/s | KenLM query tok/s | 1 thread ratio | "
          "2 threads ratio | RSS MiB lmkit / KenLM | perplexity lmkit / KenLM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in query_rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:,.0f} | {r[3]:,.0f} | {r[4]:,.0f} | {r[2] / r[4]:.2f}x | {r[3] / r[4]:.2f}x | "
              f"{r[5]:.0f} / {r[6]:.0f} | {r[7]:.2f} / {r[8]:.2f} |")
    print()
    print("Trie with 8-bit quantization (lmkit `--quantize 8`, KenLM `build_binary trie -q 8`; rows with -a B: "
          "also lmkit `--pointer-bits B`, KenLM `-a B`), query 1 thread:")
    print()
    print("| corpus | lmkit MB | KenLM MB | size ratio | lmkit tok/s | KenLM tok/s | speed ratio | "
          "perplexity lmkit → q8 | KenLM → q8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in trie_rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[1] / r[2]:.2f} | {r[3]:,.0f} | {r[4]:,.0f} | {r[3] / r[4]:.2f}x | "
              f"{r[5]:.3f} → {r[6]:.3f} ({100 * (r[6] / r[5] - 1):+.2f}%) | {r[7]:.3f} → {r[8]:.3f} "
              f"({100 * (r[8] / r[7] - 1):+.2f}%) |")
    print()
    print("Whole processes: start, load (lmkit mmaps .lmkb; query populates its probing mmap), read, score.")
    print(f"lmplz -S {args.lmplz_memory or '80% (its default)'}; lmkit --memory-mb 1024 (its default).")


if __name__ == "__main__":
    main()
