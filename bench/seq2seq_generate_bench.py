#!/usr/bin/env python3
"""Encoder-decoder generation speed: `lmkit generate --source-ids` next to transformers'
`generate` on the same random-initialised BartForConditionalGeneration (2+2 layers × 256, vocabulary
8192), greedy and beam search, a fixed number of new tokens (the end token ignored), same run,
alternated, medians of whole calls (lmkit: the whole process, model load included; transformers:
the generate call only, model already loaded).

usage: ~/.cache/lmkit/venv/bin/python bench/seq2seq_generate_bench.py [--tokens 200] [--rounds 5]
       [--beams 4] [--baseline OTHER_LMKIT]   # an older binary too (greedy only: --source text)
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

import torch
from transformers import BartConfig, BartForConditionalGeneration

ROOT = pathlib.Path(__file__).resolve().parents[1]


def timed(cmd):
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{cmd} failed: {p.stderr}")
    return time.perf_counter() - t0, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--baseline", help="another lmkit binary, measured greedy from --source text")
    a = ap.parse_args()
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-s2s-"))
    atexit.register(shutil.rmtree, tmp, True)  # removed when the bench ends
    subprocess.run([lm, "tokenizer", "train", "--input", ROOT / "data/en", "--vocab-size", "8192", "--output",
                    tmp / "bart"], check=True, capture_output=True)
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=8192, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                     max_position_embeddings=a.tokens + 8, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp / "bart", safe_serialization=True)
    text = "In the beginning God created the heavens and the earth."
    from tokenizers import Tokenizer
    src = Tokenizer.from_file(str(tmp / "bart" / "tokenizer.json")).encode(text).ids
    ids = ",".join(map(str, src))
    kw = dict(max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, no_repeat_ngram_size=0)
    rows = {k: [] for k in ("lmkit greedy", "transformers greedy", f"lmkit {a.beams} beams",
                            f"transformers {a.beams} beams", "baseline greedy")}
    for _ in range(a.rounds):
        for beams in (1, a.beams):
            name = "greedy" if beams == 1 else f"{a.beams} beams"
            flags = ["--greedy"] if beams == 1 else ["--num-beams", beams]
            secs, out = timed([lm, "generate", "--model", tmp / "bart", "--source-ids", ids, *flags, "--ignore-eos",
                               "--max-tokens", a.tokens, "--ids"])
            assert len(out.split()) == a.tokens, out
            rows[f"lmkit {name}"].append(secs)
            with torch.no_grad():
                t0 = time.perf_counter()
                ref = model.generate(torch.tensor([src]), num_beams=beams, **kw)
                rows[f"transformers {name}"].append(time.perf_counter() - t0)
            assert ref.shape[1] >= a.tokens
        if a.baseline:
            secs, _ = timed([a.baseline, "generate", "--model", tmp / "bart", "--source", text, "--greedy",
                             "--ignore-eos", "--max-tokens", a.tokens, "--ids"])
            rows["baseline greedy"].append(secs)
    print(f"{a.tokens} new tokens, BART 2+2 layers × 256, vocabulary 8192; {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}; medians of {a.rounds} rounds")
    print()
    print("| run | seconds | tokens/s |")
    print("|---|---|---|")
    for name, v in rows.items():
        if v:
            m = statistics.median(v)
            print(f"| {name} | {m:.3f} | {a.tokens / m:,.0f} |")
    for name in ("greedy", f"{a.beams} beams"):
        print(f"lmkit / transformers, {name}: "
              f"{statistics.median(rows[f'transformers {name}']) / statistics.median(rows[f'lmkit {name}']):.2f}x")
    if rows["baseline greedy"]:
        print(f"lmkit / baseline, greedy: "
              f"{statistics.median(rows['baseline greedy']) / statistics.median(rows['lmkit greedy']):.2f}x")


if __name__ == "__main__":
    main()
