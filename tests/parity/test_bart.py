"""The encoder-decoder Transformer against transformers: a random-initialised
BartForConditionalGeneration saved with save_pretrained gives the same decoder logits in lmkit."""
import json

import numpy as np
import torch
from transformers import BartConfig, BartForConditionalGeneration

ATOL = 1e-4


def build(tmp_path):
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=301, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                     dropout=0, attention_dropout=0, activation_dropout=0, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2)
    model = BartForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape) * 0.1)
    model.eval().save_pretrained(tmp_path / "bart", safe_serialization=True)
    return model, tmp_path / "bart"


def test_bart_logits_match(lmkit, tmp_path):
    model, path = build(tmp_path)
    g = torch.Generator().manual_seed(5)
    src = [int(x) for x in torch.randint(3, 301, (13,), generator=g)]
    tgt = [2] + [int(x) for x in torch.randint(3, 301, (9,), generator=g)]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt])).logits[0].numpy()
    got = np.array(json.loads(lmkit("model", "logits", "--model", path, "--source-ids", ",".join(map(str, src)),
                                    "--ids", ",".join(map(str, tgt)))), dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()


def test_lmkit_trained_seq2seq_loads_in_transformers_and_generates_the_same(lmkit, tiny_model, tmp_path):
    import random
    random.seed(0)
    words = "the cat dog sat on mat log".split()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(200):
            s = " ".join(random.choice(words) for _ in range(random.randint(2, 5)))
            f.write(json.dumps({"source": s, "target": " ".join(reversed(s.split()))}) + "\n")
    tmp = tiny_model["tmp"]
    (tmp_path / "run.toml").write_text(
        '[model]\nmodel_type = "bart"\nd_model = 32\nencoder_layers = 1\ndecoder_layers = 1\n'
        'encoder_attention_heads = 2\ndecoder_attention_heads = 2\nencoder_ffn_dim = 64\ndecoder_ffn_dim = 64\n'
        'max_position_embeddings = 32\n'
        f'[data]\ntrain = "{tmp_path}/pairs.jsonl"\ntokenizer = "{tmp}/tok"\nval_fraction = 0.1\n'
        f'[train]\nout_dir = "{tmp_path}/out"\nbatch_size = 16\nmax_steps = 60\nwarmup_steps = 5\nlr = 0.003\n'
        'eval_every = 60\neval_batches = 2\nsave_every = 60\nlog_every = 10\n')
    lmkit("train", "--config", tmp_path / "run.toml")
    recs = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    assert losses[-1] < losses[0], losses
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    hf = BartForConditionalGeneration.from_pretrained(ckpt).eval()
    src, tgt = [5, 9, 12, 7], [hf.config.decoder_start_token_id, 9, 5, 3]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt])).logits[0].numpy()
    got = np.array(json.loads(lmkit("model", "logits", "--model", tmp_path / "out", "--source-ids", "5,9,12,7",
                                    "--ids", ",".join(map(str, tgt)))), dtype=np.float32)
    assert np.abs(got - want).max() < ATOL
    # Greedy generation from a source text: the same ids as transformers' generate.
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("the cat sat on the mat").ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, num_beams=1, max_new_tokens=8, min_new_tokens=8,
                          eos_token_id=None, forced_bos_token_id=None, forced_eos_token_id=None)[0, 1:].tolist()
    out = lmkit("generate", "--model", tmp_path / "out", "--source", "the cat sat on the mat", "--greedy", "--ids",
                "--ignore-eos", "--max-tokens", "8")
    assert [int(x) for x in out.split()] == ref


def test_seq2seq_eval_matches_transformers(lmkit, tiny_model, tmp_path):
    model, path = build(tmp_path)
    import shutil
    ckpt = tiny_model["dir"] / (tiny_model["dir"] / "latest").read_text().strip()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, path / f)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    pairs = [{"source": "the cat sat", "target": "on the mat"}, {"source": "a dog", "target": "the log"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    got = json.loads(lmkit("eval", "ppl", "--model", path, "--input", tmp_path / "p.jsonl", "--json"))
    nll, n = 0.0, 0
    for p in pairs:
        src, tgt = tok.encode(p["source"]).ids, tok.encode(p["target"]).ids + [2]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([src]),
                                         decoder_input_ids=torch.tensor([[2] + tgt[:-1]])).logits[0].double(), -1)
        nll -= sum(lp[i, t].item() for i, t in enumerate(tgt))
        n += len(tgt)
    assert got["tokens"] == n
    assert abs(got["nll"] - nll) < 1e-3
    assert got["bytes"] == sum(len(p["target"]) + 1 for p in pairs)


def test_beam_search_matches_transformers(lmkit, tmp_path):
    """Beam search with the decoder's KV cache: the same best hypothesis as transformers'
    generate(num_beams=...) for 2, 3 and 4 beams, length penalties 0.5/1/2, early stopping
    false/true/never, with the end token's bias at 0, 1.5 and 3 (hypotheses that run to the length
    limit, end at once, or where finished and running ones compete)."""
    model, path = build(tmp_path)
    with torch.no_grad():
        model.model.shared.weight.mul_(15.0)  # peaked distributions: beams part by clear margins
    cases = [(nb, lp, es) for nb in (2, 3, 4) for lp, es in ((1.0, False), (0.5, True), (2.0, "never"), (1.0, True))]
    g = torch.Generator().manual_seed(11)
    kw = dict(max_new_tokens=12, do_sample=False, forced_bos_token_id=None, forced_eos_token_id=None,
              no_repeat_ngram_size=0, min_length=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2)
    lengths, beats_greedy = set(), 0
    for eos_bias in (0.0, 1.5, 3.0):
        with torch.no_grad():
            model.final_logits_bias[0, 2] = eos_bias
        model.save_pretrained(path, safe_serialization=True)
        for nb, lp, es in cases:
            src = [int(x) for x in torch.randint(3, 301, (9,), generator=g)]
            with torch.no_grad():
                ref = model.generate(torch.tensor([src]), num_beams=nb, length_penalty=lp, early_stopping=es,
                                     **kw)[0, 1:].tolist()
                greedy = model.generate(torch.tensor([src]), num_beams=1, **kw)[0, 1:].tolist()
            lengths.add(len(ref))
            beats_greedy += ref != greedy
            if ref and ref[-1] == 2:
                ref = ref[:-1]
            out = lmkit("generate", "--model", path, "--source-ids", ",".join(map(str, src)), "--num-beams", nb,
                        "--length-penalty", lp, "--early-stopping", str(es).lower(), "--max-tokens", 12, "--ids")
            assert [int(x) for x in out.split()] == ref, (nb, lp, es, eos_bias)
    # The cases exercise what they claim: beams that beat greedy, hypotheses of several lengths.
    assert beats_greedy >= 12 and len(lengths) >= 2, (beats_greedy, lengths)
