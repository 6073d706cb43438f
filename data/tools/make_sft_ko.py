"""Builds a small Korean instruction set from the bundled tax rulings (data/ko/tax_rulings.txt) for
the fine-tuning example: each row asks for the article references (제N조, 제N조제M항, ...) in one
sentence of a ruling, and the answer lists them in order, or says there are none. Writes chat JSONL
(`{"messages": [...]}`) with a seeded held-out split.

    python3 data/tools/make_sft_ko.py --out runs/sft-ko [--train 400] [--test 60] [--seed 0]

The answers come from a regular expression over the sentence, so the task can be scored exactly
(`score` below): `python3 data/tools/make_sft_ko.py --score runs/sft-ko/test.jsonl ANSWERS.jsonl`.
"""
import argparse
import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
REF = re.compile(r"제\d+조(?:의\s?\d+)?(?:\s?제\d+항)?(?:\s?제\d+호)?")
QUESTION = "다음 문장에 나오는 조항 번호를 순서대로 모두 쓰세요. 없으면 '없음'이라고 쓰세요.\n\n"


def answer(sentence):
    refs = REF.findall(sentence)
    return ", ".join(refs) if refs else "없음"


def rows(lines, rng, n):
    with_refs = [s for s in lines if REF.search(s)]
    without = [s for s in lines if not REF.search(s)]
    picked = rng.sample(with_refs, min(len(with_refs), n * 2 // 3))
    picked += rng.sample(without, min(len(without), n - len(picked)))
    rng.shuffle(picked)
    return [{"messages": [{"role": "user", "content": QUESTION + s},
                          {"role": "assistant", "content": answer(s)}]} for s in picked]


def score(test_path, answers_path):
    """Exact-match accuracy of answers (JSONL with `answer`) against the test rows."""
    want = [json.loads(l)["messages"][-1]["content"] for l in open(test_path, encoding="utf-8")]
    got = [json.loads(l)["answer"].strip() for l in open(answers_path, encoding="utf-8")]
    return sum(w == g for w, g in zip(want, got)) / len(want)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", nargs=2, metavar=("TEST", "ANSWERS"))
    a = ap.parse_args()
    if a.score:
        print(f"exact match: {score(*a.score):.3f}")
        return
    text = (ROOT / "data/ko/tax_rulings.txt").read_text(encoding="utf-8")
    # Sentences of 20-90 characters (the rulings separate clauses with two spaces).
    lines = sorted({s.strip() for line in text.splitlines() for s in line.split("  ") if 20 <= len(s.strip()) <= 90})
    rng = random.Random(a.seed)
    rng.shuffle(lines)
    cut = len(lines) * 4 // 5
    train, test = rows(lines[:cut], rng, a.train), rows(lines[cut:], rng, a.test)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rs in [("train.jsonl", train), ("test.jsonl", test)]:
        (a.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(test)} test rows to {a.out}")


if __name__ == "__main__":
    main()
