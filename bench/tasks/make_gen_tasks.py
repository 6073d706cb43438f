#!/usr/bin/env python3
"""Makes the bundled generation and classification task set, bench/tasks/gen/, from the bundled
corpus: JSONL data (a few-shot `train` split and a `test` split) and an lm-evaluation-harness-style
YAML task for each, seeded so the files are reproducible.

- en-bible-testament: which part of the Bible a verse is from (Old or New Testament; multiple choice)
- en-bible-complete: the last three words of a verse (question answering by completion; exact match,
  SQuAD F1, chrF)
- ko-tax-article: the first statute article a tax text cites, e.g. 제104조 (extraction; regex filter)
- ko-tax-rate: the first rate a tax text states, e.g. 100분의 40 (extraction; regex filter)
- ko-bill-law: the law a National Assembly bill amends, from its stated reasons (summarising a bill
  into its subject; exact match, chrF, ROUGE-L)

usage: python3 bench/tasks/make_gen_tasks.py
then:  lmkit eval tasks --model MODEL --tasks bench/tasks/gen/*.yaml --limit 100
"""
import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "tasks" / "gen"
TRAIN, TEST = 20, 200


def write(name, train, test, yaml_text):
    (OUT / f"{name}.train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train),
                                             encoding="utf-8")
    (OUT / f"{name}.test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test),
                                            encoding="utf-8")
    head = (f"# Made by bench/tasks/make_gen_tasks.py from the bundled corpus.\ntask: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    train: {name}.train.jsonl\n    test: {name}.test.jsonl\n"
            "training_split: train\ntest_split: test\n")
    (OUT / f"{name}.yaml").write_text(head + yaml_text, encoding="utf-8")


def split(rows, rng):
    rng.shuffle(rows)
    return rows[:TRAIN], rows[TRAIN:TRAIN + TEST]


def bible(rng):
    lines = (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").splitlines()
    tobit = next(i for i, l in enumerate(lines) if l.startswith("The book of the words of Tobit"))
    matthew = next(i for i, l in enumerate(lines) if l.startswith("The book of the genealogy of Jesus Christ"))
    # Line 0 is the preface and the last line carries the glossary; the deuterocanon is left out.
    old = [l for l in lines[1:tobit] if 8 <= len(l.split()) <= 40]
    new = [l for l in lines[matthew:-1] if 8 <= len(l.split()) <= 40]
    rows = [{"verse": v, "label": 0} for v in rng.sample(old, 110)] + [{"verse": v, "label": 1} for v in rng.sample(new, 110)]
    train, test = split(rows, rng)
    write("en-bible-testament", train, test, """output_type: multiple_choice
description: "Say which part of the Bible each verse is from.\\n\\n"
doc_to_text: "Verse: {{verse}}\\nPart:"
doc_to_choice: ["Old Testament", "New Testament"]
doc_to_target: label
num_fewshot: 4
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    word = re.compile(r"^(.*\S)\s+(\S+\s+\S+\s+\S+?)[.!?;:,’”]*$")
    rows = []
    for v in rng.sample(old + new, 400):
        m = word.match(v)
        if m and re.fullmatch(r"[A-Za-z’' ]+", m.group(2)):
            rows.append({"context": m.group(1), "ending": m.group(2)})
    train, test = split(rows, rng)
    write("en-bible-complete", train, test, """output_type: generate_until
description: "Complete each Bible verse with its last three words.\\n\\n"
doc_to_text: "Verse: {{context}} ...\\nLast three words:"
doc_to_target: ending
num_fewshot: 3
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "([A-Za-z’']+(?: [A-Za-z’']+){0,2})"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
  - metric: squad_f1
  - metric: chrf
""")


def tax(rng):
    lines = [l for l in (ROOT / "data/ko/tax_rulings.txt").read_text(encoding="utf-8").splitlines() if 40 <= len(l) <= 400]
    art = re.compile(r"제\s?\d+조(?:의\d+)?")
    rows = [{"text": l, "article": art.search(l).group(0).replace(" ", "")} for l in lines if art.search(l)]
    train, test = split(rows, rng)
    write("ko-tax-article", train, test, """output_type: generate_until
description: "다음 세법 글에서 처음 인용된 조문 번호를 쓰시오.\\n\\n"
doc_to_text: "글: {{text}}\\n조문:"
doc_to_target: article
num_fewshot: 3
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
filter_list:
  - name: article
    filter:
      - function: regex
        regex_pattern: "제\\\\s?\\\\d+조(?:의\\\\d+)?"
      - function: take_first
metric_list:
  - metric: exact_match
    regexes_to_ignore: [" "]
""")
    rate = re.compile(r"100분의 \d+")
    rows = [{"text": l, "rate": rate.search(l).group(0)} for l in lines if rate.search(l)]
    train, test = split(rows, rng)
    write("ko-tax-rate", train, test, """output_type: generate_until
description: "다음 세법 글에서 처음 나오는 비율(예: 100분의 10)을 쓰시오.\\n\\n"
doc_to_text: "글: {{text}}\\n비율:"
doc_to_target: rate
num_fewshot: 3
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
filter_list:
  - name: rate
    filter:
      - function: regex
        regex_pattern: "100분의 ?\\\\d+"
      - function: take_first
metric_list:
  - metric: exact_match
    regexes_to_ignore: [" "]
""")


def bills():
    lines = (ROOT / "data/ko/law_and_bills.txt").read_text(encoding="utf-8").splitlines()
    rows = []
    for i, l in enumerate(lines):
        if not l.startswith("제안이유"):
            continue
        title = next((lines[j] for j in range(i, max(i - 15, 0), -1) if lines[j].endswith("일부개정법률안")), None)
        if not title or title == "일부개정법률안":
            continue
        body = []
        for l2 in lines[i + 1:]:
            if l2.startswith("- ") or l2.startswith("주요내용") or l2.startswith("법률 제"):
                break
            body.append(l2.strip())
        reasons = "".join(body)
        law = title.removesuffix(" 일부개정법률안")
        if reasons and all(r["law"] != law for r in rows):
            rows.append({"reasons": reasons[:600], "law": law})
    # Few bills: the few-shot examples are drawn from the same split (the harness leaves the
    # document itself out).
    (OUT / "ko-bill-law.test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
    (OUT / "ko-bill-law.yaml").write_text(f"""# Made by bench/tasks/make_gen_tasks.py from the bundled corpus ({len(rows)} bills).
task: ko-bill-law
dataset_path: json
dataset_kwargs:
  data_files:
    test: ko-bill-law.test.jsonl
test_split: test
fewshot_split: test
output_type: generate_until
description: "국회 법률안의 제안이유를 읽고 개정하려는 법률의 이름을 쓰시오.\\n\\n"
doc_to_text: "제안이유: {{{{reasons}}}}\\n법률:"
doc_to_target: law
num_fewshot: 2
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
metric_list:
  - metric: exact_match
  - metric: chrf
  - metric: rougeL
""", encoding="utf-8")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    bible(rng)
    tax(rng)
    bills()
    for p in sorted(OUT.glob("*.jsonl")):
        print(p.relative_to(ROOT), sum(1 for _ in p.open(encoding="utf-8")))


if __name__ == "__main__":
    main()
