#!/usr/bin/env python3
"""n-gram benchmark: lmkit vs KenLM on the bundled English corpus, measured in the same run.

usage: bash scripts/setup-python.sh  # once
       ~/.cache/lmkit/venv/bin/python bench/ngram_bench.py [--orders 3 5]

Prints, per order: model build time and peak memory, load time, and query throughput (tokens
scored per second, every word plus </s>). The peer is the `kenlm` Python module (KenLM's C++ query
code behind a thin Cython layer); KenLM's estimator `lmplz` is not in the package registries, so
the peer's build column is empty and KenLM queries the ARPA file that lmkit wrote.
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "en" / "web_bible.txt"


def run_measured(cmd, env=None):
    """Runs cmd; returns (wall seconds, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{cmd} failed:\n{err}")
    return wall, out


def peak_rss(cmd):
    """Peak RSS (MiB) of one command, measured with os.wait4 on the child itself."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if status:
        sys.exit(f"{cmd} failed with status {status}")
    return usage.ru_maxrss / 1024


KENLM_QUERY = r"""
import sys, time, kenlm
t0 = time.perf_counter(); m = kenlm.Model(sys.argv[1]); load = time.perf_counter() - t0
lines = [l.strip() for l in open(sys.argv[2], encoding="utf-8") if l.strip()]
t0 = time.perf_counter(); total = 0.0; tokens = 0
for s in lines:
    total += m.score(s, bos=True, eos=True); tokens += len(s.split()) + 1
q = time.perf_counter() - t0
print(load, q, tokens, total)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--lmkit", default=os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit")))
    args = ap.parse_args()
    if not os.path.exists(args.lmkit):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    lm = args.lmkit
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-bench-"))
    nbytes = CORPUS.stat().st_size
    rows = []
    for order in args.orders:
        arpa, binary = tmp / f"en{order}.arpa", tmp / f"en{order}.lmkb"
        build_s, _ = run_measured([lm, "ngram", "train", "--order", str(order), "--input", str(CORPUS), "--output", str(arpa)])
        build_mb = peak_rss([lm, "ngram", "train", "--order", str(order), "--input", str(CORPUS), "--output", str(arpa)])
        binb_s, _ = run_measured([lm, "ngram", "train", "--order", str(order), "--input", str(CORPUS), "--output", str(binary)])
        info = run_measured([lm, "ngram", "info", str(binary)])[1]
        load_ms = float(info.split("loaded in:\t")[1].split()[0])
        arpa_load = float(run_measured([lm, "ngram", "info", str(arpa)])[1].split("loaded in:\t")[1].split()[0])
        q1_s, _ = run_measured([lm, "ngram", "ppl", "-m", str(binary), "--input", str(CORPUS)], {"RAYON_NUM_THREADS": "1"})
        q_s, out = run_measured([lm, "ngram", "ppl", "-m", str(binary), "--input", str(CORPUS)])
        tokens = int(out.split("Tokens:\t")[1].split()[0])
        q_mb = peak_rss([lm, "ngram", "ppl", "-m", str(binary), "--input", str(CORPUS)])
        lm_total = float(out.split("log10 probability:\t")[1].split()[0])

        kq = subprocess.run([sys.executable, "-c", KENLM_QUERY, str(arpa), str(CORPUS)], capture_output=True, text=True, check=True)
        k_load, k_q, k_tokens, k_total = map(float, kq.stdout.split())
        k_mb = peak_rss([sys.executable, "-c", KENLM_QUERY, str(arpa), str(CORPUS)])
        assert int(k_tokens) == tokens, (k_tokens, tokens)
        n_ngrams = sum(int(l.split("\t")[1]) for l in info.splitlines() if "-grams:" in l)
        rows.append((order, n_ngrams, build_s, binb_s, build_mb, arpa_load, load_ms, q_s, tokens / q_s, q_mb,
                     k_load * 1e3, k_q, k_tokens / k_q, k_mb, abs(lm_total - k_total), tokens / q1_s))

    print(f"corpus: {CORPUS.relative_to(ROOT)} ({nbytes / 1e6:.1f} MB); machine: {os.cpu_count()} cores")
    print()
    print("| order | n-grams | lmkit build → ARPA (s) | lmkit build → .lmkb (s) | lmkit build peak RSS (MiB) | KenLM build |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0f} | n/a (lmplz not in registries) |")
    print()
    print("| order | load: lmkit ARPA (ms) | load: lmkit .lmkb mmap (ms) | load: KenLM ARPA (ms) | query: lmkit 1 thread (tokens/s) | query: lmkit all cores (tokens/s) | query: KenLM 1 thread (tokens/s) | lmkit/KenLM 1 thread | lmkit all cores/KenLM | query peak RSS lmkit / KenLM (MiB) | Σlog10 diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[5]:.0f} | {r[6]:.2f} | {r[10]:.0f} | {r[15]:,.0f} | {r[8]:,.0f} | {r[12]:,.0f} | {r[15] / r[12]:.2f}x | {r[8] / r[12]:.2f}x | {r[9]:.0f} / {r[13]:.0f} | {r[14]:.2e} |")
    print()
    print("lmkit query time is the whole `lmkit ngram ppl` process (start, mmap load, read, tokenize, score);")
    print("KenLM query time is the scoring loop only (Model.score per sentence), after loading.")


if __name__ == "__main__":
    main()
