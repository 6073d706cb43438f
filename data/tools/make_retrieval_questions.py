"""Builds a retrieval question set from the bundled corpus (English and Korean) for
`lmkit eval retrieval`: each question is a sentence of the corpus with a third of its words
dropped (seeded), and its answer is the line it came from ({"question", "source", "lines", "lang"}).
It is known-item retrieval in the spirit of the inverse cloze task (Lee et al. 2019): the words
left overlap the passage, but not all of them, so dense and keyword search can be compared.

    python3 data/tools/make_retrieval_questions.py [--per-language 150] [--seed 0] --output questions.jsonl
"""
import argparse
import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = {"en": ["data/en/web_bible.txt"], "ko": ["data/ko/law_and_bills.txt", "data/ko/tax_rulings.txt"]}
MIN_WORDS = {"en": 10, "ko": 6}


def sentences(line):
    return [s.strip() for s in re.split(r"(?<=[.!?。])\s+", line) if s.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-language", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for lang, files in SOURCES.items():
        pool = []
        for f in files:
            lines = (ROOT / f).read_text(encoding="utf-8").split("\n")
            counts = {}
            for line in lines:
                counts[line.strip()] = counts.get(line.strip(), 0) + 1
            for n, line in enumerate(lines, 1):
                if counts[line.strip()] > 1:
                    continue  # a repeated line has no single answer
                for s in sentences(line):
                    if len(s.split()) >= MIN_WORDS[lang]:
                        pool.append((f, n, s))
        for f, n, s in rng.sample(pool, min(args.per_language, len(pool))):
            words = s.split()
            keep = sorted(rng.sample(range(len(words)), max(3, round(len(words) * 2 / 3))))
            rows.append({"question": " ".join(words[i] for i in keep), "source": f, "lines": [n, n], "lang": lang})
    out = pathlib.Path(args.output)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{out}: {len(rows)} questions")


if __name__ == "__main__":
    main()
