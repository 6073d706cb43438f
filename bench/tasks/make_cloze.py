#!/usr/bin/env python3
"""Makes bench/tasks/en-bible-cloze.jsonl: 200 last-word cloze questions from the last verses of the
bundled English corpus. Context = a verse without its last word; choices = the true last word and
three other words that end verses elsewhere in the corpus (seeded, so the file is reproducible).

usage: python3 bench/tasks/make_cloze.py"""
import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
lines = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").splitlines()
rng = random.Random(0)
word = re.compile(r"^(.*\S)\s+([A-Za-z]+)([.!?;:,’”]*)$")
ends = [m.group(2) for l in lines[:-3000] if (m := word.match(l))]
pool = sorted(set(ends))
out = []
for l in lines[-3000:]:
    m = word.match(l)
    if not m or len(l.split()) < 8:
        continue
    ctx, last = m.group(1), m.group(2)
    others = set()
    while len(others) < 3:
        w = rng.choice(pool)
        if w.lower() != last.lower():
            others.add(w)
    choices = [last] + sorted(others)
    rng.shuffle(choices)
    out.append({"context": ctx, "choices": [" " + c for c in choices], "answer": choices.index(last)})
rng.shuffle(out)
dest = ROOT / "bench/tasks/en-bible-cloze.jsonl"
dest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in out[:200]), encoding="utf-8")
print(f"wrote {min(200, len(out))} examples to {dest}")
