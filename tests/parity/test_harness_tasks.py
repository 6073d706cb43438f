"""Generation tasks in lm-evaluation-harness's YAML format, and text metrics.

- prompts (few-shot draws, delimiters, descriptions, templates, choices) equal the harness's own
  rendering (lm-eval's ConfigurableTask) document for document;
- exact match, SQuAD F1, ROUGE, BLEU, chrF and chrF++ equal rouge-score, sacrebleu and the
  harness's exact_match on fixed outputs (1e-6);
- generate_until responses equal transformers' greedy generation cut at the same stop strings.
"""
import collections
import json
import re
import string

import pytest
import yaml

from test_finetune import make_base

TRAIN = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i), "words": ["zero", "one", "two"], "label": i % 3,
          "note": "대한민국은 민주공화국이다." if i % 4 == 0 else "plain", "aliases": [str(2 * i)]} for i in range(30)]
TEST = [{"question": f"What is {i} times 3?", "answer": str(3 * i), "words": ["red", "green", "blue"], "label": (i + 1) % 3,
         "note": "헌법 제1조" if i % 2 else "", "aliases": [str(3 * i), f"{3 * i}.0"]} for i in range(12)]


def write_data(tmp_path):
    for name, rows in [("train", TRAIN), ("test", TEST)]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    return {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}


def configs(files):
    base = {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}
    return {
        # random few-shot from the training split, a description, a regex filter chain
        "random": dict(base, task="random", training_split="train", output_type="generate_until",
                       description="Answer the question.\n\n", doc_to_text="Q: {{question}}\nA:", doc_to_target="answer",
                       num_fewshot=3, generation_kwargs={"until": ["\n\n", "Q:"], "max_gen_toks": 8}),
        # few-shot drawn from the evaluated split itself (the document is excluded), Korean text, filters in Jinja
        "same_split": dict(base, task="same_split", fewshot_split="test", output_type="generate_until",
                           doc_to_text="{{note|trim}} {{question|upper}} =", doc_to_target="{{answer}}", num_fewshot=4,
                           target_delimiter="", fewshot_delimiter="\n###\n"),
        # the first examples in order, per-field few-shot overrides, a list target (several references)
        "first_n": dict(base, task="first_n", training_split="train", output_type="generate_until",
                        doc_to_text="question", doc_to_target="{{aliases}}",
                        fewshot_config={"sampler": "first_n", "doc_to_target": "answer", "fewshot_delimiter": "\n"},
                        num_fewshot=2),
        # inline few-shot samples, multiple choice with an index target and a choice list from a column
        "choice": dict(base, task="choice", output_type="multiple_choice", doc_to_text="Pick a colour for {{question}}",
                       doc_to_choice="words", doc_to_target="label", num_fewshot=2,
                       fewshot_config={"samples": [{"question": "x", "words": ["a", "b", "c"], "label": 1},
                                                   {"question": "y", "words": ["d", "e", "f"], "label": 2}]}),
        # a template choice list and a many-example draw (Python's set-based sampling branch)
        "many": dict(base, task="many", training_split="train", output_type="multiple_choice",
                     doc_to_text="{{question}}", doc_to_choice="{{words}}", doc_to_target="{{label}}", num_fewshot=7),
    }


def harness_contexts(cfg, limit=None):
    from lm_eval.api.task import ConfigurableTask
    t = ConfigurableTask(config=json.loads(json.dumps(cfg)))
    t.set_fewshot_seed(1234)
    t.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc = collections.defaultdict(list)
    for inst in t.instances:
        by_doc[inst.doc_id].append(inst.args)
    return by_doc


@pytest.mark.parametrize("name", ["random", "same_split", "first_n", "choice", "many"])
def test_prompts_equal_the_harness(lmkit, tmp_path, name):
    cfg = configs(write_data(tmp_path))[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    ours = [json.loads(l) for l in lmkit("prompt", "render", "--task", path, "--json").splitlines()]
    theirs = harness_contexts(cfg)
    assert len(ours) == len(theirs) == len(TEST)
    for o in ours:
        args = theirs[o["doc_index"]]
        assert o["prompt"] == args[0][0], (name, o["doc_index"])
        if cfg["output_type"] == "multiple_choice":
            assert [" " + c for c in o["choices"]] == [a[1] for a in args]
    if name == "first_n":
        assert ours[0]["targets"] == TEST[0]["aliases"]


def test_chat_template_prompts_equal_the_harness(lmkit, tmp_path):
    """--apply-chat-template: the description as the system message, the rest as one user turn."""
    from lm_eval.api.task import ConfigurableTask
    from transformers import AutoTokenizer

    _, base = make_base(lmkit, tmp_path, kind="gpt2")
    cfg = configs(write_data(tmp_path))["random"]
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tok = AutoTokenizer.from_pretrained(base)

    def template(msgs, add_generation_prompt=True):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)

    t = ConfigurableTask(config=json.loads(json.dumps(cfg)))
    t.set_fewshot_seed(1234)
    t.build_all_requests(limit=4, apply_chat_template=True, chat_template=template)
    ours = [json.loads(l) for l in lmkit("prompt", "render", "--task", path, "--model", base, "--apply-chat-template",
                                         "--limit", 4, "--json").splitlines()]
    theirs = {i.doc_id: i.args[0] for i in t.instances}
    assert len(ours) == 4 and all(o["prompt"] == theirs[o["doc_index"]] for o in ours)
    assert all(o["tokens"] > 0 for o in ours) and "Answer the question." in ours[0]["prompt"]


def test_unsupported_settings_are_refused(tmp_path):
    import subprocess
    import os
    from conftest import ROOT
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    files = write_data(tmp_path)
    cases = {
        "process_docs": ("process_docs: !function utils.process\n", "process_docs"),
        "tag": ("doc_to_text: !function utils.text\n", "!function"),
        "metric": ("metric_list:\n  - metric: f1\n", "squad_f1"),
        "gen": ("generation_kwargs:\n  until: [x]\n  num_beams: 4\n", "num_beams"),
        "filter": ("filter_list:\n  - name: m\n    filter:\n      - function: majority_vote\n", "majority_vote"),
        "regex": ("filter_list:\n  - name: m\n    filter:\n      - function: regex\n        regex_pattern: '(?<=a)b'\n",
                  "regex_pattern"),
    }
    for key, (extra, needle) in cases.items():
        p = tmp_path / f"{key}.yaml"
        lines = [l for l in yaml.safe_dump(configs(files)["random"]).splitlines()
                 if not l.startswith(("doc_to_text", "generation_kwargs", "  until", "  max_gen_toks"))]
        p.write_text("\n".join(lines) + "\n" + ("doc_to_text: q\n" if key != "tag" else "") + extra)
        r = subprocess.run([binary, "prompt", "render", "--task", p], capture_output=True, text=True)
        assert r.returncode != 0 and needle in r.stderr and f"{key}.yaml" in r.stderr, (key, r.stderr)


# ---- metrics against the reference packages ----

PREDICTIONS = [
    ("The cat sat on the mat.", ["A cat was sitting on the mat."]),
    ("It costs $3.50, doesn't it?", ["It costs $3.50 - does it not?"]),
    ("Paris", ["paris"]),
    ("the quick brown fox jumps over the lazy dog", ["the quick brown fox jumped over the lazy dog"]),
    ("", ["nothing here"]),
    ("New York-based company's profits rose 12.5% in 2023.", ["The company, based in New York, saw profits rise 12.5%."]),
    ("대한민국은 민주공화국이다.", ["대한민국은 민주 공화국이다."]),
    ("1,000 people &amp; 3 dogs", ["1,000 people & 3 dogs"]),
]


def squad_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(pred, gold):
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def test_metrics_equal_reference_packages(lmkit, tmp_path):
    import sacrebleu
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from rouge_score import rouge_scorer

    rows = PREDICTIONS
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"prediction": p, "references": r}, ensure_ascii=False) + "\n" for p, r in rows),
                    encoding="utf-8")
    preds = [p for p, _ in rows]
    refs = [[r[0] for _, r in rows]]
    ours = json.loads(lmkit("eval", "metrics", "--input", path))
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, refs).score, abs=1e-6)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, refs).score, abs=1e-6)
    assert ours["chrf++"] == pytest.approx(sacrebleu.corpus_chrf(preds, refs, word_order=2).score, abs=1e-6)
    # rouge-score keeps only [a-z0-9]: compare on the ASCII rows (lmkit also keeps Hangul).
    ascii_rows = [(p, r) for p, r in rows if (p + r[0]).isascii()]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    path2 = tmp_path / "ascii.jsonl"
    path2.write_text("".join(json.dumps({"prediction": p, "references": r}) + "\n" for p, r in ascii_rows))
    ours_ascii = json.loads(lmkit("eval", "metrics", "--input", path2))
    for key in ["rouge1", "rouge2", "rougeL"]:
        want = sum(scorer.score(r[0], p)[key].fmeasure for p, r in ascii_rows) / len(ascii_rows)
        assert ours_ascii[key] == pytest.approx(want, abs=1e-6), key
    assert ours["squad_f1"] == pytest.approx(sum(squad_f1(p, r[0]) for p, r in rows) / len(rows), abs=1e-6)
    em = exact_match_hf_evaluate(preds, refs[0])["exact_match"]
    assert ours["exact_match"] == pytest.approx(em, abs=1e-6)
    ours_ci = json.loads(lmkit("eval", "metrics", "--input", path, "--ignore-case", "--ignore-punctuation"))
    em_ci = exact_match_hf_evaluate(preds, refs[0], ignore_case=True, ignore_punctuation=True)["exact_match"]
    assert ours_ci["exact_match"] == pytest.approx(em_ci, abs=1e-6) and em_ci > em
    # The values are not trivial: some but not all examples match.
    assert 0 < ours["bleu"] < 100 and 0 < ours["chrf"] < 100


# ---- generation against transformers ----

def test_generate_until_equals_transformers_greedy(lmkit, tmp_path):
    import torch
    from tokenizers import Tokenizer

    model, base = make_base(lmkit, tmp_path, kind="gpt2")
    files = write_data(tmp_path)
    cfg = configs(files)["random"]
    cfg["generation_kwargs"] = {"until": ["Q:", "\n\n", "\t\t\t"], "max_gen_toks": 12}
    cfg["filter_list"] = [{"name": "first-number", "filter": [{"function": "regex", "regex_pattern": r"(-?\d+)"},
                                                               {"function": "take_first"}]}]
    cfg["metric_list"] = [{"metric": "exact_match"}, {"metric": "rougeL"}, {"metric": "bleu"}]
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    details = tmp_path / "details.jsonl"
    # One example per prompt: the random model's output stays varied on short prompts.
    out = lmkit("eval", "tasks", "--model", base, "--tasks", path, "--limit", 6, "--batch-size", 4, "--num-fewshot", 1,
                "--details", details, "--output", tmp_path / "r.json")
    assert "| random | first-number | 1 | exact_match |" in out
    rows = [json.loads(l) for l in details.read_text().splitlines()]
    assert len(rows) == 6 and sum(bool(r["response"]) for r in rows) >= 3
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    for r in rows:
        ids = tok.encode(r["prompt"], add_special_tokens=False).ids
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        if eos in gen:
            gen = gen[:gen.index(eos)]
        text = tok.decode(gen, skip_special_tokens=False)
        for stop in ["Q:", "\n\n", "\t\t\t"]:
            text = text.split(stop)[0]
        assert r["response"] == text, r["doc_index"]
        m = re.findall(r"(-?\d+)", r["response"])
        assert r["filtered,first-number"] == (m[0].strip() if m else "[invalid]")
        assert r["exact_match,first-number"] == float(r["filtered,first-number"] in r["targets"])
    scores = json.loads((tmp_path / "r.json").read_text())["scores"]
    assert {s["metric"] for s in scores} == {"exact_match", "rougeL", "bleu"}
