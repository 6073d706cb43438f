#!/usr/bin/env python3
"""Training speed of each model family in lmkit next to its PyTorch equivalent, same run, same
machine: RNN (tanh) and LSTM vs torch.nn.RNN / torch.nn.LSTM, BERT masked-LM vs transformers'
BertForMaskedLM, GPT vs GPT2LMHeadModel, Llama (RMSNorm, rope, SwiGLU, grouped-query attention)
vs LlamaForCausalLM, the encoder-decoder vs BartForConditionalGeneration (on
verse → next-verse pairs of the bundled corpus; tokens = source + target). Same sizes, batch,
sequence length and optimizer (AdamW, clipping); tokens/s over the steps after the first.

usage: ~/.cache/lmkit/venv/bin/python bench/families_bench.py [--steps 8] [--batch 16] [--seq 128]
       [--lmkit-blas builtin|off|/path/to/libopenblas.so]   # LMKIT_BLAS for lmkit (builtin: no system BLAS)
       [--baseline OTHER_LMKIT [--baseline-blas VALUE]]   # also train each family with another lmkit binary, right after lmkit
       [--only rnn,lstm]          # some families: rnn, lstm, bert, gpt, llama, bart
       [--autograd-baseline]      # the baseline column: this lmkit with train.backward = "autograd"
"""
import argparse
import atexit
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
V = 8192


def run(cmd, blas=None):
    env = dict(os.environ)
    if blas is not None:
        env["LMKIT_BLAS"] = blas
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{cmd} failed: {p.stderr}")
    return p


class RecurrentLM(torch.nn.Module):
    def __init__(self, cell, hidden, layers):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, hidden)
        kind = torch.nn.LSTM if cell == "lstm" else torch.nn.RNN
        self.rnn = kind(hidden, hidden, num_layers=layers, batch_first=True)
        self.lm_head = torch.nn.Linear(hidden, V, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, x):
        out, _ = self.rnn(self.embedding(x))
        return self.lm_head(out)


MATMUL = {}


def lmkit_tps(lm, tmp, name, model_toml, data_toml, train_toml, blas=None):
    """Trains with `lmkit train` (LMKIT_BLAS=blas when given) and returns the mean (harmonic) tokens/s of the
    steps after the first."""
    out = tmp / name
    (tmp / "run.toml").write_text(f"[model]\n{model_toml}\n[data]\n{data_toml}[train]\nout_dir = \"{out}\"\n{train_toml}"
                                  "warmup_steps = 1\neval_every = 0\nsave_every = 0\nlog_every = 1\n")
    p = run([lm, "train", "--config", tmp / "run.toml"], blas)
    used = re.search(r"CPU matmul: ([^\n]*)", p.stdout + p.stderr)
    MATMUL[lm, blas] = used.group(1).strip() if used else "?"
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_sec"] for r in recs if "tokens_per_sec" in r][1:]
    return len(tps) / sum(1 / t for t in tps)


def torch_tps(model, loss_fn, batch, seq, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.randint(5, V, (batch, seq + 1))

    def step():
        loss = loss_fn(model, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq / (time.perf_counter() - t0)


def causal_loss(model, data):
    logits = model(data[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), data[:, 1:].reshape(-1))


def mlm_loss(model, data):
    x = data[:, :-1].clone()
    pick = torch.rand(x.shape) < 0.15
    labels = torch.where(pick, x, torch.full_like(x, -100))
    x[pick & (torch.rand(x.shape) < 0.8)] = 2
    return model(input_ids=x, labels=labels).loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--baseline", help="another lmkit binary (e.g. built from an earlier commit) measured alongside")
    ap.add_argument("--lmkit-blas", help="LMKIT_BLAS for lmkit's runs: `builtin` (the product lmkit has without a "
                    "system BLAS), `off` (candle's), or a library path; default: lmkit's own pick")
    ap.add_argument("--baseline-blas", help="LMKIT_BLAS for the baseline's runs (as --lmkit-blas)")
    ap.add_argument("--only", help="comma-separated families to measure: rnn, lstm, bert, gpt, llama, bart (default: all)")
    ap.add_argument("--autograd-baseline", action="store_true",
                    help="baseline column: this lmkit through the autograd graph (train.backward = \"autograd\")")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else {"rnn", "lstm", "bert", "gpt", "llama", "bart"}
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target/release/lmkit"))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lmkit-families-"))
    # Its checkpoints, shards and tokenizers take hundreds of MB: removed when the bench ends.
    atexit.register(shutil.rmtree, tmp, True)
    run([lm, "tokenizer", "train", "--input", ROOT / "data/en", "--vocab-size", V, "--output", tmp / "tok"])
    run([lm, "tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", ROOT / "data/en", "--shards", tmp / "shards"])
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    families = [
        ("RNN (tanh), 2×256", 'model_type = "lmkit_rnn"\ncell = "rnn"\nhidden_size = 256\nnum_layers = 2\ntie_word_embeddings = true\n',
         lambda: RecurrentLM("rnn", 256, 2), causal_loss),
        ("LSTM, 2×256", 'model_type = "lmkit_rnn"\ncell = "lstm"\nhidden_size = 256\nnum_layers = 2\ntie_word_embeddings = true\n',
         lambda: RecurrentLM("lstm", 256, 2), causal_loss),
        ("BERT masked LM, 4 layers × 256", 'model_type = "bert"\nhidden_size = 256\nnum_hidden_layers = 4\nnum_attention_heads = 4\n'
         f'intermediate_size = 1024\nmax_position_embeddings = {a.seq}\n',
         lambda: BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                            intermediate_size=1024, max_position_embeddings=a.seq,
                                            hidden_dropout_prob=0, attention_probs_dropout_prob=0)), mlm_loss),
        ("GPT, 4 layers × 256", f'model_type = "gpt2"\nn_positions = {a.seq}\nn_embd = 256\nn_layer = 4\nn_head = 4\n',
         lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=a.seq, n_embd=256, n_layer=4, n_head=4,
                                            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
         lambda m, d: m(d[:, :-1], labels=d[:, :-1]).loss),
        ("Llama, 4 layers × 256, 4 heads sharing 2 key/value heads",
         f'model_type = "llama"\nhidden_size = 256\nintermediate_size = 688\nnum_hidden_layers = 4\n'
         f'num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = {a.seq}\ntie_word_embeddings = true\n',
         lambda: LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=a.seq, tie_word_embeddings=True)),
         lambda m, d: m(d[:, :-1], labels=d[:, :-1]).loss),
    ]
    rows = []
    # Encoder-decoder: verse -> next verse, at most 64 tokens a side.
    from tokenizers import Tokenizer
    from transformers import BartConfig, BartForConditionalGeneration
    verses = [l for l in (ROOT / "data/en/web_bible.txt").read_text(encoding="utf-8").splitlines()[1:] if l.strip()][:4000]
    with open(tmp / "pairs.jsonl", "w") as f:
        for a_, b_ in zip(verses, verses[1:]):
            f.write(json.dumps({"source": a_, "target": b_}) + "\n")
    tok = Tokenizer.from_file(str(tmp / "tok/tokenizer.json"))
    enc = [(tok.encode(a_).ids[:64], tok.encode(b_).ids[:63]) for a_, b_ in zip(verses, verses[1:])]
    bart_toml = ('model_type = "bart"\nd_model = 256\nencoder_layers = 2\ndecoder_layers = 2\nencoder_attention_heads = 4\n'
                 'decoder_attention_heads = 4\nencoder_ffn_dim = 1024\ndecoder_ffn_dim = 1024\nmax_position_embeddings = 64\n')
    bart_args = (bart_toml, f"train = \"{tmp}/pairs.jsonl\"\ntokenizer = \"{tmp}/tok\"\n",
                 f"batch_size = {a.batch}\nmax_steps = {a.steps + 1}\n")
    with_bart = "bart" in only
    bart_lm = lmkit_tps(lm, tmp, "bart", *bart_args, blas=a.lmkit_blas) if with_bart else None
    bart_base = (lmkit_tps(a.baseline, tmp, "bart-base", *bart_args, blas=a.baseline_blas)
                 if a.baseline and with_bart else None)
    if a.autograd_baseline and with_bart:
        bart_base = lmkit_tps(lm, tmp, "bart-graph", *bart_args[:2], bart_args[2] + 'backward = "autograd"\n')
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=V, d_model=256, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=64,
                                                   dropout=0, attention_dropout=0, activation_dropout=0, pad_token_id=1))
    opt = torch.optim.AdamW(bart.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def bart_step():
        pick = [enc[i] for i in torch.randint(0, len(enc), (a.batch,), generator=gen).tolist()]
        s = max(len(p[0]) for p in pick)
        t_ = max(len(p[1]) + 1 for p in pick)
        src = torch.tensor([p[0] + [1] * (s - len(p[0])) for p in pick])
        lab = torch.tensor([p[1] + [2] + [-100] * (t_ - len(p[1]) - 1) for p in pick])
        loss = bart(input_ids=src, attention_mask=(src != 1).long(), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bart.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(p[0]) + len(p[1]) + 1 for p in pick)

    if with_bart:
        bart_step()
        t0 = time.perf_counter()
        n_tok = sum(bart_step() for _ in range(a.steps))
        bart_pt = n_tok / (time.perf_counter() - t0)
    for name, model_toml, make, loss_fn in families:
        if name.split()[0].lower().rstrip(",") not in only:
            continue
        args = (model_toml, f"train = \"{tmp}/shards\"\ntokenizer = \"{tmp}/tok\"\n",
                f"seq_len = {a.seq}\nbatch_size = {a.batch}\nmax_steps = {a.steps + 1}\n")
        lm_tps = lmkit_tps(lm, tmp, name.split()[0].lower(), *args, blas=a.lmkit_blas)
        base = (lmkit_tps(a.baseline, tmp, name.split()[0].lower() + "-base", *args, blas=a.baseline_blas)
                if a.baseline else None)
        if a.autograd_baseline:
            base = lmkit_tps(lm, tmp, name.split()[0].lower() + "-graph", *args[:2], args[2] + 'backward = "autograd"\n')
        torch.manual_seed(0)
        pt = torch_tps(make(), loss_fn, a.batch, a.seq, a.steps)
        rows.append((name, lm_tps, pt, base))
    print(f"batch {a.batch}, sequence {a.seq}, vocab {V}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"lmkit's matrix products: {MATMUL.get((lm, a.lmkit_blas))}"
          + (f"; the baseline's: {MATMUL.get((a.baseline, a.baseline_blas))}" if a.baseline else ""))
    print()
    if with_bart:
        rows.append(("encoder-decoder (BART layout), 2+2 layers × 256", bart_lm, bart_pt, bart_base))
    if a.baseline or a.autograd_baseline:
        print("baseline:", a.baseline or 'this lmkit with train.backward = "autograd"')
        print("| family | lmkit tokens/s | PyTorch tokens/s | lmkit/PyTorch | baseline lmkit tokens/s | lmkit/baseline |")
        print("|---|---|---|---|---|---|")
        for name, l, p, b in rows:
            print(f"| {name} | {l:,.0f} | {p:,.0f} | {l / p:.2f}x | {b:,.0f} | {l / b:.2f}x |")
    else:
        print("| family | lmkit tokens/s | PyTorch tokens/s | lmkit/PyTorch |")
        print("|---|---|---|---|")
        for name, l, p, _ in rows:
            print(f"| {name} | {l:,.0f} | {p:,.0f} | {l / p:.2f}x |")


if __name__ == "__main__":
    main()
