"""How good are the HNSW graphs themselves, apart from the speed of the code that walks them:
builds lmkit's graph (through the `ann_bench` example) and hnswlib's on the same vectors, reads
both back, and walks each with one and the same search written here (greedy descent through the
upper layers, then the layer-0 walk with `ef` candidates, as hnswlib's searchKnn and lmkit's
Graph::search do). Prints, per ef, recall@k against exact search and the distances computed per
query on each graph: equal counts at equal recall mean the graphs are equally good and any QPS
gap in bench/ann_bench.py is the walking code's.

    ~/.cache/lmkit/venv/bin/python bench/ann_graph_compare.py [--data random|INDEX_DIR] [--n 20000]
        [--queries 1000] [--m 16] [--ef-construction 200] [--efs 16,64]
"""
import argparse
import heapq
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

import ann_bench

NONE = 0xFFFFFFFF


def lmkit_links(path):
    """Neighbour lists of lmkit's graph file (hnsw.rs: header, levels, upper-list starts, layer-0
    lists of 2·m slots, upper lists of m)."""
    w = np.fromfile(path, dtype="<u4")
    n, m, m0, entry, top, _ = (int(x) for x in w[2:8])
    levels, starts = w[8:8 + n], w[8 + n:8 + 2 * n]
    base0 = 8 + 2 * n
    layer0 = w[base0:base0 + n * m0].reshape(n, m0)
    upper = w[base0 + n * m0:]

    def links(i, level):
        if level == 0:
            row = layer0[i]
        elif level > levels[i]:
            return []
        else:
            s = int(starts[i]) + (level - 1) * m
            row = upper[s:s + m]
        return [int(x) for x in row if x != NONE]

    return links, entry, top, None


def hnswlib_links(path):
    """Neighbour lists of an hnswlib saved index (hnswalg.h saveIndex), and each internal id's label."""
    raw = open(path, "rb").read()
    at = 0

    def read(fmt):
        nonlocal at
        v = struct.unpack_from(fmt, raw, at)[0]
        at += struct.calcsize(fmt)
        return v

    off0, max_el, count, size, label_off, _ = (read("<Q") for _ in range(6))
    top, entry = read("<i"), read("<I")
    max_m, _max_m0, _m, _mult, _efc = read("<Q"), read("<Q"), read("<Q"), read("<d"), read("<Q")
    level0 = raw[at:at + max_el * size]
    at += max_el * size
    upper = []
    for _ in range(count):
        s = read("<I")
        upper.append(raw[at:at + s])
        at += s
    labels = [struct.unpack_from("<Q", level0, i * size + label_off)[0] for i in range(count)]
    per = max_m * 4 + 4

    def links(i, level):
        if level == 0:
            c = struct.unpack_from("<I", level0, i * size + off0)[0]
            return list(struct.unpack_from(f"<{c}I", level0, i * size + off0 + 4))
        u = upper[i]
        if (level - 1) * per >= len(u):
            return []
        c = struct.unpack_from("<I", u, (level - 1) * per)[0]
        return list(struct.unpack_from(f"<{c}I", u, (level - 1) * per + 4))

    return links, entry, top, labels


def walk(base, links, entry, top, q, ef, k):
    """The k nearest ids found and the distances computed."""
    count = 0

    def dist(i):
        nonlocal count
        count += 1
        return 1.0 - float(base[i] @ q)

    cur, cd = entry, dist(entry)
    for level in range(top, 0, -1):
        moved = True
        while moved:
            moved = False
            for j in links(cur, level):
                dj = dist(j)
                if dj < cd:
                    cur, cd, moved = j, dj, True
    seen, cand, res = {cur}, [(cd, cur)], [(-cd, cur)]
    while cand:
        c, ci = heapq.heappop(cand)
        if len(res) >= ef and c > -res[0][0]:
            break
        for j in links(ci, 0):
            if j in seen:
                continue
            seen.add(j)
            dj = dist(j)
            if len(res) < ef or dj < -res[0][0]:
                heapq.heappush(cand, (dj, j))
                heapq.heappush(res, (-dj, j))
                if len(res) > ef:
                    heapq.heappop(res)
    return [i for _, i in sorted((-a, i) for a, i in res)[:k]], count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="random")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", default="16,64")
    args = ap.parse_args()
    import faiss
    import hnswlib

    base, queries = ann_bench.load(args)
    args.dim = base.shape[1]
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    _, truth = flat.search(queries, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        files = [f"{tmp}/base.f32", f"{tmp}/queries.f32", f"{tmp}/truth.u32"]
        base.astype("<f4").tofile(files[0])
        queries.astype("<f4").tofile(files[1])
        truth.astype("<u4").tofile(files[2])
        subprocess.run([ann_bench.build_example(), *files, str(args.dim), str(args.k), str(args.m),
                        str(args.ef_construction), str(args.k)],
                       env=dict(os.environ, LMKIT_ANN_GRAPH=f"{tmp}/lmkit.graph"), check=True,
                       capture_output=True)
        ix = hnswlib.Index(space="ip", dim=args.dim)
        ix.init_index(max_elements=len(base), M=args.m, ef_construction=args.ef_construction, random_seed=0)
        ix.add_items(base, num_threads=os.cpu_count())
        ix.save_index(f"{tmp}/hnswlib.bin")
        graphs = {"lmkit": lmkit_links(f"{tmp}/lmkit.graph"), "hnswlib": hnswlib_links(f"{tmp}/hnswlib.bin")}
    print(f"{len(base)} vectors of {args.dim} dims ({args.data}), {len(queries)} queries, k={args.k}, "
          f"M={args.m}, ef_construction={args.ef_construction}; one walk over each graph\n")
    print("| graph | ef | recall | distances per query |\n|---|---|---|---|")
    for ef in (int(e) for e in args.efs.split(",")):
        for name, (links, entry, top, labels) in graphs.items():
            hits = total = 0
            for q, t in zip(queries, truth):
                ids, c = walk(base, links, entry, top, q, max(ef, args.k), args.k)
                if labels is not None:
                    ids = [labels[i] for i in ids]
                hits += len(set(ids) & set(t.tolist()))
                total += c
            print(f"| {name} | {ef} | {hits / (len(queries) * args.k):.4f} | {total / len(queries):.1f} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
