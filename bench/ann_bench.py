"""Approximate nearest-neighbour search: lmkit's HNSW vs hnswlib and faiss (IndexHNSWFlat, and
IndexFlatIP as the exact reference) at equal M / ef_construction / ef on the same unit vectors
(inner product = cosine). Prints, per ef, recall@k against exact search and single-thread
queries/s for each (the fastest of three passes over the queries) (medians over rounds, the libraries alternating), build time on all threads,
and lmkit's QPS over hnswlib's at equal ef.

Data: `--data random` (Gaussian vectors of --dim dimensions, normalised) or `--data INDEX_DIR`
(the vectors of an `lmkit index build` output; the last --queries rows become the queries).

    ~/.cache/lmkit/venv/bin/python bench/ann_bench.py [--n 100000] [--dim 384] [--queries 1000]
        [--m 16] [--ef-construction 200] [--efs 16,32,64,128] [--rounds 2] [--data random|INDEX_DIR]
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_example():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "lmkit-rag", "--example", "ann_bench"],
                   cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(pathlib.Path(target) / "release" / "examples" / "ann_bench")


def load(args):
    rng = np.random.default_rng(0)
    if args.data == "random":
        x = rng.standard_normal((args.n + args.queries, args.dim), dtype=np.float32)
    else:
        d = pathlib.Path(args.data)
        m = json.loads((d / "manifest.json").read_text())
        x = np.fromfile(d / "vectors.f32", dtype="<f4").reshape(m["count"], m["model"]["dim"])
        x = x[rng.permutation(len(x))]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[:-args.queries]), np.ascontiguousarray(x[-args.queries:])


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run_lmkit(exe, files, args):
    out = subprocess.run([exe, *files, str(args.dim), str(args.k), str(args.m), str(args.ef_construction), args.efs],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(l) for l in out.splitlines()]
    return rows[0]["build_s"], {r["ef"]: (r["recall"], r["qps"]) for r in rows}


def run_hnswlib(base, queries, truth, args, efs):
    import hnswlib
    ix = hnswlib.Index(space="ip", dim=args.dim)
    t = time.perf_counter()
    ix.init_index(max_elements=len(base), M=args.m, ef_construction=args.ef_construction, random_seed=0)
    ix.add_items(base, num_threads=os.cpu_count())
    build = time.perf_counter() - t
    res = {}
    for ef in efs:
        ix.set_ef(ef)
        s = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            labels, _ = ix.knn_query(queries, k=args.k, num_threads=1)
            s = min(s, time.perf_counter() - t)
        res[ef] = (recall(labels, truth), len(queries) / s)
    return build, res


def run_faiss(base, queries, truth, args, efs):
    import faiss
    faiss.omp_set_num_threads(os.cpu_count())
    ix = faiss.IndexHNSWFlat(args.dim, args.m, faiss.METRIC_INNER_PRODUCT)
    ix.hnsw.efConstruction = args.ef_construction
    t = time.perf_counter()
    ix.add(base)
    build = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    res = {}
    for ef in efs:
        ix.hnsw.efSearch = ef
        s = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            _, labels = ix.search(queries, args.k)
            s = min(s, time.perf_counter() - t)
        res[ef] = (recall(labels, truth), len(queries) / s)
    return build, res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", default="16,32,64,128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default="random")
    args = ap.parse_args()
    import faiss

    exe = build_example()
    base, queries = load(args)
    args.dim = base.shape[1]
    efs = [int(e) for e in args.efs.split(",")]
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    _, truth = flat.search(queries, args.k)
    flat_qps = len(queries) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        files = [f"{tmp}/base.f32", f"{tmp}/queries.f32", f"{tmp}/truth.u32"]
        base.astype("<f4").tofile(files[0])
        queries.astype("<f4").tofile(files[1])
        truth.astype("<u4").tofile(files[2])
        runs = {"lmkit": [], "hnswlib": [], "faiss-hnsw": []}
        for r in range(args.rounds):
            for name in runs:
                if name == "lmkit":
                    runs[name].append(run_lmkit(exe, files, args))
                elif name == "hnswlib":
                    runs[name].append(run_hnswlib(base, queries, truth, args, efs))
                else:
                    runs[name].append(run_faiss(base, queries, truth, args, efs))
                print(f"round {r + 1}: {name} built in {runs[name][-1][0]:.1f} s", file=sys.stderr)
    print(f"\n{len(base)} vectors of {args.dim} dims ({args.data}), {len(queries)} queries, k={args.k}, "
          f"M={args.m}, ef_construction={args.ef_construction}; {args.rounds} rounds, medians; "
          f"build on {os.cpu_count()} threads, queries on 1")
    print(f"faiss IndexFlatIP (exact): {flat_qps:.0f} queries/s")
    print("\n| library | build s | " + " | ".join(f"ef={e} recall / QPS" for e in efs) + " |")
    print("|---|---|" + "---|" * len(efs))
    med = {}
    for name, rs in runs.items():
        build = statistics.median(b for b, _ in rs)
        cells = []
        for e in efs:
            rec = statistics.median(res[e][0] for _, res in rs)
            qps = statistics.median(res[e][1] for _, res in rs)
            med[(name, e)] = (rec, qps)
            cells.append(f"{rec:.4f} / {qps:.0f}")
        print(f"| {name} | {build:.1f} | " + " | ".join(cells) + " |")
    print("\nlmkit QPS / hnswlib QPS at equal ef: " +
          ", ".join(f"ef={e}: {med[('lmkit', e)][1] / med[('hnswlib', e)][1]:.2f}x" for e in efs))
    print("lmkit recall − hnswlib recall: " +
          ", ".join(f"ef={e}: {med[('lmkit', e)][0] - med[('hnswlib', e)][0]:+.4f}" for e in efs))


if __name__ == "__main__":
    main()
